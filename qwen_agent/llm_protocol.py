"""The backend protocol: the types the agent and every backend speak, and the :class:`LLM` protocol itself.

They live apart from the backends (:mod:`qwen_agent.llm`, :mod:`qwen_agent.openai_client`) so that each backend
module imports them without importing the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .runtime.chatml import DEFAULT_SYSTEM, IM_END, IM_START

__all__ = ["ChatPrompt", "Sampling", "Completion", "LLM", "AsyncLLM"]


@dataclass(frozen=True)
class ChatPrompt:
    """A ChatML conversation: ``system``, ``history`` as ``(query, response)`` pairs, the current ``query``,
    and ``assistant_prefix``, text the assistant has already written in this turn and is to continue."""

    query: str
    history: tuple[tuple[str, str], ...] = ()
    system: str = DEFAULT_SYSTEM
    assistant_prefix: str = ""

    def to_chatml(self) -> str:
        """The prompt as one ChatML string, exactly as ``make_context`` writes it, plus the prefix."""
        parts = [f"{IM_START}system\n{self.system}{IM_END}"]
        for query, response in self.history:
            parts.append(f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n{response}{IM_END}")
        parts.append(f"\n{IM_START}user\n{self.query}{IM_END}\n{IM_START}assistant\n{self.assistant_prefix}")
        return "".join(parts)

    def to_messages(self) -> list[dict[str, str]]:
        """OpenAI chat messages; a non-empty prefix becomes a final assistant message."""
        messages = [{"role": "system", "content": self.system}]
        for query, response in self.history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": self.query})
        if self.assistant_prefix:
            messages.append({"role": "assistant", "content": self.assistant_prefix})
        return messages


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; ``None`` leaves a setting to the backend's default. ``temperature=0`` is greedy."""

    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``finish_reason`` is ``"stop"`` (a stop string or end of turn) or ``"length"``; ``stop`` is the stop string
    that ended it, if one did. Token counts are ``None`` when the backend does not report them;
    ``prefill_tokens`` is how many prompt tokens had to be encoded (fewer than ``prompt_tokens`` when a KV cache
    was reused) and ``cached_tokens`` how many came from the backend's prefix cache (a server's
    ``usage.prompt_tokens_details.cached_tokens``).
    """

    text: str
    finish_reason: str = "stop"
    stop: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prefill_tokens: int | None = None
    seconds: float = 0.0
    cached_tokens: int | None = None


@runtime_checkable
class LLM(Protocol):
    """What the agent needs from a model. Implement both methods to plug in any backend."""

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        """The continuation of ``prompt``, cut before the first of ``stop``."""
        ...

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        """Text deltas as they are generated, then the :class:`Completion` as the last item."""
        ...


@runtime_checkable
class AsyncLLM(Protocol):
    """What ``Agent.arun`` awaits where a backend has it (a backend without it runs on a worker thread)."""

    def astream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> AsyncIterator[str | Completion]:
        """:meth:`LLM.stream` as an async iterator; closing it (a cancelled task) stops the generation."""
        ...
