"""One thread owns the engine; HTTP handlers hand it prompts and get text back, so concurrent requests share
batched decoding.

The engine is not thread-safe and decodes fastest in batches. :class:`Scheduler` runs a single thread that
takes submitted :class:`~qwen_agent.runtime.generate.PromptRequest` s from an inbox and decodes them together in
one open :class:`~qwen_agent.runtime.generate.Generation` (``engine.open_batch``): what arrives while a batch
decodes joins it at the next step, when a row is free and the prompt fits the batch's cache; what does not fit
waits until the batch drains, and then, oldest first, starts the next one (so nothing waits forever). A
cancelled request (a client that went away) frees its row at the next step. No other thread calls the engine.

Events reach the submitter through the ``on_event`` callback it passed, called on the scheduler thread: text
deltas (``str``), then the :class:`~qwen_agent.runtime.generate.GenerationResult`, or an exception if the batch
failed. The callback must not block (an asyncio caller uses ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import QwenAgentError
from ..runtime.generate import Generation, GenerationResult, PromptRequest

__all__ = ["Scheduler", "Ticket", "QueueFullError"]

log = logging.getLogger(__name__)

Event = str | GenerationResult | BaseException


class QueueFullError(QwenAgentError):
    """More requests are waiting or decoding than the scheduler was configured to hold."""


@dataclass(eq=False)
class Ticket:
    """A submitted request: set ``cancelled`` (through :meth:`Scheduler.cancel`) to drop it."""

    request: PromptRequest
    on_event: Callable[[Event], None]
    cancelled: bool = False


class Scheduler:
    """Decode submitted prompts in shared batches of up to ``max_batch`` rows on one engine-owning thread.

    ``max_queue`` bounds how many requests may wait beyond a full batch (``submit`` raises
    :class:`QueueFullError` past ``max_batch + max_queue`` requests in flight). A batch's cache is sized for the
    longest request that starts it, and at least ``min_cache_tokens`` slots, so later arrivals usually fit.
    """

    def __init__(
        self, engine: Any, *, max_batch: int = 32, max_queue: int = 256, min_cache_tokens: int = 2048
    ):
        if max_batch < 1 or max_queue < 0:
            raise QwenAgentError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.min_cache_tokens = min(min_cache_tokens, engine.config.max_context)
        self._inbox: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _in_flight and the counters read by stats()
        self._in_flight = 0
        self._waiting: list[Ticket] = []  # taken from the inbox, not yet in a batch (scheduler thread only)
        self._live: dict[int, Ticket] = {}  # in the open batch, by prompt index (scheduler thread only)
        self._runner = None  # the last batch's decode runner, reused while its cache is big enough
        self._step_rows: Counter[int] = Counter()
        self._batches = 0
        self._completed = 0
        self._cancelled = 0
        self._thread = threading.Thread(target=self._run, name="qwen-agent-scheduler", daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------------------

    def submit(self, request: PromptRequest, on_event: Callable[[Event], None]) -> Ticket:
        with self._lock:
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {self._in_flight} requests are in flight "
                    f"(max batch {self.max_batch} + max queue {self.max_queue}); retry later"
                )
            self._in_flight += 1
        ticket = Ticket(request, on_event)
        self._inbox.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop ``ticket``: its row is freed at the next decode step, or it never starts."""
        ticket.cancelled = True

    def stats(self) -> dict[str, Any]:
        """Requests in flight (``running`` in the open batch, the others ``waiting``) and finished
        (``cancelled`` of them dropped by their client), batches run, decode steps by the number of rows they
        decoded, and whether the scheduler's thread is ``alive``."""
        with self._lock:
            steps = dict(sorted(self._step_rows.items()))
            running = len(self._live)  # the scheduler thread's dict: its size is read without a lock
            return {
                "alive": self._thread.is_alive(),
                "in_flight": self._in_flight,
                "running": running,
                "waiting": max(0, self._in_flight - running),
                "completed": self._completed,
                "cancelled": self._cancelled,
                "batches": self._batches,
                "decode_steps": sum(steps.values()),
                "max_rows": max(steps, default=0),
                "step_rows": steps,
            }

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current batch; requests still waiting get an error."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- the scheduler thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._waiting:
                ticket = self._inbox.get()
                if ticket is None:
                    break
                self._waiting.append(ticket)
            if not self._take_inbox():
                break
            self._run_batch()
        # what waits, and what arrived after the shutdown was asked for, gets an error and leaves the count
        while True:
            try:
                late = self._inbox.get_nowait()
            except queue.Empty:
                break
            if late is not None:
                self._waiting.append(late)
        for ticket in self._waiting:
            self._emit(ticket, QwenAgentError("the server is shutting down"))
            self._release(ticket)
        self._waiting.clear()

    def _take_inbox(self) -> bool:
        """Move what arrived to ``_waiting``; False once shutdown was asked for."""
        while True:
            try:
                ticket = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if ticket is None:
                return False
            self._waiting.append(ticket)

    def _run_batch(self) -> None:
        self._waiting = [t for t in self._waiting if not self._dropped(t)]
        if not self._waiting:
            return
        needed = max(
            len(t.request.prompt) + t.request.max_new_tokens for t in self._waiting[: self.max_batch]
        )
        try:
            batch = self.engine.open_batch(self.max_batch, max(needed, self.min_cache_tokens), self._runner)
        except Exception as exc:  # e.g. no memory for the cache: what waits would wait for the same
            log.exception("could not open a batch")
            for ticket in self._waiting:
                self._emit(ticket, exc)
                self._release(ticket)
            self._waiting = []
            return
        self._runner = batch.runner
        with self._lock:
            self._batches += 1
        self._live = {}
        batch.on_step = lambda: self._join(batch)
        self._join(batch)
        try:
            for index, event in batch:
                ticket = self._live[index]
                if isinstance(event, GenerationResult):
                    del self._live[index]
                    if event.finish_reason != "cancelled":
                        self._emit(ticket, event)
                    self._release(ticket)
                elif not ticket.cancelled:
                    self._emit(ticket, event)
        except Exception as exc:  # a failed batch fails its requests, not the server
            log.exception("batch failed")
            for ticket in self._live.values():
                self._emit(ticket, exc)
                self._release(ticket)
            self._live = {}
        finally:
            self._count_steps(batch)

    def _join(self, batch: Generation) -> None:
        """Called between decode steps: cancel what was cancelled, add what arrived and fits."""
        self._count_steps(batch)
        for index, ticket in self._live.items():
            if ticket.cancelled:
                batch.cancel(index)
        if not self._take_inbox():
            self._inbox.put(None)  # seen again by _run once this batch drains
        waiting = []
        for ticket in self._waiting:
            if self._dropped(ticket):
                continue
            fits = len(ticket.request.prompt) + ticket.request.max_new_tokens <= batch.cache.capacity
            # the oldest one that does not fit starts the next batch: nothing behind it overtakes it
            if waiting or not fits:
                waiting.append(ticket)
                continue
            self._live[batch.add(ticket.request)] = ticket
        self._waiting = waiting

    def _count_steps(self, batch: Generation) -> None:
        with self._lock:
            self._step_rows.update(batch.step_rows)
        batch.step_rows.clear()

    def _dropped(self, ticket: Ticket) -> bool:
        if ticket.cancelled:
            self._release(ticket)
        return ticket.cancelled

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            self._in_flight -= 1
            self._completed += 1
            self._cancelled += ticket.cancelled

    @staticmethod
    def _emit(ticket: Ticket, event: Event) -> None:
        try:
            ticket.on_event(event)
        except Exception:  # a broken callback must not take the batch down
            log.exception("a request's event callback failed")
