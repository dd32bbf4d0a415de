"""The fine-tuning comparison at equal compute: (a) our MoE pretrained with the KG, (b) the same
MoE pretrained without it, (c) a dense model with the same active parameters pretrained the same
way, (d) the MoE trained from scratch on the task. Same pretraining steps and tokens for a-c, same
fine-tuning steps, batch and data for all four; one table of dev metrics, parameters, active
parameters and tokens/s. With several seeds, each metric as mean ± sd [95% interval] and each arm's
paired t-test against b); with one, a paired bootstrap over the dev examples.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from experiments.ablation import SHARED, _launch, arm_overrides, mean_tokens_per_s, run_jobs, table
from sparsexpert.data.format import is_dataset
from sparsexpert.stats import Paired, bootstrap_diff, paired_t, summary
from sparsexpert.weights import checkpoint

REPO = Path(__file__).resolve().parents[1]


def prepare_news_wiki(out: Path, seq_len: int, log=print) -> Path:
    """News + the Wikipedia sample (its links are entity mentions), joined with the Nations KG."""
    from data_prep.pipeline import PrepConfig, prepare

    data = out / "data"
    if not is_dataset(data):
        cfg = PrepConfig(
            corpus=[
                str(SHARED / "news" / "lee_background.txt"),
                str(SHARED / "wiki" / "enwiki-sample.xml.bz2"),
            ],
            kg=str(SHARED / "kg" / "nations" / "train.tsv"),
            aliases=str(REPO / "data_prep" / "examples" / "nations_aliases.tsv"),
            case="exact",
            output=str(data),
            vocab_size=4000,
            seq_len=seq_len,
        )
        prepare(cfg, log=log)
    return data


def _main(scores: dict[str, float]) -> str:
    value = scores.get("f1", scores.get("accuracy"))
    return "-" if value is None else f"{value:.4f}"


def dev_metric_of(ft: Path) -> tuple[int, Callable[[np.ndarray], float]] | None:
    """(dev examples, metric of a subset of them) from a fine-tuning run's dev predictions (its best
    checkpoint's), for the bootstrap over evaluation examples: entity micro F1 over sentences (ner),
    micro F1 without the negative label (relation), accuracy (classification). None: no predictions."""
    from sparsexpert.finetune.metrics import classification_scores, entity_report, relation_scores

    preds = sorted((ft / "predictions").glob("*_dev.*"))
    conll = [f for f in preds if f.suffix == ".conll"]
    if conll:
        sents = [blk.splitlines() for blk in conll[0].read_text().strip().split("\n\n") if blk.strip()]
        gold = [[line.split("\t")[1] for line in s] for s in sents]
        pred = [[line.split("\t")[2] for line in s] for s in sents]
        return len(sents), lambda i: entity_report([gold[k] for k in i], [pred[k] for k in i])["micro avg"][
            "f1-score"
        ]
    rows = [f for f in preds if f.name.endswith("_dev.jsonl")]
    if not rows:
        return None
    recs = [json.loads(line) for line in rows[0].read_text().splitlines()]
    g, q = [r["gold"] for r in recs], [r["pred"] for r in recs]
    config = json.loads((ft / "config.json").read_text())
    kind = config["run"]["tasks"][0]["kind"]
    if kind == "relation":
        neg = config["run"]["tasks"][0].get("negative_label", "no_relation")
        return len(recs), lambda i: relation_scores([g[k] for k in i], [q[k] for k in i], neg)["f1"]
    return len(recs), lambda i: classification_scores([g[k] for k in i], [q[k] for k in i])["accuracy"]


def run_comparison(
    task_args: list[str],
    output_dir: str | Path,
    ds_config: str,
    nproc: int,
    model_overrides: list[str],
    pretrain_steps: int,
    finetune_overrides: list[str],
    kg_arm: str = "fusion",
    seq_len: int = 128,
    reuse: bool = False,
    data: str | Path | None = None,
    seeds: int = 1,
    parallel: int = 1,
) -> str:
    """task_args: the fine-tuning task (`--task ner --train F --dev F`); model_overrides
    (`--model.*`) shape every model, the dense twin's FFN excepted. data: an already prepared
    dataset to pretrain on instead of news + Wikipedia + Nations. seeds: every arm is pretrained
    and fine-tuned this many times (seed s: model initialization, data order, heads), and each metric
    is given as mean ± sd [95% interval] over them, with each arm's paired t-test against b) over
    the seeds; with one seed, against b) by a paired bootstrap over the dev examples. parallel: how many
    seeds run side by side (each seed's arms one after the other: c) is shaped from b)'s config)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data else prepare_news_wiki(out, seq_len)
    arms: dict[str, list[str] | None] = {
        "a) MoE + KG": arm_overrides(kg_arm),
        "b) MoE, text only": arm_overrides("none"),
        "c) dense, same active": [*arm_overrides("none"), "--model.moe.num_experts=0"],
        "d) MoE from scratch": None,
    }
    runs: dict[str, list[tuple[dict, Path, Path | None]]] = {name: [] for name in arms}

    def one_seed(seed: int) -> dict[str, tuple[dict, Path, Path | None]]:
        found: dict[str, tuple[dict, Path, Path | None]] = {}
        sfx = f"_s{seed}" if seed else ""  # seed 0 keeps the folder names of a one-seed comparison
        base = ["--ds_config", ds_config, "--data.path", str(data), f"--train.max_steps={pretrain_steps}"]
        base += ["--train.eval_every=0", f"--train.seed={seed}", f"--data.seed={seed}", *model_overrides]
        for name, pre in arms.items():
            slug = name.split(")")[0]
            run: Path | None = None
            if pre is not None:
                run = out / f"pretrain_{slug}{sfx}"
                extra = list(pre)
                # the dense twin: one FFN as wide as a token's top_k experts
                if "--model.moe.num_experts=0" in extra:
                    moe = json.loads((out / f"pretrain_b{sfx}" / "config.json").read_text())["run"]["model"]
                    extra.append(
                        f"--model.d_ff={moe['moe']['top_k'] * (moe['moe']['d_expert'] or moe['d_ff'])}"
                    )
                if not (reuse and checkpoint.find_latest(run / "checkpoints")):
                    print(f"compare: {name}, seed {seed}: pretraining into {run}", flush=True)
                    _launch(
                        nproc,
                        "launcher/pretrain.py",
                        [*base, "--output_dir", str(run), "--overwrite", *extra],  # this command's folder
                        Path(f"{run}.log"),
                    )
                init = ["--init", str(run)]
            else:
                init = [
                    f"--tokenizer={data / 'tokenizer.model'}",
                    *(o for o in model_overrides if ".knowledge." not in o),
                ]
            ft = out / f"finetune_{slug}{sfx}"
            if not (reuse and (ft / "results.json").is_file()):
                print(f"compare: {name}, seed {seed}: fine-tuning into {ft}", flush=True)
                args = [
                    "--ds_config",
                    ds_config,
                    "--output_dir",
                    str(ft),
                    "--overwrite",
                    *init,
                    *task_args,
                ]
                args += [*finetune_overrides, f"--train.seed={seed}"]
                _launch(nproc, "launcher/finetune.py", args, Path(f"{ft}.log"))
            found[name] = (json.loads((ft / "results.json").read_text()), ft, run)
        return found

    for per_seed in run_jobs([functools.partial(one_seed, s) for s in range(seeds)], parallel):
        for name in arms:
            runs[name].append(per_seed[name])
    rows = {name: _rows(found) for name, found in runs.items()}
    baseline = "b) MoE, text only"
    notes = []
    for name in arms:
        if name == baseline:
            rows[name]["vs b) on the best dev metric"] = "-"
            continue
        cmp = _versus(runs[name], runs[baseline])
        rows[name]["vs b) on the best dev metric"] = str(cmp) if cmp else "-"
        if cmp:
            verdict = "significant" if cmp.p < 0.05 else "not significant"
            how = (
                f"paired t over {seeds} seeds" if seeds > 1 else f"paired bootstrap over {cmp.n} dev examples"
            )
            notes.append(f"{name} - b): {cmp} ({how}): {verdict} at 0.05")
    text = table(list(arms), rows)
    text += "\n\n" + "\n".join(notes) if notes else ""
    (out / "comparison.txt").write_text(text + "\n")
    print(f"\ncomparison, written to {out / 'comparison.txt'}:\n{text}", flush=True)
    return text


