from sparsexpert.data.config import DataConfig
from sparsexpert.data.shards import BatchPlan, PackedDataset, ShardLoader, read_manifest

__all__ = ["BatchPlan", "DataConfig", "PackedDataset", "ShardLoader", "read_manifest"]
