"""What one completion asks of the engine: a frozen :class:`PromptRequest`, made once at the top (from
``Sampling`` and a ``ChatPrompt`` by :class:`~qwen_agent.llm.LocalLLM`, or from ``generate()``'s arguments by
:meth:`~qwen_agent.runtime.engine.QwenEngine.request`) and handed unchanged to the scheduler and the batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from .constraint import TokenConstraint

__all__ = ["SamplingParams", "PromptRequest"]


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True, eq=False)
class PromptRequest:
    """One prompt and how to complete it: at most ``max_new_tokens`` (the cache must hold the prompt and
    them), its sampling, its stops, its constraint (stateful: one request each) and its random generator (None:
    torch's global one). Compared by identity: two requests are two completions."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    constraint: TokenConstraint | None = None  # masks what it does not allow before sampling
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", tuple(self.prompt))
        if not self.prompt:
            raise ConfigError("a request needs a non-empty prompt")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def slots(self) -> int:
        """Cache slots the request may fill: its prompt and every token it may generate."""
        return len(self.prompt) + self.max_new_tokens
