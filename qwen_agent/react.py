"""Qwen ReAct prompts and a total parser for what the model writes back.

Prompts
-------
Three official Qwen-7B-Chat prompt variants are rendered byte for byte (reference section 4.1):

``react_prompt`` (default)
    ``examples/react_prompt.md``: "...the following tools:", tool names joined with ``","``, every TOOL_DESC line
    ends with "Format the arguments as a JSON object."
``react_demo``
    ``examples/react_demo.py``: "...the following APIs:", names joined with ``", "``, the suffix depends on the
    tool's ``args_format`` (``json`` or ``code``).
``openai_api``
    ``openai_api.py``: as ``react_demo`` with no suffix at all.

The model stops at ``Observation:``; :data:`STOP_WORDS` holds both spellings because the tokenizer merges ``:\\n``
into one token. A step is continued with ``"\\nObservation: {observation}\\nThought:"``.

The parser
----------
:func:`parse_output` maps *every* string to exactly one of :class:`Action`, :class:`FinalAnswer` or
:class:`Malformed`, and never raises. Markers (``Thought:``, ``Action:``, ``Action Input:``, ``Final Answer:``,
``Observation:``) count only at the start of a line (leading spaces allowed), so a sentence that merely mentions
"Action:" is not a tool call; a line holding nothing but a piece of ``Observation`` (``Observ``) also counts as an
Observation, while a code line such as ``Observation = 3`` does not. Each irregularity is a :class:`Problem` with
a fixed policy:

======================  =========================================================================================
problem                 policy
======================  =========================================================================================
empty                   Malformed: nothing (or an empty Final Answer) was written.
no_format               FinalAnswer: plain text with no ReAct marker at all is taken as the answer.
missing_final_answer    Malformed: ReAct markers (e.g. ``Thought:``) but neither an Action nor a Final Answer.
missing_action          Malformed: ``Action Input:`` with no ``Action:`` line before it.
missing_action_input    Malformed: ``Action:`` with no ``Action Input:`` after it.
unknown_tool            Malformed: the tool name is empty or not among the known tools (when they are given).
invalid_arguments       Malformed: Action Input of a JSON tool is not JSON/JSON5 (a fenced ```json block is
                        unwrapped first; an empty input means ``{}``). Tools declared with ``args_format="code"``
                        take the raw text and are not checked here.
multiple_actions        Action: the first action wins; everything after its Action Input is dropped and reported.
invented_observation    Action: the model wrote its own ``Observation``; it and everything after it are dropped.
text_after_action       Action: other text followed the Action Input (e.g. a Final Answer written without waiting
                        for the Observation); it is dropped.
leaked_stop_fragment    any: a partial stop word at the end (``\\nObserv``) is removed. The complete stop word
                        ``Observation:`` at the end is removed silently (model.chat keeps it in its output), and
                        the text before ``\\nObservation:`` is kept as written (react_demo carries it so).
======================  =========================================================================================

An Action is chosen over a Final Answer when its ``Action:`` line comes first, and vice versa; the text of a
Final Answer is everything after its marker. Each result keeps ``text``: the part of the output that is kept for
the transcript (dropped material removed), so rendering a step and parsing it back is the identity.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import json5

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANT",
    "STOP_WORDS",
    "Variant",
    "tool_desc_line",
    "react_instruction",
    "react_question",
    "Problem",
    "Action",
    "FinalAnswer",
    "Malformed",
    "ParsedOutput",
    "parse_output",
    "parse_arguments",
    "render_action",
    "render_final_answer",
    "render_observation",
    "format_hint",
    "SectionStreamer",
]

Variant = Literal["react_prompt", "react_demo", "openai_api"]
VARIANTS: tuple[str, ...] = ("react_prompt", "react_demo", "openai_api")
DEFAULT_VARIANT: Variant = "react_prompt"

# Both are needed: the Qwen tokenizer writes "Observation:\n" as [37763, 367, 510], not [..., 25].
STOP_WORDS: tuple[str, ...] = ("Observation:", "Observation:\n")

_TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
_JSON_SUFFIX = " Format the arguments as a JSON object."
_CODE_SUFFIX = " Enclose the code within triple backticks (`) at the beginning and end of the code."

_INSTRUCTION = """Answer the following questions as best you can. You have access to the following {noun}:

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

