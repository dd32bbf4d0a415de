"""data_prep with knowledge graphs of growing size: wall time, memory of all processes and per worker.

    python bench/kg_scale.py                          # 10 k, 100 k and 1 M entities, --workers 2
    python bench/kg_scale.py --sizes 10000 100000     # chosen sizes
    python bench/kg_scale.py --full                   # adds the Wikidata5M-sized graph (4.8 M entities, 21 M triples)
    python bench/kg_scale.py --corpus-sizes 20000 80000 --sizes 100000   # growing corpus at a fixed KG
    python bench/kg_scale.py --workers 1 2 4          # memory per extra worker

The synthetic KG: N entities, each with 2 aliases ("Bako Tirel", "Tirel of Bako": pseudo-words from the
entity number, distinct per entity), 5 triples per entity over 50 relations (Wikidata5M has 4.4 triples
per entity). The corpus: a fixed number of sentences (default 20,000, ~0.7 M tokens), 10 a document, each
naming the head and tail of a KG triple by one of their aliases, so linking and distant supervision find
them. The tokenizer is trained once on the corpus and given to every run (its time is not the KG's).

Per run it prints: wall time of `python -m data_prep run` (timed in a run of its own: see run_prep); peak
memory of all its processes together and of the largest worker, as proportional set size (PSS: a page shared by k processes counts 1/k in each,
so shared memory-mapped files are not counted k times), and the largest worker's anonymous memory (what one
more worker adds: the pages of the memory-mapped KG index it reads are the page cache's), sampled every 50 ms
from /proc; and the stage times data_prep logs (the KG index, join, pack). "KG s" is the wall time less
that of the same corpus with no KG, "x text" their ratio. With --corpus-sizes, a line per KG size gives the
marginal throughput, text only and with the KG: the sentences between the smallest and the largest corpus
over the wall time they add, so that the KG's fixed costs (opening the index, writing entities.tsv and
triples.tsv) do not count; from the median and from the least of --repeat timed runs of each (default 3,
text only and with the KG in turn), as one run's time varies by a second or more on a shared machine.

Then, for each of --train-sizes, 20 steps of a small MoE pretraining on that dataset, one process: text only,
fusion with the entity table on Adam (DeepSpeed's optimizer), and fusion with it on row-wise Adagrad
(model.knowledge.entity_optimizer=rowwise_adagrad): step time, peak memory, the knowledge tables' memory a
rank as the run header states it, and row-wise against Adam; then link prediction on the fusion run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


def word(n: int, parts: int = 3) -> str:
    """A pseudo-word for n (distinct for n < 70**parts), capitalized."""
    s = ""
    for _ in range(parts):
        s += SYLLABLES[n % len(SYLLABLES)]
        n //= len(SYLLABLES)
    return s.capitalize()


def aliases_of(i: int) -> tuple[str, str]:
    a, b = word(i), word(i * 7 + 1, 4)
    return f"{a} {b}", f"{b} of {a}"


def write_kg(n: int, folder: Path, per_entity: int = 5, relations: int = 50) -> tuple[Path, Path]:
    """kg.tsv and aliases.tsv of n entities, streamed to disk."""
    kg, al = folder / "kg.tsv", folder / "aliases.tsv"
    with open(kg, "w") as f, open(al, "w") as g:
        for i in range(n):
            for j in range(per_entity):
                t = (i * 7919 + (j + 1) * 104729) % n
                if t == i:
                    t = (t + 1) % n
                f.write(f"Q{i}\tP{(i + j * 11) % relations}\tQ{t}\n")
            x, y = aliases_of(i)
            g.write(f"Q{i}\t{x}\nQ{i}\t{y}\n")
    return kg, al


def write_corpus(n_entities: int, sentences: int, path: Path, per_doc: int = 10) -> Path:
    """Sentences naming a triple's head and tail (as write_kg makes them); the same text for every KG
    size up to the entity numbers, which wrap at n_entities."""
    docs, doc = [], []
    for k in range(sentences):
        i = (k * 2654435761) % n_entities
        j = k % 5
        t = (i * 7919 + (j + 1) * 104729) % n_entities
        if t == i:
            t = (t + 1) % n_entities
        h_name, t_name = aliases_of(i)[k % 2], aliases_of(t)[(k // 2) % 2]
        doc.append(f"In report {k}, {h_name} was seen with {t_name} near the old market.")
        if len(doc) == per_doc:
            docs.append(json.dumps({"text": " ".join(doc)}))
            doc = []
    if doc:
        docs.append(json.dumps({"text": " ".join(doc)}))
    path.write_text("\n".join(docs) + "\n")
    return path


def memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, anonymous) of a process in kB. Anonymous memory (heap, not backed by a file) is what one more
    such process adds; the pages of the memory-mapped KG index it reads are the page cache's, one copy for
    every process that maps them (and the kernel can drop them under pressure)."""
    pss = private = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                private = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return pss, private


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def measure(cmd: list[str], log: Path, sample: bool = True) -> dict:
    """Run cmd; its wall time, and with sample the peak PSS of all its processes together and the peak of each
    (sampled every 50 ms; without, the memory figures are 0)."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        peak_total, peak_each, peak_private = 0, dict[int, int](), dict[int, int]()
        if not sample:
            proc.wait()
        while proc.poll() is None:
            pids = descendants(proc.pid)
            sizes = {p: memory_kb(p) for p in pids}
            peak_total = max(peak_total, sum(pss for pss, _ in sizes.values()))
            for p, (pss, private) in sizes.items():
                peak_each[p] = max(peak_each.get(p, 0), pss)
                peak_private[p] = max(peak_private.get(p, 0), private)
            time.sleep(0.05)
    wall = time.time() - t0
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    each = sorted(peak_each.values(), reverse=True)
    main = max(peak_each, key=peak_each.__getitem__) if peak_each else None
    workers = [v for p, v in peak_private.items() if p not in (proc.pid, main)]
    stages = {
        m.group(1): float(m.group(2)) for m in re.finditer(r"data_prep (\w[\w ]*?): .*?in ([\d.]+) ?s", text)
    }
    return {
        "wall_s": wall,
        "peak_gb": peak_total / 2**20,
        "main_gb": each[0] / 2**20 if each else 0.0,
        "worker_gb": each[1] / 2**20 if len(each) > 1 else 0.0,
        "worker_private_gb": max(workers, default=0) / 2**20,
        "stages": stages,
        "log": text,
    }


def prep_command(corpus: Path, tok: Path, out: Path, workers: int, kg: tuple[Path, Path] | None) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep", "run", "--corpus", str(corpus), "--output", str(out)]
    cmd += ["--tokenizer", str(tok), "--workers", str(workers), "--seq_len", "256", "--case", "exact"]
    return cmd + (["--kg", str(kg[0]), "--aliases", str(kg[1])] if kg else [])


def run_prep(
    corpus: Path, tok: Path, out: Path, workers: int, kg: tuple[Path, Path] | None, build: bool = False
) -> dict:
    """data_prep run, twice: once sampling memory, once timed (wall time and stages). Reading
    /proc/<pid>/smaps_rollup walks the process's page tables: 10 to 15 ms for a worker that maps the KG index,
    so sampling every 50 ms took most of a core of a 2-core machine during the KG runs, far less during the
    text-only ones, and inflated the KG's cost. build: remove the KG index first, each time."""
    cmd = prep_command(corpus, tok, out, workers, kg)
    runs = []
    for sample in (True, False):
        if build:
            shutil.rmtree(out.with_name(out.name + ".kgindex"), ignore_errors=True)
        runs.append(measure(cmd, out.parent / f"{out.name}.log", sample))
    memory, timed = runs
    return {**memory, "wall_s": timed["wall_s"], "stages": timed["stages"], "log": timed["log"]}


