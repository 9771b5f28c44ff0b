"""A local model as an :class:`~qwen_agent.llm_protocol.LLM` backend that many threads share: their calls are
decoded together in the batches of one :class:`~qwen_agent.serve.scheduler.Scheduler`.

:class:`~qwen_agent.llm.LocalLLM` runs the engine on the caller's thread, one call at a time. :class:`ScheduledLLM`
builds the same prompt ids and engine arguments, submits them to the scheduler and relays its events: each
``stream`` is one row of a shared batch. A consumer that stops reading a stream (closes the generator) cancels
its request, so the row is freed at the next decode step.

``astream`` is the same on an event loop: the scheduler's thread hands each event to the loop
(``loop.call_soon_threadsafe``), so any number of tasks share the batches without a thread each, and a cancelled
task frees its row at the next decode step. :meth:`ScheduledLLM._submit` is the one place that speaks to the
scheduler.

>>> llm = ScheduledLLM(Scheduler(load_model("/models/Qwen-7B-Chat"), max_batch=8))   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from ..errors import LLMError
from ..llm import LocalLLM, engine_options, local_completion
from ..llm_protocol import ChatPrompt, Completion, Sampling
from ..runtime.generate import GenerationResult, PromptRequest
from .scheduler import Event, Scheduler, Ticket

__all__ = ["ScheduledLLM"]


class ScheduledLLM:
    """``complete`` and ``stream`` on the scheduler's engine, safe to call from any number of threads.

    Unlike :class:`~qwen_agent.llm.LocalLLM`, no KV cache is kept between calls: each call prefills its whole
    prompt, in exchange for decoding alongside the other callers.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.chatml = LocalLLM(scheduler.engine)  # builds prompt ids only; the scheduler runs the engine

    def request(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> PromptRequest:
        """What :meth:`stream` submits: the prompt ids and engine arguments ``LocalLLM`` would use."""
        ids = self.chatml.prompt_ids(prompt)
        return self.scheduler.engine.request(ids, stop=tuple(stop), **engine_options(sampling))

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        for item in self.stream(prompt, stop=stop, sampling=sampling):
            if isinstance(item, Completion):
                return item
        raise AssertionError("stream() always ends with its Completion")  # pragma: no cover

    @property
    def tokenizer(self) -> Any:
        return self.chatml.tokenizer

    @property
    def context_window(self) -> int:
        return self.chatml.context_window

    def _submit(
        self,
        prompt: ChatPrompt,
        stop: Sequence[str],
        sampling: Sampling | None,
        on_event: Callable[[Event], None],
    ) -> Ticket:
        return self.scheduler.submit(self.request(prompt, stop=stop, sampling=sampling), on_event)

    @staticmethod
    def _item(event: Event, started: float) -> str | Completion:
        """A scheduler event as a stream item (the Completion last); a failed batch raises LLMError."""
        if isinstance(event, BaseException):
            raise LLMError(f"the local model failed: {type(event).__name__}: {event}") from event
        if isinstance(event, GenerationResult):
            return local_completion(event, time.perf_counter() - started)
        return event

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        ticket = self._submit(prompt, stop, sampling, events.put)
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = not isinstance(event, str)
                yield self._item(event, started)
        finally:
            if not finished:  # the consumer stopped reading: free the row
                self.scheduler.cancel(ticket)

    async def astream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> AsyncIterator[str | Completion]:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        ticket = self._submit(
            prompt, stop, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        )
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = not isinstance(event, str)
                yield self._item(event, started)
        finally:
            if not finished:  # cancelled, or the consumer stopped reading: free the row at the next step
                self.scheduler.cancel(ticket)
