"""The one owner of the model: a scheduler that takes requests from any thread and decodes them in shared steps.

Design
------
**Request lifecycle.** A caller builds a frozen :class:`~qwen_agent.runtime.request.PromptRequest` (the engine's
``request``) and calls :meth:`Scheduler.add`, which returns a :class:`Handle` at once; the request waits in the
inbox. At the next :meth:`Scheduler.step` it moves to the scheduler's FIFO queue and, when a cache row and enough
slots are free, into the open :class:`~qwen_agent.runtime.generate.Generation` (the batch), where it is
prefilled and then decodes one token per step alongside every other live request. Each step's text deltas and,
at the end, the :class:`~qwen_agent.runtime.generate.GenerationResult` go to the request's handle (its own queue,
or the ``on_event`` callback it was added with), never to shared state. :meth:`Scheduler.abort` (or leaving a
handle's iteration early) ends the request at the next step, whether it waits or decodes.

**Who owns what.** One thread (the scheduler's, started by ``add`` when none runs, ending when no work is
left) calls ``step`` and is the only one that touches the model, the KV cache and the batch. ``add``, ``abort`` and ``stats`` are safe from any
thread or event loop: they only touch the inbox and counters under a lock. The scheduler owns the batch and
its cache; the batch owns its rows (which request holds which row, what a free row still keeps); a handle is
owned by its caller.

**Joining, and what does not fit.** A waiting request joins at the next step when the batch has a free row
and enough slots for its prompt plus ``max_new_tokens``. When it has neither, the cache grows at that step (rows
in powers of two up to ``max_batch``, slots up to the model's context; live rows keep their keys and values)
as long as it stays within ``cache_tokens`` (rows times slots). Otherwise the request waits at the head of the
queue and nothing behind it overtakes it (so a long request is never starved by a stream of short ones): rows
drain as their requests finish, and once the batch is empty the cache is rebuilt to the size the head needs
(a single request always gets at least one row of its size). ``max_batch + max_queue`` bounds the requests in
flight; ``add`` past it raises :class:`QueueFullError`.

**Blocks and eviction.** The engine's :class:`~qwen_agent.runtime.prefix_cache.PrefixCache` holds full 16-token
KV blocks of every sequence the batch ran, keyed by all the tokens up to them (and the NTK alpha). A request
admitted into a row gets its longest cached block prefix copied into the row and prefills only the rest; its
full blocks go into the pool once its prompt is prefilled and again, with what it generated, when it finishes.
A request holds a reference on its blocks while it runs, so they are never evicted under it; unreferenced
blocks are evicted least recently used first when the pool (``kv_cache_gb``) is full. A batch the scheduler
drops (a failed step, a shutdown) gives its live rows' blocks back (``Generation.close``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ConfigError, GenerationError, QwenAgentError
from .decode_runner import DecodeRunner
from .generate import Generation, GenerationResult
from .model import KVCache, Transformer
from .prefix_cache import PrefixCache
from .request import PromptRequest
from .tokenizer import QwenTokenizer

__all__ = ["Scheduler", "Handle", "QueueFullError", "Event"]

log = logging.getLogger(__name__)

Event = str | GenerationResult | BaseException  # what a handle receives: a delta, its result, or the failure
CACHE_STEP = 256  # cache slots grow in steps of this many


class QueueFullError(QwenAgentError):
    """More requests are waiting or decoding than the scheduler was configured to hold."""


class Handle:
    """One request in the scheduler. Iterate for its text deltas (this ends when the request is done, raising
    what failed it); afterwards, or after :meth:`wait`, ``result`` holds its
    :class:`~qwen_agent.runtime.generate.GenerationResult`. Leaving the iteration early aborts the request.
    A handle made with ``on_event`` gets its events through that callback (on the scheduler's thread; it must
    not block) instead, and is not iterated."""

    def __init__(
        self, scheduler: Scheduler, request: PromptRequest, on_event: Callable[[Event], None] | None
    ) -> None:
        self.scheduler, self.request = scheduler, request
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.aborted = False
        self._on_event = on_event
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            while True:
                event = self._events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                if isinstance(event, GenerationResult):
                    finished = True
                    return
                yield event
        finally:
            if not finished:
                self.scheduler.abort(self)

    def wait(self) -> GenerationResult:
        """Block until the request is done; its result, or raise what failed it."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _deliver(self, event: Event) -> None:
        if isinstance(event, GenerationResult):
            self.result = event
        elif isinstance(event, BaseException):
            self.error = event
        if self._on_event is None:
            self._events.put(event)
        elif not self.aborted:
            try:
                self._on_event(event)
            except Exception:  # a broken callback must not take the batch down
                log.exception("a request's event callback failed")
        if not isinstance(event, str):
            self._done.set()


