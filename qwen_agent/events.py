"""What a run of the agent produces: its :class:`RunResult` (with a :class:`Step` per model turn) and the typed
events that :meth:`Agent.stream <qwen_agent.agent.Agent.stream>` and ``astream`` yield as it goes.

Plain dataclasses, so that :mod:`qwen_agent.conversation` can store them as JSON and UIs can render them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .llm_protocol import Completion
from .react import Problem

__all__ = [
    "StopReason",
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

# final_answer: the model answered; max_iterations: the forced final turn answered; context: the prompt could not
# fit the context any more; cancelled: the run was stopped from outside (a deadline)
StopReason = Literal["final_answer", "max_iterations", "context", "cancelled"]


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

    ``stop_reason`` is ``"final_answer"``, ``"max_iterations"`` (the answer then comes from the forced final
    turn), ``"context"`` (the prompt no longer fits the context: the answer says so) or ``"cancelled"`` (stopped
    at a deadline; the answer is empty and ``history`` leaves this turn out). ``transcript`` is the whole
    assistant turn; ``history`` is the conversation to pass to the next run. Token counts add up every model call
    (``None`` parts, from backends that do not report them, count as 0). ``context_window`` is the budget's
    context (None: unknown, no budget) and ``dropped_turns`` how many of the oldest earlier turns were left out
    of the prompt to fit it. :mod:`qwen_agent.conversation` stores results and histories as JSON.
    """

    query: str
    answer: str
    steps: list[Step]
    stop_reason: StopReason
    transcript: str
    history: list[tuple[str, str]]
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the backend's prefix cache held
    seconds: float = 0.0
    llm_seconds: float = 0.0
    tool_seconds: float = 0.0
    context_window: int | None = None
    dropped_turns: int = 0


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"


@dataclass(frozen=True)
class StepStarted(Event):
    type: ClassVar[str] = "step_started"
    index: int
    forced: bool = False  # the forced final-answer turn after the budget ran out
    prompt_tokens: int | None = None  # the step's prompt, as the budget counts it (None: no budget)
    context_window: int | None = None


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
class BudgetEvent(Event):
    """The context budget or a deadline changed the run: ``kind`` is ``"observation_shortened"``,
    ``"history_trimmed"``, ``"context_full"`` (the run ends with ``stop_reason="context"``) or ``"cancelled"``."""

    type: ClassVar[str] = "budget"
    index: int
    kind: str
    message: str


@dataclass(frozen=True)
class FinalAnswerEvent(Event):
    type: ClassVar[str] = "final_answer"
    answer: str
    result: RunResult = field(repr=False)
