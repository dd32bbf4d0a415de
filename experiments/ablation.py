"""Text-only versus KG-joined pretraining at equal compute, evaluated side by side.

Every arm pretrains on the same prepared dataset, for the same steps, global batch and sequence
length (so the same tokens), with the same model (same active parameters; entity fusion adds its
tables and projections, reported), then is evaluated the same way. An arm is a knowledge mode plus
optional `model.knowledge` overrides joined by "+": `none`, `inject`, `fusion`,
`fusion+triple_source=kg`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from data_prep.output import atomic_write
from sparsexpert.data.format import MANIFEST, is_dataset
from sparsexpert.metrics import log_results
from sparsexpert.weights import checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSEXPERT_SHARED_DATA", REPO.parent / "shared" / "data"))


_PORTS: set[int] = set()
_PORTS_LOCK = threading.Lock()


def _free_port() -> int:
    """A free port no other job of this process was given (jobs may start side by side)."""
    with _PORTS_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _PORTS:
                _PORTS.add(port)
                return port


def run_jobs(jobs: list, parallel: int) -> list:
    """Call each job (a function of no arguments) and return their results in order: `parallel` at a
    time (each starts its own processes; 1: one after the other). After a failure no other job starts;
    it is raised once the jobs running beside it have ended."""
    if parallel <= 1:
        return [job() for job in jobs]
    failed = threading.Event()

    def guarded(job):
        def run():
            if failed.is_set():
                return None  # not started: a job failed
            try:
                return job()
            except BaseException:
                failed.set()
                raise

        return run

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(guarded(job)) for job in jobs]
    return [f.result() for f in futures]  # the first failure, in job order, is raised


def arm_overrides(arm: str) -> list[str]:
    mode, *extra = arm.split("+")
    out = [f"--model.knowledge.mode={mode}"]
    for item in extra:
        if "=" not in item:
            raise ValueError(f"arm {arm!r}: {item!r} is not key=value (e.g. fusion+triple_source=kg)")
        out.append(f"--model.knowledge.{item}")
    return out


def prepare_corpus(corpus: str, out: Path, seq_len: int, log=print) -> dict[str, Any]:
    """The dataset and what evaluates it: {"data": dir, "eval_args": [...]}."""
    from data_prep.pipeline import PrepConfig, prepare, prepare_example

    data = out / "data"
    if corpus == "world":
        if not is_dataset(data):
            prepare_example(data, PrepConfig(seq_len=seq_len), log=log)
        return {"data": data, "eval_args": ["--probe_world", str(out / "data_raw")]}
    if corpus == "news-nations":
        nations = SHARED / "kg" / "nations"
        if not is_dataset(data):
            cfg = PrepConfig(
                corpus=[str(SHARED / "news" / "lee_background.txt")],
                kg=str(nations / "train.tsv"),
                aliases=str(REPO / "data_prep" / "examples" / "nations_aliases.tsv"),
                case="exact",
                output=str(data),
                vocab_size=2000,
                seq_len=seq_len,
            )
            prepare(cfg, log=log)
        link = ["--link_test", str(nations / "test.tsv"), "--link_known"]
        return {"data": data, "eval_args": [*link, str(nations / "train.tsv"), str(nations / "valid.tsv")]}
    if corpus == "rebel":
        from experiments.linked_split import GROUPS, split_linked_text

        split = out / "split"
        valid_fraction = 0.1
        if not (split / "split.json").is_file():
            counts = split_linked_text(
                SHARED / "rebel" / "rebel_sample.jsonl", split, valid_fraction=valid_fraction
            )
            log(f"ablation: held out of the linked text: {json.dumps(counts)}")
        if not is_dataset(data):
            # one file is the corpus, the KG (less the held-out facts) and the aliases
            corpus_file = str(split / "corpus.jsonl")
            cfg = PrepConfig(
                corpus=[corpus_file],
                kg=corpus_file,
                output=str(data),
                vocab_size=4000,
                seq_len=seq_len,
                valid_fraction=valid_fraction,
            )
            prepare(cfg, log=log)
        known = str(split / "known.tsv")
        probe = ["--probe_facts", *(str(split / f"{g}.tsv") for g in GROUPS), "--probe_known", known]
        link = ["--link_test", str(split / "heldout.tsv"), "--link_known", known]
        return {"data": data, "eval_args": [*probe, *link, "--max_candidates", "100"]}
    raise ValueError(f"--corpus {corpus!r}: use 'world', 'news-nations' or 'rebel'")


def mean_tokens_per_s(run: Path) -> float:
    """Mean of the training tokens/s a run logged (metrics.jsonl)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return sum(tps) / max(len(tps), 1)


