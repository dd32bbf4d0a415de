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
    verify: bool = True
    """Check every shard against the manifest's sha256, and its largest token id against the
    vocabulary, when the dataset is opened. Measured (bench/data_verify.py): about 0.8 s per GiB of
    shards on one core, shards hashed in parallel threads (up to 8), and once per dataset: the
    result is kept in <data>/.verified.json by file size and mtime, so later opens cost under a
    millisecond (a read-only folder is hashed at every open). false skips it for a huge dataset on
    a read-only filesystem; every batch is still checked against the vocabulary size."""

    def validate(self) -> None:
        if self.example_seq_len < 2:
            raise ConfigError("data.example_seq_len", self.example_seq_len, "must be >= 2")
        if self.example_vocab_size < 64:
            raise ConfigError("data.example_vocab_size", self.example_vocab_size, "must be >= 64")
