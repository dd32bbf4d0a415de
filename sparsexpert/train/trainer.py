"""Pretraining on the run harness (`sparsexpert/harness.py`): data, model config, DeepSpeed config,
model, engine, resume; then the loop.

`pretrain(cfg, ds_json, output_dir, resume)` is what `launcher/pretrain.py` calls. Everything a
run writes goes under output_dir: the prepared example data, config.json, metrics.jsonl,
tensorboard/, checkpoints/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sparsexpert.config import ConfigError, from_dict
from sparsexpert.data.format import Manifest, is_dataset
from sparsexpert.data.knowledge import KnowledgeLoader
from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader, read_manifest
from sparsexpert.distributed import comm, parallel
from sparsexpert.distributed.device import accelerator_device
from sparsexpert.harness import Harness, MicroOut, NonFiniteSteps, RunStopped, load_state
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.metrics import Monitor, format_duration
from sparsexpert.model import ModelConfig, build_model
from sparsexpert.train.config import RunConfig
from sparsexpert.train.rowwise import RowwiseAdagrad, lookups_per_step
from sparsexpert.weights import checkpoint, deepspeed_formats, export


def prepare_data(cfg: RunConfig, output_dir: Path, log) -> Path:
    """The dataset folder: cfg.data.path, or the built-in example prepared once per node."""
    if cfg.data.path:
        read_manifest(cfg.data.path)  # fail early, with the path, if it is not a dataset
        return Path(cfg.data.path)
    data_dir = output_dir / "data"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not is_dataset(data_dir):
        from data_prep.pipeline import PrepConfig, prepare_example

        log(f"preparing the built-in example knowledge world into {data_dir}")
        prep = PrepConfig(vocab_size=cfg.data.example_vocab_size, seq_len=cfg.data.example_seq_len)
        prepare_example(data_dir, prep, log=log)
    comm.barrier()
    return data_dir


def resolve_knowledge_sizes(cfg: ModelConfig, manifest: Manifest, data_dir: Path) -> None:
    """Size the entity and relation tables from data_prep's vocabularies (fusion mode)."""
    k = cfg.knowledge
    if k.mode == "none":
        return
    if not manifest.get("entities"):
        raise ConfigError(
            "model.knowledge.mode",
            k.mode,
            f"the dataset {data_dir} has no linked entities; prepare it with a KG (python -m data_prep "
            "--kg ...) or set model.knowledge.mode=none",
        )
    for field, have in (("num_entities", manifest["entities"]), ("num_relations", manifest["relations"])):
        if getattr(k, field) == 0:
            setattr(k, field, max(have, 1))
        elif getattr(k, field) < have:
            raise ConfigError(
                f"model.knowledge.{field}",
                getattr(k, field),
                f"the dataset has {have}; use 0 (from the dataset) or more",
            )


def resolved_config(cfg: RunConfig, ds_json: dict[str, Any], output_dir: str | Path) -> dict[str, Any]:
    """What `launcher/pretrain.py --print_config` prints, without starting anything or writing a file:
    the run config and the DeepSpeed config as the run will record them in config.json ("run",
    "ds_config", "ds_json"), for this launch's world size (WORLD_SIZE, 1 without a launcher) and
    accelerator. What only the run can know is said under "unresolved": the knowledge tables' sizes
    of a dataset not prepared yet (the built-in example) and the network's shape given by train.init."""
    cfg.validate()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data_dir = Path(cfg.data.path) if cfg.data.path else Path(output_dir) / "data"
    manifest = read_manifest(data_dir) if is_dataset(data_dir) else None
    unresolved = []
    if cfg.train.init:
        unresolved.append(f"model: the shape comes from train.init={cfg.train.init} when the run starts")
    if manifest is not None:
        resolve_knowledge_sizes(cfg.model, manifest, data_dir)
    elif cfg.model.knowledge.mode != "none":
        unresolved.append("model.knowledge sizes: from the dataset, prepared when the run starts")
    vocab = manifest["tokenizer"]["vocab_size"] if manifest else None
    seq_len = manifest["seq_len"] if manifest else None
    accelerator = accelerator_device().type
    ds_config = parallel.prepare_ds_config(
        ds_json, cfg.model, world, cfg.train.max_steps, vocab, seq_len, accelerator
    )
    out = {"run": asdict(cfg), "ds_config": ds_config, "ds_json": ds_json, "world_size": world}
    if unresolved:
        out["unresolved"] = unresolved
    return out


