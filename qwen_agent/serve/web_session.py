"""The browser UI's per-session state, kept apart from Gradio: one agent, history and interpreter per session.

Each browser session (a page load) gets a :class:`WebSession` from the :class:`SessionPool`: its own tool
instances (so its own sandboxed kernel and workspace), its own conversation history and its own backend (or a
shared :class:`~qwen_agent.llm.LocalLLM`, whose engine decodes the sessions' calls together). A turn
runs in a worker thread that feeds agent events into a queue, so the Stop button, New chat, a closed tab and
the idle reaper can always end it, whatever the page is doing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent import Agent, Event
from ..errors import ConfigError
from ..llm_protocol import LLM, Sampling
from ..tools.registry import ToolRegistry, default_registry

__all__ = ["Settings", "WebSession", "SessionPool", "TurnEnded"]

CODE_TOOL = "code_interpreter"


@dataclass(frozen=True)
class Settings:
    """What the settings panel controls, for the next turn."""

    tools: tuple[str, ...]
    max_steps: int = 8
    temperature: float = 0.7
    greedy: bool = False
    system: str | None = None
    max_tokens: int = 512

    def sampling(self) -> Sampling:
        return Sampling(max_tokens=self.max_tokens, temperature=0.0 if self.greedy else self.temperature)


@dataclass(frozen=True)
class TurnEnded:
    """The last item of a turn's queue: ``reason`` is ``"done"``, ``"stopped"`` or ``"error"``."""

    reason: str
    error: str = ""


class WebSession:
    """One browser session: tools (with their kernel), history, the running turn."""

    def __init__(
        self, key: str, llm: LLM, tool_names: Sequence[str], registry: ToolRegistry = default_registry
    ):
        self.key = key
        self.llm = llm
        self.tool_names = tuple(tool_names)
        self.registry = registry  # where the tools come from: fresh instances of its classes per session
        self.history: list[tuple[str, str]] = []  # what the model sees of earlier turns
        self.chat: list[dict[str, Any]] = []  # what the page shows (Gradio messages)
        self.last_used = time.monotonic()
        self._tools: ToolRegistry | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _tools and _worker

    # -- tools and workspace -----------------------------------------------------------------------------------

    def _registry(self) -> ToolRegistry:
        with self._lock:
            if self._tools is None:
                self._tools = self.registry.select(self.tool_names)
            return self._tools

    def _code_tool(self) -> Any:
        return self._registry().get(CODE_TOOL) if CODE_TOOL in self.tool_names else None

    @property
    def kernel_running(self) -> bool:
        return self._interpreter() is not None

    @property
    def workspace(self) -> Path | None:
        """The interpreter's workspace, once its kernel has started."""
        return getattr(self._interpreter(), "workdir", None)

    @property
    def figure_dir(self) -> Path | None:
        """Where the interpreter keeps its figures: a host-only directory the kernel cannot reach."""
        return getattr(self._interpreter(), "host_dir", None)

    def export_files(self) -> list[Path]:
        """Host-owned copies of the workspace's files, for the download panel (never the kernel's own names)."""
        interpreter = self._interpreter()
        export = getattr(interpreter, "export_files", None)
        return export() if export is not None else []

    def upload(self, paths: Sequence[str | Path]) -> list[str]:
        """Copy uploaded files into the interpreter's workspace (starting its kernel); returns their names."""
        tool = self._code_tool()
        if tool is None:
            raise ConfigError("files can only be uploaded when the code_interpreter tool is enabled")
        interpreter = tool.start()
        names = []
        for source in paths:
            name = Path(source).name.lstrip(".") or "upload"
            # the interpreter's upload writes a new file and renames it: a symlink the kernel's code left under
            # that name is replaced, never written through
            interpreter.upload(source, name)
            names.append(name)
        return names

    # -- turns -------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        worker = self._worker
        return worker is not None and worker.is_alive()

    def start_turn(self, query: str, settings: Settings) -> queue.Queue[Event | TurnEnded]:
        """Run the agent on ``query`` in a worker thread; its events, then a :class:`TurnEnded`, arrive in the
        returned queue. The history grows only when the turn ends with an answer."""
        unknown = [name for name in settings.tools if name not in self.tool_names]
        if unknown:
            raise ConfigError(
                f"tool {unknown[0]!r} is not served here (served: {', '.join(self.tool_names)})"
            )
        registry = self._registry()
        agent = Agent(
            self.llm,
            [registry.get(name) for name in settings.tools],
            system=settings.system or None,
            max_iterations=settings.max_steps,
            sampling=settings.sampling(),
        )
        events: queue.Queue[Event | TurnEnded] = queue.Queue()
        self._stop.clear()
        history = list(self.history)

        def work() -> None:
            stream = agent.stream(query, history)
            ended = TurnEnded("done")
            try:
                for event in stream:
                    self.last_used = time.monotonic()
                    if self._stop.is_set():
                        ended = TurnEnded("stopped")
                        break
                    events.put(event)
                    result = getattr(event, "result", None)
                    if result is not None:
                        self.history = result.history
            except Exception as exc:  # a backend failure: shown in the chat, never a traceback page
                ended = TurnEnded("error", f"{type(exc).__name__}: {exc}")
            finally:
                stream.close()
                events.put(ended)

        self._worker = threading.Thread(target=work, name=f"web-turn-{self.key[:8]}", daemon=True)
        self._worker.start()
        return events

    def stop(self, wait: float = 0.0) -> None:
        """End the running turn: the generation stops at its next token, a running cell is interrupted."""
        self._stop.set()
        worker = self._worker
        if worker is None or not worker.is_alive():
            return

        def interrupt_until_done() -> None:
            # the turn ends at the agent's next event; a cell that has not started yet is interrupted once
            # it has (the kernel may still be starting), so keep trying until the worker is gone
            while worker.is_alive():
                interpreter = self._interpreter()
                if interpreter is not None:
                    interpreter.interrupt()
                worker.join(0.5)

        threading.Thread(target=interrupt_until_done, daemon=True).start()
        if wait:
            worker.join(wait)

    def _interpreter(self) -> Any:
        with self._lock:
            tool = self._tools.get(CODE_TOOL) if self._tools and CODE_TOOL in self.tool_names else None
        return tool.interpreter if tool is not None else None

    def reset(self) -> None:
        """New chat: stop the turn, close the kernel (and remove its workspace), forget the history."""
        self.stop(wait=10.0)
        with self._lock:
            tools, self._tools = self._tools, None
        if tools is not None:
            tools.close()
        self.history, self.chat = [], []
        self.last_used = time.monotonic()

    close = reset


