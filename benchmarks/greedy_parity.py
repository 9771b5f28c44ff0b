"""Greedy token ids of a model directory, recorded by one version of the package and checked by another.

``--record OUT`` writes the greedy ids of a few chat prompts, each alone and all batched (only
``engine.generate``, which every version has), so an older checkout can record the reference:

    PYTHONPATH=/path/to/old/checkout python benchmarks/greedy_parity.py --model DIR --record ref.json

``--check REF`` runs the same prompts with this checkout, the prefix cache on and off, alone, batched, streamed
and alone again (the second time from the cache), and prints whether each matches the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qwen_agent import load_model
from qwen_agent.runtime.chat_format import make_context

QUERIES = [
    "What is 17 + 25? Answer briefly.",
    "Write a Python function that reverses a string.",
    "Name three colours.",
    "你好，请介绍一下你自己。",
]


def greedy_ids(
    engine, prompts: list[list[int]], new_tokens: int, modes: list[str]
) -> dict[str, list[list[int]]]:
    settings = {"do_sample": False, "max_new_tokens": new_tokens}
    out: dict[str, list[list[int]]] = {}
    for mode in modes:
        if mode == "batched":
            out[mode] = [r.token_ids for r in engine.generate(prompts, **settings)]
        elif mode == "streamed":
            out[mode] = []
            for prompt in prompts:
                handle = engine.stream(prompt, **settings)
                "".join(handle)  # the text deltas; the result travels with the handle
                out[mode].append(handle.result.token_ids)
        else:  # "alone", "alone again"
            out[mode] = [engine.generate(prompt, **settings).token_ids for prompt in prompts]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", default="benchmarks/results/greedy-parity.json", help="where --check writes its JSON"
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", metavar="OUT")
    group.add_argument("--check", metavar="REF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.record:
        engine = load_model(args.model, device="cpu")
        prompts = [make_context(engine.tokenizer, q)[1] for q in QUERIES]
        ids = greedy_ids(engine, prompts, args.new_tokens, ["alone", "batched"])
        record = {"model": args.model, "new_tokens": args.new_tokens, "ids": ids}
        Path(args.record).write_text(json.dumps(record))
        print(f"recorded {args.record}")
        return 0

    reference = json.loads(Path(args.check).read_text())
    rows, report = [], {"model": args.model, "reference": args.check, "checks": {}}
    for cache in ("on", "off"):
        engine = load_model(args.model, device="cpu", **({"kv_cache_gb": 0} if cache == "off" else {}))
        prompts = [make_context(engine.tokenizer, q)[1] for q in QUERIES]
        ids = greedy_ids(
            engine, prompts, reference["new_tokens"], ["alone", "batched", "streamed", "alone again"]
        )
        for mode, got in ids.items():
            want = reference["ids"]["batched" if mode == "batched" else "alone"]
            same = got == want
            report["checks"][f"cache {cache}, {mode}"] = same
            rows.append(f"| {cache} | {mode} | {'identical' if same else 'DIFFERENT'} |")
        report[f"prefix_cache_{cache}"] = engine.stats()["prefix_cache"]
        del engine
    print("| prefix cache | mode | greedy ids against the reference |\n|---|---|---|")
    print("\n".join(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