def _check_resume_compatible(
    meta: dict[str, Any],
    cfg: RunConfig,
    world: int,
    ep_size: int,
    global_batch: int,
    zero_stage: int,
    tag_dir: Path,
) -> bool:
    """Whether resuming `tag_dir` is elastic (another world size or ep_size: `deepspeed_formats.load_elastic`);
    raises ConfigError for what no resume can change: the model (but its ep_size), the global batch."""
    saved_model = from_dict(ModelConfig, meta["run"]["model"])
    saved_model.moe.ep_size = cfg.model.moe.ep_size  # compared below, as resolved
    saved_model.activation_checkpointing = cfg.model.activation_checkpointing  # a runtime setting
    if asdict(saved_model) != asdict(cfg.model):
        diff = [k for k, v in asdict(cfg.model).items() if asdict(saved_model).get(k) != v]
        raise ConfigError(
            f"model.{diff[0]}",
            getattr(cfg.model, diff[0]),
            f"differs from the checkpoint {tag_dir} ({getattr(saved_model, diff[0])!r}); "
            "resume with the same model config",
        )
    if meta["global_batch"] != global_batch:
        # The data position is counted in global batches: global batch g is rows [g*B, (g+1)*B) of
        # the shuffled order whatever the world size, so B must stay (and the micro-batch size too,
        # for the same micro-batches and hence bit-comparable losses).
        raise ConfigError(
            "global_batch",
            global_batch,
            f"the checkpoint {tag_dir} was written with a global batch of {meta['global_batch']} "
            "(train_micro_batch_size_per_gpu x gradient_accumulation_steps x world size); resume with "
            "the same, e.g. the same micro-batch with gradient_accumulation_steps scaled inversely to "
            "the world size",
        )
    elastic = (meta["world_size"], meta["ep_size"]) != (world, ep_size)
    if elastic and cfg.model.moe.backend == "native" and cfg.model.moe.num_experts:
        # Measured: DeepSpeed 0.19.8's universal checkpoint assigns native experts to the wrong
        # ranks at ep_size=2, and nothing of ours reshards native checkpoints yet.
        raise ConfigError(
            "model.moe.backend",
            "native",
            f"the checkpoint {tag_dir} was written at world size {meta['world_size']}, ep_size "
            f"{meta['ep_size']}; resharding a native-MoE checkpoint to world size {world}, ep_size {ep_size} "
            "is not supported (DeepSpeed's universal checkpoint misplaces native experts): resume at the "
            "same world size and ep_size, or start a new run from its weights (launcher/export.py "
            "consolidates them at any ep_size; launcher/finetune.py --init reads them)",
        )
    saved_stage = meta["ds_config"].get("zero_optimization", {}).get("stage", 0)
    if elastic and 0 in (saved_stage, zero_stage):
        raise ConfigError(
            "ds_config.zero_optimization.stage",
            zero_stage,
            f"the checkpoint {tag_dir} was written at world size {meta['world_size']}, ep_size "
            f"{meta['ep_size']}, ZeRO-{saved_stage}; resharding it to world size {world}, ep_size {ep_size} "
            "needs ZeRO 1-3 on both sides (DeepSpeed has no universal loading at ZeRO-0): resume at the "
            "same world size and ep_size, or train with ZeRO 1-3",
        )
    return elastic


