"""``qwen-agent tokenize``: the Qwen token ids of a text, or the text of ids."""

from __future__ import annotations

import argparse

from ..errors import QwenAgentError


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..runtime.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(args.vocab)
    if args.decode:
        try:
            ids = [int(x) for x in args.text.replace(",", " ").split()]
        except ValueError:
            raise QwenAgentError(
                f"--decode expects integer ids separated by spaces or commas, got {args.text!r}"
            ) from None
        unknown = [i for i in ids if not 0 <= i < len(tokenizer)]
        if unknown:
            raise QwenAgentError(
                f"--decode: {unknown[0]} is not a token id of this vocabulary (0..{len(tokenizer) - 1})"
            )
        print(tokenizer.decode(ids))
        return 0
    allowed = "all" if args.allow_special else ()
    ids = tokenizer.encode(args.text, allowed_special=allowed)
    print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tokenizer.id_to_piece(i)!r}")
    return 0
