"""Bootstrap a knowledge graph from text with our own models: distant supervision, a fine-tuned
relation extractor, and pretraining shards holding the KG's triples and the extracted ones.

    python -m data_prep bootstrap --corpus runs/pretrain/data_raw/corpus.txt --kg runs/pretrain/data_raw/kg.tsv \\
        --aliases runs/pretrain/data_raw/aliases.tsv --case exact --init runs/pretrain --output runs/bootstrap

Stages, each kept in its folder under --output and skipped when a re-run finds it done (the fine-tuning
resumes from its checkpoints, the last stage from its parts folder, as data_prep always does):

    relations/    `data_prep relations` on the corpus and the seed KG (distant supervision)
    extractor/    `launcher/finetune.py --task relation` from --init on those examples (--finetune_steps)
    dataset/      `data_prep run` on --extract_corpus (default: the corpus) with the seed KG and the
                  extractor (`--extractor extractor/`: data_prep/model_extractor.py, --threshold): the shards attach KG triples and
                  extracted ones; triples.tsv marks each "kg" or "extracted", an extracted one with the
                  extractor's highest confidence and the extractor run
    bootstrap.json  what each stage gave (written last)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.output import atomic_write
from data_prep.pipeline import DataError, PrepConfig, prepare
from data_prep.relations import RelationsConfig, prepare_relations

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BootstrapConfig:
    """One `python -m data_prep bootstrap` run."""

    corpus: list[str] = field(default_factory=list)
    """Corpus the extractor is trained on (distant supervision), in any format data_prep reads."""
    kg: str | None = None
    """The seed KG (.tsv, .nt, .jsonl, or linked text)."""
    aliases: str | None = None
    """Alias file (as for `data_prep run`)."""
    case: str = "ignore"
    """Alias matching: "ignore" case or "exact"."""
    output: str = ""
    """Folder of the stages' outputs."""
    init: str = ""
    """The pretraining run (or checkpoint) the extractor is fine-tuned from."""
    extract_corpus: list[str] = field(default_factory=list)
    """Corpus to extract from and prepare shards of; empty: the training corpus."""
    ds_config: str = str(REPO / "ds_configs" / "moe_z2.json")
    """DeepSpeed config of the fine-tuning."""
    finetune_steps: int = 400
    """Fine-tuning steps of the relation extractor."""
    finetune_args: str = ""
    """More options for launcher/finetune.py, as one shell-quoted string ("--train.lr=1e-4 --max_len 96")."""
    launcher: str = ""
    """How the fine-tuning is started: empty runs `python launcher/finetune.py` in one process; e.g.
    "deepspeed --num_gpus 8" starts it through DeepSpeed's launcher."""
    threshold: float = 0.7
    """Least confidence of an extracted triple."""
    batch_size: int = 64
    """Sentence pairs the extractor scores at once."""
    negative_ratio: float = 1.0
    """Distant supervision: negatives kept per positive."""
    workers: int = 1
    """Processes of the data_prep stages."""
    vocab_size: int = 1024
    """The dataset's tokenizer vocabulary (trained on the extract corpus) unless tokenizer is given."""
    tokenizer: str | None = None
    """The dataset's tokenizer: e.g. the pretraining run's, to continue pretraining on the shards."""
    seq_len: int = 128
    """Tokens per packed row of the dataset."""

    def validate(self) -> None:
        if not self.corpus or not self.kg or not self.output:
            raise DataError("bootstrap needs --corpus, --kg and --output")
        if not self.init:
            raise DataError("no --init: give the pretraining run the relation extractor is fine-tuned from")
        if not 0.0 <= self.threshold <= 1.0:
            raise DataError(f"threshold={self.threshold}: a probability in [0, 1]")
        if self.finetune_steps < 1:
            raise DataError(f"finetune_steps={self.finetune_steps}: must be >= 1")


def bootstrap(cfg: BootstrapConfig, log=print) -> dict:
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"config": asdict(cfg)}

    # 1. distant supervision
    rel = out / "relations"
    if (rel / "stats.json").is_file():
        log(f"bootstrap: relations done ({rel})")
        summary["relations"] = json.loads((rel / "stats.json").read_text())
    else:
        rc = RelationsConfig(
            corpus=list(cfg.corpus),
            kg=cfg.kg,
            aliases=cfg.aliases,
            case=cfg.case,
            output=str(rel),
            negative_ratio=cfg.negative_ratio,
        )
        summary["relations"] = prepare_relations(rc, log)

    # 2. the relation extractor
    ft = out / "extractor"
    if (ft / "results.json").is_file():
        log(f"bootstrap: extractor done ({ft})")
    else:
        cmd = [*(shlex.split(cfg.launcher) or [sys.executable]), str(REPO / "launcher" / "finetune.py")]
        cmd += ["--ds_config", cfg.ds_config, "--init", cfg.init, "--task", "relation"]
        cmd += ["--train", str(rel / "train.jsonl"), "--dev", str(rel / "dev.jsonl"), "--output_dir", str(ft)]
        cmd += [
            f"--train.max_steps={cfg.finetune_steps}",
            f"--train.eval_every={max(1, cfg.finetune_steps // 4)}",
        ]
        cmd += shlex.split(cfg.finetune_args)
        if (ft / "checkpoints").is_dir():
            cmd.append("--resume")
        log(f"bootstrap: fine-tuning the extractor: {shlex.join(cmd)}")
        if subprocess.run(cmd).returncode != 0:  # in this folder: the paths given are relative to it
            raise DataError(
                f"{ft}: fine-tuning the relation extractor failed (its output is above); run again to resume"
            )
    summary["extractor"] = {
        k: v for k, v in json.loads((ft / "results.json").read_text()).items() if k != "history"
    }

    # 3. extraction and the shards
    args = out / "extractor.json"
    atomic_write(args, json.dumps({"threshold": cfg.threshold, "batch_size": cfg.batch_size}).encode())
    pc = PrepConfig(
        corpus=list(cfg.extract_corpus or cfg.corpus),
        output=str(out / "dataset"),
        kg=cfg.kg,
        aliases=cfg.aliases,
        case=cfg.case,
        tokenizer=cfg.tokenizer,
        vocab_size=cfg.vocab_size,
        seq_len=cfg.seq_len,
        workers=cfg.workers,
        extractor=str(ft),  # the fine-tuned run: data_prep/model_extractor.py
        extractor_args=str(args),
    )
    done = out / "dataset" / "manifest.json"
    if done.is_file() and (out / "bootstrap.json").is_file():
        log(f"bootstrap: dataset done ({done.parent}; delete it to extract again)")
        manifest = json.loads(done.read_text())
    else:
        manifest = prepare(pc, log=log)
    summary["dataset"] = {
        k: manifest[k]
        for k in (
            "kg_triples",
            "triples_attached",
            "triples_attached_by_extractor",
            "triples_new_from_extractor",
            "documents_written",
            "tokens",
        )
        if k in manifest
    }
    atomic_write(out / "bootstrap.json", json.dumps(summary, indent=2).encode())
    log(
        f"bootstrap: {summary['dataset'].get('triples_new_from_extractor', 0)} new triples extracted "
        f"(threshold {cfg.threshold}) beside {summary['dataset'].get('kg_triples', 0)} KG triples -> {out / 'dataset'}"
    )
    return summary
