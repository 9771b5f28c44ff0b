"""What the sync and the async OpenAI-compatible clients share: reading a server-sent-event stream of completion
chunks into text cut at the stop strings and a :class:`~qwen_agent.llm_protocol.Completion`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import LLMConnectionError, LLMError, LLMProtocolError
from .llm_protocol import Completion
from .runtime.stops import StopScanner

__all__ = ["DONE", "RETRY_STATUS", "StreamState", "SSEDecoder", "cache_counts", "preview", "stop_reason"]

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
DONE = object()  # the `data: [DONE]` event


class StreamState:
    """What a streamed answer has said so far (text cut at the stop strings, finish reason, usage); the sync and
    the async client feed it the stream's events."""

    def __init__(self, stop: Sequence[str], delta_text: Callable[[dict[str, Any]], str]) -> None:
        self.stop = stop
        self.scanner = StopScanner(stop)
        self.delta_text = delta_text
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.done = False
        self.usage: dict[str, Any] = {}
        self.last_choice: dict[str, Any] = {}

    def feed(self, event: Any) -> str:
        """The text to hand out for one event (``DONE`` or a JSON payload)."""
        if event is DONE:
            self.done = True
            return ""
        self.usage = event.get("usage") or self.usage
        choices = event.get("choices") or []
        if not choices:
            return ""
        self.last_choice = choices[0] if isinstance(choices[0], dict) else {}
        self.finish_reason = self.last_choice.get("finish_reason") or self.finish_reason
        emitted = self.scanner.feed(self.delta_text(self.last_choice))
        if emitted:
            self.pieces.append(emitted)
        return emitted

    @property
    def ended(self) -> bool:
        return self.done or self.scanner.stopped is not None

    def check_finished(self, url: str) -> None:
        if not (self.done or self.finish_reason or self.scanner.stopped):
            raise LLMConnectionError(
                f"{url}: the stream ended before the answer did (neither a finish_reason nor [DONE] arrived)"
            )

    def finish(self, started: float) -> Iterator[str | Completion]:
        """The held-back tail, if any, then the Completion."""
        tail = self.scanner.finish()
        if tail:
            self.pieces.append(tail)
            yield tail
        stopped = self.scanner.stopped or stop_reason(self.last_choice, self.stop)
        yield Completion(
            "".join(self.pieces),
            "length" if self.finish_reason == "length" and not self.scanner.stopped else "stop",
            stopped,
            self.usage.get("prompt_tokens"),
            self.usage.get("completion_tokens"),
            seconds=time.perf_counter() - started,
            **cache_counts(self.usage),
        )


class SSEDecoder:
    """Server-sent events, line by line: :meth:`line` returns an event's JSON payload (or ``DONE``) once the blank
    line after it arrives; :meth:`end` the last one, not followed by a blank line."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.data_lines: list[str] = []

    def line(self, line: str) -> Any:
        if line.startswith("data:"):
            self.data_lines.append(line[5:].lstrip(" "))
            return None
        if line or not self.data_lines:
            return None  # comments, other fields, keep-alives
        return self._payload()

    def end(self) -> Any:
        return self._payload() if self.data_lines else None

    def _payload(self) -> Any:
        payload, self.data_lines = "\n".join(self.data_lines), []
        return DONE if payload.strip() == "[DONE]" else decode_event(payload, self.url)


def decode_event(payload: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise LLMProtocolError(f"{url}: a stream event is not JSON: {payload[:200]!r}") from None
    if not isinstance(event, dict):
        raise LLMProtocolError(f"{url}: a stream event is not a JSON object: {payload[:200]!r}")
    if "error" in event:
        raise LLMError(f"{url}: the server reported an error mid-stream: {preview(event['error'])}")
    return event


def stop_reason(choice: dict[str, Any], stop: Sequence[str]) -> str | None:
    # vLLM reports the matched stop string in `stop_reason`
    reason = choice.get("stop_reason")
    return reason if isinstance(reason, str) and reason in stop else None


def preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def cache_counts(usage: dict[str, Any]) -> dict[str, int]:
    """``cached_tokens`` and ``prefill_tokens`` from a usage whose ``prompt_tokens_details`` (OpenAI's field)
    says how many prompt tokens the server's prefix cache held; nothing where it does not."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = usage.get("prompt_tokens")
    if not isinstance(cached, int) or not isinstance(prompt, int):
        return {}
    return {"cached_tokens": cached, "prefill_tokens": prompt - cached}
