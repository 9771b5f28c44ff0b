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

The loop is written once, as a step machine (:class:`_Run`): a generator that yields events for the caller and
two kinds of requests, :class:`_ModelCall` (stream this prompt) and :class:`_ToolCall` (run this tool), and is
sent back what they produced. :meth:`Agent.stream` fulfils the requests on the caller's thread;
:meth:`Agent.astream` awaits them on the caller's event loop (:mod:`qwen_agent.aio`). So the two APIs give the
same events and results by construction, the sync API needs no event loop, and the async one no thread per call.

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
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .budget import ContextBudget, Fit
from .constrained import ConstraintOptions, constrain_llm
from .errors import ConfigError, LLMError
from .events import (
    ActionEvent,
    AnswerDelta,
    BudgetEvent,
    ErrorEvent,
    Event,
    FinalAnswerEvent,
    ObservationEvent,
    RunResult,
    Step,
    StepStarted,
    StopReason,
    ThoughtDelta,
)
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
from .tracing import SpanRecord, Tracing

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
    "BudgetEvent",
    "FinalAnswerEvent",
]

FORCED_THOUGHT = "I now know the final answer."
FORCED_ANSWER_CUE = f" {FORCED_THOUGHT}\nFinal Answer:"
_ANSWER_MARKER = "Final Answer:"
NO_ANSWER = "I could not find an answer within the allowed number of steps."
CONTEXT_FULL = "I could not finish: the conversation no longer fits the model's context."


