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


def tool_names(text: str | None) -> list[str] | None:
    """A comma-separated ``--tools`` value as names; None (not given) stays None, ``''`` is no tools."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]
