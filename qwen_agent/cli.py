"""The ``qwen-agent`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import QwenAgentError


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(args.vocab)
    if args.decode:
        try:
            ids = [int(x) for x in args.text.replace(",", " ").split()]
        except ValueError:
            raise QwenAgentError(
                f"--decode expects integer ids separated by spaces or commas, got {args.text!r}"
            ) from None
        print(tokenizer.decode(ids))
        return 0
    allowed = "all" if args.allow_special else ()
    ids = tokenizer.encode(args.text, allowed_special=allowed)
    print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tokenizer.id_to_piece(i)!r}")
    return 0


def _cmd_sandbox(args: argparse.Namespace) -> int:
    import json

    from .tools import CodeInterpreter

    with CodeInterpreter(network=args.network) as interpreter:
        interpreter.execute("pass")  # waits until the kernel is up
        print(json.dumps(interpreter.sandbox_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-agent", description="ReAct tool-use agents for Qwen-7B-Chat running locally."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tokenize", help="print the Qwen token ids of a text (or decode ids with --decode)")
    p.add_argument("text", help="the text to encode, or ids to decode")
    p.add_argument("--decode", action="store_true", help="treat TEXT as token ids and print the decoded text")
    p.add_argument(
        "--vocab", default=None, help="model directory or qwen.tiktoken file (default: dashscope's copy)"
    )
    p.add_argument(
        "--allow-special", action="store_true", help="parse <|im_start|> and friends as control tokens"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also print each token's bytes")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser("sandbox", help="start a code-interpreter kernel and print the active sandbox layers")
    p.add_argument("--network", action="store_true", help="allow network access (no network namespace)")
    p.set_defaults(func=_cmd_sandbox)

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


if __name__ == "__main__":
    sys.exit(main())