def _cell(values: list[float]) -> str:
    return f"{values[0]:.4f}" if len(values) == 1 else str(summary(values))


def _rows(found: list[tuple[dict, Path, Path | None]]) -> dict[str, str]:
    """One arm's rows: each metric over the seeds (one value, or mean ± sd [95% interval])."""
    results = [r for r, _, _ in found]
    first = [next(iter(r["results"].values())) for r in results]
    p = results[0]["params"]
    rows = {
        "seeds": str(len(results)),
        "best dev metric": _cell([r["best_dev_metric"] for r in results]),
        **{f"dev {k}": _cell([f[k] for f in first]) for k, v in first[0].items() if isinstance(v, float)},
        "majority-class baseline (dev metric)": _main(
            next(iter(results[0].get("majority_baseline", {}).values()), {})
        ),
        "params total (M)": f"{p['total'] / 1e6:.3f}",
        "params active (M)": f"{p['active'] / 1e6:.3f}",
        "pretrain tokens/s": f"{np.mean([mean_tokens_per_s(run) for _, _, run in found if run]):,.0f}"
        if found[0][2] is not None
        else "-",
        "fine-tune tokens/s": f"{np.mean([mean_tokens_per_s(ft) for _, ft, _ in found]):,.0f}",
        "fine-tune steps (best at)": ", ".join(f"{r['steps']} ({r['best_step']})" for r in results),
    }
    return rows


def _versus(
    arm: list[tuple[dict, Path, Path | None]], base: list[tuple[dict, Path, Path | None]]
) -> Paired | None:
    """The arm against the baseline on the best dev metric: paired over seeds, or (one seed) a paired
    bootstrap over the dev examples of the two runs' best checkpoints."""
    if len(arm) > 1:
        return paired_t([r["best_dev_metric"] for r, _, _ in arm], [r["best_dev_metric"] for r, _, _ in base])
    mine, theirs = dev_metric_of(arm[0][1]), dev_metric_of(base[0][1])
    if mine is None or theirs is None or mine[0] != theirs[0]:
        return None
    return bootstrap_diff(mine[0], mine[1], theirs[1], samples=1000, seed=0)
