"""``qwen-agent chat``: a streaming terminal chat with a local model."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat", help="chat with a local model in the terminal (reads lines until EOF when piped)"
    )
    p.add_argument(
        "--model", required=True, help="model directory (Qwen-7B-Chat or a Qwen2-family chat model) or Hub id"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or auto (default: a GPU when there is one)"
    )
    p.add_argument(
        "--dtype", default=None, help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--system", default=None, help="system prompt (default: the checkpoint's)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="reply length limit (default: generation_config)"
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.engine import load_model

    engine = load_model(args.model, device=args.device, dtype=args.dtype)
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "do_sample": False if args.greedy else None,
    }
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model}. Empty line or :clear resets the history; Ctrl-D quits.")
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input("You> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not query:
            break  # end of input
        query = query.rstrip("\n")
        if query.strip() in ("", ":clear"):
            history = []
            continue
        if interactive:
            print("Qwen> ", end="", flush=True)
        deltas = []
        for delta in engine.chat_stream(query, history, args.system, **generation):
            deltas.append(delta)
            print(delta, end="", flush=True)
        print(flush=True)
        history.append((query, "".join(deltas)))
    return 0
