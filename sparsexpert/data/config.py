"""Where pretraining data comes from."""

from __future__ import annotations

from dataclasses import dataclass

from sparsexpert.config import ConfigError


@dataclass
class DataConfig:
    """The packed shards pretraining reads."""

    path: str = ""
    """A folder written by data_prep (with manifest.json). Empty: prepare the built-in example
    knowledge world into <output_dir>/data first and train on it."""
    seed: int = 1234
    """Seed of the per-epoch shuffle of the training rows."""
    example_seq_len: int = 128
    """Row length when preparing the built-in example."""
    example_vocab_size: int = 1024
    """Tokenizer vocabulary size when preparing the built-in example."""

    def validate(self) -> None:
        if self.example_seq_len < 2:
            raise ConfigError("data.example_seq_len", self.example_seq_len, "must be >= 2")
        if self.example_vocab_size < 64:
            raise ConfigError("data.example_vocab_size", self.example_vocab_size, "must be >= 64")
