"""Argument types and help texts that several subcommands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

CONSTRAINED_HELP = (
    "local models: decode under the ReAct grammar of the offered tools (valid steps, offered tool names, "
    "schema-valid arguments); needs the llguidance package"
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
