"""Weights in one place: checkpoints of ours (writing, verifying, reading at any world size, ZeRO-3 and
elastic resharding through DeepSpeed's universal form: `checkpoint.py`) and weights from and to other
formats (consolidated safetensors, Hugging Face Mixtral/Llama folders, initialization from any of them,
upcycling a dense model into experts: `export.py`)."""
