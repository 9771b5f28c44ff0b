"""Every ``qwen-agent`` subcommand's ``--help`` text equals the recorded one in ``tests/data/cli_help/``.

The recorded texts are what users read; a change to an option shows up here as a diff to review. After an
intended change, rewrite them with ``python tests/test_cli_help.py``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from qwen_agent.cli import build_parser

RECORDED = Path(__file__).parent / "data" / "cli_help"
COMMANDS = [
    [],
    ["tokenize"],
    ["chat"],
    ["run"],
    ["sandbox"],
    ["mcp"],
    ["bench"],
    ["bench", "tool-use"],
    ["bench", "score"],
    ["bench", "compare"],
    ["bench", "code-interpreter"],
    ["serve"],
    ["web"],
]


def help_text(command: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):  # --help prints, then exits
        build_parser().parse_args([*command, "--help"])
    return out.getvalue()


def recorded_path(command: list[str]) -> Path:
    return RECORDED / f"{'-'.join(command) or 'qwen-agent'}.txt"


@pytest.fixture(autouse=True)
def fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal's width


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qwen-agent")
def test_help_is_the_recorded_text(command):
    assert help_text(command) == recorded_path(command).read_text()


def test_every_subcommand_is_recorded():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert sorted(c[0] for c in COMMANDS if len(c) == 1) == sorted(sub.choices)


if __name__ == "__main__":  # rewrite the recorded texts after an intended change
    import os

    os.environ["COLUMNS"] = "100"
    for command in COMMANDS:
        recorded_path(command).write_text(help_text(command))