def make_loader(
    data_dir: Path,
    split: str,
    knowledge: KnowledgeConfig,
    causal: bool,
    micro: int,
    grad_accum: int,
    world: int,
    rank: int,
    seed: int,
    tokenizer_file: Path,
    verify: bool = True,
) -> KnowledgeLoader:
    """This rank's micro-batches of a split: loader.batch(global batch, micro step) -> model inputs (host).
    verify: check the shards against the manifest's hashes and the vocabulary (data.verify)."""
    data = PackedDataset(data_dir, split, verify=verify)
    tok = read_manifest(data_dir)["tokenizer"]
    plan = BatchPlan(len(data), micro, grad_accum, world, rank, seed)
    return KnowledgeLoader(
        ShardLoader(data, plan),
        data_dir,
        split,
        knowledge,
        causal,
        tok.get("mask_id"),
        tok["vocab_size"],
        tokenizer_file,
    )


def table_bytes_per_rank(n_params: int, zero_stage: int, precision: str, dp: int) -> int:
    """Memory one rank holds for n_params trained with Adam: the parameters (in the training precision),
    their gradients, and the optimizer's states (an fp32 master copy under mixed precision, and Adam's
    two moments), each divided over the dp ranks where the ZeRO stage partitions it (states from stage
    1, gradients from 2, parameters at 3)."""
    half = precision in ("bf16", "fp16")
    param_b, grad_b, state_b = (2, 2, 12) if half else (4, 4, 8)
    share = lambda partitioned: n_params / dp if partitioned else n_params  # noqa: E731
    return int(
        share(zero_stage >= 3) * param_b + share(zero_stage >= 2) * grad_b + share(zero_stage >= 1) * state_b
    )


RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "eval.json")
"""What a pretraining run writes into its output folder (besides the built-in example's data/)."""