class ToolLike(Protocol):
    """What the agent needs from a tool (``qwen_agent.tools.BaseTool`` provides it)."""

    name: str

    def tool_desc(self, variant: str) -> str: ...

    def invoke(self, raw_arguments: str) -> Any: ...  # -> an object with .observation, .ok and .error


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

    The context budget (:mod:`qwen_agent.budget`): ``context_window`` is the backend's context in tokens (default:
    what the backend says, ``llm.context_window``); ``max_observation_tokens`` caps one Observation (default: a
    quarter of the context). ``name``, ``tracer_provider`` and ``callbacks`` configure tracing
    (:mod:`qwen_agent.tracing`): OpenTelemetry spans when a tracer provider is given or configured globally, and
    each callback called with a :class:`~qwen_agent.tracing.SpanRecord` as a run, model call or tool call ends.
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
        context_window: int | None = None,
        max_observation_tokens: int | None = None,
        name: str = "qwen-agent",
        tracer_provider: Any = None,
        callbacks: Sequence[Callable[[SpanRecord], None]] = (),
        tool_format: str | ToolFormat | None = None,
    ):
        if max_iterations < 1:
            raise ConfigError(f"max_iterations must be at least 1, got {max_iterations}")
        for label, value in (
            ("context_window", context_window),
            ("max_observation_tokens", max_observation_tokens),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{label} must be a positive number of tokens, got {value}")
        self.tools = _tool_map(tools)
        self.llm = llm
        self.format = choose_format(tool_format, llm)
        self.constrained = bool(constrained)
        if constrained:
            options = constrained if isinstance(constrained, ConstraintOptions) else None
            self.llm = constrain_llm(llm, self.tools, variant, options, self.format)
        self._system_given = system  # hermes: None lets the chat template write its own default
        self.system = DEFAULT_SYSTEM if system is None else system
        self.max_iterations = max_iterations
        self.variant = variant
        self.sampling = sampling
        self.context_window = context_window
        self.max_observation_tokens = max_observation_tokens
        self.tracing = Tracing(name, tracer_provider, callbacks)
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

    def budget(self) -> ContextBudget:
        """The context budget of a run: the window from the option or the backend, its tokenizer if it has one."""
        window = self.context_window or getattr(self.llm, "context_window", None)
        tokenizer = getattr(self.llm, "tokenizer", None)
        return ContextBudget(window, tokenizer, self.max_observation_tokens)

    # -- running --------------------------------------------------------------------------------------------

    def run(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> RunResult:
        """Answer ``query``; ``history`` holds earlier ``(query, transcript)`` turns (``RunResult.history``)."""
        for event in self.stream(query, history):
            if isinstance(event, FinalAnswerEvent):
                return event.result
        raise AssertionError("stream() always ends with a FinalAnswerEvent")

    def stream(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> Iterator[Event]:
        """Run like :meth:`run`, yielding events as they happen; the last one is a :class:`FinalAnswerEvent`.

        Per step: ``StepStarted`` [``BudgetEvent``], ``ThoughtDelta``*, then either ``ActionEvent``
        [``ErrorEvent``] ``ObservationEvent`` [``BudgetEvent``], or ``ErrorEvent ObservationEvent`` for an
        unusable output, or ``AnswerDelta``* and the ``FinalAnswerEvent``.
        """
        run = _Run(self, query, list(history or []))
        machine = run.events()
        items: Iterator[str | Completion] | None = None
        reply: Any = None
        try:
            while True:
                request = machine.send(reply)
                reply = None
                if isinstance(request, _ModelCall):
                    items = iter(
                        self.llm.stream(request.prompt, stop=request.stop, sampling=request.sampling)
                    )
                    reply = next(items, None)
                elif request is _NEXT_ITEM:
                    reply = next(items, None)
                elif isinstance(request, _ToolCall):
                    try:
                        reply = request.tool.invoke(request.raw_arguments)
                    except Exception as exc:  # handed to the machine, which makes it an Observation
                        reply = exc
                else:
                    yield request
        except StopIteration:
            return
        except BaseException as exc:
            run.trace.abort(exc)
            raise
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    async def arun(
        self, query: str, history: Sequence[tuple[str, str]] | None = None, *, timeout: float | None = None
    ) -> RunResult:
        """:meth:`run` on the caller's event loop. After ``timeout`` seconds the run stops (generation at the next
        token, a code cell interrupted with its variables kept, an MCP call cancelled) and the result has
        ``stop_reason="cancelled"``. Cancelling the task does the same cleanup and then raises CancelledError, as
        asyncio expects."""
        async for event in self.astream(query, history, timeout=timeout):
            if isinstance(event, FinalAnswerEvent):
                return event.result
        raise AssertionError("astream() always ends with a FinalAnswerEvent")

    async def astream(
        self, query: str, history: Sequence[tuple[str, str]] | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """:meth:`stream` on the caller's event loop: the same events, from the same loop (:class:`_Run`).
        Backends with ``astream`` and tools with ``ainvoke`` are awaited; others run on a worker thread."""
        from . import aio

        await aio.prepare(self.llm)
        run = _Run(self, query, list(history or []))
        machine = run.events()
        items: AsyncIterator[str | Completion] | None = None
        reply: Any = None
        deadline = aio.Deadline(timeout)
        try:
            async with deadline:
                try:
                    while True:
                        request = machine.send(reply)
                        reply = None
                        if isinstance(request, _ModelCall):
                            items = aio.astream_llm(self.llm, request.prompt, request.stop, request.sampling)
                            reply = await anext(items, None)
                        elif request is _NEXT_ITEM:
                            reply = await anext(items, None)
                        elif isinstance(request, _ToolCall):
                            try:
                                reply = await aio.ainvoke_tool(request.tool, request.raw_arguments)
                            except Exception as exc:
                                reply = exc
                        else:
                            with deadline.paused():  # the deadline never fires in the consumer's code
                                yield request
                except StopIteration:
                    return
                finally:
                    if items is not None:
                        await items.aclose()
        except BaseException as exc:
            if not (isinstance(exc, TimeoutError) and deadline.expired()):
                run.trace.abort(exc)
                raise
        for event in run.cancelled(f"the run was stopped at its deadline of {timeout:g} s"):
            yield event


@dataclass(frozen=True)
class _ModelCall:
    """A request of the step machine: stream ``prompt`` up to ``stop``; the driver sends back the stream's first
    item."""

    prompt: ChatPrompt
    sampling: Sampling | None
    stop: Sequence[str]


_NEXT_ITEM = (
    object()
)  # a request for the next item of the open stream (None once it ended without a Completion)


@dataclass(frozen=True)
class _ToolCall:
    """A request of the step machine: run ``tool``; the driver sends back its result, or what it raised."""

    tool: ToolLike
    raw_arguments: str


class _Run:
    """One run as a step machine (see the module docstring): the growing transcript, steps and counters."""

    def __init__(self, agent: Agent, query: str, history: list[tuple[str, str]]):
        self.agent = agent
        self.query = query
        self.history = history
        self.transcript = ""
        self.exchange: list[dict[str, Any]] = []  # hermes: the assistant's calls and their results so far
        self.steps: list[Step] = []
        self.completions: list[Completion] = []
        self.answer = ""
        self.stop_reason: StopReason = "final_answer"
        self.started = time.perf_counter()
        self.budget = agent.budget()
        self.trace = agent.tracing.start_run(
            query, getattr(agent.llm, "model_name", type(agent.llm).__name__)
        )
        self._seen_calls: dict[tuple[str, str], int] = {}
        self._dropped_turns = 0
        self._index = 0

    def events(self) -> Generator[Any, Any, None]:
        """The whole run: events for the caller, interleaved with model and tool requests for the driver."""
        if not self.agent.tools:
            fit = yield from self.start_step(0, "")
            if fit.prompt is not None:
                yield from self.plain_answer(0, fit)
        else:
            for index in range(self.agent.max_iterations):
                fit = yield from self.start_step(index, self.transcript)
                if fit.prompt is None:
                    break
                steps = yield from self.model_step(index, fit)
                if steps is None:  # a final answer
                    break
                for step in steps:  # parallel calls run in order
                    yield from self.act(step)
                self.record(steps)
            else:
                index = self.agent.max_iterations
                fit = yield from self.start_step(index, self.transcript + FORCED_ANSWER_CUE, forced=True)
                if fit.prompt is not None:
                    yield from self.forced_answer(index, fit)
        result = self.result()
        self.trace.finish(result)
        yield FinalAnswerEvent(self.answer, result)

    def start_step(self, index: int, prefix: str, forced: bool = False) -> Generator[Event, None, Fit]:
        """Fit the step's prompt to the context (oldest turns dropped first); a prompt that cannot fit ends the
        run with ``stop_reason="context"``."""
        self._index = index
        fit = self.budget.fit(self._builder(prefix, forced), self.history, self.agent.sampling)
        yield StepStarted(index, forced, fit.prompt_tokens, fit.context_window)
        if fit.dropped_turns > self._dropped_turns:
            self._dropped_turns = fit.dropped_turns
            yield BudgetEvent(
                index,
                "history_trimmed",
                f"the {fit.dropped_turns} oldest of {len(self.history)} earlier turns were left out of the prompt "
                f"to fit the context of {fit.context_window} tokens",
            )
        if fit.prompt is None:
            self.stop_reason, self.answer = "context", CONTEXT_FULL
            yield BudgetEvent(index, "context_full", fit.reason)
            yield AnswerDelta(index, CONTEXT_FULL)
        return fit

    def _builder(self, prefix: str, forced: bool) -> Callable[[Sequence[tuple[str, str]]], ChatPrompt]:
        """The step's prompt from the earlier turns kept: ReAct's conversation with ``prefix`` as the unfinished
        assistant turn, or the chat template's rendering of the messages (hermes; no tools offered when
        ``forced``, so the reply is the answer)."""
        agent = self.agent
        if not isinstance(agent.format, HermesFormat):
            return lambda turns: agent.prompt(self.query, turns, prefix)
        tools = [] if forced else [openai_tool(t) for t in agent.tools.values()]
        return lambda turns: agent.format.prompt(agent.messages(self.query, turns, self.exchange), tools)

    def generate(
        self, index: int, fit: Fit, answer_only: bool = False
    ) -> Generator[Any, Any, tuple[Completion, list[ParsedOutput]]]:
        """Stream one model call as thought / answer deltas; returns the Completion and its parse (hermes: one
        item per call in the turn).

        ``answer_only``: the reply continues a ``Final Answer:`` (written by the prompt, or implied by a plain
        chat), so all of it is the answer."""
        agent, hermes = self.agent, isinstance(self.agent.format, HermesFormat)
        answer_marker = _ANSWER_MARKER if answer_only else ""
        sections = streamer(agent.format, answer_marker)
        # the backend cuts at the stop words (the LLM protocol's contract)
        self.trace.model_started(fit.prompt, fit.sampling)
        item = yield _ModelCall(fit.prompt, fit.sampling, agent.format.stop)
        while not isinstance(item, Completion):  # read to its end, so the backend can finish its bookkeeping
            if item is None:
                raise LLMError(
                    f"{type(self.agent.llm).__name__}.stream() ended without yielding its Completion"
                )
            yield from self._deltas(index, sections.feed(item))
            item = yield _NEXT_ITEM
        completion = item
        self.trace.model_finished(completion)
        self.completions.append(completion)
        if hermes:
            turn = parse_hermes(completion.text, constrained=agent.constrained)
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

    def model_step(self, index: int, fit: Fit) -> Generator[Any, Any, list[Step] | None]:
        """Generate and parse one turn; returns the Steps to act on (one per call), or None when the answer is
        final."""
        completion, outputs = yield from self.generate(index, fit)
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
        """The Step of one call; ``completion`` only on a turn's first (its text and usage are counted once)."""
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

    def act(self, step: Step) -> Generator[Any, Any, None]:
        """Run the step's tool (or report why not); :meth:`record` carries the Observation on."""
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
                step.observation, step.ok, error = yield from self._invoke(step)
                if step.ok:  # a failed call may be retried as it was
                    self._seen_calls[key] = index
                else:
                    yield ErrorEvent(index, "tool_error", error or step.observation)
        step.observation, elided = self.budget.shorten(step.observation)
        yield ObservationEvent(index, step.observation, step.ok)
        if elided:
            yield BudgetEvent(
                index,
                "observation_shortened",
                f"the Observation was over its budget of {self.budget.observation_tokens} tokens: "
                f"{elided} characters in its middle were left out",
            )
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

    def _invoke(self, step: Step) -> Generator[Any, Any, tuple[str, bool, str | None]]:
        started = time.perf_counter()
        self.trace.tool_started(step.action, step.raw_arguments)
        result = yield _ToolCall(self.agent.tools[step.action], step.raw_arguments)
        if isinstance(
            result, Exception
        ):  # tools should not raise, but a user's tool might: the model hears of it
            tb = traceback.format_exception_only(type(result), result)[-1].strip()
            observation, ok, error = f"Error: the tool {step.action} failed: {tb}", False, tb
        else:
            observation, error = str(result.observation), getattr(result, "error", None)
            ok = bool(result.ok)
        step.tool_seconds = time.perf_counter() - started
        self.trace.tool_finished(ok, error and str(error))
        return observation, ok, error and str(error)

    def forced_answer(self, index: int, fit: Fit) -> Generator[Any, Any, None]:
        """The budget is spent: let the model write only the Final Answer."""
        self.stop_reason = "max_iterations"
        prefix = fit.prompt.assistant_prefix
        yield ThoughtDelta(index, FORCED_THOUGHT)
        completion, (parsed, *_) = yield from self.generate(index, fit, answer_only=True)
        self.answer = parsed.answer if isinstance(parsed, FinalAnswer) else NO_ANSWER
        if not isinstance(parsed, FinalAnswer):
            yield AnswerDelta(index, NO_ANSWER)
        self.transcript = prefix + " " + self.answer
        self.steps.append(Step(index, FORCED_THOUGHT, output=completion.text, completion=completion))

    def plain_answer(self, index: int, fit: Fit) -> Generator[Any, Any, None]:
        """No tools: one reply, all of it the answer (its end cut at a stop word, its ends stripped)."""
        completion, (parsed, *_) = yield from self.generate(index, fit, answer_only=True)
        self.transcript = completion.text
        step = Step(index, "", problems=parsed.problems, output=completion.text, completion=completion)
        if isinstance(parsed, FinalAnswer):
            self.answer = parsed.answer
        else:  # an empty reply
            step.ok, step.problems = False, (parsed.problem, *parsed.problems)
        self.steps.append(step)

    def cancelled(self, why: str) -> Iterator[Event]:
        """The events that end a run stopped from outside: what was done so far, ``stop_reason="cancelled"``."""
        self.stop_reason, self.answer = "cancelled", ""
        yield BudgetEvent(self._index, "cancelled", why)
        result = self.result()
        self.trace.finish(result)
        yield FinalAnswerEvent(self.answer, result)

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
            # a cancelled turn is not part of the conversation: the next run continues from the one before
            history=[*self.history, *([] if self.stop_reason == "cancelled" else [entry])],
            llm_calls=len(self.completions),
            prompt_tokens=total("prompt_tokens"),
            completion_tokens=total("completion_tokens"),
            prefill_tokens=total("prefill_tokens"),
            cached_tokens=total("cached_tokens"),
            seconds=time.perf_counter() - self.started,
            llm_seconds=sum(c.seconds for c in self.completions),
            tool_seconds=sum(s.tool_seconds for s in self.steps),
            context_window=self.budget.context_window,
            dropped_turns=self._dropped_turns,
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