class SessionPool:
    """The sessions of one app, by Gradio session hash; a daemon thread closes those idle past ``idle_timeout``
    seconds (a tab closed without its unload event reaching the server, a laptop put to sleep)."""

    def __init__(
        self,
        new_llm: Callable[[], LLM],
        tool_names: Sequence[str],
        *,
        registry: ToolRegistry = default_registry,
        idle_timeout: float = 1800.0,
        reap_every: float | None = None,
    ):
        if idle_timeout <= 0:
            raise ConfigError(f"idle_timeout must be a positive number of seconds, got {idle_timeout!r}")
        self.new_llm = new_llm
        self.tool_names = tuple(tool_names)
        self.registry = registry
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, WebSession] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper = threading.Thread(
            target=self._reap_loop, args=(reap_every or min(60.0, idle_timeout / 2),), daemon=True
        )
        self._reaper.start()

    def get(self, key: str) -> WebSession:
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = WebSession(
                    key, self.new_llm(), self.tool_names, self.registry
                )
        session.last_used = time.monotonic()
        return session

    def close(self, key: str) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            session.close()

    def kernel_count(self) -> int:
        """Sessions whose interpreter has a kernel right now."""
        with self._lock:
            sessions = list(self._sessions.values())
        return sum(s.kernel_running for s in sessions)

    def reap(self) -> int:
        """Close sessions idle for longer than ``idle_timeout`` (a running turn is not idle)."""
        now = time.monotonic()
        with self._lock:
            idle = [
                k for k, s in self._sessions.items() if not s.busy and now - s.last_used > self.idle_timeout
            ]
        for key in idle:
            self.close(key)
        return len(idle)

    def drain(self, timeout: float) -> int:
        """Let running turns go on for up to ``timeout`` seconds, then stop the ones left (the server is
        shutting down); returns how many were stopped."""
        deadline = time.monotonic() + timeout
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        running = self._busy()
        for session in running:
            session.stop()
        for session in running:  # a stopped turn ends at its next token or once its cell is interrupted
            session.stop(wait=max(0.0, 5.0 - (time.monotonic() - deadline)))
        return len(running)

    def _busy(self) -> list[WebSession]:
        with self._lock:
            return [s for s in self._sessions.values() if s.busy]

    def _reap_loop(self, every: float) -> None:
        while not self._closed.wait(every):
            self.reap()

    def close_all(self) -> None:
        self._closed.set()
        with self._lock:
            keys = list(self._sessions)
        for key in keys:
            self.close(key)
