"""Fine-tuning on the run harness (`sparsexpert/harness.py`): a pretrained (or dense, or fresh)
backbone, one head per task, the DeepSpeed engine.

`Finetuner(cfg, ds_json, output_dir).train()` is what `launcher/finetune.py` calls. Writes under
output_dir: config.json, metrics.jsonl, tensorboard/, best/ (the checkpoint with the best dev
metric), predictions/<task>_{dev,test}.{conll,jsonl}, results.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_prep.output import atomic_write
from data_prep.tokenizer import text_start_id
from sparsexpert.config import ConfigError
from sparsexpert.distributed import comm, parallel
from sparsexpert.distributed import device as _device
from sparsexpert.finetune import data as fdata
from sparsexpert.finetune.config import FinetuneConfig
from sparsexpert.finetune.metrics import classification_scores, entity_report, relation_scores
from sparsexpert.finetune.model import TaskModel, TaskSpec
from sparsexpert.harness import Harness, MicroOut, NonFiniteSteps, RunStopped, load_state
from sparsexpert.metrics import Monitor, format_duration
from sparsexpert.model.transformer import IGNORE_INDEX
from sparsexpert.weights import checkpoint, deepspeed_formats
from sparsexpert.weights.export import load_init, model_config_of, upcycled

RUN_FILES = (
    "best",
    "checkpoints",
    "predictions",
    "metrics.jsonl",
    "tensorboard",
    "config.json",
    "results.json",
)
"""What a fine-tuning run writes into its output folder."""


class Finetuner:
    def __init__(
        self,
        cfg: FinetuneConfig,
        ds_json: dict[str, Any],
        output_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
    ):
        """resume: continue the run in output_dir from its checkpoints/ (written at each evaluation);
        overwrite: start over in a folder that holds a run. Neither: the folder must hold no run."""
        cfg.validate()
        tc = cfg.train
        self.h = h = Harness.for_loop(output_dir, tc, tc.max_steps, resume, overwrite, RUN_FILES)
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.rank, self.world = h.rank, h.world
        log = h.log

        # Backbone config and weights.
        state = None
        if cfg.train.init:
            init = load_init(cfg.train.init)
            state, model_cfg, tok_path = init.state, init.cfg, init.tokenizer
            if tok_path is None:
                raise FileNotFoundError(f"{cfg.train.init}: no tokenizer beside the weights")
            if cfg.train.upcycle_experts:
                model_cfg, state = upcycled(
                    model_cfg, state, cfg.model.moe, cfg.train.upcycle_experts, cfg.train.seed
                )
            model_cfg.moe.ep_size = cfg.model.moe.ep_size
            model_cfg.activation_checkpointing = cfg.model.activation_checkpointing
            model_cfg.moe.aux_loss_coef, model_cfg.moe.z_loss_coef = (
                cfg.model.moe.aux_loss_coef,
                cfg.model.moe.z_loss_coef,
            )
            model_cfg.moe.router_fp32 = cfg.model.moe.router_fp32
            log(f"initializing from {init.source}{' (dense, upcycled)' if cfg.train.upcycle_experts else ''}")
        else:
            model_cfg, tok_path = cfg.model, Path(cfg.tokenizer)
        if cfg.bidirectional:
            model_cfg.causal = False
        # Fine-tuning reads text; the pretrained backbone keeps what the KG taught it.
        model_cfg.knowledge.mode = "none"
        self.tok = fdata.load_tokenizer_for(tok_path)
        self.tokenizer_file = Path(self.tok.path)
        if model_cfg.vocab_size == 0:
            model_cfg.vocab_size = self.tok.vocab_size
        self.model_cfg = model_cfg
        self.max_len = cfg.max_len or model_cfg.max_seq_len
        if self.max_len > model_cfg.max_seq_len:
            raise ConfigError("max_len", cfg.max_len, f"must be <= model.max_seq_len={model_cfg.max_seq_len}")
        bos = text_start_id(self.tok)
        self.pad_id = self.tok.pad_id if self.tok.pad_id is not None else self.tok.eos_id

        # Tasks and data.
        self.specs, self.train_sets, self.dev_sets, self.test_sets = [], [], [], []
        for t in cfg.tasks:
            train = fdata.read_task(t, "train")
            labels = fdata.task_labels(t, train)
            self.specs.append(TaskSpec(t.name, t.kind, labels))
            self.train_sets.append(fdata.encode(t, train, labels, self.tok, bos, self.max_len, t.train))
            self.dev_sets.append(
                fdata.encode(t, fdata.read_task(t, "dev"), labels, self.tok, bos, self.max_len, t.dev)
            )
            self.test_sets.append(
                fdata.encode(t, fdata.read_task(t, "test"), labels, self.tok, bos, self.max_len, t.test)
                if t.test
                else None
            )
            c = self.train_sets[-1].counts + self.dev_sets[-1].counts
            log(
                f"task {t.name} ({t.kind}): {len(self.train_sets[-1].ids)} train, {len(self.dev_sets[-1].ids)} dev, "
                f"{len(labels)} labels{'; ' + str(dict(c)) if c else ''}"
            )

        # DeepSpeed config.
        ds, self.triplet = h.deepspeed_config(
            ds_json, model_cfg, cfg.train.max_steps, self.tok.vocab_size, self.max_len
        )
        if ds.get("zero_optimization", {}).get("stage", 0) == 3:
            raise ConfigError(
                "ds_config.zero_optimization.stage",
                3,
                "fine-tuning supports ZeRO 0-2; use ds_configs/moe_z2.json",
            )
        self.ds_config, self.ds_json = ds, ds_json

        # Model and weights, teacher, engine.
        model_cfg.validate()
        model = TaskModel(model_cfg, self.specs, cfg.task_aware_routing)
        model.init_weights(cfg.train.seed)
        model.init_heads(cfg.train.seed)
        if state is not None:
            load_state(
                model,
                state,
                str(cfg.train.init),
                skip=("knowledge.", "heads.", "task_embeddings."),
                fresh=("heads.", "task_embeddings."),
            )
        if not model_cfg.tie_embeddings:
            model.output.weight.requires_grad_(False)  # the LM head has no part in the tasks
        if cfg.freeze_embeddings:
            model.tok_embeddings.weight.requires_grad_(False)
        self.param_counts = model.num_params()
        # DeepSpeed wants the experts in an optimizer group even when they are frozen, so frozen
        # experts stay in it without weight decay and with their gradients zeroed: Adam moves them by 0.
        self.engine = h.build_engine(model, ds, no_decay=".experts." if cfg.freeze_experts else None)
        if cfg.freeze_experts:
            for n, p in self.engine.module.named_parameters():
                if ".experts." in n:
                    p.register_hook(torch.zeros_like)
        self.teacher = self._load_teacher() if cfg.distill.teacher else None
        self.schedule = fdata.TaskSchedule(
            [len(d.ids) for d in self.train_sets],
            self.triplet.micro,
            self.triplet.grad_accum,
            self.world,
            self.rank,
            cfg.train.seed,
            cfg.sampling,
            cfg.sampling_temperature,
        )
        self.step = 0
        self.loop: dict[str, Any] = {
            "best": None,
            "best_step": 0,
            "bad_evals": 0,
            "stopped_early": False,
            "history": [],
            "best_results": {},
        }
        if resume:
            self._resume()
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            described = {**self._describe(), "environment": parallel.environment()}
            (self.output_dir / "config.json").write_text(json.dumps(described, indent=2, default=str))
        # the LM head is not computed: the task heads replace it
        self.monitor = Monitor(
            h.device,
            self.world,
            model_cfg,
            self.param_counts["active"],
            self.max_len,
            parallel.precision_of(ds),
            cfg.train.heatmap_every,
            lm_head=False,
        )
        p, b = self.param_counts, self.triplet
        log(
            f"finetune: {p['total'] / 1e6:.2f}M parameters ({p['active'] / 1e6:.2f}M active) | world {self.world}, "
            f"ZeRO-{ds.get('zero_optimization', {}).get('stage', 0)} | batch {b.global_batch} = {b.micro} x {b.grad_accum} x {b.dp} | "
            f"adversarial {cfg.adversarial.method}{' | distill from ' + cfg.distill.teacher if self.teacher else ''}"
        )
        log(self.monitor.describe())

    def _describe(self) -> dict[str, Any]:
        return {
            "kind": "finetune",
            "run": asdict(self.cfg),
            "model": asdict(self.model_cfg),
            "tasks": [asdict(s) for s in self.specs],
            "ds_config": self.ds_config,
            "ds_json": self.ds_json,
            "world_size": self.world,
            "init": self.cfg.train.init,
        }

    def _load_teacher(self) -> TaskModel:
        """The frozen teacher, on this rank's device in the student's compute dtype."""
        state, meta = deepspeed_formats.load_weights(self.cfg.distill.teacher)
        if meta.get("kind") != "finetune":
            raise ConfigError(
                "distill.teacher",
                self.cfg.distill.teacher,
                "must be a fine-tuning checkpoint (with task heads)",
            )
        specs = [TaskSpec(**s) for s in meta["tasks"]]
        mine = {s.name: s.labels for s in self.specs}
        for s in specs:
            if s.name in mine and s.labels != mine[s.name]:
                raise ConfigError(
                    "distill.teacher",
                    self.cfg.distill.teacher,
                    f"task {s.name}: teacher labels {s.labels} differ from {mine[s.name]}",
                )
        if any(s.name not in {t.name for t in specs} for s in self.specs):
            raise ConfigError(
                "distill.teacher", self.cfg.distill.teacher, "the teacher lacks some of the tasks"
            )
        tcfg = model_config_of(meta)
        tcfg.moe.ep_size = 1
        teacher = TaskModel(tcfg, specs, meta["run"].get("task_aware_routing", False))
        load_state(teacher, state, str(self.cfg.distill.teacher))
        self._teacher_task = {s.name: i for i, s in enumerate(specs)}
        for p in teacher.parameters():
            p.requires_grad_(False)
        dtype = next(self.engine.module.parameters()).dtype
        return _device.guard(teacher.to(device=self.h.device, dtype=dtype).eval(), "teacher")

    # ------------------------------------------------------------------ one micro-batch
    def _batch(self, step: int, m: int) -> tuple[int, dict[str, Any], int]:
        """(task, model inputs on the host, tokens): a function of (step, m), so it can be prefetched."""
        task, idx = self.schedule.examples(step, m)
        kind = self.specs[task].kind
        batch = fdata.collate(self.train_sets[task], kind, idx, self.pad_id, self.model_cfg.causal)
        return task, batch, int(batch["lengths"].sum())

    def _forward(self, item: tuple[int, dict[str, Any], int]) -> MicroOut:
        task, batch, tokens = item
        loss, scalars, counts, router_layers = self._loss(task, batch)
        scalars[f"{self.specs[task].name}/loss"] = scalars["task_loss"]
        if counts is None or router_layers is None:  # a dense model: both are None
            return MicroOut(loss, scalars, tokens=tokens)
        return MicroOut(loss, scalars, {"expert_counts": counts}, tokens, {"router_layers": router_layers})

    def _loss(
        self, task: int, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The weighted loss of a micro-batch (on the device), the terms to log (device tensors, no
        host sync), the expert counts and the per-layer router figures."""
        cfg = self.cfg
        out = self.engine(task=task, **batch)
        w = cfg.tasks[task].loss_weight
        loss = out.loss
        stats = {"task_loss": out.task_loss, "aux_loss": out.aux_loss, "z_loss": out.z_loss}
        adv = cfg.adversarial
        if adv.method != "none":
            delta = self._adversary(task, batch, out)
            adv_out = self.engine(task=task, embed_delta=delta, **batch)
            loss = loss + adv_out.loss
            stats["adv_loss"] = adv_out.task_loss
        if self.teacher is not None:
            with torch.no_grad():
                name = self.specs[task].name
                t_logits = self.teacher(task=self._teacher_task[name], **batch).logits.float()
            T = cfg.distill.temperature
            s_logp = F.log_softmax(out.logits.float() / T, -1)
            t_logp = F.log_softmax(t_logits / T, -1)
            kl_rows = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # KL(teacher || student) per row or token
            if kl_rows.dim() == 2:  # tokens: the mean over labelled positions (a mask, no host sync)
                keep = (batch["labels"] != IGNORE_INDEX).to(kl_rows.dtype)
                kl = (kl_rows * keep).sum() / keep.sum().clamp_min(1)
            else:
                kl = kl_rows.mean()
            loss = (1 - cfg.distill.alpha) * loss + cfg.distill.alpha * T * T * kl
            stats["distill_kl"] = kl
        stats["total_loss"] = loss
        return w * loss, stats, out.expert_counts, out.router_layers

    def _adversary(self, task: int, batch: dict[str, Any], out) -> torch.Tensor:
        """FGM: epsilon * g / ||g||; PGD: `steps` ascent steps of size alpha on the embedding
        perturbation, each projected onto the epsilon ball (norms per example). Gradients are taken
        w.r.t. the perturbation only (torch.autograd.grad), so parameter gradients come from the one
        engine.backward of the total loss."""
        adv = self.cfg.adversarial

        def normalized(g: torch.Tensor) -> torch.Tensor:
            return g / g.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]

        (g,) = torch.autograd.grad(out.task_loss, out.embeds, retain_graph=True)
        if adv.method == "fgm":
            return self.h.to_device((adv.epsilon * normalized(g)).detach())
        delta = torch.zeros_like(out.embeds)
        for _ in range(adv.steps):
            delta = (delta + adv.alpha * normalized(g)).detach()
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = self.h.to_device(delta * (adv.epsilon / norm).clamp(max=1.0)[:, None, None])
            delta.requires_grad_(True)
            probe = self.engine(task=task, embed_delta=delta, **batch)
            (g,) = torch.autograd.grad(probe.task_loss, delta)
        return self.h.to_device(delta.detach())

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, task: int, data: fdata.Encoded) -> list:
        """Predictions for every example of `data` (every rank returns all of them). The argmaxes stay
        on the device until the last batch: one host synchronization per call, not per batch or token."""
        self.engine.eval()
        kind, n = self.specs[task].kind, len(data.ids)
        size = self.triplet.micro
        n_batches = math.ceil(n / size)
        n_batches += (-n_batches) % self.world  # equal forward counts on every rank
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        for bi in range(self.rank, n_batches, self.world):
            idx = np.arange(bi * size, min(n, (bi + 1) * size))
            real = len(idx) > 0
            batch = fdata.collate(
                data, kind, idx if real else np.array([0]), self.pad_id, self.model_cfg.causal
            )
            batch.pop("labels")
            logits = self.engine(task=task, **self.h.to_device(batch)).logits
            if real:
                pending.append((idx, logits.argmax(-1)))
        mine: list[tuple[int, Any]] = []
        for idx, pred_dev in pending:
            pred = pred_dev.cpu().numpy()
            for b, i in enumerate(idx):
                if kind == "ner":
                    mine.append((int(i), pred[b, : len(data.ids[i])]))
                else:
                    mine.append((int(i), int(pred[b])))
        self.engine.train()
        out: list = [None] * n
        for part in comm.all_gather_object(mine):
            for i, p in part:
                out[i] = fdata.ner_decode(data, i, p, self.specs[task].labels) if kind == "ner" else p
        return out

    def score(self, task: int, data: fdata.Encoded, preds: list) -> dict[str, Any]:
        """Entity-level P/R/F1 as seqeval computes them (ner; words cut by max_len count as
        predicted O), accuracy and macro F1 (classification), micro F1 without the negative class (relation)."""
        spec = self.specs[task]
        if spec.kind == "ner":
            rep = entity_report(data.tags, [p.tags for p in preds])
            micro = rep["micro avg"]
            return {
                "f1": micro["f1-score"],
                "precision": micro["precision"],
                "recall": micro["recall"],
                "macro_f1": rep["macro avg"]["f1-score"],
                "entities_inside_words": sum(p.inside_word for p in preds),
                "report": rep,
            }
        y_true = [spec.labels[y] for y in data.labels]
        y_pred = [spec.labels[p] for p in preds]
        if spec.kind == "classification":
            return classification_scores(y_true, y_pred)
        return relation_scores(y_true, y_pred, self.cfg.tasks[task].negative_label)

    def majority_baseline(self, task: int) -> dict[str, Any]:
        """Dev scores of always predicting the most frequent training label (ner: "O" everywhere)."""
        spec, train, dev = self.specs[task], self.train_sets[task], self.dev_sets[task]
        preds: list[fdata.NerPrediction] | list[int]
        if spec.kind == "ner":
            preds = [fdata.NerPrediction(["O"] * len(words), []) for words in dev.words]
        else:
            majority = int(np.bincount(np.asarray(train.labels), minlength=len(spec.labels)).argmax())
            preds = [majority] * len(dev.ids)
        return {k: v for k, v in self.score(task, dev, preds).items() if k != "report"}

    @staticmethod
    def main_metric(kind: str, scores: dict[str, Any]) -> float:
        return scores["accuracy"] if kind == "classification" else scores["f1"]

    def evaluate(self) -> tuple[float, dict[str, Any]]:
        results, mains = {}, []
        for task, spec in enumerate(self.specs):
            preds = self.predict(task, self.dev_sets[task])
            s = self.score(task, self.dev_sets[task], preds)
            results[spec.name] = (s, preds)
            mains.append(self.main_metric(spec.kind, s))
        return float(np.mean(mains)), results

    def write_predictions(self, split: str, task: int, data: fdata.Encoded, preds: list) -> Path:
        """ner: `word<TAB>gold<TAB>predicted` lines, a blank line between sentences, and beside them
        <task>_<split>.entities.jsonl, each sentence's entities with character spans in its words joined
        by single spaces (what transformers' NER pipeline gives on that text); else JSONL."""
        spec = self.specs[task]
        d = self.output_dir / "predictions"
        d.mkdir(parents=True, exist_ok=True)
        if spec.kind == "ner":
            path = d / f"{spec.name}_{split}.conll"
            lines = []
            for words, gold, p in zip(data.words, data.tags, preds):
                lines += [f"{w}\t{g}\t{t}" for w, g, t in zip(words, gold, p.tags)] + [""]
            atomic_write(path, ("\n".join(lines) + "\n").encode())
            rows = [
                json.dumps({"index": i, "text": " ".join(w), "entities": p.entities}, ensure_ascii=False)
                for i, (w, p) in enumerate(zip(data.words, preds))
            ]
            atomic_write(d / f"{spec.name}_{split}.entities.jsonl", ("\n".join(rows) + "\n").encode())
            return path
        path = d / f"{spec.name}_{split}.jsonl"
        rows = [
            json.dumps({"index": i, "gold": spec.labels[data.labels[i]], "pred": spec.labels[p]})
            for i, p in enumerate(preds)
        ]
        atomic_write(path, ("\n".join(rows) + "\n").encode())
        return path

    # ------------------------------------------------------------------ the loop
    def _meta(self, **extra: Any) -> dict[str, Any]:
        return {**self._describe(), "step": self.step, "loop": self.loop, **extra}

    def save_best(self, metric: float) -> Path:
        meta = self._meta(dev_metric=metric)
        return self.h.save(self.output_dir / "best", self.step, meta, self.tokenizer_file, keep=1)

    def save_resumable(self) -> Path:
        """checkpoints/: the latest state, with the loop's own (best metric, evaluations without a better
        one, history, the best results), which --resume continues from."""
        return self.h.save(
            self.output_dir / "checkpoints", self.step, self._meta(), self.tokenizer_file, keep=1
        )

    def _resume(self) -> None:
        root = self.output_dir / "checkpoints"
        tag = checkpoint.for_resume(root, self.h.log)
        if tag is None:
            self.h.log(f"--resume: no complete checkpoint in {root}; starting from step 0")
            self.h.metrics.resume_from(0)
            return
        meta = json.loads((tag / checkpoint.META).read_text())
        if meta["world_size"] != self.world:
            raise ConfigError(
                "world size",
                self.world,
                f"{tag} was written by {meta['world_size']} processes; resume fine-tuning with as many",
            )
        self.step = self.h.resume(tag, False, self.cfg.train.seed, 0)["step"]
        self.loop = meta["loop"]
        self.h.metrics.resume_from(self.step)
        self.h.log(f"resumed from {tag} at step {self.step}")

    def train(self) -> dict[str, Any]:
        """Train to max_steps (or an early stop). If any rank fails, every rank stops within seconds
        with exit status 1 and a line naming the failed rank (comm.RankWatch)."""
        with self.h.watch("fine-tuning"):
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg, h, engine, loop = self.cfg, self.h, self.engine, self.loop
        nonfinite = NonFiniteSteps(
            cfg.train.max_nonfinite_steps, parallel.precision_of(self.ds_config) == "fp16"
        )
        t0, t_int = time.time(), time.time()
        accum = self.triplet.grad_accum
        engine.train()
        batches = h.prefetch(self._batch, self.step, cfg.train.max_steps, accum)
        try:
            while self.step < cfg.train.max_steps and not loop["stopped_early"]:
                h.tick(self.step + 1)
                applied = h.step(self.step, batches, accum, self._forward)
                self.step += 1
                done = self.step == cfg.train.max_steps
                if nonfinite.update(self.step, applied):
                    r = h.interval()
                    h.metrics.log({k: r[k] for k in ("task_loss", "grad_norm") if k in r}, self.step)
                    raise RunStopped(
                        f"steps {nonfinite.first}-{self.step}: {nonfinite.in_a_row} updates in a row skipped, the "
                        f"loss or gradients not finite; the best checkpoint is {self.output_dir / 'best'}, the "
                        f"latest healthy one {checkpoint.find_latest(self.output_dir / 'checkpoints')}: continue "
                        "with --resume, e.g. at a lower learning rate, or raise max_nonfinite_steps"
                    )
                if not nonfinite.healthy:
                    h.log(f"step {self.step}: the gradients are not finite; the update was skipped")
                if self.step % cfg.train.log_every == 0 or done:
                    r = h.interval()
                    record = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "tokens"}
                    record["loss"] = record.pop("task_loss")
                    record.update(self.monitor.figures(r, time.time() - t_int, final=done))
                    h.metrics.log(record, self.step)
                    t_int = time.time()
                if (self.step % cfg.train.eval_every == 0 or done) and nonfinite.healthy:
                    self._evaluate_and_keep()
                    self.save_resumable()
        finally:
            batches.close()
        best, best_step = loop["best"], loop["best_step"]
        results = loop["best_results"]
        summary = {
            "best_dev_metric": best,
            "best_step": best_step,
            "steps": self.step,
            "params": self.param_counts,
            "results": {k: {kk: vv for kk, vv in v.items() if kk != "report"} for k, v in results.items()},
            "reports": {k: v.get("report") for k, v in results.items() if "report" in v},
            "majority_baseline": {s.name: self.majority_baseline(t) for t, s in enumerate(self.specs)},
            "history": loop["history"],
            "seconds": time.time() - t0,
        }
        if self.rank == 0:
            (self.output_dir / "results.json").write_text(json.dumps(summary, indent=2))
            from sparsexpert.finetune.metrics import format_report

            for name, rep in summary["reports"].items():
                h.log(f"{name} (best dev, step {best_step}):\n{format_report(rep)}")
            best_text = f"{best:.4f}" if best is not None else "none"
            h.log(
                f"done: best dev metric {best_text} at step {best_step}; {format_duration(summary['seconds'])}; "
                f"best checkpoint {self.output_dir / 'best'}"
            )
        h.metrics.close()
        return summary

    def _evaluate_and_keep(self) -> None:
        """Dev evaluation; a better metric writes best/, the predictions and the test scores; `patience`
        evaluations without one stop the run early."""
        loop, h = self.loop, self.h
        metric, results = self.evaluate()
        rec = {"dev_metric": metric}
        for name, (sc, _) in results.items():
            rec.update({f"dev/{name}/{k}": v for k, v in sc.items() if isinstance(v, float)})
        loop["history"].append({"step": self.step, **rec})
        h.metrics.log(rec, self.step)
        if loop["best"] is None or metric > loop["best"]:
            loop.update(best=metric, best_step=self.step, bad_evals=0)
            self.save_best(metric)
            if self.rank == 0:
                for task, (_, preds) in enumerate(results.values()):
                    self.write_predictions("dev", task, self.dev_sets[task], preds)
            loop["best_results"] = {n: sc for n, (sc, _) in results.items()}
            for task, data in enumerate(self.test_sets):
                if data is not None:
                    preds = self.predict(task, data)
                    loop["best_results"][f"{self.specs[task].name}/test"] = self.score(task, data, preds)
                    if self.rank == 0:
                        self.write_predictions("test", task, data, preds)
        else:
            loop["bad_evals"] += 1
            if self.cfg.train.patience and loop["bad_evals"] >= self.cfg.train.patience:
                h.log(
                    f"early stop at step {self.step}: no better dev metric in {loop['bad_evals']} evaluations"
                )
                loop["stopped_early"] = True