# variant -> (word for the tools, separator between tool names)
_VARIANT_WORDING: dict[str, tuple[str, str]] = {
    "react_prompt": ("tools", ","),
    "react_demo": ("APIs", ", "),
    "openai_api": ("APIs", ", "),
}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        from .errors import ConfigError

        raise ConfigError(f"unknown ReAct prompt variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def tool_desc_line(
    name_for_model: str,
    name_for_human: str,
    description_for_model: str,
    parameters: Any,
    *,
    variant: Variant = DEFAULT_VARIANT,
    args_format: str = "json",
) -> str:
    """One TOOL_DESC line as the given variant writes it.

    ``parameters`` is dumped with ``json.dumps(..., ensure_ascii=False)`` unless it is already a string.
    ``args_format`` ("json" or "code") chooses the react_demo suffix; react_prompt always asks for JSON and
    openai_api adds no suffix.
    """
    _check_variant(variant)
    params = parameters if isinstance(parameters, str) else json.dumps(parameters, ensure_ascii=False)
    line = _TOOL_DESC.format(
        name_for_model=name_for_model,
        name_for_human=name_for_human,
        description_for_model=description_for_model,
        parameters=params,
    )
    if variant == "react_prompt":
        return line + _JSON_SUFFIX
    if variant == "react_demo":
        if args_format not in ("json", "code"):
            from .errors import ConfigError

            raise ConfigError(
                f"tool {name_for_model!r}: args_format must be 'json' or 'code', got {args_format!r}"
            )
        return line + (_JSON_SUFFIX if args_format == "json" else _CODE_SUFFIX)
    return line


def react_instruction(
    tool_descs: Sequence[str], tool_names: Sequence[str], variant: Variant = DEFAULT_VARIANT
) -> str:
    """The ReAct instruction up to and including ``Begin!``, with the TOOL_DESC lines joined by blank lines."""
    _check_variant(variant)
    noun, sep = _VARIANT_WORDING[variant]
    return _INSTRUCTION.format(noun=noun, tool_descs="\n\n".join(tool_descs), tool_names=sep.join(tool_names))


def react_question(instruction: str, query: str) -> str:
    """The user turn that carries the instruction: ``{instruction}\\n\\nQuestion: {query}``."""
    return f"{instruction}\n\nQuestion: {query}"


# ----------------------------------------------------------------------------------------------------------------
# Parsing


class Problem(str, enum.Enum):
    """An irregularity in a model output; the module docstring gives the policy for each."""

    EMPTY = "empty"
    NO_FORMAT = "no_format"
    MISSING_FINAL_ANSWER = "missing_final_answer"
    MISSING_ACTION = "missing_action"
    MISSING_ACTION_INPUT = "missing_action_input"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    MULTIPLE_ACTIONS = "multiple_actions"
    INVENTED_OBSERVATION = "invented_observation"
    TEXT_AFTER_ACTION = "text_after_action"
    LEAKED_STOP_FRAGMENT = "leaked_stop_fragment"


@dataclass(frozen=True)
class Action:
    """A tool call: run ``tool`` with ``raw_arguments`` (``arguments`` is their JSON5 value, or None for a
    code-format tool whose input is not JSON). ``problems`` lists what was repaired or dropped."""

    thought: str
    tool: str
    raw_arguments: str
    arguments: Any
    text: str
    problems: tuple[Problem, ...] = ()
    kind: Literal["action"] = field(default="action", init=False)


@dataclass(frozen=True)
class FinalAnswer:
    """The turn is over; ``answer`` is what the user sees."""

    thought: str
    answer: str
    text: str
    problems: tuple[Problem, ...] = ()
    kind: Literal["final_answer"] = field(default="final_answer", init=False)


