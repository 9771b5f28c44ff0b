"""Argument types and help texts that several subcommands share."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

CONSTRAINED_HELP = (
    "local models: decode under the grammar of the offered tools in the tool format (valid steps, offered tool "
    "names, schema-valid arguments); needs the llguidance package"
)


def add_constrained_switch(p: argparse.ArgumentParser) -> None:
    """``--constrained`` / ``--no-constrained``, on by default for a local model (see :func:`constrained`)."""
    p.add_argument(
        "--constrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=CONSTRAINED_HELP + " (default: on for a local model; --no-constrained turns it off)",
    )


def constrained(args: argparse.Namespace) -> bool:
    """Whether to decode under the grammar: as asked, else by default for a local model (a server decodes by
    itself) when llguidance is installed (a note says so when it is not)."""
    if args.constrained is not None:
        return args.constrained
    if args.model.startswith(("http://", "https://")):
        return False
    if importlib.util.find_spec("llguidance") is None:
        print(
            "note: decoding without the tool grammar (pip install 'qwen-react-agent[constrained]' for valid calls)",
            file=sys.stderr,
        )
        return False
    return True


def add_tool_format(p: argparse.ArgumentParser) -> None:
    """``--tool-format``: how tools are offered to the model and its calls read."""
    p.add_argument(
        "--tool-format",
        choices=["react", "hermes"],
        default=None,
        help="how tools are offered and calls read: react (Qwen-7B-Chat's) or hermes (the <tool_call> format of "
        "a Qwen2/Qwen2.5 chat template); default: the model's own",
    )


def number_at_least(kind: type, minimum: float, exclusive: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) no smaller than ``minimum`` (larger, if ``exclusive``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if value < minimum or (exclusive and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'above' if exclusive else 'at least'} {minimum}, got {value}"
            )
        return value

    return parse


positive_int = number_at_least(int, 1)


def add_kv_cache_gb(p: argparse.ArgumentParser) -> None:
    """``--kv-cache-gb``: the budget of a local model's prefix cache (``load_model``'s ``kv_cache_gb``)."""
    p.add_argument(
        "--kv-cache-gb",
        type=number_at_least(float, 0),
        default=None,
        help="a local model's prefix cache of KV blocks, in GiB (default: a quarter of the memory free after "
        "loading, at most 16; 0: off)",
    )


def tool_names(text: str | None) -> list[str] | None:
    """A comma-separated ``--tools`` value as names; None (not given) stays None, ``''`` is no tools."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def add_shutdown_timeout(p: argparse.ArgumentParser) -> None:
    """``--shutdown-timeout``, for the subcommands that run a server (serve, web)."""
    p.add_argument(
        "--shutdown-timeout",
        type=number_at_least(float, 0),
        default=30.0,
        help="on SIGTERM/SIGINT, seconds requests in flight may run on before they are aborted (default: 30)",
    )
