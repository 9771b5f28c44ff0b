"""Constrained ReAct decoding: a grammar built from the offered tools, applied as a token mask by the local model.

With it the model can write only a valid ReAct step::

    Thought: <one line of text>
    Action: <an offered tool's name>
    Action Input: <arguments>            (up to where "\\nObservation:" begins)

or ``Thought: <one line>`` then ``Final Answer: <text>`` (ended by the end-of-turn id). The arguments of a JSON tool
are a JSON object that matches the tool's ``parameters`` schema (with unknown top-level names ruled out, as
:func:`~qwen_agent.tools.schema.validate_arguments` rules them out); those of a code tool (``args_format="code"``)
are free code text, fenced or not, and for the ``react_demo`` wording, which asks for triple backticks, fenced.
Free text never holds ``Observation:`` (the stop string would cut it) nor a line that starts with a ReAct marker
inside code (the parser would end the Action Input there). Where the assistant turn already ends with
``Thought:`` (after an Observation) the grammar starts at the thought's text; where it ends with
``Final Answer:`` (the forced answer), at the answer's.

The grammar is compiled by llguidance (the ``constrained`` extra: ``pip install 'qwen-react-agent[constrained]'``),
which also computes the masks: it walks the vocabulary's byte trie against the grammar's lexer, a few hundred
microseconds a token (through :class:`~qwen_agent.runtime.grammar.Grammar`, which also serves
``engine.generate(..., json_schema=..., grammar=...)``).

For the ``hermes`` tool format (:mod:`qwen_agent.tool_format`) the grammar is :func:`hermes_grammar`: either an
answer or one or more calls, each ``{"name": "<offered>", "arguments": <JSON matching that tool's schema>}``,
one per line: in ``<tool_call>`` tags as the chat template writes them (the tags as the tokenizer's own tokens
where it has them), or bare, or in one ```` ```json ```` fence, as some Qwen2.5 models write them. An answer
holds no ``<tool_call>`` and does not begin like a bare or fenced call, so whatever begins like a call is one
the grammar checked (``parse_hermes(text, constrained=True)`` reads a turn that way). A code tool's arguments
there are its schema's object (``{"code": "..."}``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError
from .llm_protocol import LLM, ChatPrompt
from .react import VARIANTS, Variant
from .runtime.grammar import COMPACT_JSON, Grammar, require_llguidance
from .runtime.tokenizer import QwenTokenizer
from .tool_format import HermesFormat

if TYPE_CHECKING:
    from .runtime.constraint import TokenConstraint

__all__ = [
    "ConstraintOptions",
    "react_grammar",
    "ReActConstraints",
    "hermes_grammar",
    "HermesConstraints",
    "strict_function_constraints",
    "constrain_llm",
    "require_llguidance",
]

Start = Literal["step", "thought", "answer"]
_STARTS: tuple[Start, ...] = ("step", "thought", "answer")

# a ReAct marker at the start of a line of code would end the Action Input for the parser
_MARKER_LINE = r"\n[ \t]*(Thought|Action|Action Input|Final Answer)[ \t]*:"


@dataclass(frozen=True)
class ConstraintOptions:
    """``max_text_chars`` bounds every free text (each Thought, the Final Answer, code, each JSON string) to that
    many characters, so that even a model with random weights completes its steps; None leaves them free."""

    max_text_chars: int | None = None

    def __post_init__(self) -> None:
        if self.max_text_chars is not None and self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars must be at least 1, got {self.max_text_chars}")


def _tool_spec(tool: Any) -> tuple[str, str, dict[str, Any]]:
    """(name, args_format, parameters schema) of a tool."""
    name = getattr(tool, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"constrained decoding: {tool!r} has no name")
    args_format = getattr(tool, "args_format", "json")
    schema = getattr(tool, "schema", None)
    if schema is None and callable(getattr(tool, "openai_function", None)):
        schema = tool.openai_function().get("parameters")
    if not isinstance(schema, dict):
        raise ConfigError(
            f"constrained decoding: tool {name!r} has no parameters JSON Schema (a .schema dict)"
        )
    return name, args_format, schema


def _bounded_strings(schema: Any, limit: int) -> Any:
    """``schema`` with ``maxLength`` (at most ``limit``) on every string."""
    if isinstance(schema, list):
        return [_bounded_strings(s, limit) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded_strings(v, limit) for k, v in schema.items()}
    types = schema.get("type")
    if types == "string" or (isinstance(types, list) and "string" in types):
        out["maxLength"] = min(schema.get("maxLength", limit), limit)
    return out


def _argument_schema(schema: dict[str, Any], options: ConstraintOptions) -> dict[str, Any]:
    schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
    schema.setdefault("additionalProperties", False)  # as validate_arguments: no unknown top-level names
    if options.max_text_chars is not None:
        schema = _bounded_strings(schema, options.max_text_chars)
    return {**schema, "x-guidance": COMPACT_JSON}


_THOUGHT = r"[^\n]*\S[^\n]*"  # one line, not blank
_ANSWER = r"\s*\S.*"  # any lines, not blank


def _text(pattern: str, limit: int | None) -> str:
    """A Lark token: text matching ``pattern``, at most ``limit`` characters, never containing the stop string."""
    token = f"/(?s:{pattern})/ & ~/(?s:.*Observation:.*)/"
    return token + (f" & /(?s:.{{1,{limit}}})/" if limit is not None else "")


def react_grammar(
    tools: Mapping[str, Any], variant: Variant, start: Start, options: ConstraintOptions
) -> str:
    """The Lark grammar (llguidance's dialect) of one ReAct step for ``tools`` (name -> tool), from ``start``:
    ``"step"`` (a whole step), ``"thought"`` (after ``Thought:``) or ``"answer"`` (after ``Final Answer:``)."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown ReAct prompt variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    limit = options.max_text_chars
    lines = [
        {
            "step": 'start: "Thought: " THOUGHT "\\n" decision',
            "thought": 'start: THOUGHT "\\n" decision',
            "answer": "start: ANSWER",
        }[start],
        "decision: action | final" if tools else "decision: final",
        'final: "Final Answer: " ANSWER',
        f"THOUGHT: {_text(_THOUGHT, limit)}",
        f"ANSWER: {_text(_ANSWER, limit)}",
    ]
    calls = []
    for i, tool in enumerate(tools.values()):
        name, args_format, schema = _tool_spec(tool)
        head = json.dumps(f"{name}\nAction Input: ")
        if args_format == "code":
            # one token up to and including the stop string, so the lexer never has to give text back
            body = r"```[^\n`]*\n.*[^\s`].*\n```" if variant == "react_demo" else r"[\s`]*[^\s`].*"
            bound = f" & /(?s:.{{1,{limit + 20}}})/" if limit is not None else ""
            excluded = f"(?s:.*(Observation:|{_MARKER_LINE}).*\\nObservation:)"
            lines.append(f"ARGS{i}: /(?s:{body}\\nObservation:)/ & ~/{excluded}/{bound}")
            calls.append(f"{head} ARGS{i}")
        else:
            lines.append(f"args{i}: %json{json.dumps(_argument_schema(schema, options), ensure_ascii=False)}")
            calls.append(f'{head} args{i} "\\nObservation:"')
    if tools:
        lines.append('action: "Action: " (' + " | ".join(calls) + ")")
    return "\n".join(lines) + "\n"


class ReActConstraints:
    """Gives each model call a fresh constraint for the ReAct grammar of ``tools`` (name -> tool).

    Compiles the grammar once per start (a whole step, after ``Thought:``, after ``Final Answer:``), the whole
    step's at once; a tool whose schema llguidance cannot compile is a :class:`~qwen_agent.errors.ConfigError`
    naming it. Call with a
    :class:`~qwen_agent.llm_protocol.ChatPrompt` (or :meth:`for_prefix` with the assistant text so far).
    """

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        vocab_size: int,
        tools: Mapping[str, Any],
        variant: Variant = "react_prompt",
        options: ConstraintOptions | None = None,
    ) -> None:
        require_llguidance()
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._tools, self._variant = dict(tools), variant
        self._options = options or ConstraintOptions()
        self._grammars: dict[Start, Grammar] = {}
        self._grammar("step")  # compile errors surface here; the other starts compile when first needed

    def _grammar(self, start: Start) -> Grammar:
        if start not in self._grammars:
            lark = react_grammar(self._tools, self._variant, start, self._options)
            try:
                self._grammars[start] = Grammar(
                    self._tokenizer, self._vocab_size, lark, "constrained decoding: the ReAct grammar"
                )
            except ConfigError:
                self._name_the_tool()
                raise
        return self._grammars[start]

    def _name_the_tool(self) -> None:
        """Raise a ConfigError naming the first tool whose parameters schema llguidance cannot compile."""
        for name, tool in self._tools.items():
            _, args_format, schema = _tool_spec(tool)
            if args_format != "code":
                args = json.dumps(_argument_schema(schema, self._options), ensure_ascii=False)
                what = f"constrained decoding: the parameters schema of tool {name!r}"
                Grammar(self._tokenizer, self._vocab_size, f"start: %json{args}\n", what)

    def for_prefix(self, assistant_prefix: str) -> TokenConstraint:
        """A constraint for a completion that continues ``assistant_prefix``."""
        tail = assistant_prefix.rstrip(" ")
        start: Start = "step"
        if tail.endswith("Final Answer:"):
            start = "answer"
        elif tail.endswith("Thought:"):
            start = "thought"
        return self._grammar(start).constraint()

    def __call__(self, prompt: ChatPrompt) -> TokenConstraint:
        return self.for_prefix(prompt.assistant_prefix)


