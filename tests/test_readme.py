"""Every command in the README's code blocks, run as a user would run it: in README order, in one
folder laid out like a checkout (with ../shared beside it), through the same `deepspeed` and `python`
the user has, only with tiny step counts. One-process `deepspeed` commands after the first run as
`python <script>`: the world of one the launcher would start, without its two extra processes. A
documented example cannot break again without this test failing on its line.

What cannot run on one CPU machine is listed in NOT_HERE with the reason (GPU nodes, several hosts,
Slurm, docker, the install itself, the test command that runs this). Files a command needs that only a
user has (their corpus, a Hugging Face model on their disk) are made here, small, under the same name.
A README command that none of these rules knows makes the test fail, so new examples are run too.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import REPO, SHARED_DATA, launch_env, leaked_shm_buffers

README = REPO / "README.md"

NOT_HERE: list[tuple[Callable[[list[str]], bool], str]] = [
    (lambda c: c[:3] == ["python3", "-m", "venv"] or c[0] in (".", "source"), "creates the environment"),
    (lambda c: c[0] == "pip", "installs: .ci/run installs the same way before running this test"),
    (lambda c: c[0] in ("ruff", "mypy") or c[1:3] == ["-m", "pytest"], "the test command: .ci/run runs it"),
    (lambda c: c[0] == "docker", "needs docker and a GPU host"),
    (lambda c: c[0] == "sbatch", "needs a Slurm cluster"),
    (lambda c: "--hostfile" in c, "needs several hosts"),
    (lambda c: c[0] == "deepspeed" and _num_gpus(c) > 2, "needs a GPU node (8 GPUs, bf16 or fp16)"),
    (lambda c: c[:2] == ["bash", "bench/gpu_smoke.sh"], "a GPU host (its --cpu form: test_gpu_smoke.py)"),
    (lambda c: c[:2] == ["python", "bench/gpu_throughput.py"], "a GPU host"),
]
"""Commands that cannot run on one CPU machine, and why."""

TINY: dict[str, list[str]] = {
    "launcher/pretrain.py": [
        "--train.max_steps=4",
        "--train.log_every=2",
        "--train.save_every=4",
        "--train.eval_every=4",
    ],
    "launcher/finetune.py": ["--train.max_steps=4", "--train.eval_every=2"],
    "launcher/evaluate.py": ["--max_facts=4"],
    "launcher/ablate.py": [
        "--train.max_steps=4",
        "--train.save_every=0",
        "--train.eval_every=0",
        "--max_facts=4",
        "--seeds=1",
    ],
    "launcher/compare.py": ["--pretrain_steps=2", "--train.max_steps=2", "--train.eval_every=2"],
    "launcher/generate.py": ["--max_new_tokens=4"],
    "data_prep bootstrap": ["--finetune_steps=4"],
}
"""Appended to a command of that script (the last value of an option wins): tiny step counts."""


def _num_gpus(cmd: list[str]) -> int:
    for i, tok in enumerate(cmd):
        if tok == "--num_gpus":
            return int(cmd[i + 1])
        if tok.startswith("--num_gpus="):
            return int(tok.split("=", 1)[1])
    return 1


def _script(cmd: list[str]) -> str | None:
    if cmd[:4] == ["python", "-m", "data_prep", "bootstrap"]:
        return "data_prep bootstrap"
    return next((t for t in cmd if t.startswith(("launcher/", "bench/"))), None)


def readme_commands() -> list[tuple[int, list[str]]]:
    """(README line, argv) of every command in the README's ```bash blocks: continuation lines
    joined, comments dropped, `a && b` split into its commands."""
    out: list[tuple[int, list[str]]] = []
    lines = README.read_text().splitlines()
    in_block, pending, start = False, "", 0
    for no, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block:
            continue
        if not pending:
            start = no
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        tokens = shlex.split(text, comments=True)
        cmd: list[str] = []
        for tok in [*tokens, "&&"]:
            if tok == "&&":
                if cmd:
                    out.append((start, cmd))
                cmd = []
            else:
                cmd.append(tok)
    return out


def not_here(cmd: list[str]) -> str | None:
    return next((why for rule, why in NOT_HERE if rule(cmd)), None)


def test_every_readme_command_is_either_run_or_excluded_with_a_reason():
    """The rules above are neither stale nor missing: each excludes some README command, and the
    commands they leave are the ones test_readme_commands runs (all the launchers and data_prep)."""
    commands = readme_commands()
    assert len(commands) > 30
    for rule, why in NOT_HERE:
        assert any(rule(c) for _, c in commands), f"no README command is excluded as: {why}"
    runnable = [c for _, c in commands if not not_here(c)]
    scripts = {_script(c) or " ".join(c[:3]) for c in runnable}
    assert {
        "launcher/pretrain.py",
        "launcher/finetune.py",
        "launcher/evaluate.py",
        "launcher/ablate.py",
        "launcher/compare.py",
        "launcher/export.py",
        "launcher/generate.py",
        "python -m data_prep",
    } <= scripts, scripts
    unknown = [c for c in runnable if c[0] not in ("python", "deepspeed")]
    assert not unknown, f"README commands this test does not know how to run: {unknown}"


# ------------------------------------------------------------------------------ a user's own files
def _big_jsonl(ws: Path, name: str) -> None:
    """A JSON-lines corpus and a KG, as a user's: the built-in world's sentences and triples."""
    corpus = ws / "runs" / "pretrain" / "data_raw" / "corpus.txt"
    docs = corpus.read_text().splitlines()[:400]
    (ws / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _kg_tsv(ws: Path, name: str) -> None:
    (ws / name).write_text((ws / "runs" / "pretrain" / "data_raw" / "kg.tsv").read_text())


def _llama_small(ws: Path, name: str) -> None:
    """A small dense Llama saved by transformers, with the tokenizer the README exported."""
    import shutil

    import transformers

    hf = ws / "runs" / "pretrain" / "hf"
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    out = ws / name
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for f in hf.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)


USER_FILES: dict[str, Callable[[Path, str], None]] = {
    "big.jsonl": _big_jsonl,
    "my.jsonl": _big_jsonl,
    "kg.tsv": _kg_tsv,
    "/models/llama-small": _llama_small,
}
"""Inputs the README's examples take from the user's disk, made when a command first names them
(absolute paths are made inside the folder: /models/llama-small -> models/llama-small)."""


def _local(ws: Path, cmd: list[str]) -> list[str]:
    out = []
    for tok in cmd:
        for name, make in USER_FILES.items():
            if name in tok:
                local = name.lstrip("/")
                if not (ws / local).exists():
                    make(ws, local)
                tok = tok.replace(name, local)
        out.append(tok)
    return out


def _expand(cmd: list[str]) -> list[list[str]]:
    """`--shard_index $i` ("on machine i"): once for each of the --num_shards machines."""
    if "$i" not in cmd:
        return [cmd]
    n = int(cmd[cmd.index("--num_shards") + 1])
    return [[str(i) if t == "$i" else t for t in cmd] for i in range(n)]


def _workspace(tmp_path: Path) -> Path:
    """tmp/ws: the checkout's tracked folders linked in (read only by the commands), runs/ and
    data/ real folders; tmp/shared/data: the shared real data (../shared/data, as CI has it)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    for entry in ("launcher", "ds_configs", "configs", "data_prep", "bench", "experiments", "sparsexpert"):
        (ws / entry).symlink_to(REPO / entry)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    return ws


