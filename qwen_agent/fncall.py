"""OpenAI-style function calling on top of Qwen's ReAct prompt, as Qwen's ``openai_api.py`` does it.

``messages`` plus ``functions`` (or ``tools``) go in; the model sees the ReAct instruction of the ``openai_api``
variant; what it writes is parsed and comes back as an assistant message with ``function_call`` (or
``tool_calls``) or plain ``content``. The conversion follows the reference (section 4.4):

* a leading ``system`` message is the system text (default "You are a helpful assistant.");
* an assistant message with a call becomes ``Thought: {content}\\nAction: {name}\\nAction Input: {arguments}``;
  one without a call becomes ``Thought: I now know the final answer.\\nFinal Answer: {content}``;
* a ``function``/``tool`` result is appended to the assistant text as ``\\nObservation: {content}``, and when it
  is the last message ``\\nThought:`` follows and the unfinished assistant turn is continued (text completion);
* the instruction goes into the user message of the last complete (or unfinished) turn, else the query.

Beyond the reference: ``tools``/``tool_calls`` (several calls in one assistant message become consecutive
steps, their results are matched in order) and streaming with function calls.

With the ``hermes`` tool format (a Qwen2/Qwen2.5 model's own, :mod:`qwen_agent.tool_format`) the messages and
tools go to the model's chat template as they are (a call's ``arguments`` as an object, results as ``tool``
turns), and the reply's calls, several for parallel calls, come back as ``tool_calls``; a call to a function that
was not offered is never returned as a call (the reply is then content).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .llm_protocol import LLM, ChatPrompt, Completion, Sampling
from .react import (
    STOP_WORDS,
    FinalAnswer,
    parse_output,
    react_instruction,
    react_question,
    tool_desc_line,
)
from .runtime.chat_format import DEFAULT_SYSTEM
from .tool_format import HermesFormat, ReActFormat, ToolFormat, parse_hermes, streamer

__all__ = [
    "FunctionPrompt",
    "build_prompt",
    "response_message",
    "completion_response",
    "ChatStream",
    "chat_completion",
    "chat_completion_stream",
]


@dataclass(frozen=True)
class FunctionPrompt:
    """A request turned into a ChatML prompt, with what is needed to read the answer back."""

    prompt: ChatPrompt
    function_names: tuple[str, ...]
    use_tools: bool  # answer with tool_calls (the request used `tools`) rather than function_call
    stop: tuple[str, ...]
    tool_format: ToolFormat = ReActFormat()
    constrained: bool = False  # decoded under the functions' grammar: Hermes reads only its call forms


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text can be shown to this model
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ConfigError(
                    f"messages[{index}]: only text content parts are supported, got {part!r:.80}"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ConfigError(f"messages[{index}].content must be a string or a list of text parts")


def _functions(functions: Sequence[Mapping[str, Any]] | None, tools: Sequence[Mapping[str, Any]] | None):
    if functions and tools:
        raise ConfigError("give either 'functions' or 'tools', not both")
    if tools:
        specs = []
        for i, tool in enumerate(tools):
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
                raise ConfigError(
                    f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported"
                )
            specs.append(tool["function"])
        return specs, True
    return list(functions or []), False


def _tool_descs(functions: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    lines, names = [], []
    for i, spec in enumerate(functions):
        name = spec.get("name_for_model", spec.get("name"))
        if not name:
            raise ConfigError(f"functions[{i}] has no 'name'")
        description = spec.get("description_for_model", spec.get("description", ""))
        lines.append(
            tool_desc_line(
                name,
                spec.get("name_for_human", name),
                description,
                spec.get("parameters", {}),
                variant="openai_api",
            )
        )
        names.append(name)
    return lines, names


def _call_step(thought: str, name: str, arguments: str) -> str:
    if not thought.startswith("Thought:"):
        thought = f"Thought: {thought}"
    return f"{thought}\nAction: {name}\nAction Input: {arguments}"


def _calls(message: Mapping[str, Any], index: int) -> list[tuple[str, str]]:
    """(name, arguments) of the calls an assistant message made, in order."""
    raw = []
    if message.get("function_call"):
        raw.append(message["function_call"])
    for call in message.get("tool_calls") or []:
        raw.append(call.get("function") if isinstance(call, Mapping) else None)
    calls = []
    for call in raw:
        if not isinstance(call, Mapping) or not call.get("name"):
            raise ConfigError(f"messages[{index}]: a function call needs a 'name' and 'arguments'")
        arguments = call.get("arguments", "")
        calls.append(
            (
                str(call["name"]),
                arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            )
        )
    return calls


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    stop: Sequence[str] | None = None,
    tool_format: ToolFormat | None = None,
) -> FunctionPrompt:
    """Turn an OpenAI chat request into a ChatML prompt (ReAct), or the model's template prompt (hermes).
    Raises ConfigError naming the offending message."""
    specs, use_tools = _functions(functions, tools)
    messages = list(messages)
    if not any(m.get("role") == "user" for m in messages):
        raise ConfigError("messages must contain at least one user message")
    if isinstance(tool_format, HermesFormat):
        return _hermes_prompt(messages, specs, use_tools, stop, tool_format)
    system = DEFAULT_SYSTEM
    start = 0
    if messages and messages[0].get("role") == "system":
        system, start = _clean(_content(messages[0], 0)), 1

    # (role, text) turns after folding calls and results into the assistant text
    turns: list[list[str]] = []
    pending: list[tuple[str, str]] = []  # further calls of one assistant message, waiting for earlier results
    for index in range(start, len(messages)):
        message = messages[index]
        role, text = message.get("role"), _clean(_content(message, index))
        if role == "user":
            turns.append(["user", text])
        elif role == "assistant":
            if not turns:
                raise ConfigError(f"messages[{index}]: an assistant message must follow a user message")
            calls = _calls(message, index)
            if calls:
                piece = _call_step(text, *calls[0])
                pending = calls[1:]
            else:
                piece = f"Thought: I now know the final answer.\nFinal Answer: {text}" if specs else text
            if turns[-1][0] == "user":
                turns.append(["assistant", _clean(piece)])
            else:
                turns[-1][1] += "\n" + piece
        elif role in ("function", "tool"):
            if not turns or turns[-1][0] != "assistant":
                raise ConfigError(f"messages[{index}]: a {role} result must follow an assistant message")
            turns[-1][1] += f"\nObservation: {text}"
            if pending:
                turns[-1][1] += "\n" + _call_step("", *pending.pop(0))
            elif index == len(messages) - 1:
                turns[-1][1] += "\nThought:"
        else:
            raise ConfigError(f"messages[{index}]: unsupported role {role!r}")

    # the conversation either ends with the query, or with an unfinished assistant turn to continue
    prefix = ""
    if turns[-1][0] == "assistant":
        prefix = turns.pop()[1]
    query = turns.pop()[1]
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
        raise ConfigError("messages must alternate between user and assistant turns")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]

    names: list[str] = []
    if specs:
        descs, names = _tool_descs(specs)
        instruction = _clean(react_instruction(descs, names, "openai_api"))
        if history and not prefix:
            history[-1] = (react_question(instruction, history[-1][0]), history[-1][1])
        else:
            query = react_question(instruction, query)

    stops = list(stop or [])
    stops += [s.lstrip("\n") for s in stops if s.lstrip("\n") and s.lstrip("\n") not in stops]
    if specs:
        stops += [s for s in STOP_WORDS if s not in stops]
    return FunctionPrompt(
        ChatPrompt(query, tuple(history), system, prefix), tuple(names), use_tools, tuple(stops)
    )


def _hermes_prompt(
    messages: list[Mapping[str, Any]],
    specs: list[Mapping[str, Any]],
    use_tools: bool,
    stop: Sequence[str] | None,
    tool_format: HermesFormat,
) -> FunctionPrompt:
    """The request as the chat template's conversation; a last assistant message without calls is continued."""
    converted = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "function"):
            raise ConfigError(f"messages[{index}]: unsupported role {role!r}")
        turn: dict[str, Any] = {
            "role": "tool" if role == "function" else role,
            "content": _content(message, index),
        }
        calls = _calls(message, index) if role == "assistant" else []
        if calls:
            turn["tool_calls"] = [
                {"type": "function", "function": {"name": name, "arguments": _object_arguments(arguments)}}
                for name, arguments in calls
            ]
        converted.append(turn)
    prefix = ""
    if converted[-1]["role"] == "assistant" and "tool_calls" not in converted[-1]:
        prefix = converted.pop()["content"]
    names = []
    for i, spec in enumerate(specs):
        if not spec.get("name"):
            raise ConfigError(f"functions[{i}] has no 'name'")
        names.append(str(spec["name"]))
    offered = [
        {
            "type": "function",
            "function": {
                "name": spec["name"],
                "description": spec.get("description", ""),
                "parameters": spec.get("parameters") or {"type": "object", "properties": {}},
            },
        }
        for spec in specs
    ]
    prompt = tool_format.prompt(converted, offered, prefix)
    return FunctionPrompt(prompt, tuple(names), use_tools, tuple(stop or ()), tool_format)


