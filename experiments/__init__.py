"""Experiments built on sparsexpert, outside the library: they start the launchers as subprocesses
(`deepspeed launcher/pretrain.py ...`) and compare what the runs measured. `ablation.py`: text-only
against knowledge-joined pretraining arms (launcher/ablate.py); `compare.py`: MoE + KG, MoE and the
dense twin, fine-tuned on a task (launcher/compare.py)."""
