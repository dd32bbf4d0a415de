"""Configuration of the knowledge components (entity fusion, K-BERT injection, their objectives)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsexpert.config import ConfigError

MODES = ("none", "fusion", "inject")


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
