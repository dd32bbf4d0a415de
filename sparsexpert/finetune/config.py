"""Fine-tuning configuration: the tasks, the training techniques, the loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsexpert.config import ConfigError, LoopConfig
from sparsexpert.model.config import ModelConfig

KINDS = ("ner", "classification", "relation")


@dataclass
class TaskConfig:
    """One task: its data and its head."""

    name: str = ""
    """Unique name (metrics are logged as <name>/...). Empty: the kind."""
    kind: str = "ner"
    """"ner" (token classification, BIO tags), "classification" (text -> label) or "relation"
    (a sentence with two marked entity spans -> relation label)."""
    train: str = ""
    """Training file: CoNLL/BIO or JSONL (ner); JSONL or CSV (classification); JSONL (relation)."""
    dev: str = ""
    """Development file (same format): evaluated every train.eval_every steps; the best checkpoint is kept."""
    test: str = ""
    """Optional test file, predicted with the best checkpoint."""
    text_field: str = "text"
    """Classification: the text field (JSONL) or column (CSV)."""
    label_field: str = "label"
    """Classification: the label field or column."""
    negative_label: str = "no_relation"
    """Relation: the class left out of micro F1."""
    loss_weight: float = 1.0
    """Multi-task: weight of this task's loss."""

    def validate(self, i: int) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"tasks[{i}].kind", self.kind, f"use one of {', '.join(KINDS)}")
        if not self.train or not self.dev:
            raise ConfigError(f"tasks[{i}].train/dev", (self.train, self.dev), "both files are required")
        if self.loss_weight <= 0:
            raise ConfigError(f"tasks[{i}].loss_weight", self.loss_weight, "must be > 0")


@dataclass
class AdversarialConfig:
    """Adversarial training on the token embeddings."""

    method: str = "none"
    """"none", "fgm" (one step of size epsilon along the normalized gradient) or "pgd" (`steps`
    steps of size `alpha`, projected onto the epsilon ball)."""
    epsilon: float = 1.0
    """Radius of the perturbation (L2 norm per example over its tokens' embeddings)."""
    alpha: float = 0.3
    """PGD step size."""
    steps: int = 3
    """PGD steps."""

    def validate(self) -> None:
        if self.method not in ("none", "fgm", "pgd"):
            raise ConfigError("adversarial.method", self.method, 'use "none", "fgm" or "pgd"')
        if self.epsilon <= 0 or self.alpha <= 0 or self.steps < 1:
            raise ConfigError(
                "adversarial", (self.epsilon, self.alpha, self.steps), "epsilon, alpha > 0 and steps >= 1"
            )


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher."""

    teacher: str = ""
    """A fine-tuning checkpoint (run folder or tag) with the same tasks and labels. Empty: off."""
    temperature: float = 2.0
    """Softmax temperature T of both teacher and student in the KL term (scaled by T^2)."""
    alpha: float = 0.5
    """loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher || student)."""

    def validate(self) -> None:
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ConfigError(
                "distill", (self.temperature, self.alpha), "temperature > 0 and alpha in [0, 1]"
            )


@dataclass
class FinetuneTrainConfig(LoopConfig):
    """The loop, with the same names as pretraining's `train` section. Batch sizes, optimizer,
    learning-rate schedule, precision and ZeRO live in the DeepSpeed JSON (--ds_config, --ds.*)."""

    init: str = ""
    """Weights to start from, with their model config and tokenizer: a pretraining or fine-tuning run
    folder or tag (any world size and ep_size), a consolidated folder (launcher/export.py), or a local
    Hugging Face Mixtral or Llama folder. Empty: train from scratch (needs `tokenizer`)."""
    upcycle_experts: int = 0
    """With a dense `init` (ours or a Llama folder): make every feed-forward layer an MoE of this many experts,
    each a copy of the dense FFN, the router initialized small (top_k from model.moe.top_k)."""
    max_steps: int = 300
    """Optimizer steps."""
    eval_every: int = 50
    """Evaluate on dev every this many steps (and at the end)."""
    patience: int = 0
    """Stop after this many evaluations without a better dev metric. 0: never stop early."""
    log_every: int = 10
    """Log training metrics every this many steps."""
    seed: int = 0
    """Seed of heads, data order, sampling."""

    def validate(self) -> None:
        super().validate()
        for name in ("max_steps", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", getattr(self, name), "must be >= 1")
        for name in ("patience", "upcycle_experts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", getattr(self, name), "must be >= 0")
        if self.upcycle_experts and not self.init:
            raise ConfigError(
                "train.upcycle_experts", self.upcycle_experts, "needs train.init (a dense model)"
            )


@dataclass
class FinetuneConfig:
    """A fine-tuning run: one task or several over a shared backbone."""

    tasks: list[TaskConfig] = field(default_factory=list)
    """The tasks (one for single-task fine-tuning: --task KIND --train FILE --dev FILE)."""
    tokenizer: str = ""
    """Tokenizer when training from scratch (a SentencePiece .model or a dataset folder)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model when training from scratch; with `train.init`, only model.moe.ep_size and the router loss
    coefficients are taken from here (the rest comes from the checkpoint)."""
    sampling: str = "proportional"
    """Multi-task: which task each step trains, drawn with probability ∝ n_i (proportional) or
    n_i^(1/sampling_temperature) (temperature)."""
    sampling_temperature: float = 2.0
    """Temperature of the "temperature" task sampling."""
    bidirectional: bool = False
    """Fine-tune with bidirectional attention (padding masked), also from a causal pretrained model:
    token tasks then see the right context too."""
    task_aware_routing: bool = False
    """Add a learned task embedding to the token embeddings, so the routers see the task."""
    freeze_embeddings: bool = False
    """Keep the token embeddings fixed."""
    freeze_experts: bool = False
    """Keep the routed experts fixed (routers, attention and heads still train)."""
    max_len: int = 0
    """Longest example in tokens; longer ones are truncated (counted). 0: the model's max_seq_len."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """Adversarial training (FGM/PGD)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation."""
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    """The loop: steps, evaluation, early stopping, logging, where to start from."""

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", [], "give at least one task (--task ner --train F --dev F)")
        for i, t in enumerate(self.tasks):
            t.name = t.name or t.kind
            t.validate(i)
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError("tasks[].name", names, "task names must be unique")
        if not self.train.init and not self.tokenizer:
            raise ConfigError(
                "train.init", "", "give a checkpoint to start from, or a tokenizer to train from scratch"
            )
        if self.sampling not in ("proportional", "temperature"):
            raise ConfigError("sampling", self.sampling, 'use "proportional" or "temperature"')
        if self.max_len < 0:
            raise ConfigError("max_len", self.max_len, "must be >= 0")
        self.train.validate()
        self.adversarial.validate()
        self.distill.validate()
