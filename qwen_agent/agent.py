"""The ReAct loop: prompt, generate until ``Observation:``, parse, run the tool, append the Observation, repeat.

The assistant turn is built up as one growing text, exactly as Qwen's ``react_demo.py`` continues it::

    Thought: ...\\nAction: tool\\nAction Input: {...}\\nObservation: result\\nThought: ...\\nFinal Answer: ...

Each step sends the same conversation with that text as the unfinished assistant turn, so a backend with a KV
cache (the local engine) only has to encode the new Observation.

Nothing that goes wrong inside a step is raised: an unknown tool, bad arguments, a failing tool, a malformed
output or a repeated call each becomes an Observation that says what was wrong, and an ``ErrorEvent``. When the
step budget is spent the model gets one more turn that starts ``Final Answer:``, so a run always ends with an
answer. Errors of the backend itself (``LLMError``) propagate.

An agent without tools is a plain chat, as react_demo is without plugins: the query goes bare, with no ReAct
instruction, and the whole reply is the answer.

With the ``hermes`` tool format (:mod:`qwen_agent.tool_format`; a Qwen2/Qwen2.5 model's own) each step renders
the conversation with the model's chat template instead: the tools in the system turn, the earlier calls as the
assistant's ``tool_calls`` and their results as ``tool`` messages. A turn may make several calls; they run in
order, each a Step (with the turn's index) with its own ActionEvent and ObservationEvent, and their results go
back in that order. ``RunResult.history`` then keeps ``(query, answer)`` pairs.

Streaming holds one rule: in every step the text of its ``ThoughtDelta`` events joins to ``Step.thought`` and
that of the ``AnswerDelta`` events to the answer, whatever the model writes and whatever the backend cuts.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from .constrained import ConstraintOptions, constrain_llm
from .errors import ConfigError, LLMError
from .llm import cut_stream
from .llm_protocol import LLM, ChatPrompt, Completion, Sampling
from .react import (
    DEFAULT_VARIANT,
    STOP_WORDS,
    Action,
    FinalAnswer,
    ParsedOutput,
    Problem,
    Variant,
    format_hint,
    parse_output,
    react_instruction,
    react_question,
    render_observation,
)
from .runtime.chat_format import DEFAULT_SYSTEM
from .tool_format import HermesFormat, ToolFormat, choose_format, openai_tool, parse_hermes, streamer

__all__ = [
    "Agent",
    "Step",
    "RunResult",
    "Event",
    "StepStarted",
    "ThoughtDelta",
    "ActionEvent",
    "ObservationEvent",
    "AnswerDelta",
    "ErrorEvent",
    "FinalAnswerEvent",
]

FORCED_THOUGHT = "I now know the final answer."
FORCED_ANSWER_CUE = f" {FORCED_THOUGHT}\nFinal Answer:"
_ANSWER_MARKER = "Final Answer:"
NO_ANSWER = "I could not find an answer within the allowed number of steps."


class ToolLike(Protocol):
    """What the agent needs from a tool (``qwen_agent.tools.BaseTool`` provides it)."""

    name: str

    def tool_desc(self, variant: str) -> str: ...

    def invoke(self, raw_arguments: str) -> Any: ...  # -> an object with .observation, .ok and .error


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Step:
    """One model turn of the loop and what came of it."""

    index: int
    thought: str
    action: str | None = None
    raw_arguments: str | None = None
    arguments: Any = None
    observation: str | None = None
    ok: bool = True  # False when the step ended in an error observation
    problems: tuple[Problem, ...] = ()
    output: str = ""  # what the model wrote (after stop handling)
    completion: Completion | None = None
    tool_seconds: float = 0.0


@dataclass
class RunResult:
    """The outcome of :meth:`Agent.run`.

    ``stop_reason`` is ``"final_answer"`` or ``"max_iterations"`` (the answer then comes from the forced final
    turn). ``transcript`` is the whole assistant turn; ``history`` is the conversation to pass to the next run.
    Token counts add up every model call (``None`` parts, from backends that do not report them, count as 0).
    """

    query: str
    answer: str
    steps: list[Step]
    stop_reason: Literal["final_answer", "max_iterations"]
    transcript: str
    history: list[tuple[str, str]]
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0
    llm_seconds: float = 0.0
    tool_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"


@dataclass(frozen=True)
class StepStarted(Event):
    type: ClassVar[str] = "step_started"
    index: int
    forced: bool = False  # the forced final-answer turn after the budget ran out


@dataclass(frozen=True)
class ThoughtDelta(Event):
    type: ClassVar[str] = "thought_delta"
    index: int
    text: str


@dataclass(frozen=True)
class ActionEvent(Event):
    type: ClassVar[str] = "action"
    index: int
    tool: str
    raw_arguments: str
    arguments: Any


@dataclass(frozen=True)
class ObservationEvent(Event):
    type: ClassVar[str] = "observation"
    index: int
    observation: str
    ok: bool


@dataclass(frozen=True)
class AnswerDelta(Event):
    type: ClassVar[str] = "answer_delta"
    index: int
    text: str


@dataclass(frozen=True)
class ErrorEvent(Event):
    """A recoverable problem in a step; ``kind`` is a :class:`Problem` value, ``"tool_error"`` or
    ``"repeated_action"``."""

    type: ClassVar[str] = "error"
    index: int
    kind: str
    message: str


@dataclass(frozen=True)
class FinalAnswerEvent(Event):
    type: ClassVar[str] = "final_answer"
    answer: str
    result: RunResult = field(repr=False)


# ------------------------------------------------------------------------------------------------ the agent


def _tool_map(tools: Any) -> dict[str, ToolLike]:
    """Tools from a ToolRegistry (whose iteration yields names), a name -> tool mapping, or an iterable."""
    if callable(getattr(tools, "tools", None)):
        items = tools.tools()
    elif isinstance(tools, Mapping):
        items = tools.values()
    else:
        items = tools
    mapping: dict[str, ToolLike] = {}
    for tool in items:
        if tool.name in mapping:
            raise ConfigError(f"two tools are named {tool.name!r}")
        mapping[tool.name] = tool
    return mapping


def _clean(text: str) -> str:
    # the reference strips every turn this way: without it the prompt differs from the training data
    return text.lstrip("\n").rstrip()


class Agent:
    """A ReAct agent over any :class:`~qwen_agent.llm.LLM` and a set of tools (a ``ToolRegistry``, a list of
    tools, or a name -> tool mapping; none makes it a plain chat).

    ``tool_format`` is ``"react"``, ``"hermes"`` or None: the model's own (:func:`~qwen_agent.tool_format.
    choose_format`). ``variant`` picks the ReAct prompt wording (see :mod:`qwen_agent.react`); ``max_iterations``
    caps the model turns that call tools in one run; ``sampling`` is passed to the backend on every call.
    ``constrained=True`` (or a :class:`~qwen_agent.constrained.ConstraintOptions`) decodes a local model under the
    grammar of these tools in the format (:mod:`qwen_agent.constrained`); other backends raise ConfigError.
    """

    def __init__(
        self,
        llm: LLM,
        tools: Iterable[ToolLike] | Mapping[str, ToolLike] | Any = (),
        system: str | None = None,
        max_iterations: int = 8,
        *,
        variant: Variant = DEFAULT_VARIANT,
        sampling: Sampling | None = None,
        constrained: bool | ConstraintOptions = False,
        tool_format: str | ToolFormat | None = None,
    ):
        if max_iterations < 1:
            raise ConfigError(f"max_iterations must be at least 1, got {max_iterations}")
        self.tools = _tool_map(tools)
        self.llm = llm
        self.format = choose_format(tool_format, llm)
        if constrained:
            options = constrained if isinstance(constrained, ConstraintOptions) else None
            self.llm = constrain_llm(llm, self.tools, variant, options, self.format)
        self._system_given = system  # hermes: None lets the chat template write its own default
        self.system = DEFAULT_SYSTEM if system is None else system
        self.max_iterations = max_iterations
        self.variant = variant
        self.sampling = sampling
        names = list(self.tools)
        self._instruction = react_instruction(
            [t.tool_desc(variant) for t in self.tools.values()], names, variant
        )
        self._formats = {name: getattr(tool, "args_format", "json") for name, tool in self.tools.items()}

    # -- prompt ---------------------------------------------------------------------------------------------

    def prompt(
        self, query: str, history: Sequence[tuple[str, str]] = (), assistant_prefix: str = ""
    ) -> ChatPrompt:
        """The conversation for one model call. As in the reference, the ReAct instruction goes into the last
        earlier turn when there is one (so that turn's cache stays valid), else into the query, and each turn is
        stripped after that (a query's leading newline stays after ``Question: ``). Without tools no instruction
        is sent."""
        turns = list(history)
        if self.tools and turns:
            turns[-1] = (react_question(self._instruction, turns[-1][0]), turns[-1][1])
        elif self.tools:
            query = react_question(self._instruction, query)
        cleaned = tuple((_clean(q), _clean(r)) for q, r in turns)
        return ChatPrompt(_clean(query), cleaned, self.system, assistant_prefix)

    def messages(
        self, query: str, history: Sequence[tuple[str, str]] = (), exchange: Sequence[dict[str, Any]] = ()
    ) -> list[dict[str, Any]]:
        """The hermes conversation: system (when given), earlier turns, the query, this run's calls and results."""
        messages = [] if self._system_given is None else [{"role": "system", "content": self.system}]
        for old_query, answer in history:
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
        return [*messages, {"role": "user", "content": query}, *exchange]

    # -- running --------------------------------------------------------------------------------------------

    def run(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> RunResult:
        """Answer ``query``; ``history`` holds earlier ``(query, transcript)`` turns (``RunResult.history``)."""
        for event in self.stream(query, history):
            if isinstance(event, FinalAnswerEvent):
                return event.result
        raise AssertionError("stream() always ends with a FinalAnswerEvent")

    def stream(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> Iterator[Event]:
        """Run like :meth:`run`, yielding events as they happen; the last one is a :class:`FinalAnswerEvent`.

        Per step: ``StepStarted``, ``ThoughtDelta``*, then either ``ActionEvent`` [``ErrorEvent``]
        ``ObservationEvent``, or ``ErrorEvent ObservationEvent`` for an unusable output, or ``AnswerDelta``* and
        the ``FinalAnswerEvent``.
        """
        history = list(history or [])
        run = _Run(self, query, history)
        if not self.tools:
            yield StepStarted(0)
            yield from run.plain_answer(0)
            yield FinalAnswerEvent(run.answer, run.result())
            return
        for index in range(self.max_iterations):
            yield StepStarted(index)
            steps = yield from run.model_step(index, run.transcript)
            if steps is None:  # a final answer
                break
            for step in steps:  # parallel calls run in order
                yield from run.act(step)
            run.record(steps)
        else:
            yield StepStarted(self.max_iterations, forced=True)
            yield from run.forced_answer(self.max_iterations)
        yield FinalAnswerEvent(run.answer, run.result())


class _Run:
    """The state of one run: the growing transcript, steps and counters."""

    def __init__(self, agent: Agent, query: str, history: list[tuple[str, str]]):
        self.agent = agent
        self.query = query
        self.history = history
        self.transcript = ""
        self.exchange: list[dict[str, Any]] = []  # hermes: the assistant's calls and their results so far
        self.steps: list[Step] = []
        self.completions: list[Completion] = []
        self.answer = ""
        self.stop_reason: Literal["final_answer", "max_iterations"] = "final_answer"
        self.started = time.perf_counter()
        self._seen_calls: dict[tuple[str, str], int] = {}

    def generate(
        self, index: int, prefix: str, answer_only: bool = False
    ) -> Generator[Event, None, tuple[Completion, list[ParsedOutput]]]:
        """Stream one model call as thought / answer deltas; returns the Completion and its parse (hermes: one
        item per call in the turn).

        ``answer_only``: the reply continues a ``Final Answer:`` (written by the prompt, or implied by a plain
        chat), so all of it is the answer."""
        agent, hermes = self.agent, isinstance(self.agent.format, HermesFormat)
        if hermes:
            tools = [openai_tool(t) for t in agent.tools.values()] if not answer_only else []
            prompt = agent.format.prompt(agent.messages(self.query, self.history, self.exchange), tools)
        else:
            prompt = agent.prompt(self.query, self.history, prefix)
        answer_marker = _ANSWER_MARKER if answer_only else ""
        sections = streamer(agent.format, answer_marker)
        completion = None
        stop = agent.format.stop
        # cut here too: a backend that returns the stop word (or what follows it) must not reach the transcript
        items = cut_stream(agent.llm.stream(prompt, stop=stop, sampling=agent.sampling), stop)
        for item in items:  # read to its end, so that the backend can finish its own bookkeeping
            if isinstance(item, Completion):
                completion = item
            else:
                yield from self._deltas(index, sections.feed(item))
        if completion is None:
            raise LLMError(f"{type(self.agent.llm).__name__}.stream() ended without yielding its Completion")
        self.completions.append(completion)
        if hermes:
            turn = parse_hermes(completion.text)
            if answer_only:  # the whole reply is the answer; calls it wrote anyway are dropped
                turn = type(turn)(turn.content, (), completion.text)
            outputs = turn.outputs(agent._formats)
        else:
            # with its stop word back, the text before "\nObservation:" is carried as written, as react_demo does
            stop_word = completion.stop if completion.stop in STOP_WORDS else ""
            outputs = [parse_output(answer_marker + completion.text + stop_word, agent._formats)]
        yield from self._deltas(index, sections.finish(outputs[0]))
        return completion, outputs

    @staticmethod
    def _deltas(index: int, pieces: list[tuple[str, str]]) -> Iterator[Event]:
        for section, text in pieces:
            yield (AnswerDelta if section == "answer" else ThoughtDelta)(index, text)

    def model_step(self, index: int, prefix: str) -> Generator[Event, None, list[Step] | None]:
        """Generate and parse one turn; returns the Steps to act on (one per call), or None when the answer is
        final."""
        completion, outputs = yield from self.generate(index, prefix)
        parsed = outputs[0]
        if isinstance(parsed, FinalAnswer):
            self.steps.append(
                Step(
                    index, parsed.thought, problems=parsed.problems, output=parsed.text, completion=completion
                )
            )
            self.transcript += parsed.text
            self.answer = parsed.answer
            return None
        return [self._step(index, parsed, completion if i == 0 else None) for i, parsed in enumerate(outputs)]

    def _step(self, index: int, parsed: ParsedOutput, completion: Completion | None) -> Step:
        step = Step(
            index,
            parsed.thought,
            parsed.tool,
            parsed.raw_arguments,
            output=parsed.text if completion is not None else "",
            completion=completion,
        )
        if isinstance(parsed, Action):
            step.arguments, step.problems = parsed.arguments, parsed.problems
        else:
            step.ok, step.problems = False, (parsed.problem, *parsed.problems)
            step.observation = f"Error: {parsed.detail}"
            if completion is not None and completion.finish_reason == "length":
                step.observation += " The reply was cut off at the token limit; keep the next one shorter."
            if parsed.problem not in (Problem.UNKNOWN_TOOL, Problem.INVALID_ARGUMENTS):
                step.observation += "\n" + format_hint(list(self.agent.tools))
        return step

    def act(self, step: Step) -> Iterator[Event]:
        """Run the step's tool (or report why not) and append the Observation to the transcript."""
        index = step.index
        if step.observation is not None:  # a malformed output
            yield ErrorEvent(index, step.problems[0].value, step.observation)
        else:
            yield ActionEvent(index, step.action, step.raw_arguments, step.arguments)
            key = (step.action, _call_key(step))
            if key in self._seen_calls:
                step.ok = False
                step.observation = (
                    f"Error: you already called {step.action} with exactly these arguments in step "
                    f"{self._seen_calls[key] + 1}; its Observation is above. Use it, try different arguments, "
                    "or give the Final Answer."
                )
                yield ErrorEvent(index, "repeated_action", step.observation)
            else:
                step.observation, step.ok, error = self._invoke(step)
                if step.ok:  # a failed call may be retried as it was
                    self._seen_calls[key] = index
                else:
                    yield ErrorEvent(index, "tool_error", error or step.observation)
        yield ObservationEvent(index, step.observation, step.ok)
        self.steps.append(step)

    def record(self, steps: list[Step]) -> None:
        """Carry a turn's calls and their Observations into the next prompt."""
        if not isinstance(self.agent.format, HermesFormat):
            for step in steps:
                self.transcript += step.output + render_observation(step.observation)
            return
        calls = [
            {"type": "function", "function": {"name": s.action or "", "arguments": _wire_arguments(s)}}
            for s in steps
        ]
        self.exchange.append({"role": "assistant", "content": steps[0].thought, "tool_calls": calls})
        self.exchange += [{"role": "tool", "content": s.observation or ""} for s in steps]

    def _invoke(self, step: Step) -> tuple[str, bool, str | None]:
        tool = self.agent.tools[step.action]
        started = time.perf_counter()
        try:
            result = tool.invoke(step.raw_arguments)
            observation, error = str(result.observation), getattr(result, "error", None)
            ok = bool(result.ok)
        except Exception as exc:  # tools should not raise, but a user's tool might: the model hears about it
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            observation, ok, error = f"Error: the tool {step.action} failed: {tb}", False, tb
        step.tool_seconds = time.perf_counter() - started
        return observation, ok, error and str(error)

    def forced_answer(self, index: int) -> Iterator[Event]:
        """The budget is spent: let the model write only the Final Answer."""
        self.stop_reason = "max_iterations"
        prefix = self.transcript + FORCED_ANSWER_CUE
        yield ThoughtDelta(index, FORCED_THOUGHT)
        completion, (parsed, *_) = yield from self.generate(index, prefix, answer_only=True)
        self.answer = parsed.answer if isinstance(parsed, FinalAnswer) else NO_ANSWER
        if not isinstance(parsed, FinalAnswer):
            yield AnswerDelta(index, NO_ANSWER)
        self.transcript = prefix + " " + self.answer
        self.steps.append(Step(index, FORCED_THOUGHT, output=completion.text, completion=completion))

    def plain_answer(self, index: int) -> Iterator[Event]:
        """No tools: one reply, all of it the answer (its end cut at a stop word, its ends stripped)."""
        completion, (parsed, *_) = yield from self.generate(index, "", answer_only=True)
        self.transcript = completion.text
        step = Step(index, "", problems=parsed.problems, output=completion.text, completion=completion)
        if isinstance(parsed, FinalAnswer):
            self.answer = parsed.answer
        else:  # an empty reply
            step.ok, step.problems = False, (parsed.problem, *parsed.problems)
        self.steps.append(step)

    def result(self) -> RunResult:
        def total(name: str) -> int:
            return sum(getattr(c, name) or 0 for c in self.completions)

        transcript = _clean(self.transcript)
        entry = (self.query, transcript)
        if isinstance(
            self.agent.format, HermesFormat
        ):  # the template's text of the calls, results and answer
            base = self.agent.messages(self.query, self.history)
            final = [*self.exchange, {"role": "assistant", "content": self.answer}]
            text = self.agent.format.conversation_text
            transcript, entry = text(base + final)[len(text(base)) :].strip(), (self.query, self.answer)
        return RunResult(
            query=self.query,
            answer=self.answer,
            steps=self.steps,
            stop_reason=self.stop_reason,
            transcript=transcript,
            history=[*self.history, entry],
            llm_calls=len(self.completions),
            prompt_tokens=total("prompt_tokens"),
            completion_tokens=total("completion_tokens"),
            prefill_tokens=total("prefill_tokens"),
            seconds=time.perf_counter() - self.started,
            llm_seconds=sum(c.seconds for c in self.completions),
            tool_seconds=sum(s.tool_seconds for s in self.steps),
        )


def _wire_arguments(step: Step) -> Any:
    """A call's arguments as the chat template writes them: the object, else the text as written."""
    return step.arguments if isinstance(step.arguments, dict) else (step.raw_arguments or "")


def _call_key(step: Step) -> str:
    """Arguments in a canonical form, so that ``{"a":1}`` and ``{ "a": 1 }`` are the same call."""
    if step.arguments is not None:
        try:
            return json.dumps(step.arguments, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            pass
    return (step.raw_arguments or "").strip()
