"""The context budget of a run: what fits the backend's context, and what is left out to make it fit.

Three rules, applied before every model call and after every tool call:

* An Observation over its budget (``max_observation_tokens``; by default a quarter of the context) keeps its head
  and its tail, with a marker in between saying how many characters were left out, as the code interpreter
  elides a long output.
* Earlier turns are dropped oldest first until the prompt fits, as Qwen's ``make_context`` does with
  ``max_window_size``; the prompt must leave room for a reply of ``min(max_tokens, MIN_REPLY_TOKENS)`` tokens,
  and the reply's ``max_tokens`` is lowered to the room that is left.
* A prompt that does not fit even without earlier turns ends the run (``stop_reason="context"``).

Tokens are counted with the backend's tokenizer where it has one (``llm.tokenizer``: exact for the local engine,
ChatML framing included); otherwise estimated as one token per three bytes of UTF-8. Without a known context
window nothing is counted and only an explicit ``max_observation_tokens`` applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .llm_protocol import ChatPrompt, Sampling

__all__ = ["ContextBudget", "Fit", "MIN_REPLY_TOKENS", "elide_middle"]

MIN_REPLY_TOKENS = 64
# ChatML framing of make_context in tokens: <|im_start|>system\n...<|im_end|>; each earlier turn
# \n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>; the query turn up to "assistant\n"
_SYSTEM_FRAME, _TURN_FRAME, _QUERY_FRAME = 4, 10, 9


@dataclass(frozen=True)
class Fit:
    """The prompt of one model call after budgeting (``prompt`` None: it cannot fit, ``reason`` says why)."""

    prompt: ChatPrompt | None
    sampling: Sampling | None
    prompt_tokens: int | None = None
    context_window: int | None = None
    dropped_turns: int = 0
    reason: str = ""


def elide_middle(text: str, keep: int, note: str = "") -> str:
    """``text`` with only its first and last ``keep // 2`` characters and a marker for what was left out."""
    head = keep // 2
    tail = keep - head
    elided = len(text) - keep
    return f"{text[:head]}\n...[{elided} characters elided{note}]...\n{text[len(text) - tail :]}"


class ContextBudget:
    """The budget of one run over a context of ``context_window`` tokens (None: unknown)."""

    def __init__(
        self, context_window: int | None, tokenizer: Any = None, max_observation_tokens: int | None = None
    ) -> None:
        self.context_window = context_window
        self._encode_len: Callable[[str], int] = (
            (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else _estimate
        )
        if max_observation_tokens is None and context_window is not None:
            max_observation_tokens = max(context_window // 4, 1)
        self.observation_tokens = max_observation_tokens
        self._memo: dict[str, int] = {}  # earlier turns are counted once per run

    def count(self, text: str) -> int:
        return self._encode_len(text)

    def prompt_tokens(self, prompt: ChatPrompt) -> int:
        """The prompt's tokens as ``make_context`` lays them out, plus the assistant prefix."""
        return (
            self._turn_count(prompt.system) + _SYSTEM_FRAME
            + sum(self._turns(prompt.history))
            + self.count(prompt.query) + _QUERY_FRAME
            + self.count(prompt.assistant_prefix)
        )  # fmt: skip

    def _turn_count(self, text: str) -> int:
        if text not in self._memo:
            self._memo[text] = self.count(text)
        return self._memo[text]

    def _turns(self, history: Sequence[tuple[str, str]]) -> list[int]:
        return [self._turn_count(q) + self._turn_count(r) + _TURN_FRAME for q, r in history]

    def fit(
        self,
        build: Callable[[Sequence[tuple[str, str]]], ChatPrompt],
        history: Sequence[tuple[str, str]],
        sampling: Sampling | None,
    ) -> Fit:
        """The prompt ``build(kept turns)`` with as many of the newest turns of ``history`` as fit."""
        prompt = build(history)
        window = self.context_window
        if window is None:
            return Fit(prompt, sampling)
        max_tokens = (sampling or Sampling()).max_tokens
        reply = min(max_tokens, MIN_REPLY_TOKENS)
        turns = self._turns(prompt.history)
        fixed = self.prompt_tokens(prompt) - sum(turns)
        kept, kept_tokens = 0, 0
        for tokens in reversed(turns):  # newest first; the first turn that does not fit ends it
            if fixed + kept_tokens + tokens + reply > window:
                break
            kept, kept_tokens = kept + 1, kept_tokens + tokens
        dropped = len(turns) - kept
        if dropped:
            prompt = build(
                history[dropped:]
            )  # the ReAct instruction moves to the last kept turn, or the query
            total = self.prompt_tokens(prompt)
        else:
            total = fixed + kept_tokens
        if total + reply > window:
            reason = f"the prompt needs {total} tokens and its reply at least {reply} more, but the context holds {window}"
            if turns:
                reason += f", even with all {len(turns)} earlier turns left out"
            return Fit(None, sampling, total, window, dropped, reason)
        if total + max_tokens > window:  # a shorter reply rather than a prompt the backend refuses
            sampling = replace(sampling or Sampling(), max_tokens=window - total)
        return Fit(prompt, sampling, total, window, dropped)

    def shorten(self, observation: str) -> tuple[str, int]:
        """The Observation within its budget, and how many characters were left out (0: unchanged)."""
        limit = self.observation_tokens
        if limit is None or len(observation) <= limit:  # a token holds at least one character
            return observation, 0
        tokens = self.count(observation)
        if tokens <= limit:
            return observation, 0
        note = f"; the Observation had {tokens} tokens, its budget is {limit}"
        keep = int(len(observation) * limit / tokens)
        while keep > 0:
            shortened = elide_middle(observation, keep, note)
            if self.count(shortened) <= limit:
                return shortened, len(observation) - keep
            keep = int(keep * 0.9)
        return elide_middle(observation, 0, note), len(observation)


def _estimate(text: str) -> int:
    """Tokens of ``text`` without a tokenizer: about three bytes of UTF-8 each (a CJK character is one)."""
    return len(text.encode("utf-8")) // 3 + 1 if text else 0