@dataclass(frozen=True)
class Malformed:
    """An output that cannot be acted on. ``problem`` says why, ``detail`` says it in words the model can use;
    ``tool``/``raw_arguments`` are filled when the output got that far."""

    problem: Problem
    detail: str
    thought: str
    text: str
    tool: str | None = None
    raw_arguments: str | None = None
    problems: tuple[Problem, ...] = ()
    kind: Literal["malformed"] = field(default="malformed", init=False)


ParsedOutput = Action | FinalAnswer | Malformed

_OBSERVATION = "Observation:"
# Line-start markers. An Observation is "Observation:" or a line that holds nothing but a piece of it ("Observ"),
# so that code such as "Observation = 3" in an Action Input is left alone.
_OBSERVATION_PIECES = "|".join("Observation"[:n] for n in range(len("Observation"), 2, -1))
_MARKER_RE = re.compile(
    rf"^[ \t]*(?:(Thought|Action Input|Action|Final Answer)[ \t]*:|(Observation[ \t]*:|(?:{_OBSERVATION_PIECES})[ \t]*$))",
    re.M,
)
_FENCE_RE = re.compile(r"\A```[ \t]*(?:json5?|JSON5?)?[ \t]*\n(.*?)\n?```\Z", re.S)


def _find(name: str, text: str, start: int = 0) -> re.Match[str] | None:
    for m in _MARKER_RE.finditer(text, start):
        if (m.group(1) or m.group(2)) == name:
            return m
    return None


def _strip_stop_trailer(text: str) -> tuple[str, tuple[Problem, ...]]:
    """Remove a trailing stop word (silently) or a partial one (reported). The text before a complete
    ``\\nObservation:`` is kept exactly as written, as react_demo carries it into the next prompt; anywhere else
    trailing space goes."""
    body = text.rstrip()
    cut = body.rfind("\n") + 1
    tail = body[cut:].strip()
    if len(tail) >= 3 and _OBSERVATION.startswith(tail):
        if body[cut:] == _OBSERVATION:
            return body[: max(cut - 1, 0)], ()
        problems = () if tail == _OBSERVATION else (Problem.LEAKED_STOP_FRAGMENT,)
        return body[:cut].rstrip(), problems
    return body, ()


def _strip_thought_marker(text: str) -> str:
    text = text.strip()
    m = _MARKER_RE.match(text)
    if m and m.group(1) == "Thought":
        text = text[m.end() :].strip()
    return text


def _normalise_tool_name(name: str) -> str:
    return name.strip().strip("`'\"").strip()


def parse_arguments(raw: str) -> tuple[Any, str | None]:
    """JSON5 value of an Action Input: ``(value, None)`` or ``(None, error message)``. Never raises.

    An empty input is ``{}``; a fenced block marked json/json5 (or unmarked) is unwrapped first.
    """
    raw = raw.strip()
    if not raw:
        return {}, None
    fenced = _FENCE_RE.match(raw)
    if fenced:
        raw = fenced.group(1).strip()
    try:
        return json5.loads(raw), None
    except RecursionError:
        return None, "the JSON is nested too deeply"
    except Exception as exc:  # json5 raises ValueError and, on odd input, other types
        return None, f"not valid JSON: {exc}"


def _tool_formats(tools: Mapping[str, str] | Iterable[str] | None) -> dict[str, str] | None:
    if tools is None:
        return None
    if isinstance(tools, Mapping):
        return {str(k): str(v) for k, v in tools.items()}
    return {str(name): "json" for name in tools}


def _names(formats: Mapping[str, str]) -> str:
    return ", ".join(formats) if formats else "(none)"