class Scheduler:
    """Decode requests from any number of threads in shared steps of one batch of up to ``max_batch`` rows.

    ``max_queue`` bounds how many requests may wait beyond a full batch. ``cache_tokens`` bounds the cache
    (rows times slots; default ``max_batch`` rows of 2,048 slots, or of the whole context if shorter).
    ``cuda_graphs`` and ``fused_kernels`` choose the decode step's kernels (see
    :class:`~qwen_agent.runtime.decode_runner.DecodeRunner`). The thread starts with the first :meth:`add`; a
    caller that drives :meth:`step` itself passes ``thread=False``.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: QwenTokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        cache_tokens: int | None = None,
        cuda_graphs: bool | None = None,
        fused_kernels: bool | None = None,
        thread: bool = True,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.model, self.tokenizer, self.prefix_cache = model, tokenizer, prefix_cache
        self.cuda_graphs, self.fused_kernels = cuda_graphs, fused_kernels
        self.max_context = model.config.max_context
        self.configure(max_batch=max_batch, max_queue=max_queue, cache_tokens=cache_tokens)
        self._lock = threading.Lock()  # guards the inbox, the counters and the thread's start and end
        self._inbox: deque[Handle] = deque()
        self._closed = False
        self._in_flight = 0
        self._step_rows: Counter[int] = Counter()
        self._batches = self._completed = self._cancelled = 0
        self._waiting: deque[Handle] = deque()  # taken from the inbox, not yet in the batch
        self._live: dict[int, Handle] = {}  # in the batch, by prompt index
        self._batch: Generation | None = None
        self._threaded = thread
        self._thread: threading.Thread | None = None

    def configure(
        self, *, max_batch: int | None = None, max_queue: int | None = None, cache_tokens: int | None = None
    ) -> None:
        """Change the limits (a server sets its own); they apply from the next step."""
        max_batch = getattr(self, "max_batch", 32) if max_batch is None else max_batch
        max_queue = getattr(self, "max_queue", 256) if max_queue is None else max_queue
        if not isinstance(max_batch, int) or max_batch < 1 or not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch!r}, {max_queue!r}")
        self.max_batch, self.max_queue = max_batch, max_queue
        # (an empty batch takes the head of the queue whatever its size: nothing the model can take is refused)
        self.cache_tokens = cache_tokens or max_batch * min(2048, self.max_context)

    # -- any thread ----------------------------------------------------------------------------------------

    def add(self, request: PromptRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue ``request``; its :class:`Handle` at once. Raises :class:`QueueFullError` when
        ``max_batch + max_queue`` requests are in flight, and :class:`GenerationError` when the prompt and its
        budget do not fit the model's context."""
        if request.slots > self.max_context:
            raise GenerationError(
                f"a prompt of {len(request.prompt)} tokens plus {request.max_new_tokens} new ones needs "
                f"{request.slots} slots; the model's context holds {self.max_context}"
            )
        handle = Handle(self, request, on_event)
        with self._lock:
            if self._closed:
                raise QwenAgentError("the scheduler is closed")
            if self._in_flight >= self.max_batch + self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {self._in_flight} requests are in flight "
                    f"(max batch {self.max_batch} + max queue {self.max_queue}); retry later"
                )
            self._in_flight += 1
            self._inbox.append(handle)
            if self._threaded and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qwen-agent-scheduler", daemon=True)
                self._thread.start()
        return handle

    def abort(self, handle: Handle) -> None:
        """End ``handle``'s request at the next step: a waiting one never starts, a decoding one frees its row.
        Its events stop; it is done with ``finish_reason="cancelled"``."""
        handle.aborted = True

    def stats(self) -> dict[str, Any]:
        """Requests in flight (``waiting`` for a row and ``running`` in one) and finished (``cancelled`` of them
        aborted), caches allocated (``batches``), decode steps by the number of rows they decoded, and whether
        it is ``alive``: not closed, and (when threaded) a live thread for whatever is in flight."""
        with self._lock:
            steps = dict(sorted(self._step_rows.items()))
            thread_ok = (
                not self._threaded or self._in_flight == 0 or bool(self._thread and self._thread.is_alive())
            )
            return {
                "alive": not self._closed and thread_ok,
                "in_flight": self._in_flight,
                "waiting": self._in_flight - len(self._live),
                "running": len(self._live),
                "completed": self._completed,
                "cancelled": self._cancelled,
                "batches": self._batches,
                "decode_steps": sum(steps.values()),
                "max_rows": max(steps, default=0),
                "step_rows": steps,
            }

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; requests still in flight get an error. Later ``add`` calls raise."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            self._shut_down()
        elif thread is not threading.current_thread():
            thread.join(timeout)

    # -- the owning thread ---------------------------------------------------------------------------------

    def step(self) -> list[tuple[Handle, Event]]:
        """Take what arrived, drop what was aborted, admit what fits, and run one decode step; returns the events
        of that step with their handles (already delivered to them). Only the owning thread calls this."""
        outputs: list[tuple[Handle, Event]] = []
        self._take_inbox()
        self._drop_aborted(outputs)
        try:
            self._admit()
        except Exception as exc:
            # e.g. no memory for a bigger cache: the head of the queue fails, not the rest
            log.exception("could not admit a request")
            self._fail([self._waiting.popleft()], exc, outputs)
        batch = self._batch
        if batch is None or batch.idle:
            return outputs
        try:
            events = batch.step()
        except Exception as exc:  # a failed batch fails its requests, not the scheduler
            log.exception("a decode step failed")
            batch.close()
            self._batch = None  # its rows are in an unknown state
            self._fail(list(self._live.values()), exc, outputs)
            self._live = {}
            return outputs
        with self._lock:
            if batch.last_step_rows:
                self._step_rows[batch.last_step_rows] += 1
        for index, event in events:
            handle = self._live[index]
            if isinstance(event, GenerationResult):
                del self._live[index]
                self._release(handle)
            if not handle.aborted or not isinstance(event, str):
                handle._deliver(event)
                outputs.append((handle, event))
        return outputs

    @property
    def idle(self) -> bool:
        """Nothing waits or decodes (the owning thread's view)."""
        return not self._inbox and not self._waiting and (self._batch is None or self._batch.idle)

    def _run(self) -> None:
        """The owning thread: step while there is work, then end (the next ``add`` starts another), so an
        engine nobody uses holds no thread."""
        while True:
            with self._lock:
                if self._closed or self.idle:
                    self._thread = None
                    closed = self._closed
                    break
            try:
                self.step()
            except Exception as exc:  # a bug of the scheduler's own: fail what it holds rather than hang them
                log.exception("the scheduler failed")
                self._take_inbox()
                self._fail([*self._live.values(), *self._waiting], exc, [])
                if self._batch is not None:
                    self._batch.close()
                self._live, self._waiting, self._batch = {}, deque(), None
        if closed:
            self._shut_down()

    def _shut_down(self) -> None:
        self._take_inbox()
        outputs: list[tuple[Handle, Event]] = []
        self._fail(
            [*self._live.values(), *self._waiting], QwenAgentError("the scheduler is shutting down"), outputs
        )
        if self._batch is not None:
            self._batch.close()
        self._live, self._waiting, self._batch = {}, deque(), None

    def _take_inbox(self) -> None:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()

    def _drop_aborted(self, outputs: list[tuple[Handle, Event]]) -> None:
        for index, handle in self._live.items():
            if handle.aborted and self._batch is not None:
                self._batch.cancel(index)
        for handle in [h for h in self._waiting if h.aborted]:
            self._waiting.remove(handle)
            result = GenerationResult("", [], "cancelled", None, len(handle.request.prompt), 0, 0, 0.0, 0.0)
            self._release(handle)
            handle._deliver(result)
            outputs.append((handle, result))

    def _admit(self) -> None:
        """Move waiting requests into the batch, in order, growing its cache where that is allowed."""
        while self._waiting:
            request = self._waiting[0].request
            batch = self._batch
            if batch is None or batch.free_rows < 1 or batch.cache.capacity < request.slots:
                if not self._grow(request):
                    return  # it waits at the head; nothing behind it overtakes it
                batch = self._batch
            handle = self._waiting.popleft()
            self._live[batch.add(request)] = handle

    def _grow(self, request: PromptRequest) -> bool:
        """Give the batch a cache with a free row and room for ``request``, if the limits allow; False if not."""
        batch = self._batch
        live = batch.decoding + batch.queued if batch is not None else 0  # rows that must keep their place
        rows_now, slots_now = (batch.cache.batch_size, batch.cache.capacity) if batch is not None else (0, 0)
        slots = max(slots_now, min(-(-request.slots // CACHE_STEP) * CACHE_STEP, self.max_context))
        wanted = min(self.max_batch, 1 << (live + len(self._waiting) - 1).bit_length())
        rows = max(rows_now, min(wanted, self.cache_tokens // slots))
        if rows <= live or rows * slots > self.cache_tokens:
            if live:
                return False  # rows drain as their requests finish; then the cache is rebuilt
            # nothing to keep: a fresh cache of the size the head of the queue needs, the old one freed first
            batch = self._batch = None
            rows = max(1, min(wanted, self.cache_tokens // slots))
        runner = self._new_runner(rows, slots)
        with self._lock:
            self._batches += 1
        if batch is None:
            self._batch = Generation(runner, self.tokenizer, self.prefix_cache)
        else:
            batch.resize(runner)
        return True

    def _new_runner(self, rows: int, slots: int) -> DecodeRunner:
        dtype, device = self.model.tok_embeddings.weight.dtype, self.model.tok_embeddings.weight.device
        cache = KVCache(self.model.config, rows, slots, dtype=dtype, device=device)
        return DecodeRunner(self.model, cache, graphs=self.cuda_graphs, fused=self.fused_kernels)

    def _fail(self, handles: list[Handle], exc: BaseException, outputs: list[tuple[Handle, Event]]) -> None:
        for handle in handles:
            self._release(handle)
            handle._deliver(exc)
            outputs.append((handle, exc))

    def _release(self, handle: Handle) -> None:
        with self._lock:
            self._in_flight -= 1
            self._completed += 1
            self._cancelled += handle.aborted
