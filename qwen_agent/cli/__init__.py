"""The ``qwen-agent`` command line: one module per subcommand, each with its parser beside its handler.

Each subcommand imports what it needs only when it runs, so ``qwen-agent --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import QwenAgentError
from . import bench, chat, mcp, run, sandbox, serve, tokenize, web

__all__ = ["build_parser", "main"]

# in the order --help lists them
SUBCOMMANDS = (tokenize, chat, run, sandbox, mcp, bench, serve, web)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-agent", description="ReAct tool-use agents for Qwen-7B-Chat running locally."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except QwenAgentError as exc:
        print(f"qwen-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
