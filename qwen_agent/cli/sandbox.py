"""``qwen-agent sandbox``: start a code-interpreter kernel and print the sandbox layers it runs under."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sandbox", help="start a code-interpreter kernel and print the active sandbox layers")
    p.add_argument("--network", action="store_true", help="allow network access (no network namespace)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..tools import CodeInterpreter

    with CodeInterpreter(network=args.network) as interpreter:
        interpreter.execute("pass")  # waits until the kernel is up
        print(json.dumps(interpreter.sandbox_info(), indent=2))
    return 0
