"""Tools: the registry, the declaration API and the built-in tools (code_interpreter, web_fetch, current_time).

>>> from qwen_agent.tools import tool
>>> @tool(register=False)
... def add(a: int, b: int = 1) -> int:
...     '''Add two integers.
...
...     Args:
...         a: the first number
...         b: the second number
...     '''
...     return a + b
>>> add.invoke('{"a": 2}').observation
'3'
"""

from __future__ import annotations

from ..errors import ToolArgumentError, ToolError, ToolNotFoundError
from .base import BaseTool, ToolResult, extract_code
from .builtin import CodeInterpreterTool, CurrentTimeTool, WebFetchTool, html_to_text
from .interpreter import CodeInterpreter, ExecutionError, ExecutionResult, Executor
from .registry import FunctionTool, ToolRegistry, default_registry, register_tool, tool
from .sandbox import SandboxConfig, SandboxLimits

__all__ = [
    "BaseTool",
    "ToolResult",
    "FunctionTool",
    "ToolRegistry",
    "default_registry",
    "register_tool",
    "tool",
    "extract_code",
    "CodeInterpreter",
    "ExecutionResult",
    "ExecutionError",
    "Executor",
    "SandboxConfig",
    "SandboxLimits",
    "CodeInterpreterTool",
    "WebFetchTool",
    "CurrentTimeTool",
    "html_to_text",
    "ToolError",
    "ToolNotFoundError",
    "ToolArgumentError",
]
