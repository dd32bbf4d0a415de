from sparsexpert.model.config import ModelConfig, MoEConfig
from sparsexpert.model.transformer import IGNORE_INDEX, ModelOutput, Transformer, build_model

__all__ = ["IGNORE_INDEX", "ModelConfig", "ModelOutput", "MoEConfig", "Transformer", "build_model"]