def _tag(tokenizer: QwenTokenizer, tag: str) -> str:
    """A tag as the tokenizer's own token where it has one (the model writes that id), else as text."""
    token = tokenizer.special_tokens.get(tag)
    return f"<[{token}]>" if token is not None else json.dumps(tag)


def hermes_grammar(
    tools: Mapping[str, Any],
    options: ConstraintOptions,
    open_tag: str = '"<tool_call>"',
    close_tag: str = '"</tool_call>"',
) -> str:
    """The Lark grammar of one Hermes turn for ``tools`` (name -> tool): an answer, or calls (see the module
    docstring). ``open_tag``/``close_tag`` are Lark items for the tags."""
    limit = options.max_text_chars
    answer = r"/(?s:\s*[^\s{].*)/"
    if tools:  # no tag anywhere, nor the opening of a fenced call: those are the calls' own forms
        answer += r" & ~/(?s:.*<tool_call>.*)/ & ~/(?s:```json\n\{.*)/"
    lines = ["start: answer | calls" if tools else "start: answer", "answer: ANSWER"]
    lines.append("ANSWER: " + answer + (f" & /(?s:.{{1,{limit}}})/" if limit is not None else ""))
    if tools:
        names = []
        for i, tool in enumerate(tools.values()):
            name, _, schema = _tool_spec(tool)
            head = json.dumps(name) + ', "arguments": '
            lines.append(f"c{i}: {json.dumps(head)} args{i}")
            lines.append(f"args{i}: %json{json.dumps(_argument_schema(schema, options), ensure_ascii=False)}")
            names.append(f"c{i}")
        lines.append(
            'calls: tagged ("\\n" tagged)* | call ("\\n" call)* | "```json\\n" call ("\\n" call)* "\\n```"'
        )
        lines.append(f'tagged: {open_tag} "\\n" call "\\n" {close_tag}')
        lines.append(f'call: "{{\\"name\\": " ({" | ".join(names)}) "}}"')
    return "\n".join(lines) + "\n"


