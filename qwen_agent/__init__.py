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
    "QwenTokenizer": "qwen_agent.runtime.tokenizer",
    "IncrementalDecoder": "qwen_agent.runtime.tokenizer",
    "make_context": "qwen_agent.runtime.chat_format",
    "stop_ids": "qwen_agent.runtime.chat_format",
    "DEFAULT_SYSTEM": "qwen_agent.runtime.chat_format",
    "write_tiny_checkpoint": "qwen_agent.runtime.tiny",
    "load_model": "qwen_agent.runtime.engine",
    "QwenEngine": "qwen_agent.runtime.engine",
    "GenerationResult": "qwen_agent.runtime.generate",
    "QwenConfig": "qwen_agent.runtime.config",
    "GenerationConfig": "qwen_agent.runtime.config",
    "Agent": "qwen_agent.agent",
    "RunResult": "qwen_agent.agent",
    "Step": "qwen_agent.agent",
    "ChatPrompt": "qwen_agent.llm_protocol",
    "Completion": "qwen_agent.llm_protocol",
    "Sampling": "qwen_agent.llm_protocol",
    "LLM": "qwen_agent.llm_protocol",
    "ScriptedLLM": "qwen_agent.llm",
    "LocalLLM": "qwen_agent.llm",
    "llm_from_spec": "qwen_agent.llm",
    "OpenAICompatibleLLM": "qwen_agent.openai_client",
    "parse_output": "qwen_agent.react",
    "chat_completion": "qwen_agent.fncall",
    "chat_completion_stream": "qwen_agent.fncall",
    "BaseTool": "qwen_agent.tools",
    "ToolResult": "qwen_agent.tools",
    "ToolRegistry": "qwen_agent.tools",
    "default_registry": "qwen_agent.tools",
    "register_tool": "qwen_agent.tools",
    "tool": "qwen_agent.tools",
    "CodeInterpreter": "qwen_agent.tools",
    "ExecutionResult": "qwen_agent.tools",
    "SandboxLimits": "qwen_agent.tools",
    "scorecard": "qwen_agent.bench.metrics",
    "run_benchmark": "qwen_agent.bench.tool_use",
    "run_code_benchmark": "qwen_agent.bench.code_interpreter",
    "QwenLLM": "qwen_agent.langchain",
    "ChatQwen": "qwen_agent.langchain",
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
