"""A local model as an :class:`~qwen_agent.llm_protocol.LLM` backend that many threads share: their calls are
decoded together in the batches of one :class:`~qwen_agent.serve.scheduler.Scheduler`.

:class:`~qwen_agent.llm.LocalLLM` runs the engine on the caller's thread, one call at a time. :class:`ScheduledLLM`
builds the same prompt ids and engine arguments, submits them to the scheduler and relays its events: each
``stream`` is one row of a shared batch. A consumer that stops reading a stream (closes the generator) cancels
its request, so the row is freed at the next decode step.

>>> llm = ScheduledLLM(Scheduler(load_model("/models/Qwen-7B-Chat"), max_batch=8))   # doctest: +SKIP
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..errors import LLMError
from ..llm import LocalLLM, engine_options, local_completion
from ..llm_protocol import ChatPrompt, Completion, Sampling
from ..runtime.generate import GenerationResult, PromptRequest
from .scheduler import Event, Scheduler

__all__ = ["ScheduledLLM"]


class ScheduledLLM:
    """``complete`` and ``stream`` on the scheduler's engine, safe to call from any number of threads.

    Unlike :class:`~qwen_agent.llm.LocalLLM`, no KV cache is kept between calls: each call prefills its whole
    prompt, in exchange for decoding alongside the other callers.
    """

    def __init__(self, scheduler: Scheduler, constraint: Callable[[ChatPrompt], Any] | None = None):
        self.scheduler = scheduler
        self.constraint = constraint
        self.chatml = LocalLLM(scheduler.engine)  # builds prompt ids only; the scheduler runs the engine

    @property
    def engine(self) -> Any:
        return self.scheduler.engine

    def with_constraint(self, constraint: Callable[[ChatPrompt], Any] | None) -> ScheduledLLM:
        """The same scheduler with ``constraint`` (as :meth:`qwen_agent.llm.LocalLLM.with_constraint`)."""
        return ScheduledLLM(self.scheduler, constraint)

    def request(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> PromptRequest:
        """What :meth:`stream` submits: the prompt ids and engine arguments ``LocalLLM`` would use."""
        ids = self.chatml.prompt_ids(prompt)
        options = engine_options(sampling)
        if self.constraint is not None:
            options["constraint"] = self.constraint(prompt)
        return self.scheduler.engine.request(ids, stop=tuple(stop), **options)

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        for item in self.stream(prompt, stop=stop, sampling=sampling):
            if isinstance(item, Completion):
                return item
        raise AssertionError("stream() always ends with its Completion")  # pragma: no cover

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        ticket = self.scheduler.submit(self.request(prompt, stop=stop, sampling=sampling), events.put)
        finished = False
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise LLMError(f"the local model failed: {type(event).__name__}: {event}") from event
                if isinstance(event, GenerationResult):
                    finished = True
                    yield local_completion(event, time.perf_counter() - started)
                    return
                yield event
        finally:
            if not finished:  # the consumer stopped reading: free the row
                self.scheduler.cancel(ticket)
