"""Weights in one place: checkpoints of ours (writing, verifying, `latest`, RNG states: `checkpoint.py`),
DeepSpeed's formats inside them (weights at any world size, ZeRO-3 and elastic resharding through its
universal form, the engine's loading: `deepspeed_formats.py`) and weights from and to other
formats (consolidated safetensors, Hugging Face Mixtral/Llama folders, initialization from any of them,
upcycling a dense model into experts: `export.py`)."""