TINY_MODEL = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.d_ff=128"]


def run_pretrain(data: Path, out: Path, mode: str, steps: int, *extra: str) -> dict:
    """A short pretraining run of a small MoE on a prepared dataset: its step time (the mean over the
    last log interval, metrics.jsonl) and the peak memory of its process. extra: more overrides."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "launcher/pretrain.py",
        "--ds_config",
        "ds_configs/moe_z2.json",
        "--output_dir",
        str(out),
    ]
    cmd += [*TINY_MODEL, "--model.max_seq_len=256", f"--data.path={data}", f"--model.knowledge.mode={mode}"]
    cmd += [f"--train.max_steps={steps}", f"--train.log_every={steps // 2}", "--train.eval_every=0"]
    cmd += ["--train.save_every=0", *extra]
    env_port = {"MASTER_PORT": str(29500 + os.getpid() % 1000)}
    os.environ.update(env_port)
    r = measure(cmd, out.with_name(out.name + ".log"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = [x["step_time_s"] for x in rows if "step_time_s" in x][-1]
    header = next((line for line in r["log"].splitlines() if "knowledge: fusion" in line), "")
    table = re.search(r"([\d.]+) GiB a rank", header)
    return {**r, "step_s": step, "table_gib": float(table.group(1)) if table else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--full", action="store_true", help="add 4.8 M entities (21 M triples)")
    p.add_argument("--sentences", type=int, default=20_000)
    p.add_argument("--corpus-sizes", type=int, nargs="*", default=[], help="sentences, at the first KG size")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="with --corpus-sizes: time the smallest and largest corpus this many times each, text only and with "
        "the KG in turn, for the marginal throughput's median and least",
    )
    p.add_argument("--keep", default="", help="folder to keep the inputs and outputs in")
    p.add_argument(
        "--train-sizes",
        type=int,
        nargs="*",
        default=[100_000, 1_000_000],
        help="KG sizes (among --sizes) whose dataset a fusion model pretrains on, next to a text-only one",
    )
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument(
        "--eval-triples", type=int, default=100, help="link prediction after the fusion run; 0: none"
    )
    p.add_argument("--max-candidates", type=int, default=1000)
    args = p.parse_args()
    sizes = args.sizes + ([4_800_000] if args.full else [])
    root = Path(args.keep or tempfile.mkdtemp(prefix="kg_scale."))
    root.mkdir(parents=True, exist_ok=True)

    from data_prep.pipeline import PrepConfig, train_tokenizer

    print(f"bench/kg_scale.py: {args.sentences:,} sentences, workers {args.workers}, in {root}")
    print(
        f"{'entities':>10} {'triples':>11} {'KG MB':>7} {'workers':>7} {'wall s':>7} {'KG s':>6} "
        f"{'x text':>6} {'peak GB':>8} {'main GB':>8} {'worker GB':>9} {'anon GB':>7}  stages (s)"
    )
    walls: dict[tuple[int, int, str], float] = {}  # (entities, sentences, "text" or "kg") -> wall s
    commands: dict[tuple[int, int, str], tuple[list[str], Path]] = {}  # the same -> its command and log
    for k, n in enumerate(sizes):
        folder = root / f"kg{n}"
        folder.mkdir(exist_ok=True)
        kg = write_kg(n, folder)
        corpora = [args.sentences] + (args.corpus_sizes if k == 0 else [])
        for sentences in corpora:
            corpus = write_corpus(n, sentences, folder / f"corpus{sentences}.jsonl")
            tok = folder / f"tok{sentences}.model"
            if not tok.exists():
                texts = (json.loads(x)["text"] for x in corpus.read_text().splitlines())
                train_tokenizer(texts, tok, PrepConfig(vocab_size=2000))
            for w in args.workers:
                text_out = folder / f"text{sentences}_w{w}"
                base = run_prep(corpus, tok, text_out, w, None)
                walls[(n, sentences, "text")] = base["wall_s"]
                out = folder / f"out{sentences}_w{w}"
                for mode, o in (("text", text_out), ("kg", out)):
                    cmd = prep_command(corpus, tok, o, w, kg if mode == "kg" else None)
                    commands[(n, sentences, mode)] = cmd, o.parent / f"{o.name}.log"
                for when in ("built", "reused"):  # the first run builds the KG index, a second reuses it
                    r = run_prep(corpus, tok, out, w, kg, build=when == "built")
                    size = kg[0].stat().st_size / 1e6
                    stages = " ".join(f"{name}={s:.1f}" for name, s in r["stages"].items())
                    print(
                        f"{n:>10,} {5 * n:>11,} {size:>7.1f} {w:>7} {r['wall_s']:>7.1f} "
                        f"{r['wall_s'] - base['wall_s']:>6.1f} {r['wall_s'] / base['wall_s']:>6.2f} "
                        f"{r['peak_gb']:>8.2f} {r['main_gb']:>8.2f} "
                        f"{r['worker_gb']:>9.2f} {r['worker_private_gb']:>7.2f}  index {when}; {stages}"
                        + (f"  ({sentences:,} sentences)" if len(corpora) > 1 else ""),
                        flush=True,
                    )
                    walls[(n, sentences, "kg")] = r["wall_s"]
        if len(corpora) > 1:  # what each more sentence costs, the KG's fixed costs apart
            lo, hi = min(corpora), max(corpora)
            timed = {key: [walls[key]] for key in walls if key[0] == n}
            for _ in range(args.repeat - 1):  # a run's time varies by a second or more here: several, in turn
                for sentences in (lo, hi):
                    for mode in ("text", "kg"):
                        cmd, log = commands[(n, sentences, mode)]
                        timed[(n, sentences, mode)].append(measure(cmd, log, False)["wall_s"])
            for name, pick in (("median", statistics.median), ("least", min)):
                extra = {m: pick(timed[(n, hi, m)]) - pick(timed[(n, lo, m)]) for m in ("text", "kg")}
                print(
                    f"{n:>10,} marginal throughput, {lo:,} to {hi:,} sentences (index reused, {name} of "
                    f"{len(timed[(n, hi, 'kg')])} runs each): text only {(hi - lo) / extra['text']:,.0f} sentences/s, "
                    f"with the KG {(hi - lo) / extra['kg']:,.0f} sentences/s: the KG costs "
                    f"{extra['kg'] / extra['text']:.2f}x",
                    flush=True,
                )

    train = [n for n in args.train_sizes if n in sizes]
    if train:
        print(
            f"\npretraining a small MoE ({' '.join(TINY_MODEL)}, seq 256, ds_configs/moe_z2.json, one process) "
            f"for {args.train_steps} steps on each dataset (rowwise: fusion with the entity table on "
            "model.knowledge.entity_optimizer=rowwise_adagrad):"
        )
        print(
            f"{'entities':>10} {'mode':>7} {'step s':>7} {'vs none':>8} {'peak GB':>8} {'table GiB/rank':>15}"
        )
        first = root / f"kg{train[0]}" / f"out{args.sentences}_w{args.workers[-1]}"
        run_pretrain(first, root / "warm_up", "none", 2)  # DeepSpeed builds its CPU Adam once: not measured
        for n in train:
            w = args.workers[-1]
            data = root / f"kg{n}" / f"out{args.sentences}_w{w}"
            base = run_pretrain(data, root / f"kg{n}" / "pre_none", "none", args.train_steps)
            rowwise = "--model.knowledge.entity_optimizer=rowwise_adagrad"
            runs = {
                "none": base,
                "fusion": run_pretrain(data, root / f"kg{n}" / "pre_fusion", "fusion", args.train_steps),
                "rowwise": run_pretrain(
                    data, root / f"kg{n}" / "pre_rows", "fusion", args.train_steps, rowwise
                ),
            }
            for mode, r in runs.items():
                print(
                    f"{n:>10,} {mode:>7} {r['step_s']:>7.3f} {r['step_s'] / base['step_s']:>7.2f}x "
                    f"{r['peak_gb']:>8.2f} {r['table_gib']:>15.2f}",
                    flush=True,
                )
            dense, rows = runs["fusion"], runs["rowwise"]
            print(
                f"{n:>10,} row-wise Adagrad against Adam for the entity table: step time "
                f"{rows['step_s'] / dense['step_s']:.3f}x ({dense['step_s']:.3f} s -> {rows['step_s']:.3f} s; "
                f"text only {base['step_s']:.3f} s), peak memory {rows['peak_gb'] / dense['peak_gb']:.2f}x",
                flush=True,
            )
            if args.eval_triples:
                t0 = time.time()
                r = run_link_prediction(root / f"kg{n}", root / f"kg{n}" / "pre_fusion", args)
                lp = r["link_prediction"]
                print(
                    f"{n:>10,} link prediction of {args.eval_triples} KG triples, heads and tails, among at most "
                    f"{args.max_candidates} relation-constrained candidates: {time.time() - t0:.0f} s "
                    f"(text MRR {lp['text']['mrr']:.3f}, embeddings {lp['embeddings']['mrr']:.3f}, "
                    f"random {lp['random']['mrr']:.3f})",
                    flush=True,
                )


def run_link_prediction(folder: Path, run: Path, args) -> dict:
    """launcher/evaluate.py on a sample of the KG's own triples (filtered against the whole KG)."""
    lines = (folder / "kg.tsv").read_text().splitlines()
    test = folder / "lp_test.tsv"
    test.write_text("\n".join(lines[:: max(1, len(lines) // args.eval_triples)][: args.eval_triples]) + "\n")
    cmd = [sys.executable, "launcher/evaluate.py", "--run", str(run), "--link_test", str(test)]
    cmd += ["--link_known", str(folder / "kg.tsv"), "--max_candidates", str(args.max_candidates)]
    measure(cmd, folder / "lp.log")
    return json.loads((run / "eval.json").read_text())


if __name__ == "__main__":
    main()