def _object_arguments(arguments: str) -> Any:
    """A call's arguments as the template dumps them: the object (the text as it is when it is not one)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _hermes_message(text: str, request: FunctionPrompt) -> tuple[dict[str, Any], str]:
    turn = parse_hermes(text, constrained=request.constrained)
    calls = [call for call in turn.calls if call.name in request.function_names]
    if not calls:  # nothing offered was called: the reply is text, as written
        return {"role": "assistant", "content": text.strip()}, "stop"
    wire = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.raw_arguments},
        }
        for call in calls
    ]
    message: dict[str, Any] = {"role": "assistant", "content": turn.content or None}
    if request.use_tools:
        message["tool_calls"] = wire
        return message, "tool_calls"
    message["function_call"] = wire[0]["function"]  # the legacy API has one call per message
    return message, "function_call"


def response_message(text: str, request: FunctionPrompt) -> tuple[dict[str, Any], str]:
    """The assistant message for what the model wrote, and its finish_reason."""
    if not request.function_names:
        return {"role": "assistant", "content": text}, "stop"
    if isinstance(request.tool_format, HermesFormat):
        return _hermes_message(text, request)
    parsed = parse_output(text, request.function_names)
    tool, arguments = getattr(parsed, "tool", None), getattr(parsed, "raw_arguments", None)
    if tool and arguments is not None:
        # an Action, or a call with bad arguments / an unknown name: returned as written, like the reference,
        # so the caller decides
        call = {"name": tool, "arguments": arguments}
        message: dict[str, Any] = {"role": "assistant", "content": parsed.thought}
        if request.use_tools:
            message["tool_calls"] = [
                {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
            ]
            return message, "tool_calls"
        message["function_call"] = call
        return message, "function_call"
    answer = parsed.answer if isinstance(parsed, FinalAnswer) else parsed.text
    return {"role": "assistant", "content": answer}, "stop"


def _usage(completion: Completion) -> dict[str, int] | None:
    if completion.prompt_tokens is None or completion.completion_tokens is None:
        return None
    total = completion.prompt_tokens + completion.completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": total,
    }
    if completion.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": completion.cached_tokens}
    return usage


def completion_response(
    request: FunctionPrompt, completion: Completion, model: str = "qwen"
) -> dict[str, Any]:
    """The OpenAI ``chat.completion`` object for what the model wrote in answer to ``request``."""
    message, finish = response_message(completion.text, request)
    if finish == "stop" and completion.finish_reason == "length":
        finish = "length"
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": _usage(completion),
    }


def chat_completion(
    llm: LLM,
    messages: Sequence[Mapping[str, Any]],
    *,
    functions: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    stop: Sequence[str] | None = None,
    sampling: Sampling | None = None,
    model: str = "qwen",
    tool_format: ToolFormat | None = None,
) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object answering ``messages``."""
    request = build_prompt(messages, functions, tools, stop, tool_format)
    completion = llm.complete(request.prompt, stop=request.stop, sampling=sampling)  # cut by the backend
    return completion_response(request, completion, model)


