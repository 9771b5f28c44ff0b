"""``make demo``: the agent end to end on this machine, with no model download.

1. A model directory: ``QWEN_MODEL=/path/to/Qwen-7B-Chat`` if set, otherwise a tiny random-weight checkpoint in
   the real Qwen-7B-Chat layout written once under ``.cache/`` (its replies are noise; it shows the mechanics:
   loading, the ReAct prompt, generation with stop words, the tool loop, the forced final answer).
2. The sandboxed code interpreter running a cell, and the sandbox layers active on this machine.
3. ``qwen-agent run`` on that model with the built-in tools, printing each step as it happens.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import cli
from .errors import QwenAgentError
from .runtime.tiny import write_tiny_checkpoint

QUESTION = "What is 2**100? Use the code interpreter."


def model_directory() -> tuple[Path, bool]:
    """The user's model (``QWEN_MODEL``) or a tiny checkpoint under ``.cache/``; and whether it is the tiny one."""
    if os.environ.get("QWEN_MODEL"):
        return Path(os.environ["QWEN_MODEL"]), False
    path = Path(".cache") / "tiny-qwen-7b-chat-layout"
    if not (path / "model.safetensors.index.json").is_file():
        print(f"writing a tiny random-weight checkpoint to {path} ...")
        write_tiny_checkpoint(path, seed=0)
    return path, True


def show_interpreter() -> None:
    from .tools import CodeInterpreter

    with CodeInterpreter(timeout=10) as interpreter:
        print("== code interpreter: import sys; print(sys.version); 2**100")
        print(interpreter.call("import sys\nprint(sys.version.split()[0])\n2**100"))
        print("== sandbox layers on this machine:")
        for layer, state in interpreter.sandbox_info().items():
            print(f"   {layer}: {state}")


def main() -> int:
    try:
        model, tiny = model_directory()
        show_interpreter()
    except QwenAgentError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"\n== qwen-agent run --model {model} {QUESTION!r}")
    if tiny:
        print("(random weights: the text is noise; a real checkpoint answers the question)")
    limits = ["--max-iterations", "2", "--max-tokens", "24", "--temperature", "0"] if tiny else []
    return cli.main(["run", "--model", str(model), "--device", "cpu" if tiny else "auto", *limits, QUESTION])


if __name__ == "__main__":
    sys.exit(main())
