"""A fine-tuned run for inference, outside DeepSpeed: its best checkpoint's weights in a `TaskModel` on one
device, fed batches of examples encoded exactly as fine-tuning encoded them (data_prep's model
extractor uses it; `launcher/finetune.py` trains what it loads).

    model = FinetunedModel.load("runs/relation")            # the run folder (its best/), or a tag
    probs = model.relation_probs([RelationExample(text, (0, 5), (12, 20), "no_relation")])
    entities = model.ner_entities([["Ada", "Lovelace", "was", "born", "in", "London", "."]])

Examples are sorted by length and cut into batches of `batch_size`, so a batch pads little; the
answers come back in the order given. On CUDA the model runs there (fp32; `dtype` to change it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.tokenizer import text_start_id
from sparsexpert.finetune import data as fdata
from sparsexpert.finetune.config import TaskConfig
from sparsexpert.finetune.model import TaskModel, TaskSpec
from sparsexpert.finetune.readers import NerExample, RelationExample
from sparsexpert.harness import load_state
from sparsexpert.weights import checkpoint, deepspeed_formats
from sparsexpert.weights.export import model_config_of

CACHE = Path(os.environ.get("SPARSEXPERT_CACHE", Path.home() / ".cache" / "sparsexpert"))
"""Where shared weights are kept (SPARSEXPERT_CACHE; default ~/.cache/sparsexpert)."""


def shared_weights(tag: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's fp32 weights memory-mapped, read-only, from one .npy file per tensor in
    CACHE/weights/<digest of the tag's COMPLETE.json>/ (written once, atomically, by the first process
    to need it, from the checkpoint's files checked against that manifest). Processes that map the same
    files share their pages: n data_prep workers hold one copy of an extractor's weights, not n."""
    key = hashlib.sha256((tag / checkpoint.COMPLETE).read_bytes()).hexdigest()[:24]
    folder = CACHE / "weights" / key
    if not (folder / "index.json").is_file():
        state, meta = deepspeed_formats.load_weights(tag)
        tmp = folder.with_name(f".{key}.{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        try:
            names = sorted(state)
            for i, name in enumerate(names):
                np.save(tmp / f"{i:05d}.npy", state[name].detach().contiguous().cpu().numpy())
            files = {n: f"{i:05d}.npy" for i, n in enumerate(names)}
            (tmp / "index.json").write_text(json.dumps({"source": str(tag), "meta": meta, "tensors": files}))
            try:
                tmp.rename(folder)
            except OSError:  # another process wrote the same weights first
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    index = json.loads((folder / "index.json").read_text())
    with warnings.catch_warnings():  # read-only arrays: inference never writes the weights
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {n: torch.from_numpy(np.load(folder / f, mmap_mode="r")) for n, f in index["tensors"].items()}
    return state, index["meta"]


@dataclass
class FinetunedModel:
    model: TaskModel
    tasks: list[TaskSpec]
    negative: dict[str, str]
    """task name -> its negative label (relation tasks)."""
    tok: Any
    bos: int
    pad_id: int
    max_len: int
    device: torch.device
    source: Path
    """The checkpoint tag read."""

    @classmethod
    def load(
        cls, run: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32, shared: bool = False
    ) -> FinetunedModel:
        """A fine-tuning run folder (its best/ checkpoint, else its latest) or a checkpoint tag; every
        file checked against COMPLETE.json and read as data (weights_only). shared (fp32 on the CPU):
        the weights are memory-mapped from one copy on disk (`shared_weights`), so that every process
        loading this run reads the same pages instead of holding its own copy."""
        tag = checkpoint.resolve_tag(run)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        where = torch.device(device)
        shared = shared and where.type == "cpu" and dtype == torch.float32
        state, meta = shared_weights(tag) if shared else deepspeed_formats.load_weights(tag)
        if meta.get("kind") != "finetune":
            raise ValueError(
                f"{tag}: a {meta.get('kind', 'pretraining')} checkpoint; give a fine-tuning run (with task heads)"
            )
        cfg = model_config_of(meta)
        cfg.moe.ep_size = 1
        specs = [TaskSpec(**s) for s in meta["tasks"]]
        model = TaskModel(cfg, specs, meta["run"].get("task_aware_routing", False))
        load_state(model, state, str(tag), assign=shared)
        model = model.to(device=where, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        tok = fdata.load_tokenizer_for(tag)
        negative = {
            t["name"] or t["kind"]: t.get("negative_label", "no_relation") for t in meta["run"]["tasks"]
        }
        max_len = meta["run"].get("max_len") or cfg.max_seq_len
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        return cls(model, specs, negative, tok, text_start_id(tok), pad, max_len, where, tag)

    def task(self, kind: str, name: str | None = None) -> int:
        """The index of the task of this kind (and name)."""
        found = [i for i, t in enumerate(self.tasks) if t.kind == kind and (name is None or t.name == name)]
        if len(found) != 1:
            have = ", ".join(f"{t.name} ({t.kind})" for t in self.tasks)
            raise ValueError(
                f"{self.source}: {len(found)} {kind} tasks{f' named {name}' if name else ''}; it has {have}"
            )
        return found[0]

    def _logits(
        self, data: fdata.Encoded, kind: str, task: int, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """(example indices, their fp32 logits on the device) of every batch, the examples sorted by
        length so that a batch pads little."""
        order = np.argsort([len(x) for x in data.ids], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = fdata.collate(data, kind, idx, self.pad_id, self.model.cfg.causal)
            batch.pop("labels")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            yield idx, self.model(task=task, **batch).logits.float()

    @torch.inference_mode()
    def relation_probs(
        self, examples: list[RelationExample], task: str | None = None, batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [n, labels], kept [n] bool) of each example: the softmax of the relation head.
        An example whose entity marker max_len would cut is not scored (kept False, probabilities 0),
        as fine-tuning drops it."""
        t = self.task("relation", task)
        spec = self.tasks[t]
        neg = self.negative.get(spec.name, "no_relation")
        probs = np.zeros((len(examples), len(spec.labels)), np.float32)
        kept = np.zeros(len(examples), bool)
        if not examples:
            return probs, kept
        cfg = TaskConfig(name=spec.name, kind="relation", train="-", negative_label=neg)
        # one example at a time, so that a dropped one is known (encode skips it)
        enc = [
            fdata.encode(
                cfg,
                [RelationExample(x.text, x.e1, x.e2, neg)],
                spec.labels,
                self.tok,
                self.bos,
                self.max_len,
                "-",
            )
            for x in examples
        ]
        scored = [i for i, e in enumerate(enc) if e.ids]
        data = fdata.Encoded(
            [enc[i].ids[0] for i in scored],
            [enc[i].labels[0] for i in scored],
            [enc[i].markers[0] for i in scored],
        )
        for idx, logits in self._logits(data, "relation", t, batch_size):
            probs[np.asarray(scored)[idx]] = torch.softmax(logits, -1).cpu().numpy()
        kept[scored] = True
        return probs, kept

    @torch.inference_mode()
    def ner_entities(
        self, sentences: list[list[str]], task: str | None = None, batch_size: int = 64
    ) -> list[list[dict[str, Any]]]:
        """Each sentence's (a list of words) entities as fine-tuning predicts them (`ner_decode`):
        {"type", "start", "end", "text"}, character offsets in the words joined by single spaces. Words
        past max_len are not tagged (as in fine-tuning's predictions)."""
        t = self.task("ner", task)
        spec = self.tasks[t]
        if not sentences:
            return []
        cfg = TaskConfig(name=spec.name, kind="ner", train="-")
        data = fdata.encode(
            cfg,
            [NerExample(list(w), ["O"] * len(w)) for w in sentences],
            spec.labels,
            self.tok,
            self.bos,
            self.max_len,
            "-",
        )
        out: list[list[dict[str, Any]]] = [[] for _ in sentences]
        for idx, logits in self._logits(data, "ner", t, batch_size):
            pred = logits.argmax(-1).cpu().numpy()
            for row, i in enumerate(idx.tolist()):
                out[i] = fdata.ner_decode(data, i, pred[row], spec.labels).entities
        return out
