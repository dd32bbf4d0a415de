"""Take a model out of sparsexpert: consolidated weights, or a Hugging Face model folder.

One process, no DeepSpeed launch needed. The checkpoint may come from any world size and ep_size
(ZeRO 0-2): the experts are read from their per-expert files by global id.

Consolidate a run's latest checkpoint into one safetensors file (experts stacked by global id),
with the model config (sparsexpert_model.json) and the tokenizer beside it:
    python launcher/export.py --checkpoint runs/pretrain --output runs/pretrain/consolidated

A Hugging Face folder (Mixtral layout for an MoE model, Llama for a dense one) with tokenizer.json,
loadable by transformers.AutoModelForCausalLM / AutoTokenizer without trust_remote_code:
    python launcher/export.py --checkpoint runs/pretrain --output runs/pretrain/hf --hf

Configurations with no Mixtral equivalent (dense layers between MoE layers, shared experts, a
masked LM) are refused with the field to change. A knowledge-fusion model exports as its text LM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder (its latest checkpoint), checkpoints/ or one tag"
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--hf", action="store_true", help="write a Hugging Face model folder instead")
    args = parser.parse_args(argv)

    from sparsexpert.weights.export import consolidate, export_hf

    if args.hf:
        export_hf(args.checkpoint, args.output)
    else:
        out = consolidate(args.checkpoint, args.output)
        print(f"export: consolidated weights -> {out}")


if __name__ == "__main__":
    main()
