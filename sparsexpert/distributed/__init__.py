"""Everything that talks to DeepSpeed and to the other ranks, in one place: the DeepSpeed config checks,
engine construction and known DeepSpeed quirks (`parallel.py`), DeepSpeed-MoE's native layer swapped in
for ours (`native_moe.py`), every collective and the failure watch with heartbeats (`comm.py`), and where
tensors live (`device.py`). The model (sparsexpert/model/) never imports from here."""