class Pretrainer:
    def __init__(
        self,
        cfg: RunConfig,
        ds_json: dict[str, Any],
        output_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
    ):
        """resume: continue the run in output_dir from its latest usable checkpoint; overwrite: start
        over in a folder that holds a run (its files are deleted). Neither: the folder must hold no run."""
        cfg.validate()
        t = cfg.train
        self.h = h = Harness.for_loop(output_dir, t, t.max_steps, resume, overwrite, RUN_FILES)
        self.cfg, self.output_dir, self.ds_json = cfg, Path(output_dir), ds_json
        self.rank, self.world = h.rank, h.world
        log = h.log

        # Data.
        self.data_dir = prepare_data(cfg, self.output_dir, log)
        manifest = read_manifest(self.data_dir)
        self.tokenizer_file = self.data_dir / manifest["tokenizer"]["file"]

        # Model config: the shape from train.init if given, the knowledge tables sized by the data.
        init_state = None
        if t.init:  # the weights are loaded once the model is built
            init = export.load_init(t.init)
            export.check_same_vocabulary(init, self.tokenizer_file, self.data_dir)
            cfg.model, init_state = export.model_for_init(cfg.model, init, t.upcycle_experts, t.seed)
            log(f"initializing from {init.source}{' (dense, upcycled)' if t.upcycle_experts else ''}")
        resolve_knowledge_sizes(cfg.model, manifest, self.data_dir)

        # DeepSpeed config, and what a resume may change.
        self.ds_config, self.triplet = h.deepspeed_config(
            ds_json, cfg.model, t.max_steps, manifest["tokenizer"]["vocab_size"], manifest["seq_len"]
        )
        self.ep_size = parallel.expert_parallel_size(cfg.model, self.ds_config, self.world)
        self.ckpt_root = self.output_dir / "checkpoints"
        # every checkpoint checked; those passed over are logged with the reason; an error listing each
        # one when there are checkpoints but none is usable
        tag_dir = checkpoint.for_resume(self.ckpt_root, log) if resume else None
        if resume and tag_dir is None:
            log(f"--resume: no checkpoint in {self.ckpt_root}; starting from step 0")
        elastic = False
        if tag_dir is not None:
            meta = json.loads((tag_dir / checkpoint.META).read_text())
            stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
            elastic = _check_resume_compatible(
                meta, cfg, self.world, self.ep_size, self.triplet.global_batch, stage, tag_dir
            )

        # Model and its first weights (a resume overwrites them).
        model = build_model(cfg.model, t.seed)
        if init_state is not None and tag_dir is None:
            # Knowledge tables carry over when this run has the same ones; otherwise they start fresh.
            load_state(
                model,
                init_state,
                f"train.init={t.init}",
                fresh=("knowledge.",),
                if_same_shape=("knowledge.",),
            )
        self.param_counts = model.num_params()

        # Engine, then the checkpoint. Universal loading must be on at initialize for an elastic
        # resume; self.ds_config (saved with checkpoints) stays without it.
        self.engine = h.build_engine(
            model, deepspeed_formats.universal_loading(self.ds_config) if elastic else self.ds_config
        )
        # the entity table's own optimizer (fp32 from here on, before a resume loads it)
        self.rows: RowwiseAdagrad | None = None
        k = cfg.model.knowledge
        if k.fusion and k.entity_optimizer == "rowwise_adagrad":
            cap = lookups_per_step(k, self.triplet.micro, manifest["seq_len"], self.triplet.grad_accum)
            self.rows = RowwiseAdagrad(self.engine.module.knowledge, cap)
        self.step = 0
        if tag_dir is not None:
            self.step = h.resume(tag_dir, elastic, t.seed, self.ep_size)["step"]
            log(f"resumed from {tag_dir} at step {self.step}")
        if resume:
            h.metrics.resume_from(self.step)

        # Loaders.
        self.train_data = PackedDataset(self.data_dir, "train", verify=cfg.data.verify)
        self.seq_len = self.train_data.seq_len

        def loader(split: str, grad_accum: int, knowledge: KnowledgeConfig) -> KnowledgeLoader:
            return make_loader(
                self.data_dir,
                split,
                knowledge,
                cfg.model.causal,
                self.triplet.micro,
                grad_accum,
                self.world,
                self.rank,
                cfg.data.seed,
                self.tokenizer_file,
                verify=cfg.data.verify,
            )

        self.loader = loader("train", self.triplet.grad_accum, cfg.model.knowledge)
        self.valid_loader = None
        if t.eval_every and len(PackedDataset(self.data_dir, "valid", verify=cfg.data.verify)):
            # validation reads the text alone, whatever the knowledge mode, so arms compare
            self.valid_loader = loader("valid", 1, KnowledgeConfig())
        self.native = bool(cfg.model.moe_layer_ids) and cfg.model.moe.backend == "native"
        self.monitor = Monitor(
            h.device,
            self.world,
            cfg.model,
            self.param_counts["active"],
            self.seq_len,
            parallel.precision_of(self.ds_config),
            t.heatmap_every,
        )
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            described = {**self._describe(), "environment": parallel.environment()}
            (self.output_dir / "config.json").write_text(json.dumps(described, indent=2))
        self._log_header()

    def _describe(self) -> dict[str, Any]:
        return {
            "run": asdict(self.cfg),
            "ds_config": self.ds_config,
            "ds_json": self.ds_json,
            "world_size": self.world,
            "ep_size": self.ep_size,
            "global_batch": self.triplet.global_batch,
            "data_dir": str(self.data_dir),
        }

    def _log_header(self) -> None:
        p, t, m = self.param_counts, self.triplet, self.cfg.model.moe
        zero = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        precision = parallel.precision_of(self.ds_config)
        layer_experts = m.layer_experts(len(self.cfg.model.moe_layer_ids))
        experts = layer_experts if len(set(layer_experts)) > 1 else (layer_experts or [m.num_experts])[0]
        routing = ""
        if m.num_experts and m.backend == "native":
            from sparsexpert.distributed import native_moe

            routing = f" ({native_moe.describe(m, layer_experts)})"
        self.h.log(
            f"sparsexpert: {p['total'] / 1e6:.2f}M parameters ({p['active'] / 1e6:.2f}M active), "
            f"{len(layer_experts)} MoE layers x {experts} "
            f"experts top-{m.top_k}{routing} | "
            f"world {self.world}, ep {self.ep_size}, ZeRO-{zero}, {precision} | batch {t.global_batch} = "
            f"{t.micro} micro x {t.grad_accum} accum x {t.dp} dp, seq {self.seq_len} | "
            f"{len(self.train_data)} train rows from {self.data_dir} | output {self.output_dir}"
        )
        self.h.log(self.monitor.describe())
        k = self.cfg.model.knowledge
        if k.mode == "fusion":
            if self.rows is None:
                per_rank = table_bytes_per_rank(p["knowledge"], zero, precision, t.dp)
                memory = (
                    f"{per_rank / 2**30:.2f} GiB a rank with their gradients and Adam states under ZeRO-{zero} "
                    f"over {t.dp} data-parallel ranks"
                )
            else:
                rest = p["knowledge"] - self.engine.module.knowledge.entities.weight.numel()
                per_rank = self.rows.memory_bytes() + table_bytes_per_rank(rest, zero, precision, t.dp)
                memory = (
                    f"{per_rank / 2**30:.2f} GiB a rank: the entity table fp32 and whole on every rank with "
                    f"row-wise Adagrad (lr {k.entity_lr}, {self.rows.cap:,} rows a rank exchanged a step), the "
                    f"rest with their gradients and Adam states under ZeRO-{zero} over {t.dp} data-parallel ranks"
                )
            self.h.log(
                f"knowledge: fusion at layer {k.fusion_layer}, {k.num_entities:,} entities x {k.num_relations} "
                f"relations x {k.entity_dim} dims ({p['knowledge'] / 1e6:.3f}M parameters, {memory}); "
                f"entity loss x {k.entity_loss_coef}, {k.triple_score} x {k.triple_loss_coef} on "
                f"{k.triple_source} triples"
            )
        elif k.mode == "inject":
            self.h.log(
                f"knowledge: K-BERT injection, up to {k.inject_per_mention} triples after "
                f"{k.inject_prob:.0%} of mentions (no new parameters)"
            )

    def _meta(self) -> dict[str, Any]:
        return {
            **self._describe(),
            "step": self.step,
            "data_position": {"global_batches_consumed": self.step},
            "tokenizer": self.tokenizer_file.name,
            "torch": torch.__version__,
            "deepspeed": parallel.deepspeed_version(),
        }

    def save(self) -> Path:
        return self.h.save(
            self.ckpt_root, self.step, self._meta(), self.tokenizer_file, keep=self.cfg.train.keep_checkpoints
        )

    # ------------------------------------------------------------------ one micro-batch
    def _forward(self, batch: dict[str, Any]) -> MicroOut:
        out = self.engine(**batch)
        scalars = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, "z_loss": out.z_loss}
        if out.entity_loss is not None:
            scalars.update(entity_loss=out.entity_loss, triple_loss=out.triple_loss)
        arrays = {}
        if out.expert_counts is not None:
            arrays["expert_counts"] = out.expert_counts
        if self.native:  # [layers, 2] dropped and routed token-expert assignments
            arrays["dropped"] = parallel.moe_drop_counts(self.engine.module)
        means = {"router_layers": out.router_layers} if out.router_layers is not None else None
        return MicroOut(out.loss, scalars, arrays, self.triplet.micro * self.seq_len, means)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation LM loss over train.eval_batches micro-batches per rank (one host sync)."""
        if self.valid_loader is None:
            raise RuntimeError(
                "evaluate() without a validation loader (train.eval_every=0 or no valid split)"
            )
        self.engine.eval()
        total = self.h.to_device(torch.zeros(2))
        for i in range(self.cfg.train.eval_batches):
            out = self.engine(**self.h.to_device(self.valid_loader.batch(i, 0)))
            total[0] += out.lm_loss.float()
            total[1] += 1
        self.engine.train()
        comm.all_reduce(total)
        return (total[0] / total[1]).item()

    def _stop_nonfinite(self, nonfinite: NonFiniteSteps) -> None:
        """Log what the last interval saw (non-finite values as null in metrics.jsonl) and stop."""
        r = self.h.interval()
        record: dict[str, Any] = {
            k: r[k] for k in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm") if k in r
        }
        self.h.metrics.log(record, self.step)
        latest = checkpoint.find_latest(self.ckpt_root)
        figures = ", ".join(f"{k} {v:.4g}" for k, v in record.items())
        raise RunStopped(
            f"steps {nonfinite.first}-{self.step}: {nonfinite.in_a_row} updates in a row skipped, the loss or "
            f"gradients not finite (this interval: {figures}); "
            + (
                f"the last healthy checkpoint is {latest}: continue from it with --resume, e.g. at a lower "
                "learning rate"
                if latest
                else "no checkpoint was written before them: start again at a lower learning rate"
            )
            + " (or raise train.max_nonfinite_steps)"
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Train to train.max_steps. If any rank fails, every rank stops within seconds with exit
        status 1 and a line naming the failed rank (comm.RankWatch), instead of hanging."""
        with self.h.watch():
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg, h, engine = self.cfg.train, self.h, self.engine
        accum = self.triplet.grad_accum
        t_interval, steps_in_interval, t_start, start_step = time.time(), 0, time.time(), self.step
        last: dict[str, Any] = {}
        nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps, parallel.precision_of(self.ds_config) == "fp16")
        engine.train()
        batches = h.prefetch(self.loader.batch, self.step, cfg.max_steps, accum)
        rows_step = self.rows.step if self.rows is not None else None  # the entity table's own optimizer
        try:
            while self.step < cfg.max_steps:
                h.tick(self.step + 1)
                applied = h.step(self.step, batches, accum, self._forward, rows_step)
                self.step += 1
                steps_in_interval += 1
                done = self.step == cfg.max_steps
                if nonfinite.update(self.step, applied):
                    self._stop_nonfinite(nonfinite)
                if not nonfinite.healthy:
                    h.log(
                        f"step {self.step}: the gradients are not finite; the update was skipped "
                        f"({nonfinite.in_a_row} in a row; the run stops at {nonfinite.limit})"
                    )
                if self.step % cfg.log_every == 0 or done:
                    r = h.interval()
                    elapsed = time.time() - t_interval
                    last = {k: r[k] for k in ("loss", "lm_loss", "aux_loss", "z_loss")}
                    last.update(
                        lr=r["lr"],
                        step_time_s=elapsed / steps_in_interval,
                        eta_s=(time.time() - t_start)
                        / (self.step - start_step)
                        * (cfg.max_steps - self.step),
                    )
                    if self.cfg.model.knowledge.fusion:
                        last.update(entity_loss=r["entity_loss"], triple_loss=r["triple_loss"])
                    if "grad_norm" in r:
                        last["grad_norm"] = r["grad_norm"]  # of the last step of the interval
                    for key in ("loss_scale", "skipped_steps"):
                        if key in r:
                            last[key] = r[key]
                    last.update(self.monitor.figures(r, elapsed, final=done))
                    if self.valid_loader is not None and (self.step % cfg.eval_every == 0 or done):
                        last["valid_lm_loss"] = self.evaluate()
                    h.metrics.log(last, self.step)
                    t_interval, steps_in_interval = time.time(), 0
                elif self.valid_loader is not None and self.step % cfg.eval_every == 0:
                    h.metrics.log({"valid_lm_loss": self.evaluate()}, self.step)
                if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                    if nonfinite.healthy:
                        self.save()
                    else:  # the newest checkpoint stays the last one of finite steps
                        h.log(f"step {self.step}: no checkpoint written, the step was not finite")
        finally:
            batches.close()
        h.log(
            f"done: {self.step} steps in {format_duration(time.time() - t_start)}; "
            f"checkpoint {checkpoint.find_latest(self.ckpt_root)}"
        )
        h.metrics.close()
        return last


def pretrain(
    cfg: RunConfig,
    ds_json: dict[str, Any],
    output_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    return Pretrainer(cfg, ds_json, output_dir, resume, overwrite).train()
