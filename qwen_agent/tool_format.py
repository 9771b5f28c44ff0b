"""Tool-call formats: how a model is shown its tools, and how its calls are read back. Each model speaks its own.

``react``
    Qwen-7B-Chat's ReAct (:mod:`qwen_agent.react`): the tools in the user turn's instruction, one
    ``Action``/``Action Input`` per step, the result appended to the same assistant turn as ``Observation:``.
``hermes``
    The format of a Qwen2/Qwen2.5 chat template that handles ``tools``: the tools as JSON in the system turn,
    each call a ``{"name": ..., "arguments": {...}}`` object in ``<tool_call>`` tags (several per turn for
    parallel calls), the results in ``tool`` messages, all rendered by the checkpoint's own template
    (:class:`~qwen_agent.runtime.chat_template.ChatTemplate`), so the prompt is byte for byte the one
    transformers' ``apply_chat_template`` gives.

:func:`choose_format` picks the format from the loaded model (a template that reads ``tools``: hermes; none, as
for Qwen-7B-Chat, or one without tools: react) unless told (``"react"``, ``"hermes"``).

Reading a Hermes turn (:func:`parse_hermes`) never raises. A call is a JSON object with a string ``name`` and
``arguments`` (an object, or a string holding one), inside ``<tool_call>`` tags or bare in the text (Qwen2.5-Coder
leaves the tags out), fenced or not; a last ``<tool_call>`` the token limit cut is read up to the end. The text
around the calls is the turn's content. A name that was not offered is never a call: the agent gets an
``unknown_tool`` error for it, the OpenAI server returns the text as content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import json5

from .errors import ConfigError
from .llm_protocol import ChatPrompt
from .react import STOP_WORDS, Action, FinalAnswer, Malformed, ParsedOutput, Problem, SectionStreamer
from .runtime.chat_template import ChatTemplate

__all__ = [
    "FORMATS",
    "ToolCall",
    "HermesTurn",
    "ReActFormat",
    "HermesFormat",
    "ToolFormat",
    "choose_format",
    "chat_template_of",
    "parse_hermes",
    "openai_tool",
    "HermesStreamer",
    "streamer",
]

FORMATS: tuple[str, ...] = ("react", "hermes")
FormatName = Literal["react", "hermes"]


@dataclass(frozen=True)
class ReActFormat:
    """Qwen-7B-Chat's ReAct; the prompt wording is the agent's ``variant``."""

    name: Literal["react"] = field(default="react", init=False)
    stop: tuple[str, ...] = field(default=STOP_WORDS, init=False)


@dataclass(frozen=True)
class HermesFormat:
    """The tool-call format of ``template`` (a chat template that handles ``tools``)."""

    template: ChatTemplate
    name: Literal["hermes"] = field(default="hermes", init=False)
    stop: tuple[str, ...] = field(default=(), init=False)  # a turn ends at <|im_end|>

    def __post_init__(self) -> None:
        if not self.template.handles_tools:
            raise ConfigError(
                f"{self.template.where}: this chat template does not read 'tools', so it has no tool-call "
                "format; use the react format"
            )

    def prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] = (),
        assistant_prefix: str = "",
    ) -> ChatPrompt:
        """The prompt for OpenAI-style ``messages`` (calls' ``arguments`` as objects) and ``tools``."""
        rendered = self.template.render(list(messages), list(tools) or None, add_generation_prompt=True)
        return ChatPrompt.from_template(rendered, assistant_prefix)

    def conversation_text(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()
    ) -> str:
        """The template's text of ``messages`` (no generation prompt)."""
        return self.template.render_text(list(messages), list(tools) or None, add_generation_prompt=False)


ToolFormat = ReActFormat | HermesFormat


def chat_template_of(llm: Any) -> ChatTemplate | None:
    """The chat template of a local model behind ``llm`` (a LocalLLM, an engine), if any."""
    for holder in (llm, getattr(llm, "engine", None)):
        template = getattr(holder, "chat_template", None)
        if isinstance(template, ChatTemplate):
            return template
    return None


def choose_format(requested: str | ToolFormat | None, llm: Any = None) -> ToolFormat:
    """The format to speak to ``llm``: ``requested`` (a name or a format), or, for None, the model's own (hermes
    when its chat template handles tools, else react). Hermes needs the model's template: a ConfigError says so
    for a backend without one (a server URL)."""
    if isinstance(requested, (ReActFormat, HermesFormat)):
        return requested
    if requested not in (None, *FORMATS):
        raise ConfigError(f"unknown tool format {requested!r}; expected one of {', '.join(FORMATS)}")
    template = chat_template_of(llm)
    if requested == "react" or (requested is None and (template is None or not template.handles_tools)):
        return ReActFormat()
    if template is None:
        raise ConfigError(
            f"the hermes tool format is rendered by the model's chat template, and {type(llm).__name__} has "
            "none here (a local model directory with a Qwen2/Qwen2.5 template has one)"
        )
    return HermesFormat(template)


def openai_tool(tool: Any) -> dict[str, Any]:
    """``{"type": "function", "function": {name, description, parameters}}`` for a tool (a qwen_agent tool, or
    anything with ``name`` and a ``schema``), as chat templates list tools."""
    spec = tool.openai_function() if callable(getattr(tool, "openai_function", None)) else None
    if spec is None:
        spec = {"name": tool.name, "description": getattr(tool, "description", ""), "parameters": tool.schema}
    return {
        "type": "function",
        "function": {
            "name": spec["name"],
            "description": spec.get("description", ""),
            "parameters": spec.get("parameters") or {"type": "object", "properties": {}},
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading a Hermes turn


@dataclass(frozen=True)
class ToolCall:
    """One call as written: ``arguments`` is the object (None when it is not one, see ``error``)."""

    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    error: str | None = None


@dataclass(frozen=True)
class HermesTurn:
    """A model turn in the Hermes format: ``content`` (the text around the calls) and ``calls`` in order."""

    content: str
    calls: tuple[ToolCall, ...] = ()
    text: str = ""

    def outputs(self, formats: Mapping[str, str] | None) -> list[ParsedOutput]:
        """The turn as the agent's parse results: one Action (or Malformed) per call in order, or a FinalAnswer
        (Malformed ``empty`` when nothing was written). ``formats`` holds the offered names (None: any)."""
        if not self.calls:
            if not self.content.strip():
                return [Malformed(Problem.EMPTY, "the reply is empty.", "", self.text)]
            return [FinalAnswer("", self.content.strip(), self.text)]
        outputs: list[ParsedOutput] = []
        for index, call in enumerate(self.calls):
            thought = self.content if index == 0 else ""
            if formats is not None and call.name not in formats:
                valid = ", ".join(formats) or "(none)"
                detail = f"there is no tool named {call.name!r}. Valid tools: {valid}."
                outputs.append(
                    Malformed(Problem.UNKNOWN_TOOL, detail, thought, self.text, call.name, call.raw_arguments)
                )
            elif call.error is not None:
                detail = f"the arguments of {call.name} are {call.error}. Give them as a JSON object."
                outputs.append(
                    Malformed(
                        Problem.INVALID_ARGUMENTS, detail, thought, self.text, call.name, call.raw_arguments
                    )
                )
            else:
                outputs.append(Action(thought, call.name, call.raw_arguments, call.arguments, self.text))
        return outputs


_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
_FENCE_LINE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$\n?", re.M)
_DECODER = json.JSONDecoder()


def _call_from(value: Any) -> ToolCall | None:
    """A ToolCall when ``value`` is a call object (a string ``name`` and ``arguments``), else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        return None
    if "arguments" not in value and "parameters" not in value:
        return None
    arguments = value.get("arguments", value.get("parameters"))
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    if isinstance(arguments, str):  # arguments written as a JSON string (OpenAI's own wire form)
        try:
            arguments = json5.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return ToolCall(value["name"].strip(), None, raw, "not valid JSON")
    if not isinstance(arguments, dict):
        return ToolCall(value["name"].strip(), None, raw, "not a JSON object")
    return ToolCall(value["name"].strip(), arguments, raw)


def _load(text: str) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[0]`` and its length (JSON, else JSON5 for the whole text)."""
    try:
        return _DECODER.raw_decode(text)
    except ValueError:
        pass
    try:
        return json5.loads(text), len(text)
    except Exception:  # json5 raises ValueError and, on odd input, other types
        return None


# how the Hermes grammar's bare and fenced calls begin, exactly (no answer may): a looser pattern would read
# Python's whitespace and word characters where the grammar's engine reads others
_CALL_START = re.compile(r"(?:```json\n)?\{")


def _bare_calls(text: str) -> tuple[list[ToolCall], str]:
    """Calls written as bare JSON objects in ``text``, and the text without them (and their fences)."""
    calls, kept, start = [], [], 0
    for found in re.finditer(r'\{\s*"', text):
        if found.start() < start:
            continue
        loaded = _load(text[found.start() :])
        call = _call_from(loaded[0]) if loaded else None
        if call is None:
            continue
        kept.append(text[start : found.start()])
        calls.append(call)
        start = found.start() + loaded[1]
    kept.append(text[start:])
    rest = "".join(kept)
    return calls, (_FENCE_LINE.sub("", rest) if calls else rest)


def parse_hermes(text: str, *, constrained: bool = False) -> HermesTurn:
    """Read one model turn in the Hermes format (see the module docstring). Never raises.

    ``constrained``: the turn was decoded under the Hermes grammar (:func:`qwen_agent.constrained.hermes_grammar`),
    whose calls are tagged, or begin the turn bare or fenced; a call-shaped object inside an answer is text then,
    since the grammar never checked its arguments."""
    text = text if isinstance(text, str) else str(text)
    if "<tool_call>" not in text:
        if constrained and not _CALL_START.match(text):
            return HermesTurn(text.strip(), (), text)
        calls, content = _bare_calls(text)
        return HermesTurn(content.strip(), tuple(calls), text)
    calls, kept, start = [], [], 0
    for block in _TAGGED.finditer(text):
        body = block.group(1).strip()
        fenced = re.fullmatch(r"```[\w-]*\s*\n(.*?)\n?\s*```", body, re.S)
        body = fenced.group(1).strip() if fenced else body
        loaded = _load(body)
        call = _call_from(loaded[0]) if loaded and not body[loaded[1] :].strip() else None
        if call is None:
            name = re.search(r'"name"\s*:\s*"([^"]+)"', body)
            what = "not a call object with a name and arguments"
            call = ToolCall(name.group(1) if name else "", None, body, what)
        kept.append(text[start : block.start()])
        calls.append(call)
        start = block.end()
    kept.append(text[start:])
    return HermesTurn("".join(kept).strip(), tuple(calls), text)


class HermesStreamer:
    """Streams a Hermes turn as the agent's thought/answer deltas. A call may follow any text, so the turn is held
    until it ends: then its content is the thought (when it made calls) or the answer."""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        return []

    def finish(self, parsed: ParsedOutput | None = None) -> list[tuple[str, str]]:
        if isinstance(parsed, FinalAnswer):
            return [("answer", parsed.answer)] if parsed.answer else []
        thought = getattr(parsed, "thought", "")
        return [("thought", thought)] if thought else []


def streamer(tool_format: ToolFormat, prefix: str = "") -> SectionStreamer | HermesStreamer:
    """The thought/answer streamer of a format (``prefix``: ReAct text the prompt already wrote in the turn)."""
    return HermesStreamer() if isinstance(tool_format, HermesFormat) else SectionStreamer(prefix)