def _launch(nproc: int, script: str, args: list[str], log_file: Path) -> None:
    """Run an entry point (`script`, relative to the checkout) on `nproc` processes: through the
    `deepspeed` launcher, or for one process directly (a world of one; the launcher would only add two
    Python processes' start-up). It runs in the caller's folder, where the user's relative paths
    (--output_dir, --ds_config, data files) lead."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / script), *args]
        env["MASTER_PORT"] = str(_free_port())
    else:
        launcher = str(Path(sys.executable).with_name("deepspeed"))
        cmd = [
            launcher,
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(_free_port()),
            str(REPO / script),
            *args,
        ]
    with open(log_file, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_file}")


def rows_of(res: dict[str, Any], train: dict[str, Any]) -> dict[str, str]:
    """The figures of one arm, flattened for the table."""
    p = res["params"]
    rows = {
        "steps": str(res["step"]),
        "tokens trained": f"{train['tokens']:,}",
        "backbone params total / active (M)": f"{(p['total'] - p['knowledge']) / 1e6:.3f} / "
        f"{(p['active'] - p['knowledge']) / 1e6:.3f}",
        "knowledge params (M)": f"{p['knowledge'] / 1e6:.3f}",
        "tokens/s": f"{train['tokens_per_s']:,.0f}",
    }
    if "perplexity" in res:
        rows["valid perplexity"] = f"{res['perplexity']:.3f}"
    for group, by in res.get("knowledge_probe", {}).items():
        if not isinstance(by, dict):
            continue
        for how, m in by.items():
            if not isinstance(m, dict) or "mrr" not in m:
                continue
            rows[f"probe {group} ({how}) acc@1 / MRR"] = f"{m['accuracy@1']:.3f} / {m['mrr']:.3f}"
    lp = res.get("link_prediction", {})
    for how in ("text", "embeddings", "random"):
        if how in lp:
            m = lp[how]
            rows[f"link pred ({how}) MRR / H@1 / H@3 / H@10"] = (
                f"{m['mrr']:.3f} / {m['hits@1']:.3f} / {m['hits@3']:.3f} / {m['hits@10']:.3f}"
            )
    return rows


def figures_of(res: dict[str, Any]) -> dict[str, float]:
    """The numeric figures of one arm's eval.json that several seeds summarize, by row name."""
    out: dict[str, float] = {}
    if "perplexity" in res:
        out["valid perplexity"] = res["perplexity"]
    for group, by in res.get("knowledge_probe", {}).items():
        if isinstance(by, dict):
            for how, m in by.items():
                if not isinstance(m, dict) or "mrr" not in m:
                    continue
                out[f"probe {group} ({how}) acc@1"] = m["accuracy@1"]
                out[f"probe {group} ({how}) MRR"] = m["mrr"]
    for how, m in res.get("link_prediction", {}).items():
        if isinstance(m, dict) and "mrr" in m:
            out[f"link pred ({how}) MRR"] = m["mrr"]
            out[f"link pred ({how}) H@10"] = m["hits@10"]
    return out


def rows_over_seeds(results: list[dict[str, Any]], trains: list[dict[str, Any]]) -> dict[str, str]:
    """One arm's rows over several seeds: the figures as mean ± sd [95% interval]."""
    from sparsexpert.stats import summary

    first = rows_of(results[0], trains[0])
    rows = {"seeds": str(len(results))}
    rows.update({k: first[k] for k in ("steps", "tokens trained", "backbone params total / active (M)")})
    rows["knowledge params (M)"] = first["knowledge params (M)"]
    rows["tokens/s"] = f"{sum(t['tokens_per_s'] for t in trains) / len(trains):,.0f}"
    figures = [figures_of(r) for r in results]
    for key in figures[0]:
        rows[key] = str(summary([f[key] for f in figures]))
    return rows


