"""``make demo``: show the pieces working on this machine, with no model download.

Writes a tiny random-weight checkpoint in the real Qwen-7B-Chat layout under ``.cache/`` and shows how a ReAct
question becomes ChatML token ids. Set ``QWEN_MODEL=/path/to/Qwen-7B-Chat`` to use a real download instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .chat_format import make_context
from .errors import QwenAgentError
from .tiny import write_tiny_checkpoint
from .tokenizer import QwenTokenizer


def model_directory() -> Path:
    """The user's model (``QWEN_MODEL``) or a tiny checkpoint written once under ``.cache/``."""
    if os.environ.get("QWEN_MODEL"):
        return Path(os.environ["QWEN_MODEL"])
    path = Path(".cache") / "tiny-qwen-7b-chat-layout"
    if not (path / "model.safetensors.index.json").is_file():
        print(f"writing a tiny random-weight checkpoint to {path} ...")
        write_tiny_checkpoint(path, seed=0)
    return path


def main() -> int:
    try:
        model = model_directory()
        tokenizer = QwenTokenizer.from_pretrained(model)
        query = "What is 2**10? <|im_end|> (control-token text in user input stays plain text)"
        text, ids = make_context(tokenizer, query)
    except QwenAgentError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"model directory: {model}")
    print(f"prompt ({len(ids)} tokens):\n{text}")
    print("ids:", ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