class HermesConstraints:
    """Gives each model call a fresh constraint for the Hermes grammar of ``tools`` (compiled once); a tool whose
    schema llguidance cannot compile is a ConfigError naming it."""

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        vocab_size: int,
        tools: Mapping[str, Any],
        options: ConstraintOptions | None = None,
    ) -> None:
        require_llguidance()
        options = options or ConstraintOptions()
        lark = hermes_grammar(tools, options, _tag(tokenizer, "<tool_call>"), _tag(tokenizer, "</tool_call>"))
        try:
            self._grammar = Grammar(
                tokenizer, vocab_size, lark, "constrained decoding: the tool-call grammar"
            )
        except ConfigError:
            ReActConstraints(
                tokenizer, vocab_size, tools, options=options
            )  # names the tool whose schema fails
            raise

    def __call__(self, prompt: ChatPrompt) -> TokenConstraint:
        return self._grammar.constraint()


def constrain_llm(
    llm: LLM,
    tools: Mapping[str, Any],
    variant: Variant,
    options: ConstraintOptions | None = None,
    tool_format: Any = None,
) -> LLM:
    """``llm`` decoding under the grammar of ``tools`` in ``tool_format`` (ReAct unless it is a
    :class:`~qwen_agent.tool_format.HermesFormat`): a local model only, since the mask is applied in this
    process's decoding loop."""
    from .llm import LocalLLM

    if not isinstance(llm, LocalLLM):
        raise ConfigError(
            f"constrained decoding masks tokens in this process's decoding loop, so it needs a LocalLLM; "
            f"{type(llm).__name__} cannot do it (a server decodes by itself)"
        )
    engine = llm.engine
    if isinstance(tool_format, HermesFormat):
        return llm.with_constraint(
            HermesConstraints(engine.tokenizer, engine.config.vocab_size, tools, options)
        )
    return llm.with_constraint(
        ReActConstraints(engine.tokenizer, engine.config.vocab_size, tools, variant, options)
    )


@dataclass(frozen=True)
class _Function:
    name: str
    schema: dict[str, Any]
    args_format: str = "json"


# what a function that is not strict may take: any JSON object
_ANY_OBJECT = {"type": "object", "additionalProperties": True}


def strict_function_constraints(
    tokenizer: QwenTokenizer, vocab_size: int, functions: Sequence[Mapping[str, Any]], tool_format: Any = None
) -> ReActConstraints | HermesConstraints | None:
    """The grammar (ReAct's ``openai_api`` wording, or the Hermes format's for a
    :class:`~qwen_agent.tool_format.HermesFormat`) over OpenAI function specs when any of them is ``"strict":
    true``: a strict function's arguments match its ``parameters``, the others' are any JSON object, and only
    offered names can be called. None when no function is strict."""
    if not any(spec.get("strict") is True for spec in functions):
        return None
    tools = {}
    for spec in functions:
        name = str(spec.get("name_for_model", spec.get("name")))
        schema = spec.get("parameters") or {"type": "object", "properties": {}}
        tools[name] = _Function(name, schema if spec.get("strict") is True else _ANY_OBJECT)
    if isinstance(tool_format, HermesFormat):
        return HermesConstraints(tokenizer, vocab_size, tools)
    return ReActConstraints(tokenizer, vocab_size, tools, "openai_api")