def versus(arm: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure of an arm against the baseline arm's, paired over the seeds (paired t-test); not the
    random baselines, which are the same for every arm."""
    from sparsexpert.stats import paired_t

    mine, theirs = [figures_of(r) for r in arm], [figures_of(r) for r in base]
    keys = [k for k in mine[0] if k in theirs[0] and "(random)" not in k]
    return {k: paired_t([f[k] for f in mine], [f[k] for f in theirs]) for k in keys}


def table(arms: list[str], rows: dict[str, dict[str, str]]) -> str:
    keys = list(dict.fromkeys(k for a in arms for k in rows[a]))
    w0 = max(len(k) for k in keys)
    widths = [max(len(a), *(len(rows[a].get(k, "-")) for k in keys)) for a in arms]
    lines = [" | ".join([" " * w0, *(a.rjust(w) for a, w in zip(arms, widths))])]
    lines.append("-" * len(lines[0]))
    for k in keys:
        lines.append(" | ".join([k.ljust(w0), *(rows[a].get(k, "-").rjust(w) for a, w in zip(arms, widths))]))
    return "\n".join(lines)


def run_ablation(
    corpus: str,
    arms: list[str],
    output_dir: str | Path,
    ds_config: str,
    nproc: int,
    overrides: list[str],
    seq_len: int = 128,
    eval_args: list[str] | None = None,
    reuse: bool = False,
    seeds: int = 1,
    parallel: int = 1,
) -> str:
    """reuse: an arm that already has a complete checkpoint in output_dir is only evaluated again, and not
    even that where its evaluation of that checkpoint with the same options is there (eval_args.json).
    Writes <output_dir>/ablation.txt (the table) and each arm's eval.json figures into
    <output_dir>/tensorboard/<arm>/ (one TensorBoard run per arm, tags `ablation/...`). seeds: each arm
    is pretrained that many times (seed s: initialization and data order; folders <arm>_s<s> after the
    first) and every figure is given as mean ± sd [95% interval], with each arm's paired t-test
    against the first arm over the seeds. parallel: how many arms' runs (pretraining, then evaluation)
    go side by side; their tokens/s then share the machine."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prep = prepare_corpus(corpus, out, seq_len)
    rows: dict[str, dict[str, str]] = {}
    done: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    trains: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    manifest = json.loads((Path(prep["data"]) / MANIFEST).read_text())

    def run_arm(seed: int, arm: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
        run = out / (arm.replace("+", "_").replace("=", "-") + (f"_s{seed}" if seed else ""))
        if reuse and checkpoint.find_latest(run / "checkpoints") is not None:
            print(f"ablation: arm {arm}: reusing {checkpoint.find_latest(run / 'checkpoints')}", flush=True)
        else:
            print(f"ablation: arm {arm}: pretraining into {run} (log: {run}.log)", flush=True)
            # an arm trained before (without --reuse) is trained again: its folder is this command's
            args = ["--ds_config", ds_config, "--output_dir", str(run), "--data.path", str(prep["data"])]
            args += ["--overwrite", f"--train.seed={seed}", f"--data.seed={seed}"]
            _launch(
                nproc,
                "launcher/pretrain.py",
                [*args, *overrides, *arm_overrides(arm)],
                Path(f"{run}.log"),
            )
        # what was evaluated, and how: --reuse keeps an evaluation of the same checkpoint with the same options
        how = {
            "checkpoint": str(checkpoint.find_latest(run / "checkpoints")),
            "args": [*prep["eval_args"], *(eval_args or [])],
        }
        stamp = run / "eval_args.json"
        if (
            reuse
            and (run / "eval.json").is_file()
            and stamp.is_file()
            and json.loads(stamp.read_text()) == how
        ):
            print(f"ablation: arm {arm}: reusing its evaluation {run / 'eval.json'}", flush=True)
        else:
            print(f"ablation: arm {arm}: evaluating", flush=True)
            stamp.unlink(missing_ok=True)
            _launch(nproc, "launcher/evaluate.py", ["--run", str(run), *how["args"]], Path(f"{run}.log"))
            atomic_write(stamp, json.dumps(how).encode())
        res = json.loads((run / "eval.json").read_text())
        config = json.loads((run / "config.json").read_text())
        train = {
            "tokens": res["step"] * config["global_batch"] * manifest["seq_len"],
            "tokens_per_s": mean_tokens_per_s(run),
        }
        return run, res, train

    order = [(s, a) for s in range(seeds) for a in arms]
    for (_, arm), (run, res, train) in zip(
        order, run_jobs([functools.partial(run_arm, s, a) for s, a in order], parallel)
    ):
        done[arm].append(res)
        trains[arm].append(train)
        # one TensorBoard run per arm, so that the arms' figures share a chart
        log_results(out / "tensorboard" / run.name, "ablation", {**res, "train": train}, res["step"])
    notes = []
    for arm in arms:
        if seeds == 1:
            rows[arm] = rows_of(done[arm][0], trains[arm][0])
            continue
        rows[arm] = rows_over_seeds(done[arm], trains[arm])
        if arm == arms[0]:
            continue
        for key, cmp in versus(done[arm], done[arms[0]]).items():
            rows[arm][f"{key}: vs {arms[0]}"] = str(cmp)
            verdict = "significant" if cmp.p < 0.05 else "not significant"
            notes.append(f"{arm} - {arms[0]}, {key}: {cmp} (paired t over {seeds} seeds): {verdict} at 0.05")
    text = table(arms, rows) + ("\n\n" + "\n".join(notes) if notes else "")
    (out / "ablation.txt").write_text(text + "\n")
    print(
        f"\nablation on {corpus} ({time.time() - t0:.0f}s), written to {out / 'ablation.txt'}:\n{text}",
        flush=True,
    )
    return text
