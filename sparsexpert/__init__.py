"""sparsexpert: knowledge-enhanced sparse Mixture-of-Experts language models on DeepSpeed."""

__version__ = "0.1.0"
