"""Stop strings on streamed text: cut at the earliest one, hold back a tail that may still grow into one.

Used by the local generation loop and by every :class:`~qwen_agent.llm.LLM` backend, so a stop string ends a
completion the same way wherever the text comes from.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopScanner", "cut_at_stop"]


class StopScanner:
    """Cuts streamed text at the first stop string, holding back text that may be the start of one.

    ``feed`` returns the text that is safe to emit; once a stop string is seen, ``stopped`` names it and
    everything after it is ignored. ``finish`` releases what was held back.
    """

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped: str | None = None

    def feed(self, delta: str) -> str:
        if self.stopped is not None:
            return ""
        text = self._held + delta
        hits = [(text.find(s), s) for s in self._stop if s in text]
        if hits:
            index, self.stopped = min(hits)
            self._held = ""
            return text[:index]
        keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return held


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` before the earliest stop string, and that stop string (or None)."""
    scanner = StopScanner(stop)
    kept = scanner.feed(text) + scanner.finish()
    return kept, scanner.stopped
