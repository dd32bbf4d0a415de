"""Generate text from a model, for a quick look: greedy by default, or sampled.

One process. The model may be a run folder (its latest checkpoint), a checkpoint tag, a fine-tuning
run or its best/ (generating with its language model, without the task heads), a consolidated folder,
or a Hugging Face Mixtral/Llama folder (e.g. our export):
    python launcher/generate.py --model runs/pretrain --prompt "Vokaul Ullo was born in"
    python launcher/generate.py --model runs/pretrain/hf --prompt "Vokaul Ullo was born in" \\
        --max_new_tokens 40 --temperature 0.8 --top_k 50 --num_samples 3
Several prompts run as one batch (a line each in the output):
    python launcher/generate.py --model runs/pretrain --prompt "Ulven is" "Renyan lies in"

With a key-value cache (--no_cache recomputes the whole context for every token: the same tokens,
slower; bench/generation.py measures both).

The prompt follows an end-of-sequence token, as a document does in the packed training rows
(--no_eos_prefix to feed it alone).
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
    parser.add_argument("--model", required=True, help="checkpoint, run folder, consolidated or HF folder")
    parser.add_argument("--prompt", required=True, nargs="+", help="text(s) to continue, as one batch")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens to add at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest (0 = all)")
    parser.add_argument("--num_samples", type=int, default=1, help="continuations (seeds seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--no_eos_prefix", action="store_true", help="do not start the context with EOS")
    parser.add_argument("--no_cache", action="store_true", help="recompute the context for every token")
    parser.add_argument(
        "--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: the GPU when there is one, else cpu)"
    )
    args = parser.parse_args(argv)

    from sparsexpert.generate import generate_batch, load_model

    model, tok = load_model(args.model, args.device)
    if tok is None:
        sys.exit(
            f"{args.model}: no tokenizer beside the weights (tokenizer.model, tokenizer/ or tokenizer.json)"
        )
    prompts = [[int(i) for i in ids] for ids in tok.encode(args.prompt)]
    if not args.no_eos_prefix:
        prompts = [[tok.eos_id, *p] for p in prompts]
    for n in range(args.num_samples):
        rows = generate_batch(
            model,
            prompts,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            tok.eos_id,
            args.seed + n,
            use_cache=not args.no_cache,
        )
        for prompt, new in zip(prompts, rows):
            # decode prompt and continuation together: a piece's leading space only survives in context
            text = tok.decode([i for i in prompt + new if i != tok.eos_id])
            print(f"[{n}] {text}" if args.num_samples > 1 else text)


if __name__ == "__main__":
    main()
