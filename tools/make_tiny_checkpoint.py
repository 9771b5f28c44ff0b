#!/usr/bin/env python3
"""Write a random-weight model directory in the exact Hugging Face layout of Qwen-7B-Chat (or the Qwen2 family).

python tools/make_tiny_checkpoint.py OUT_DIR [--family qwen|qwen2] [--seed 0] [--hidden-size 64] ...
python tools/make_tiny_checkpoint.py OUT_DIR --quantize gptq-int4 [--group-size 128] [--desc-act] [--asym]

``--quantize`` writes a GPTQ checkpoint in auto-gptq's layout, as Qwen-7B-Chat-Int4 / -Int8 are published
(round-to-nearest quantization of the random weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_agent.errors import QwenAgentError  # noqa: E402
from qwen_agent.runtime.tiny import write_tiny_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="directory to write")
    parser.add_argument("--family", choices=["qwen", "qwen2"], default="qwen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="qwen2 only (grouped KV heads)")
    parser.add_argument("--seq-length", type=int, default=256, help="qwen only: base length for NTK and logN")
    parser.add_argument("--tie-word-embeddings", action="store_true", help="qwen2 only")
    parser.add_argument("--num-shards", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--vocab-file", default=None, help="qwen.tiktoken to use (default: dashscope's copy)")
    parser.add_argument(
        "--tokenizer-files",
        choices=["vocab.json", "tokenizer.json"],
        default="vocab.json",
        help="qwen2 only: vocab.json + merges.txt, or tokenizer.json alone as current transformers saves it",
    )
    parser.add_argument("--quantize", choices=["gptq-int4", "gptq-int8"], default=None)
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ inputs per group (-1: one group)")
    parser.add_argument(
        "--desc-act", action="store_true", help="GPTQ groups filled in a shuffled input order"
    )
    parser.add_argument("--asym", action="store_true", help="GPTQ zero points per group (sym: false)")
    args = parser.parse_args()
    try:
        out = write_tiny_checkpoint(
            args.out,
            args.family,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            seq_length=args.seq_length,
            tie_word_embeddings=args.tie_word_embeddings,
            num_shards=args.num_shards,
            dtype=args.dtype,
            vocab_file=args.vocab_file,
            tokenizer_files=args.tokenizer_files,
            quantize=args.quantize,
            group_size=args.group_size,
            desc_act=args.desc_act,
            sym=not args.asym,
        )
    except QwenAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
