"""Conversations as data: run results, histories and events to and from JSON, so an app keeps them anywhere.

>>> conversation = Conversation()
>>> conversation.add(agent.run("What is 2**10?"))                     # doctest: +SKIP
>>> saved = conversation.to_json()                                    # a database row, a file, a cookie ...
>>> later = Conversation.from_json(saved)                              # another request, another process
>>> agent.run("And 2**20?", history=later.history)                    # doctest: +SKIP

The history round-trips exactly (strings in, the same strings out), so a resumed conversation sends the model
the same prompts, byte for byte, as one that never stopped. Validation is pydantic's: a :class:`Conversation`
is a pydantic model, and the agent's dataclasses (:class:`~qwen_agent.agent.RunResult`, its steps and
completions) are validated through ``TypeAdapter``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from .agent import Event, RunResult
from .errors import ConfigError

__all__ = ["Conversation", "result_to_json", "result_from_json", "event_to_dict"]

_RESULT = TypeAdapter(RunResult)


class Conversation(BaseModel):
    """``history``, the ``(query, transcript)`` turns to pass to the next run, and the ``runs`` that made it."""

    history: list[tuple[str, str]] = Field(default_factory=list)
    runs: list[RunResult] = Field(default_factory=list)

    def add(self, result: RunResult) -> Conversation:
        """Record a run; its history becomes the conversation's. Returns the conversation."""
        self.runs.append(result)
        self.history = list(result.history)
        return self

    def to_json(self, **options: Any) -> str:
        return self.model_dump_json(**options)

    @classmethod
    def from_json(cls, text: str | bytes) -> Conversation:
        """The conversation ``to_json`` wrote; anything else is a ConfigError naming the first bad field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigError(f"conversation JSON: {_first_error(exc)}") from None


def result_to_json(result: RunResult) -> str:
    return _RESULT.dump_json(result).decode()


def result_from_json(text: str | bytes) -> RunResult:
    try:
        return _RESULT.validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"run result JSON: {_first_error(exc)}") from None


def event_to_dict(event: Event) -> dict[str, Any]:
    """An agent event as JSON-ready data, its ``type`` first (e.g. for server-sent events)."""
    return {"type": event.type, **TypeAdapter(type(event)).dump_python(event, mode="json")}


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    return f"{where}: {error['msg']}"
