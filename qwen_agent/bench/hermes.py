"""The tool-use benchmark in the Hermes tool-call format (``bench tool-use --tool-format hermes``).

The shipped jobs are ReAct prompts. For a model whose own format is Hermes, each job becomes the conversation its
chat template expects: the question (after the prompt's last ``Question:``) as the user turn, and the plugins its
``should be one of [...]`` line offers as ``tools``. What the model writes is read with
:func:`~qwen_agent.tool_format.parse_hermes` and written back as the ReAct text the scorecard reads (its first
call as ``Action``/``Action Input``, with its arguments as JSON; no call: a ``Final Answer``), so both formats
are scored by the same metrics. The model's own text is kept in each record's ``raw``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import BenchmarkError
from ..llm_protocol import ChatPrompt
from ..tool_format import HermesFormat, openai_tool, parse_hermes

__all__ = ["HermesJobs", "react_gen"]

_OFFERED = re.compile(r"^Action: the action to take, should be one of \[(.*)\]$", re.M)
_QUESTION = "\n\nQuestion: "


def offered_names(prompt: str) -> tuple[str, ...]:
    found = _OFFERED.search(prompt)
    if found is None:
        raise BenchmarkError(f"prompt {prompt[:60]!r}...: no 'should be one of [...]' line naming its tools")
    return tuple(name.strip() for name in found.group(1).split(",") if name.strip())


class HermesJobs:
    """Turns the benchmark's ReAct prompts into Hermes prompts over ``tools`` (the plugin catalog, name ->
    tool), and the model's replies back into ReAct text."""

    def __init__(self, tool_format: HermesFormat, tools: Mapping[str, Any]) -> None:
        self.format, self.tools = tool_format, dict(tools)

    def offered(self, prompt: str) -> dict[str, Any]:
        names = offered_names(prompt)
        unknown = [name for name in names if name not in self.tools]
        if unknown:
            raise BenchmarkError(
                f"prompt {prompt[:60]!r}...: tool {unknown[0]!r} is not in the plugin catalog"
            )
        return {name: self.tools[name] for name in names}

    def prompt(self, prompt: str) -> ChatPrompt:
        if _QUESTION not in prompt:
            raise BenchmarkError(f"prompt {prompt[:60]!r}...: no 'Question:' to ask")
        question = prompt.rsplit(_QUESTION, 1)[1]
        tools = [openai_tool(tool) for tool in self.offered(prompt).values()]
        return self.format.prompt([{"role": "user", "content": question}], tools)


def react_gen(text: str, *, constrained: bool = False) -> str:
    """The ReAct text the scorecard reads for a Hermes reply (see the module docstring); ``constrained``: it was
    decoded under the Hermes grammar, so only the grammar's call forms are calls."""
    turn = parse_hermes(text, constrained=constrained)
    thought = " ".join(turn.content.split())
    if not turn.calls:
        return f"Thought: I now know the final answer\nFinal Answer: {turn.content}".strip()
    call = turn.calls[0]
    arguments = (
        json.dumps(call.arguments, ensure_ascii=False) if call.arguments is not None else call.raw_arguments
    )
    return f"Thought: {thought}\nAction: {call.name}\nAction Input: {arguments}\nObservation:"
