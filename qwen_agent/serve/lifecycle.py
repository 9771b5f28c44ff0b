"""The server's life: the model loaded behind an open socket, readiness, and a graceful shutdown.

``qwen-agent serve`` listens at once and loads the model on a thread meanwhile: ``/health`` answers 503
(``"status": "loading"``) and ``/v1`` requests 503 until it is loaded, then 200 while the scheduler is alive
(not closed, and a live thread for what is in flight; 503 ``"down"`` otherwise). An orchestrator's readiness
probe can so tell "starting" from "down".

On SIGTERM or SIGINT (:class:`GracefulServer`): the listening socket closes (no new connections), requests in
flight run on for ``shutdown_timeout`` seconds, then the ones left are aborted (:meth:`Lifecycle.abort_all`): a
stream ends with a chunk whose ``finish_reason`` is ``"abort"`` and ``data: [DONE]``, a client waiting for a
whole answer gets 503 ``server_shutting_down``. Then the scheduler stops and the process exits 0. A second
signal aborts at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import uvicorn

from .schema import APIError

__all__ = ["Lifecycle", "GracefulServer", "RequestAborted"]

log = logging.getLogger("qwen_agent.serve")


class RequestAborted(APIError):
    """A request ended by the server (shutdown or ``--request-timeout``): its stream ends with
    ``finish_reason: "abort"``, and a client waiting for a whole answer gets this error."""


class Abortable(Protocol):
    def abort(self, error: RequestAborted) -> None: ...


class Lifecycle:
    """Whether the app is ready, and its requests in flight (to abort them at shutdown).

    ``handlers`` is None until the model is loaded; ``start(engine)`` makes them; ``stats()`` reads the
    scheduler's figures (None before it exists). All methods but :meth:`load_in_background` run on the event
    loop.
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.handlers: Any = None
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[], None] = lambda: None  # set by the server: stop serving
        self.stats: Callable[[], dict[str, Any] | None] = lambda: None
        self.aborted: RequestAborted | None = None  # once set, new requests get it at once
        self._in_flight: set[Abortable] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutting_down = False

    # -- loading and readiness -------------------------------------------------------------------------------

    def ready(self, handlers: Any, stats: Callable[[], dict[str, Any]]) -> None:
        self.handlers, self.stats = handlers, stats

    def load_in_background(self, load: Callable[[], tuple[Any, Callable[[], dict[str, Any]]]]) -> None:
        """Run ``load`` (returning the handlers and the stats function) on a thread; a failure is kept, logged
        and stops the server."""

        def run() -> None:
            try:
                self.ready(*load())
                log.info("the model is loaded; ready")
            except BaseException as exc:  # noqa: BLE001 - reported through /health and the exit status
                self.load_error = exc
                log.error("the model failed to load: %s", exc)
                self.on_load_failure()

        threading.Thread(target=run, name="qwen-agent-model-loader", daemon=True).start()

    def require_handlers(self) -> Any:
        """The handlers, or a 503 saying why there are none yet."""
        if self.handlers is None:
            raise APIError(503, self._not_ready(), code="model_not_ready", type="server_error")
        return self.handlers

    def health(self) -> tuple[int, dict[str, Any]]:
        """``/health``'s status and body: 200 only when the model is loaded and the scheduler alive."""
        body: dict[str, Any] = {"model": self.model_name}
        if self.handlers is None:
            return 503, {
                **body,
                "status": "failed" if self.load_error else "loading",
                "reason": self._not_ready(),
            }
        stats = self.stats()
        if not stats["alive"]:
            return 503, {**body, "status": "down", "reason": "the scheduler has stopped"}
        prefix_cache = stats.pop("prefix_cache", None)  # the engine's prefix cache; None when off
        return 200, {**body, "status": "ok", "scheduler": stats, "prefix_cache": prefix_cache}

    def _not_ready(self) -> str:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        return "the model is loading; retry when /health answers 200"

    # -- requests in flight and shutdown -----------------------------------------------------------------------

    @contextmanager
    def tracking(self, request: Abortable) -> Iterator[None]:
        """Hold ``request`` among those aborted at shutdown while the block runs."""
        if self.aborted is not None:
            raise self.aborted
        self._in_flight.add(request)
        try:
            yield
        finally:
            self._in_flight.discard(request)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def begin_shutdown(self, timeout: float) -> None:
        """Abort what is still in flight ``timeout`` seconds from now (from any thread, a signal handler too)."""
        if self._loop is None or self._shutting_down:
            return
        self._shutting_down = True
        log.info("shutting down: %d request(s) in flight get %.0f s to finish", len(self._in_flight), timeout)
        self._loop.call_soon_threadsafe(self._loop.call_later, timeout, self.abort_all)

    def abort_now(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.abort_all)

    def abort_all(self) -> None:
        if self.aborted is None:
            self.aborted = RequestAborted(
                503, "the server is shutting down", code="server_shutting_down", type="server_error"
            )
        if self._in_flight:
            log.warning("aborting %d request(s) still in flight", len(self._in_flight))
        for request in list(self._in_flight):
            request.abort(self.aborted)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, draining through ``lifecycle`` when it stops: in-flight requests get
    ``shutdown_timeout`` seconds, then are aborted. SIGTERM and SIGINT both stop it (a second one aborts at
    once), and the process then exits normally instead of dying of the signal (uvicorn re-raises it)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float = 30.0) -> None:
        # uvicorn's own limit is the backstop: past it, it cancels whatever still runs
        config.timeout_graceful_shutdown = shutdown_timeout + 5.0
        super().__init__(config)
        self.lifecycle, self.shutdown_timeout = lifecycle, shutdown_timeout
        lifecycle.on_load_failure = self._stop

    def _stop(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        self.lifecycle.begin_shutdown(self.shutdown_timeout)
        await super().shutdown(sockets)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:
            log.info("second signal: aborting the requests in flight now")
            self.lifecycle.abort_now()
        self.should_exit = True
