"""What :meth:`Agent.astream <qwen_agent.agent.Agent.astream>` awaits: backends and tools on the caller's loop.

A backend with ``astream`` (``ScriptedLLM``, ``OpenAICompatibleLLM`` over httpx, ``LocalLLM`` on the
engine's scheduler) is awaited directly: no thread per call. A backend with only the sync ``stream`` is read on a
worker thread, one call at a time per backend (nothing says it is thread-safe). A tool with ``ainvoke``
(every :class:`~qwen_agent.tools.BaseTool`: ``async def`` tools are awaited, MCP calls are awaited on the
connection's loop, blocking tools run on a worker thread) is awaited; any other tool's ``invoke`` runs on a
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from .errors import ConfigError
from .llm_protocol import ChatPrompt, Completion, Sampling

__all__ = ["prepare", "astream_llm", "ainvoke_tool", "Deadline"]

_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_DONE = object()


async def prepare(llm: Any) -> None:
    """Let a backend learn what it needs from its server (model name, context size) without blocking the loop."""
    prepare_async = getattr(llm, "aprepare", None)
    if prepare_async is not None:
        await prepare_async()


async def astream_llm(
    llm: Any, prompt: ChatPrompt, stop: Sequence[str], sampling: Sampling | None
) -> AsyncIterator[str | Completion]:
    """The backend's stream as an async iterator; closing it closes (and so cancels) the backend's stream."""
    if hasattr(llm, "astream"):
        stream = llm.astream(prompt, stop=stop, sampling=sampling)
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
        return
    lock = _locks.setdefault(llm, threading.Lock())
    while not lock.acquire(blocking=False):  # polled on the loop: a cancelled waiter leaves nothing behind
        await asyncio.sleep(0.005)
    items: Iterator[str | Completion] | None = None

    def step() -> Any:  # on a worker thread: open the stream on the first call, then read one item
        nonlocal items
        if items is None:
            items = iter(llm.stream(prompt, stop=stop, sampling=sampling))
        return next(items, _DONE)

    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            pending = asyncio.ensure_future(asyncio.to_thread(step))
            item = await asyncio.shield(pending)  # cancelled: the worker still finishes its token
            if item is _DONE:
                break
            yield item
    finally:
        if pending is not None and not pending.done():
            await asyncio.wait({pending})  # a generator cannot be closed while a thread runs it
        close = getattr(items, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
        lock.release()


async def ainvoke_tool(tool: Any, raw_arguments: str) -> Any:
    """The tool's result: ``await tool.ainvoke(...)`` where it has one, else ``invoke`` on a worker thread."""
    if hasattr(tool, "ainvoke"):
        return await tool.ainvoke(raw_arguments)
    return await asyncio.to_thread(tool.invoke, raw_arguments)


class Deadline:
    """``async with Deadline(seconds)``: a TimeoutError at the first await past the deadline (None: never).
    :meth:`paused` holds it off while control is in the caller's code (an async generator's ``yield``)."""

    def __init__(self, seconds: float | None) -> None:
        if seconds is not None and not seconds > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {seconds!r}")
        if seconds is not None and not hasattr(asyncio, "timeout"):
            raise ConfigError("a run's timeout needs Python 3.11 or newer (asyncio.timeout)")
        self.seconds = seconds
        self._timeout: Any = None
        self._when: float | None = None

    async def __aenter__(self) -> Deadline:
        if self.seconds is not None:
            self._when = asyncio.get_running_loop().time() + self.seconds
            self._timeout = asyncio.timeout_at(self._when)
            await self._timeout.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        if self._timeout is None:
            return None
        return await self._timeout.__aexit__(*exc)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        if self._timeout is None:
            yield
            return
        self._timeout.reschedule(None)
        try:
            yield
        finally:
            self._timeout.reschedule(self._when)  # already past: it fires at the next await

    def expired(self) -> bool:
        return self._timeout is not None and self._timeout.expired()
