"""Training-loop configuration, and the run configuration that groups model, data and training."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsexpert.config import ConfigError, LoopConfig
from sparsexpert.data.config import DataConfig
from sparsexpert.model.config import ModelConfig


@dataclass
class TrainConfig(LoopConfig):
    """The loop around the DeepSpeed engine. Batch sizes, optimizer, learning-rate schedule,
    precision and ZeRO live in the DeepSpeed JSON (--ds_config)."""

    max_steps: int = 200
    """Optimizer steps to train for."""
    seed: int = 0
    """Seed of the model initialization."""
    log_every: int = 10
    """Log metrics every this many optimizer steps (and at the last step)."""
    save_every: int = 100
    """Save a checkpoint every this many steps (and at the last step). 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk; older ones are deleted. 0 keeps all."""
    eval_every: int = 50
    """Evaluate the validation loss every this many steps (and at the end). 0 disables."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation."""
    init: str = ""
    """Start from these weights instead of a random initialization (step 0, a fresh optimizer): a
    sparsexpert run folder or checkpoint (any world size, ep_size, ZeRO stage), a consolidated folder
    (launcher/export.py) or a local Hugging Face Mixtral/Llama folder. The network's shape comes from
    it; model.moe.ep_size, backend and routing, router loss coefficients and model.knowledge come from
    this run. The dataset must use its vocabulary. Ignored when --resume finds a checkpoint."""
    upcycle_experts: int = 0
    """With a dense `init`: every MoE layer (model.moe.moe_every) becomes this many copies of the dense
    FFN, the router starting small."""

    def validate(self) -> None:
        super().validate()
        if self.max_steps < 1:
            raise ConfigError("train.max_steps", self.max_steps, "must be >= 1")
        if self.log_every < 1:
            raise ConfigError("train.log_every", self.log_every, "must be >= 1")
        if self.upcycle_experts and not self.init:
            raise ConfigError(
                "train.upcycle_experts", self.upcycle_experts, "needs train.init (a dense model)"
            )
        for name in (
            "save_every",
            "keep_checkpoints",
            "eval_every",
            "eval_batches",
            "upcycle_experts",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", getattr(self, name), "must be >= 0")


@dataclass
class RunConfig:
    """Everything a pretraining run needs besides the DeepSpeed JSON."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
