"""qwen_agent: a ReAct tool-use agent framework for Qwen-7B-Chat running locally.

Public names are imported lazily, so ``import qwen_agent`` stays cheap (no torch, no Jupyter) until a name that
needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "QwenTokenizer": "qwen_agent.tokenizer",
    "IncrementalDecoder": "qwen_agent.tokenizer",
    "make_context": "qwen_agent.chat_format",
    "stop_ids": "qwen_agent.chat_format",
    "DEFAULT_SYSTEM": "qwen_agent.chat_format",
    "write_tiny_checkpoint": "qwen_agent.tiny",
    "load_model": "qwen_agent.engine",
    "QwenEngine": "qwen_agent.engine",
    "GenerationResult": "qwen_agent.generate",
    "QwenConfig": "qwen_agent.config",
    "GenerationConfig": "qwen_agent.config",
}

__all__ = ["__version__", "errors", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("qwen_agent.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