def parse_output(text: str, tools: Mapping[str, str] | Iterable[str] | None = None) -> ParsedOutput:
    """Classify one model output. Never raises.

    ``tools`` are the valid tool names, or a mapping name -> args_format ("json" or "code"); when it is None
    every name is accepted and every Action Input must be JSON.
    """
    try:
        return _parse(text if isinstance(text, str) else str(text), _tool_formats(tools))
    except Exception as exc:  # a bug here must not kill the agent loop; report it as malformed instead
        return Malformed(Problem.NO_FORMAT, f"the output could not be parsed ({exc!r})", "", str(text))


def _parse(text: str, formats: dict[str, str] | None) -> ParsedOutput:
    body, problems = _strip_stop_trailer(text)
    action = _find("Action", body)
    final = _find("Final Answer", body)

    if final is not None and (action is None or final.start() < action.start()):
        thought = _strip_thought_marker(body[: final.start()])
        answer = body[final.end() :].strip()
        if not answer:
            return Malformed(Problem.EMPTY, "the Final Answer is empty.", thought, body, problems=problems)
        return FinalAnswer(thought, answer, body, problems)

    if action is not None:
        return _parse_action(body, action, formats, problems)

    orphan_input = _find("Action Input", body)
    if orphan_input is not None:
        return Malformed(
            Problem.MISSING_ACTION,
            "there is an Action Input but no 'Action:' line naming the tool before it.",
            _strip_thought_marker(body[: orphan_input.start()]),
            body,
            problems=problems,
        )
    if not body.strip():
        return Malformed(Problem.EMPTY, "the reply is empty.", "", body, problems=problems)
    if _MARKER_RE.search(body) is not None:
        return Malformed(
            Problem.MISSING_FINAL_ANSWER,
            "the reply has neither an Action nor a Final Answer.",
            _strip_thought_marker(body),
            body,
            problems=problems,
        )
    return FinalAnswer("", body.strip(), body, (*problems, Problem.NO_FORMAT))


def _parse_action(
    body: str, action: re.Match[str], formats: dict[str, str] | None, problems: tuple[Problem, ...]
) -> ParsedOutput:
    thought = _strip_thought_marker(body[: action.start()])
    action_input = _find("Action Input", body, action.end())
    name_end = action_input.start() if action_input else len(body)
    tool = _normalise_tool_name(body[action.end() : name_end])

    if action_input is None:
        return Malformed(
            Problem.MISSING_ACTION_INPUT,
            f"'Action: {tool}' is not followed by an 'Action Input:' line.",
            thought,
            body,
            tool=tool,
            problems=problems,
        )

    # The Action Input runs to the next line-start marker; whatever follows is dropped.
    following = _MARKER_RE.search(body, action_input.end())
    end = following.start() if following else len(body)
    raw_arguments = body[action_input.end() : end].strip()
    kept = body[:end]
    if following is not None:
        # as before a trailing stop word: the text before "\nObservation:" stays as written
        kept = kept[:-1] if body.startswith("\n" + _OBSERVATION, end - 1) else kept.rstrip()
        rest = body[end:]
        if following.group(2):
            problems += (Problem.INVENTED_OBSERVATION,)
        if _find("Action", rest) is not None:
            problems += (Problem.MULTIPLE_ACTIONS,)
        if not following.group(2) and _find("Action", rest) is None:
            problems += (Problem.TEXT_AFTER_ACTION,)

    if not tool or (formats is not None and tool not in formats):
        what = "no tool name is given" if not tool else f"there is no tool named {tool!r}"
        valid = f" Valid tools: {_names(formats)}." if formats is not None else ""
        return Malformed(
            Problem.UNKNOWN_TOOL, f"{what}.{valid}", thought, kept, tool, raw_arguments, problems
        )

    arguments, error = parse_arguments(raw_arguments)
    args_format = formats.get(tool, "json") if formats is not None else "json"
    if error is not None and args_format != "code":
        return Malformed(
            Problem.INVALID_ARGUMENTS,
            f"the Action Input of {tool} is {error}. Format the arguments as a JSON object.",
            thought,
            kept,
            tool,
            raw_arguments,
            problems,
        )
    return Action(thought, tool, raw_arguments, arguments, kept, problems)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def render_action(thought: str, tool: str, raw_arguments: str) -> str:
    """The text of one action step (no trailing Observation)."""
    head = f"Thought: {thought}\n" if thought else ""
    return f"{head}Action: {tool}\nAction Input: {raw_arguments}"