def test_readme_commands(tmp_path):
    ws = _workspace(tmp_path)
    env = launch_env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `python`, `deepspeed`: this environment
    ran: set[str] = set()
    launched: set[str] = set()
    checks_run: set[str] = set()
    timings = []
    for line, cmd in readme_commands():
        if not_here(cmd) or " ".join(cmd) in ran:
            continue
        ran.add(" ".join(cmd))
        script = _script(cmd)
        extra = list(TINY.get(script or "", []))
        if script == "launcher/pretrain.py" and "--resume" in cmd:
            extra[0] = "--train.max_steps=8"  # continues the 4 steps above
        if script == "launcher/ablate.py" and "rebel" in cmd:
            extra.append("--max_triples=4")  # link prediction of 4 held-out facts, not all 229
        argv0 = cmd
        if cmd[0] == "deepspeed" and _num_gpus(cmd) == 1 and "deepspeed" in launched:
            # one process: the launcher only adds two Python processes (about 8 s of start-up each time)
            # around the same script; the first such command ran through it, the others run the script
            argv0 = ["python", *cmd[1:]]
        launched.add(cmd[0])
        for argv in _expand(_local(ws, argv0 + extra)):
            t0 = time.time()
            proc = subprocess.run(
                argv, cwd=ws, env=env, capture_output=True, text=True, timeout=600, start_new_session=True
            )
            timings.append((time.time() - t0, line))
            assert proc.returncode == 0, (
                f"README.md:{line}: exit {proc.returncode}: {shlex.join(argv)}\n"
                f"{(proc.stdout + proc.stderr)[-6000:]}"
            )
            check = _check_for(cmd)
            if check is not None:
                checks_run.add(check.__name__)
                check(ws, proc.stdout + proc.stderr)
    assert not leaked_shm_buffers(29500)  # the launcher's default port, used by every command above
    assert checks_run == {c.__name__ for _, c in CHECKS}, "a check matched no README command"
    print("\n".join(f"{s:6.1f}s README.md:{line}" for s, line in sorted(timings, reverse=True)[:10]))