class ChatStream:
    """The OpenAI ``chat.completion.chunk`` objects of one streamed answer, built from the model's text deltas
    (for callers that run the model themselves; :func:`chat_completion_stream` drives it from an LLM).

    ``first()`` is the role chunk; ``feed(delta)`` gives the chunks for a text delta; ``finish(completion)`` the
    last ones. With functions, the answer's text streams as content deltas; a call is sent whole in the last
    delta once the model has finished writing it (tool calls with their ``index``, as OpenAI streams them).
    The last chunk carries ``usage``."""

    def __init__(self, request: FunctionPrompt, model: str = "qwen") -> None:
        self.request, self.model = request, model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self._sections = streamer(request.tool_format) if request.function_names else None
        self._sent = ""

    def chunk(
        self, delta: dict[str, Any], finish: str | None = None, usage: dict | None = None
    ) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        if usage is not None:
            body["usage"] = usage
        return body

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def feed(self, delta: str) -> list[dict[str, Any]]:
        pieces = [t for s, t in self._sections.feed(delta) if s == "answer"] if self._sections else [delta]
        self._sent += "".join(pieces)
        return [self.chunk({"content": piece}) for piece in pieces if piece]

    def finish(self, completion: Completion) -> list[dict[str, Any]]:
        chunks = []
        message, finish = response_message(completion.text, self.request)
        if finish == "stop":
            content = message["content"]
            rest = content[len(self._sent) :] if content.startswith(self._sent) else ""
            if rest:
                chunks.append(self.chunk({"content": rest}))
            delta: dict[str, Any] = {}
            finish = "length" if completion.finish_reason == "length" else "stop"
        else:
            delta = {k: v for k, v in message.items() if k != "role"}
            if "tool_calls" in delta:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
        chunks.append(self.chunk(delta, finish, _usage(completion)))
        return chunks


def chat_completion_stream(
    llm: LLM,
    messages: Sequence[Mapping[str, Any]],
    *,
    functions: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    stop: Sequence[str] | None = None,
    sampling: Sampling | None = None,
    model: str = "qwen",
    tool_format: ToolFormat | None = None,
) -> Iterator[dict[str, Any]]:
    """OpenAI ``chat.completion.chunk`` objects answering ``messages`` (see :class:`ChatStream`)."""
    request = build_prompt(messages, functions, tools, stop, tool_format)
    stream = ChatStream(request, model)
    yield stream.first()
    completion = Completion("")
    for item in llm.stream(request.prompt, stop=request.stop, sampling=sampling):
        if isinstance(item, Completion):
            completion = item
        else:
            yield from stream.feed(item)
    yield from stream.finish(completion)
