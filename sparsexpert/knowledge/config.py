"""Configuration of the knowledge components (entity fusion, K-BERT injection, their objectives)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsexpert.config import ConfigError

MODES = ("none", "fusion", "inject")
ENTITY_OPTIMIZERS = ("adam", "rowwise_adagrad")


@dataclass
class KnowledgeConfig:
    """How the model uses the knowledge graph that data_prep joined to the text.

    - "none": text only.
    - "fusion" (ERNIE): entity and relation embedding tables; at the tokens of a linked mention the
      entity's embedding is projected to d_model and added to the hidden state entering
      `fusion_layer`. Objectives: entity prediction from the mention's hidden states and a triple
      ranking loss (TransE or DistMult) on the tables.
    - "inject" (K-BERT): no new parameters. Triples whose head is a mentioned entity are verbalized
      ("relation words" + tail name) and inserted after the mention, with soft positions and a
      visibility mask so the injected tokens only see their anchor mention (and each other) and the
      text never sees them. The LM loss covers the injected tokens: the weights stay a plain LM.
    """

    mode: str = "none"
    """"none", "fusion" or "inject"."""
    num_entities: int = 0
    """Rows of the entity table. 0 takes data_prep's entity vocabulary size (entities.tsv)."""
    num_relations: int = 0
    """Rows of the relation table. 0 takes data_prep's relation vocabulary size (relations.tsv)."""
    entity_dim: int = 64
    """Width of the entity and relation embeddings (fusion)."""
    fusion_layer: int = 1
    """Entity embeddings are added to the hidden state entering this layer (0 = after the token embeddings)."""
    replace_prob: float = 0.05
    """ERNIE's denoising: share of mention alignments whose input entity is replaced by a random entity."""
    drop_prob: float = 0.15
    """ERNIE's denoising: share of mention alignments whose input entity is removed (masked)."""
    entity_loss_coef: float = 1.0
    """Weight of entity prediction: the entity of every mention (corrupted or not) from its hidden states."""
    entity_negatives: int = 64
    """Sampled softmax: the entities of the micro-batch plus this many uniform random entities are the
    candidates. 0 scores all entities (full softmax)."""
    triple_loss_coef: float = 1.0
    """Weight of the triple ranking loss on the entity and relation tables. 0 disables it."""
    triple_source: str = "attached"
    """"attached": the triples attached to the micro-batch's rows (distant supervision);
    "kg": `triple_batch` triples drawn from the whole KG (triples.tsv) each micro-batch, KEPLER-style."""
    triple_batch: int = 64
    """Triples per micro-batch when triple_source is "kg"; the cap when it is "attached"."""
    triple_negatives: int = 4
    """Corrupted triples per positive (head or tail replaced by a uniform random entity)."""
    triple_score: str = "transe"
    """Triple scoring on the tables: "transe" (-||e_h + w_r - e_t||_1; cannot hold symmetric
    relations apart from identity) or "distmult" (sum(e_h * w_r * e_t); symmetric by construction)."""
    triple_margin: float = 1.0
    """Margin of the ranking loss: mean(relu(margin - score(positive) + score(corrupted)))."""
    entity_optimizer: str = "adam"
    """How the entity table is trained (fusion). "adam": with every other weight, by DeepSpeed's optimizer:
    a dense gradient of the whole table every step, reduced over the ranks, and Adam's two states per
    entry (ZeRO partitions them). "rowwise_adagrad": outside DeepSpeed's optimizer, only the rows a step
    looked up: their gradients gathered over the ranks, summed per row, then row-wise Adagrad (FBGEMM's
    and TorchRec's choice for large embedding tables: one accumulator a row, of the mean squared
    gradient); the table stays fp32 and whole on every rank (ZeRO 0-2; not fp16). For tables of millions
    of entities, where the dense path's step scales with the table rather than with the rows touched
    (bench/kg_scale.py measures both)."""
    entity_lr: float = 0.01
    """Learning rate of the row-wise Adagrad path (entity_optimizer="rowwise_adagrad"), constant; the
    run's schedule does not apply to it."""
    entity_eps: float = 1e-8
    """Row-wise Adagrad's epsilon, added to the square root of a row's accumulator (> 0)."""
    inject_per_mention: int = 2
    """Inject mode: triples injected after each mention (chosen at random among its entity's)."""
    inject_prob: float = 1.0
    """Inject mode: share of mentions that get an injection."""

    @property
    def fusion(self) -> bool:
        return self.mode == "fusion"

    def validate(self, n_layers: int) -> None:
        if self.mode not in MODES:
            raise ConfigError("model.knowledge.mode", self.mode, f"use one of {', '.join(MODES)}")
        if self.num_entities < 0 or self.num_relations < 0:
            raise ConfigError(
                "model.knowledge.num_entities/num_relations",
                (self.num_entities, self.num_relations),
                "must be >= 0 (0 = from the dataset)",
            )
        if self.fusion and not 0 <= self.fusion_layer < n_layers:
            raise ConfigError(
                "model.knowledge.fusion_layer",
                self.fusion_layer,
                f"must be in [0, model.n_layers={n_layers})",
            )
        if self.entity_dim < 1:
            raise ConfigError("model.knowledge.entity_dim", self.entity_dim, "must be >= 1")
        for name in ("replace_prob", "drop_prob", "inject_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.knowledge.{name}", getattr(self, name), "must be in [0, 1]")
        if self.replace_prob + self.drop_prob > 1.0:
            raise ConfigError(
                "model.knowledge.replace_prob", self.replace_prob, "replace_prob + drop_prob must be <= 1"
            )
        if self.triple_score not in ("transe", "distmult"):
            raise ConfigError("model.knowledge.triple_score", self.triple_score, 'use "transe" or "distmult"')
        if self.triple_source not in ("attached", "kg"):
            raise ConfigError("model.knowledge.triple_source", self.triple_source, 'use "attached" or "kg"')
        if self.entity_optimizer not in ENTITY_OPTIMIZERS:
            raise ConfigError(
                "model.knowledge.entity_optimizer",
                self.entity_optimizer,
                f"use {' or '.join(ENTITY_OPTIMIZERS)}",
            )
        if self.entity_optimizer == "rowwise_adagrad":
            if self.entity_lr <= 0 or self.entity_eps <= 0:
                raise ConfigError(
                    "model.knowledge.entity_lr/entity_eps", (self.entity_lr, self.entity_eps), "must be > 0"
                )
            if self.fusion and self.entity_loss_coef > 0 and self.entity_negatives == 0:
                raise ConfigError(
                    "model.knowledge.entity_negatives",
                    0,
                    "a full softmax looks up every entity each step, so the row-wise path would update every row: "
                    "use sampled negatives (e.g. 64) with entity_optimizer=rowwise_adagrad, or entity_optimizer=adam",
                )
        for name in ("entity_loss_coef", "triple_loss_coef", "triple_margin"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.knowledge.{name}", getattr(self, name), "must be >= 0")
        for name in ("entity_negatives", "triple_batch", "triple_negatives", "inject_per_mention"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.knowledge.{name}", getattr(self, name), "must be >= 0")
        if self.triple_loss_coef > 0 and self.fusion and (self.triple_batch < 1 or self.triple_negatives < 1):
            raise ConfigError(
                "model.knowledge.triple_batch/triple_negatives",
                (self.triple_batch, self.triple_negatives),
                "must be >= 1 when triple_loss_coef > 0 (or set triple_loss_coef=0)",
            )
