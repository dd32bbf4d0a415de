"""Data loading. The names below load on first use (PEP 562), so that data_prep, which needs only
sparsexpert.data.format, does not import torch (a second of start-up and ~150 MB in every process)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsexpert.data.config import DataConfig
    from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader, read_manifest

_WHERE = {
    "DataConfig": "sparsexpert.data.config",
    "BatchPlan": "sparsexpert.data.shards",
    "PackedDataset": "sparsexpert.data.shards",
    "ShardLoader": "sparsexpert.data.shards",
    "read_manifest": "sparsexpert.data.shards",
}
__all__ = ["BatchPlan", "DataConfig", "PackedDataset", "ShardLoader", "read_manifest"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
