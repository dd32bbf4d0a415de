"""Pretraining: data, model and DeepSpeed engine put together, then the loop.

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
import torch.distributed as dist

from sparsexpert import export, parallel
from sparsexpert.config import ConfigError, from_dict
from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader, read_manifest
from sparsexpert.knowledge.config import KnowledgeConfig
from sparsexpert.knowledge.data import KnowledgeLoader
from sparsexpert.metrics import MetricsLogger, format_duration
from sparsexpert.model import ModelConfig, build_model
from sparsexpert.train import checkpoint
from sparsexpert.train.config import RunConfig


def prepare_data(cfg: RunConfig, output_dir: Path, log) -> Path:
    """The dataset folder: cfg.data.path, or the built-in example prepared once per node."""
    if cfg.data.path:
        read_manifest(cfg.data.path)  # fail early, with the path, if it is not a dataset
        return Path(cfg.data.path)
    data_dir = output_dir / "data"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (data_dir / "manifest.json").is_file():
        from data_prep.pipeline import PrepConfig, prepare_example

        log(f"preparing the built-in example knowledge world into {data_dir}")
        prep = PrepConfig(vocab_size=cfg.data.example_vocab_size, seq_len=cfg.data.example_seq_len)
        prepare_example(data_dir, prep, log=log)
    dist.barrier()
    return data_dir


def resolve_knowledge_sizes(cfg: ModelConfig, manifest: dict[str, Any], data_dir: Path) -> None:
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
    for field, key in (("num_entities", "entities"), ("num_relations", "relations")):
        have = manifest[key]
        if getattr(k, field) == 0:
            setattr(k, field, max(have, 1))
        elif getattr(k, field) < have:
            raise ConfigError(
                f"model.knowledge.{field}",
                getattr(k, field),
                f"the dataset has {have}; use 0 (from the dataset) or more",
            )


def _check_resume_compatible(
    meta: dict[str, Any],
    cfg: RunConfig,
    world: int,
    ep_size: int,
    global_batch: int,
    zero_stage: int,
    tag_dir: Path,
) -> bool:
    """Whether resuming `tag_dir` is elastic (another world size or ep_size: `checkpoint.load_elastic`);
    raises ConfigError for what no resume can change: the model (but its ep_size), the global batch."""
    saved_model = from_dict(ModelConfig, meta["run"]["model"])
    saved_model.moe.ep_size = cfg.model.moe.ep_size  # compared below, as resolved
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


class Pretrainer:
    def __init__(
        self,
        cfg: RunConfig,
        ds_json: dict[str, Any],
        output_dir: str | Path,
        resume: bool = False,
        evaluate_only: bool = False,
    ):
        """evaluate_only: load the latest checkpoint (required) and write nothing into output_dir."""
        cfg.validate()
        parallel.init_distributed(cfg.train.collective_timeout_minutes)
        self.cfg, self.output_dir = cfg, Path(output_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ds_json = ds_json
        self.metrics = MetricsLogger(
            self.output_dir,
            self.rank == 0,
            cfg.train.max_steps,
            cfg.train.tensorboard,
            write_files=not evaluate_only,
        )
        log = self.metrics.text

        self.data_dir = prepare_data(cfg, self.output_dir, log)
        manifest = read_manifest(self.data_dir)
        self.tokenizer_file = self.data_dir / manifest["tokenizer"]["file"]
        init_state = None
        if cfg.train.init:  # the shape from the init; the weights are loaded once the model is built
            init = export.load_init(cfg.train.init)
            export.check_same_vocabulary(init, self.tokenizer_file, self.data_dir)
            cfg.model, init_state = export.model_for_init(
                cfg.model, init, cfg.train.upcycle_experts, cfg.train.seed
            )
            log(f"initializing from {init.source}{' (dense, upcycled)' if cfg.train.upcycle_experts else ''}")
        self.ds_config = parallel.prepare_ds_config(
            ds_json,
            cfg.model,
            self.world,
            cfg.train.max_steps,
            tokenizer_vocab=manifest["tokenizer"]["vocab_size"],
            seq_len=manifest["seq_len"],
        )
        resolve_knowledge_sizes(cfg.model, manifest, self.data_dir)
        self.ep_size = parallel.expert_parallel_size(cfg.model, self.ds_config, self.world)
        self.triplet = parallel.batch_triplet(self.ds_config, self.world)

        self.ckpt_root = self.output_dir / "checkpoints"
        tag_dir = checkpoint.find_latest(self.ckpt_root) if (resume or evaluate_only) else None
        if evaluate_only and tag_dir is None:
            raise FileNotFoundError(f"{self.ckpt_root}: no complete checkpoint to evaluate")
        if resume and tag_dir is None:
            log(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from step 0")
        elastic = False
        if tag_dir is not None:
            meta = json.loads((tag_dir / checkpoint.META).read_text())
            stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
            elastic = _check_resume_compatible(
                meta, cfg, self.world, self.ep_size, self.triplet.global_batch, stage, tag_dir
            )

        model = build_model(cfg.model, cfg.train.seed)
        if init_state is not None and tag_dir is None:
            # Knowledge tables carry over when this run has the same ones; otherwise they start fresh.
            own = model.state_dict()
            init_state = {
                k: v
                for k, v in init_state.items()
                if not k.startswith("knowledge.") or (k in own and own[k].shape == v.shape)
            }
            missing, unexpected = model.load_state_dict(init_state, strict=False)
            missing = [k for k in missing if not k.startswith("knowledge.")]
            if missing or unexpected:
                raise ValueError(
                    f"train.init={cfg.train.init}: weights do not fit the model: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        self.param_counts = model.num_params()
        # Universal loading must be on at initialize; self.ds_config (saved with checkpoints) stays as is.
        ds_config = checkpoint.universal_loading(self.ds_config) if elastic else self.ds_config
        self.engine = parallel.initialize(model, ds_config)
        self.own_clip = parallel.own_gradient_clipping(self.ds_config)
        self.step = 0
        if tag_dir is not None and elastic:
            meta, owned = checkpoint.load_elastic(self.engine, tag_dir, cfg.train.seed)
            log(
                f"elastic resume: world {meta['world_size']} -> {self.world}, ep {meta['ep_size']} -> "
                f"{self.ep_size}, resharded through DeepSpeed's universal checkpoint; checked the weights, "
                f"the optimizer step {meta['step']} and the experts by global id: "
                + checkpoint.describe_experts(owned)
            )
        elif tag_dir is not None:
            meta = checkpoint.load(self.engine, tag_dir)
        if tag_dir is not None:
            self.step = meta["step"]
            log(f"resumed from {tag_dir} at step {self.step}")

        self.train_data = PackedDataset(self.data_dir, "train")
        self.seq_len = self.train_data.seq_len
        tok = manifest["tokenizer"]

        def batches(
            split: str, data: PackedDataset, grad_accum: int, knowledge: KnowledgeConfig
        ) -> KnowledgeLoader:
            plan = BatchPlan(len(data), self.triplet.micro, grad_accum, self.world, self.rank, cfg.data.seed)
            return KnowledgeLoader(
                ShardLoader(data, plan),
                self.data_dir,
                split,
                knowledge,
                cfg.model.causal,
                tok.get("mask_id"),
                tok["vocab_size"],
                self.tokenizer_file,
            )

        self.loader = batches("train", self.train_data, self.triplet.grad_accum, cfg.model.knowledge)
        self.valid_loader = None
        if cfg.train.eval_every or evaluate_only:
            valid = PackedDataset(self.data_dir, "valid")
            if len(valid):
                # validation reads the text alone, whatever the knowledge mode, so arms compare
                self.valid_loader = batches("valid", valid, 1, KnowledgeConfig())
        if self.rank == 0 and not evaluate_only:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(self._describe(), indent=2))
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
        precision = "bf16" if self.ds_config.get("bf16", {}).get("enabled") else "fp32"
        layer_experts = m.layer_experts(len(self.cfg.model.moe_layer_ids))
        experts = layer_experts if len(set(layer_experts)) > 1 else (layer_experts or [m.num_experts])[0]
        routing = ""
        if m.num_experts and m.backend == "native":
            from sparsexpert import native_moe

            routing = f" ({native_moe.describe(m, layer_experts)})"
        self.metrics.text(
            f"sparsexpert: {p['total'] / 1e6:.2f}M parameters ({p['active'] / 1e6:.2f}M active), "
            f"{len(layer_experts)} MoE layers x {experts} "
            f"experts top-{m.top_k}{routing} | "
            f"world {self.world}, ep {self.ep_size}, ZeRO-{zero}, {precision} | batch {t.global_batch} = "
            f"{t.micro} micro x {t.grad_accum} accum x {t.dp} dp, seq {self.seq_len} | "
            f"{len(self.train_data)} train rows from {self.data_dir} | output {self.output_dir}"
        )
        k = self.cfg.model.knowledge
        if k.mode == "fusion":
            self.metrics.text(
                f"knowledge: fusion at layer {k.fusion_layer}, {k.num_entities} entities x {k.num_relations} "
                f"relations x {k.entity_dim} dims ({p['knowledge'] / 1e6:.3f}M parameters); entity loss x "
                f"{k.entity_loss_coef}, TransE x {k.triple_loss_coef} on {k.triple_source} triples"
            )
        elif k.mode == "inject":
            self.metrics.text(
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
            "deepspeed": __import__("deepspeed").__version__,
        }

    def save(self) -> Path:
        return checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.step,
            self._meta(),
            self.tokenizer_file,
            keep=self.cfg.train.keep_checkpoints,
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total = torch.zeros(2)
        for i in range(self.cfg.train.eval_batches):
            out = self.engine(**self.valid_loader.batch(i, 0))
            total += torch.tensor([out.lm_loss.item(), 1.0])
        self.engine.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def train(self) -> dict[str, Any]:
        """Train to train.max_steps. If any rank fails, every rank stops within seconds with exit
        status 1 and a line naming the failed rank (parallel.RankWatch), instead of hanging."""
        with parallel.RankWatch(self.rank, self.world) as watch:
            return self._train(watch)

    def _train(self, watch: parallel.RankWatch) -> dict[str, Any]:
        cfg, engine = self.cfg.train, self.engine
        # Test-only fault injection (tests/test_multinode.py): SPARSEXPERT_FAIL_AT="rank:step" makes
        # that rank's process die abruptly at the start of that step; "rank:step:raise" makes it raise.
        fault = os.environ.get("SPARSEXPERT_FAIL_AT", "").split(":")
        moe_layers = self.cfg.model.moe_layer_ids
        layer_experts = self.cfg.model.moe.layer_experts(len(moe_layers))
        sums = torch.zeros(7)  # loss, lm, aux, z, entity, triple, micro-batches
        counts = torch.zeros(len(moe_layers), max(layer_experts, default=0))
        drops = torch.zeros(len(moe_layers), 2)  # native backend: dropped, routed assignments
        native = bool(moe_layers) and self.cfg.model.moe.backend == "native"
        tokens_per_step = self.triplet.global_batch * self.seq_len
        t_interval, steps_in_interval, t_start, start_step = time.time(), 0, time.time(), self.step
        last: dict[str, Any] = {}
        grad_norm: float | None = None
        engine.train()
        while self.step < cfg.max_steps:
            watch.step = self.step + 1
            if fault[:2] == [str(self.rank), str(watch.step)]:
                if fault[2:] == ["raise"]:
                    raise RuntimeError("injected failure (SPARSEXPERT_FAIL_AT)")
                os._exit(1)
            for m in range(self.triplet.grad_accum):
                out = engine(**self.loader.batch(self.step, m))
                engine.backward(out.loss)
                if self.own_clip is not None and m == self.triplet.grad_accum - 1:
                    grad_norm = parallel.clip_grad_norm(engine.module, self.own_clip)
                engine.step()
                extra = [0.0 if v is None else v.item() for v in (out.entity_loss, out.triple_loss)]
                sums += torch.tensor(
                    [out.loss.item(), out.lm_loss.item(), out.aux_loss.item(), out.z_loss.item(), *extra, 1.0]
                )
                if out.expert_counts is not None:
                    counts += out.expert_counts.float()
                if native:
                    drops += parallel.moe_drop_counts(engine.module).float()
            self.step += 1
            steps_in_interval += 1
            done = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or done:
                dist.all_reduce(sums)
                dist.all_reduce(counts)
                dist.all_reduce(drops)
                elapsed = time.time() - t_interval
                last = {
                    "loss": (sums[0] / sums[6]).item(),
                    "lm_loss": (sums[1] / sums[6]).item(),
                    "aux_loss": (sums[2] / sums[6]).item(),
                    "z_loss": (sums[3] / sums[6]).item(),
                    "lr": float(engine.get_lr()[0]),
                    "tokens_per_s": tokens_per_step * steps_in_interval / max(elapsed, 1e-9),
                    "step_time_s": elapsed / steps_in_interval,
                    "eta_s": (time.time() - t_start) / (self.step - start_step) * (cfg.max_steps - self.step),
                }
                if self.cfg.model.knowledge.fusion:
                    last["entity_loss"] = (sums[4] / sums[6]).item()
                    last["triple_loss"] = (sums[5] / sums[6]).item()
                gnorm = grad_norm if self.own_clip is not None else engine.get_global_grad_norm()
                if gnorm is not None:
                    last["grad_norm"] = float(gnorm)  # of the last step of the interval
                if moe_layers:
                    load = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
                    last["expert_load"] = {
                        f"layer{i}": load[j, : layer_experts[j]].tolist() for j, i in enumerate(moe_layers)
                    }
                    last["expert_load_max"] = {
                        f"layer{i}": (load[j].max() * layer_experts[j]).item()
                        for j, i in enumerate(moe_layers)
                    }
                if native:  # the share of token-expert assignments over capacity
                    last["dropped_frac"] = {
                        f"layer{i}": (drops[j, 0] / drops[j, 1]).item() for j, i in enumerate(moe_layers)
                    }
                if self.valid_loader is not None and (self.step % cfg.eval_every == 0 or done):
                    last["valid_lm_loss"] = self.evaluate()
                self.metrics.log(last, self.step)
                sums.zero_()
                counts.zero_()
                drops.zero_()
                t_interval, steps_in_interval = time.time(), 0
            elif self.valid_loader is not None and self.step % cfg.eval_every == 0:
                self.metrics.log({"valid_lm_loss": self.evaluate()}, self.step)
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save()
        self.metrics.text(
            f"done: {self.step} steps in {format_duration(time.time() - t_start)}; "
            f"checkpoint {checkpoint.find_latest(self.ckpt_root)}"
        )
        self.metrics.close()
        return last


def pretrain(
    cfg: RunConfig, ds_json: dict[str, Any], output_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    return Pretrainer(cfg, ds_json, output_dir, resume).train()
