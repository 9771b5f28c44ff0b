"""Tracing a run: OpenTelemetry spans and a plain callback hook.

Each run gives one span for the run (``invoke_agent <name>``), a child span for each model call
(``chat <model>``) and one for each tool call (``execute_tool <tool>``), with the attributes of the OpenTelemetry
GenAI semantic conventions (``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
``gen_ai.tool.name``, ``gen_ai.tool.call.arguments``, ``error.type`` ...). Spans are made only when a tracer
provider is given (``Agent(tracer_provider=...)``) or configured globally (``opentelemetry.trace
.set_tracer_provider``) and the ``otel`` extra is installed: otherwise tracing costs nothing. Parents are set
explicitly, never through the current context, so a span never leaks into the caller's code between events.

Callbacks (``Agent(callbacks=[...])``) get a :class:`SpanRecord` as each span ends, with or without
OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .llm_protocol import ChatPrompt, Completion, Sampling

__all__ = ["Tracing", "RunTrace", "SpanRecord"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpanRecord:
    """One ended span: ``kind`` is ``"run"``, ``"model"`` or ``"tool"``; times are ``time.time()`` seconds."""

    kind: str
    name: str
    attributes: dict[str, Any]
    start: float
    end: float
    ok: bool = True
    error: str | None = None


@dataclass
class _Span:
    kind: str
    name: str
    attributes: dict[str, Any]
    start: float = field(default_factory=time.time)
    otel: Any = None


class Tracing:
    """The tracing configuration of an agent; :meth:`start_run` traces one run."""

    def __init__(
        self,
        agent_name: str,
        tracer_provider: Any = None,
        callbacks: Sequence[Callable[[SpanRecord], None]] = (),
    ) -> None:
        self.agent_name = agent_name
        self.tracer_provider = tracer_provider
        self.callbacks = list(callbacks)

    def _tracer(self) -> Any:
        """An OpenTelemetry tracer, or None when no provider is configured (or the extra is missing)."""
        try:
            from opentelemetry import trace
        except ImportError:
            return None
        provider = self.tracer_provider or trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None  # nothing configured: no spans at all
        return provider.get_tracer("qwen_agent")

    def start_run(self, query: str, model: str) -> RunTrace:
        return RunTrace(self, self._tracer(), query, model)


class RunTrace:
    """The spans of one run; the agent's step machine calls these as things start and end."""

    def __init__(self, tracing: Tracing, tracer: Any, query: str, model: str) -> None:
        self.tracing = tracing
        self.tracer = tracer
        self.model = model
        self.enabled = tracer is not None or bool(tracing.callbacks)
        self._run = self._open(
            "run",
            f"invoke_agent {tracing.agent_name}",
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": tracing.agent_name,
                "gen_ai.request.model": model,
            },
            parent=None,
        )
        self._child: _Span | None = None

    def _open(self, kind: str, name: str, attributes: dict[str, Any], parent: _Span | None) -> _Span | None:
        if not self.enabled:
            return None
        span = _Span(kind, name, attributes)
        if self.tracer is not None:
            from opentelemetry import trace

            context = trace.set_span_in_context(parent.otel) if parent is not None else None
            kind_of = trace.SpanKind.CLIENT if kind == "model" else trace.SpanKind.INTERNAL
            span.otel = self.tracer.start_span(
                name, context=context, kind=kind_of, attributes=attributes, start_time=int(span.start * 1e9)
            )
        return span

    def _close(self, span: _Span | None, attributes: dict[str, Any], error: str | None = None) -> None:
        if span is None:
            return
        span.attributes.update({k: v for k, v in attributes.items() if v is not None})
        end = time.time()
        if span.otel is not None:
            from opentelemetry.trace import Status, StatusCode

            span.otel.set_attributes(span.attributes)
            if error is not None:
                span.otel.set_status(Status(StatusCode.ERROR, error))
            span.otel.end(end_time=int(end * 1e9))
        record = SpanRecord(
            span.kind, span.name, dict(span.attributes), span.start, end, error is None, error
        )
        for callback in self.tracing.callbacks:
            try:
                callback(record)
            except Exception:  # a broken hook must not break the run
                log.exception("a tracing callback failed")

    # -- model calls ------------------------------------------------------------------------------------------
    def model_started(self, prompt: ChatPrompt, sampling: Sampling | None) -> None:
        sampling = sampling or Sampling()
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": self.model,
            "gen_ai.request.max_tokens": sampling.max_tokens,
            "gen_ai.request.temperature": sampling.temperature,
            "gen_ai.request.top_p": sampling.top_p,
        }
        attributes = {k: v for k, v in attributes.items() if v is not None}
        self._child = self._open("model", f"chat {self.model}", attributes, self._run)

    def model_finished(self, completion: Completion) -> None:
        self._close(
            self._child,
            {
                "gen_ai.response.finish_reasons": (completion.finish_reason,),
                "gen_ai.usage.input_tokens": completion.prompt_tokens,
                "gen_ai.usage.output_tokens": completion.completion_tokens,
                "qwen_agent.prefill_tokens": completion.prefill_tokens,
                "qwen_agent.latency_seconds": completion.seconds,
            },
        )
        self._child = None

    # -- tool calls -------------------------------------------------------------------------------------------
    def tool_started(self, name: str, raw_arguments: str) -> None:
        attributes = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.type": "function",
            "gen_ai.tool.call.arguments": raw_arguments,
        }
        self._child = self._open("tool", f"execute_tool {name}", attributes, self._run)

    def tool_finished(self, ok: bool, error: str | None) -> None:
        if not ok:
            self._close(self._child, {"error.type": "tool_error"}, error or "the tool reported an error")
        else:
            self._close(self._child, {})
        self._child = None

    # -- the run ----------------------------------------------------------------------------------------------
    def finish(self, result: Any) -> None:
        """End the run's span (and a model or tool span still open, as cancelled)."""
        if self._child is not None:
            self._close(self._child, {"error.type": "cancelled"}, "cancelled")
            self._child = None
        error = "cancelled" if result.stop_reason == "cancelled" else None
        self._close(
            self._run,
            {
                "gen_ai.usage.input_tokens": result.prompt_tokens,
                "gen_ai.usage.output_tokens": result.completion_tokens,
                "qwen_agent.stop_reason": result.stop_reason,
                "qwen_agent.steps": len(result.steps),
                "error.type": error,
            },
            error,
        )
        self._run = None

    def abort(self, exc: BaseException) -> None:
        """End the open spans with the error that ended the run."""
        # a consumer that stopped reading, or a cancelled task: the run was cancelled, not broken
        error = "cancelled" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else type(exc).__name__
        for span in (self._child, self._run):
            self._close(span, {"error.type": error}, f"{error}: {exc}")
        self._child = self._run = None