def render_final_answer(thought: str, answer: str) -> str:
    head = f"Thought: {thought}\n" if thought else ""
    return f"{head}Final Answer: {answer}"


def render_observation(observation: str) -> str:
    """What follows an action in the transcript: the Observation, then the cue for the next thought."""
    return f"\nObservation: {observation}\nThought:"


def format_hint(tool_names: Sequence[str]) -> str:
    """Reminder of the expected format, appended to the Observation after a malformed output."""
    return (
        "Reply in this format:\nThought: ...\nAction: one of [" + ", ".join(tool_names) + "]\n"
        "Action Input: the arguments as a JSON object\n"
        "or, when no more tools are needed:\nThought: I now know the final answer\nFinal Answer: ..."
    )


# ----------------------------------------------------------------------------------------------------------------
# Streaming


class SectionStreamer:
    """Splits streamed model text into thought and final-answer deltas as it arrives.

    ``feed(delta)`` returns ``[(section, text), ...]`` with section ``"thought"`` or ``"answer"``; ``finish()``
    returns the rest. Each time, the text so far is parsed as if it ended there (less an unfinished last line
    that may still become a marker, such as ``"Final Ans"``) and what its thought and answer gained is emitted.
    A parse of a longer text only extends the thought and the answer of a shorter one, so no delta is ever taken
    back, and the deltas of each section join to exactly the ``thought`` and the answer (``""`` for anything but a
    :class:`FinalAnswer`) of :func:`parse_output` on the whole text. Text with no marker yet is held: it is the
    answer only if none follows.
    """

    def __init__(self, prefix: str = "") -> None:
        """``prefix`` is text the prompt already wrote in this turn: ``"Final Answer:"`` reads an answer only."""
        self._prefix = prefix
        self._buf = ""
        self._settled = -1  # length of the text last parsed
        self._sent = {"thought": "", "answer": ""}
        self._acting = False  # an Action line came first: the thought is complete and there is no answer

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._buf += delta
        cut = self._buf.rfind("\n") + 1
        settled = cut if _may_become_marker(self._buf[cut:]) else len(self._buf)
        if settled == self._settled or self._acting:
            return []
        self._settled = settled
        parsed = parse_output(self._prefix + self._buf[:settled])
        self._acting = getattr(parsed, "tool", None) is not None
        if Problem.NO_FORMAT in parsed.problems:  # a marker may still follow and make it a thought
            return []
        return self._emit(parsed)

    def finish(self, parsed: ParsedOutput | None = None) -> list[tuple[str, str]]:
        """The rest; ``parsed`` is the caller's parse of the same text with its prefix (with the tool names)."""
        return self._emit(parsed or parse_output(self._prefix + self._buf))

    def _emit(self, parsed: ParsedOutput) -> list[tuple[str, str]]:
        answer = parsed.answer if isinstance(parsed, FinalAnswer) else ""
        out = []
        for section, text in (("thought", parsed.thought), ("answer", answer)):
            sent = self._sent[section]
            if len(text) > len(sent) and text.startswith(sent):
                out.append((section, text[len(sent) :]))
                self._sent[section] = text
        return out


_MARKER_NAMES = ("Thought", "Action Input", "Final Answer", "Observation")  # "Action" is a prefix of one


def _may_become_marker(line: str) -> bool:
    """Whether an unfinished line may still turn into a line-start marker (or a piece of ``Observation``)."""
    tail = line.lstrip(" \t")
    return any(
        name.startswith(tail) or (tail.startswith(name) and not tail[len(name) :].strip(" \t"))
        for name in _MARKER_NAMES
    )