# ------------------------------------------------------------------ what some commands must leave
def _main_pretraining(ws: Path, output: str) -> None:
    assert "preparing the built-in example knowledge world" in output
    assert "step 4/4 | loss" in output and "tok/s | eta" in output
    manifest = json.loads((ws / "runs" / "pretrain" / "data" / "manifest.json").read_text())
    assert manifest["documents_in"] == manifest["documents_written"] + sum(
        manifest["documents_rejected"].values()
    )
    assert manifest["documents_written"] > 2900
    assert (ws / "runs" / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def _main_fine_tuning(ws: Path, output: str) -> None:
    assert "done: best dev metric" in output
    res = json.loads((ws / "runs" / "finetune" / "results.json").read_text())
    assert res["steps"] == 4 and 0 <= res["results"]["relation"]["f1"] <= 1


def _resumed(ws: Path, output: str) -> None:
    assert "step 8/8 | loss" in output and "step 2/8" not in output
    assert (ws / "runs" / "pretrain" / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def _generated(ws: Path, output: str) -> None:
    assert "Vokaul Ullo was born in" in output


def _table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header's columns and {row name: cells} of a table ablate.py or compare.py printed."""
    lines = text.strip().splitlines()
    header = [h.strip() for h in lines[0].split("|")[1:]]
    return header, {x.split(" | ")[0].strip(): [c.strip() for c in x.split(" | ")[1:]] for x in lines[2:]}


def _ablation_world(ws: Path, output: str) -> None:
    out = ws / "runs" / "ablation_world"
    text = (out / "ablation.txt").read_text()
    assert text in output
    header, rows = _table(text)
    assert header == ["none", "inject", "fusion"]
    # equal compute: same steps, tokens and backbone; only the fusion arm adds knowledge parameters
    for key in ("steps", "tokens trained", "backbone params total / active (M)"):
        assert len(set(rows[key])) == 1, (key, rows[key])
    assert rows["knowledge params (M)"][:2] == ["0.000", "0.000"]
    assert float(rows["knowledge params (M)"][2]) > 0
    assert "probe heldout (text) acc@1 / MRR" in rows and "probe stated (text) acc@1 / MRR" in rows
    assert rows["probe heldout (embeddings) acc@1 / MRR"][:2] == ["-", "-"]  # only fusion has embeddings
    assert rows["probe heldout (random) acc@1 / MRR"][0].startswith("0.004 / 0.02")  # 1 in 282 candidates
    for arm in header:
        res = json.loads((out / arm / "eval.json").read_text())
        assert res["step"] == 4 and 1 < res["perplexity"] < 5000
        probe = res["knowledge_probe"]
        assert probe["candidates"] == 282 and probe["heldout"]["text"]["n"] == 4
        assert 0 < probe["heldout"]["text"]["mrr"] <= 1
    fused = json.loads((out / "fusion" / "eval.json").read_text())
    assert fused["knowledge_probe"]["stated"]["embeddings"]["n"] == 4


def _ablation_nations(ws: Path, output: str) -> None:
    out = ws / "runs" / "ablation_nations"
    _, rows = _table((out / "ablation.txt").read_text())
    assert "link pred (text) MRR / H@1 / H@3 / H@10" in rows
    # uniformly random scores, filtered, over Nations' 14 countries (computed by hand from the splits)
    assert rows["link pred (random) MRR / H@1 / H@3 / H@10"][0] == "0.384 / 0.167 / 0.465 / 0.947"
    assert "link pred (embeddings) MRR / H@1 / H@3 / H@10" in rows
    (fusion,) = out.glob("fusion_*/eval.json")
    lp = json.loads(fusion.read_text())["link_prediction"]
    assert lp["test_triples"] == 201 and lp["entities"] == 14
    # every test triple ranked twice (head and tail); Nations entities all have aliases
    assert lp["text"]["n"] == 2 * (201 - lp["skipped_not_in_vocabulary"]) > 300
    m = lp["text"]
    assert 1 / 14 <= m["mrr"] <= 1 and m["hits@1"] <= m["hits@3"] <= m["hits@10"] <= 1
    assert lp["embeddings"]["n"] == lp["text"]["n"]


def _ablation_rebel(ws: Path, output: str) -> None:
    out = ws / "runs" / "ablation_rebel"
    header, rows = _table((out / "ablation.txt").read_text())
    assert header == ["none", "inject", "fusion", "fusion+triple_source=kg"]
    split = json.loads((out / "split" / "split.json").read_text())
    assert split["facts"] == 2126 and split["valid_documents"] == 70
    for group in ("stated", "kg_only", "heldout"):
        assert f"probe {group} (text) acc@1 / MRR" in rows and f"probe {group} (random) acc@1 / MRR" in rows
        assert rows[f"probe {group} (embeddings) acc@1 / MRR"][:2] == ["-", "-"]
    res = json.loads((out / "fusion_triple_source-kg" / "eval.json").read_text())
    assert all(res["knowledge_probe"][g]["text"]["n"] == 4 for g in ("stated", "kg_only", "heldout"))
    assert (
        res["link_prediction"]["text"]["n"] == res["link_prediction"]["embeddings"]["n"] == 8
    )  # 4, both ways


def _comparison(ws: Path, output: str) -> None:
    out = ws / "runs" / "compare"
    text = (out / "comparison.txt").read_text()
    assert text in output
    header, rows = _table(text)
    assert header == ["a) MoE + KG", "b) MoE, text only", "c) dense, same active", "d) MoE from scratch"]
    active = [float(x) for x in rows["params active (M)"]]
    assert active[0] == active[1] == active[3] and abs(active[2] - active[0]) / active[0] < 0.01
    assert float(rows["params total (M)"][2]) < float(rows["params total (M)"][1])  # dense: fewer in all
    assert rows["majority-class baseline (dev metric)"] == ["0.0000"] * 4
    assert rows["pretrain tokens/s"][3] == "-"
    for arm in "abcd":
        assert json.loads((out / f"finetune_{arm}" / "results.json").read_text())["steps"] == 2


def _bootstrapped(ws: Path, output: str) -> None:
    out = ws / "runs" / "bootstrap"
    summary = json.loads((out / "bootstrap.json").read_text())
    assert summary["extractor"]["steps"] == 4 and summary["relations"]["positives"] > 0
    assert (out / "dataset" / "manifest.json").is_file() and "new triples extracted" in output


def _linked_text(ws: Path, output: str) -> None:
    manifest = json.loads((ws / "data" / "rebel" / "manifest.json").read_text())
    assert manifest["documents_written"] == 800 and manifest["gold_links"]["links_realigned"] > 1000


CHECKS: list[tuple[tuple[str, ...], Callable[[Path, str], None]]] = [
    (("deepspeed", "launcher/pretrain.py", "--ds_config", "ds_configs/moe_z2.json"), _main_pretraining),
    (("launcher/finetune.py", "runs/finetune"), _main_fine_tuning),
    (("launcher/pretrain.py", "--resume"), _resumed),
    (("launcher/generate.py",), _generated),
    (("launcher/ablate.py", "world"), _ablation_world),
    (("launcher/ablate.py", "news-nations"), _ablation_nations),
    (("launcher/ablate.py", "rebel"), _ablation_rebel),
    (("launcher/compare.py",), _comparison),
    (("data_prep", "bootstrap"), _bootstrapped),
    (("data_prep", "data/rebel"), _linked_text),
]
"""Checks beyond the exit status: of the first README command made of exactly these words (the first
entry) or holding them all."""


def _check_for(cmd: list[str]) -> Callable[[Path, str], None] | None:
    for words, check in CHECKS:
        if tuple(cmd) == words or (words != CHECKS[0][0] and set(words) <= set(cmd)):
            return check
    return None
