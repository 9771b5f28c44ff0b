"""``qwen-agent web``: the agent in a browser (Gradio, the ``[web]`` extra).

The chat streams each answer token by token from :meth:`qwen_agent.Agent.stream`. Every ReAct step shows as a
collapsible block (Gradio's message ``metadata``): the Thought, the tool and its arguments (code highlighted),
and the Observation; a running step shows a spinner and a failed call is titled as an error. Figures the code
interpreter draws follow the step as images, and the workspace's files can be downloaded from the side panel.
Files dropped into the message box go into the session's workspace, and the query starts with
``[Upload file a.csv]`` as in Qwen's code-interpreter prompts.

Each browser session has its own agent, history and sandboxed kernel (:mod:`qwen_agent.serve.web_session`); New
chat and closing the tab close the kernel, and sessions idle past ``idle_timeout`` are reaped.

>>> app = build_app(lambda: ScriptedLLM([...]), ["code_interpreter"])   # doctest: +SKIP
>>> app.launch("127.0.0.1", 7860)                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports to gradio.app
# Gradio's queue otherwise rebuilds a pandas table of per-event statistics after every event (for a monitoring
# page this UI does not offer), through pandas options that pandas 3 deprecates
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**31))
import gradio as gr  # noqa: E402

from ..agent import (
    ActionEvent,
    AnswerDelta,
    ErrorEvent,
    Event,
    ObservationEvent,
    StepStarted,
    ThoughtDelta,
)
from ..errors import QwenAgentError
from ..llm_protocol import LLM
from ..runtime.chat_format import DEFAULT_SYSTEM
from ..tools.base import extract_code
from ..tools.registry import ToolRegistry, default_registry
from .web_session import SessionPool, Settings, TurnEnded, WebSession

__all__ = ["WebApp", "build_app", "launch", "TurnView"]

_FIGURE = re.compile(r"!\[fig-\d+\]\(([^)\n]+)\)")
_CSS = """
#qa-status { font-size: 0.85em; opacity: 0.8; }
#qa-chat .message-wrap pre { max-height: 22em; overflow: auto; }
"""


def _fence(text: str, lang: str = "") -> str:
    """A code fence longer than any backtick run inside ``text`` (Observations contain fences themselves)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


@dataclass
class _StepBlock:
    index: int
    started: float
    forced: bool = False
    thought: str = ""
    tool: str | None = None
    arguments: str = ""
    args_format: str = "json"
    observation: str | None = None
    error: str | None = None
    done: bool = False

    def message(self) -> dict[str, Any]:
        title = "Final answer (step budget used up)" if self.forced else f"Step {self.index + 1}"
        if self.tool:
            title += f" · {self.tool}"
        parts = []
        if self.thought.strip():
            parts.append(f"**Thought:** {self.thought.strip()}")
        if self.tool:
            code = extract_code(self.arguments) if self.args_format == "code" else self.arguments.strip()
            parts.append(
                f"**Action:** `{self.tool}`\n\n"
                + _fence(code, "python" if self.args_format == "code" else "json")
            )
        if self.observation is not None:
            parts.append("**Observation:**\n\n" + _fence(self.observation, "text"))
        metadata: dict[str, Any] = {"title": title + (" · failed" if self.error else "")}
        if self.error:
            metadata["log"] = self.error
        if self.done:
            metadata["status"] = "done"
            metadata["duration"] = round(time.monotonic() - self.started, 2)
        else:
            metadata["status"] = "pending"
            metadata.setdefault("log", "running…")
        return {"role": "assistant", "content": "\n\n".join(parts) or "…", "metadata": metadata}


@dataclass
class TurnView:
    """Turns one agent run's events into Gradio chat messages (dicts), re-rendered as events arrive."""

    args_formats: dict[str, str]
    figure_dir: Callable[[], Path | None]  # the interpreter's host-only directory, where its figures are
    messages: list[dict[str, Any] | None] = field(default_factory=list)  # None: a block taken out
    _blocks: dict[int, tuple[int, _StepBlock]] = field(default_factory=dict)
    _answer_at: int | None = None
    _answer: str = ""
    _shown: set[Path] = field(default_factory=set)

    def feed(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            block = _StepBlock(event.index, time.monotonic(), forced=event.forced)
            self._blocks[event.index] = (len(self.messages), block)
            self.messages.append(block.message())
            return
        if isinstance(event, AnswerDelta):
            self._close_step(event.index, event.text)
            if self._answer_at is None:
                self._answer_at = len(self.messages)
                self.messages.append({"role": "assistant", "content": ""})
            self._answer += event.text
            self.messages[self._answer_at]["content"] = self._answer
            return
        at, block = self._blocks[event.index] if hasattr(event, "index") else (None, None)
        if block is None:
            return
        if isinstance(event, ThoughtDelta):
            block.thought += event.text
        elif isinstance(event, ActionEvent):
            block.tool, block.arguments = event.tool, event.raw_arguments
            block.args_format = self.args_formats.get(event.tool, "json")
        elif isinstance(event, ErrorEvent):
            block.error = event.kind.replace("_", " ")
        elif isinstance(event, ObservationEvent):
            block.observation, block.done = event.observation, True
            self.messages[at] = block.message()
            self._add_figures(event.observation)
            return
        self.messages[at] = block.message()

    def _close_step(self, index: int, answer: str) -> None:
        """The answer has started: the step's block (a thought, or nothing) is finished. It is taken out when
        it says nothing more than the answer (a reply without the ReAct format streams as thought, then comes
        whole as the answer)."""
        at, block = self._blocks[index]
        if not block.done:
            block.done = True
            self.messages[at] = block.message()
            thought = block.thought.strip()
            trivial = (
                thought.rstrip(".").lower() in ("", "i now know the final answer")
                or thought == answer.strip()
            )
            if trivial and not block.forced:
                self.messages[at] = None  # nothing to show beyond the answer itself

    def visible(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m is not None]

    def _add_figures(self, observation: str) -> None:
        """Figures named in an Observation, shown only when they are files of the interpreter's host-only
        directory (the kernel writes the Observation text, so it could name any path)."""
        root = self.figure_dir()
        if root is None:
            return
        for name in _FIGURE.findall(observation):
            path = Path(name)
            if path.parent != root or path.is_symlink() or not path.is_file():
                continue
            if path not in self._shown:
                self._shown.add(path)
                self.messages.append(
                    {"role": "assistant", "content": {"path": str(path), "mime_type": "image/png"}}
                )

    def finish(self, ended: TurnEnded) -> None:
        """Close every step still pending and say why the turn ended when it was not an answer."""
        for at, block in self._blocks.values():
            if not block.done:
                block.done = True
                if ended.reason != "done":
                    block.error = ended.reason
                self.messages[at] = block.message()
        if ended.reason == "stopped":
            self.messages.append({"role": "assistant", "content": "Stopped."})
        elif ended.reason == "error":
            self.messages.append(_error_message(ended.error))


def _error_message(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": f"⚠️ **Error:** {text}"}


class WebApp:
    """The Gradio Blocks of the UI and the session pool behind it; ``blocks.launch(...)`` serves it."""

    def __init__(
        self,
        new_llm: Callable[[], LLM],
        tool_names: Sequence[str],
        *,
        registry: ToolRegistry = default_registry,
        title: str = "Qwen ReAct agent",
        model_label: str = "",
        max_tokens: int = 512,
        idle_timeout: float = 1800.0,
    ):
        self.tool_names = tuple(tool_names)
        self.max_tokens = max_tokens
        self.pool = SessionPool(new_llm, self.tool_names, registry=registry, idle_timeout=idle_timeout)
        self.args_formats = {name: registry.get(name).args_format for name in self.tool_names}
        self.blocks = self._build(title, model_label)

    # -- layout ------------------------------------------------------------------------------------------------

    def _build(self, title: str, model_label: str) -> Any:
        with gr.Blocks(title=title, fill_height=True) as blocks:
            gr.Markdown(f"### {title}" + (f" · `{model_label}`" if model_label else ""))
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(
                        elem_id="qa-chat", label="Agent", height="76vh", layout="panel", buttons=[]
                    )
                    box = gr.MultimodalTextbox(
                        elem_id="qa-input",
                        placeholder="Ask a question, or drop a file (CSV, ...) for the code interpreter",
                        file_count="multiple",
                        show_label=False,
                        submit_btn=True,
                    )
                    with gr.Row():
                        stop = gr.Button("Stop", elem_id="qa-stop", variant="stop", size="sm")
                        new_chat = gr.Button("New chat", elem_id="qa-new", size="sm")
                with gr.Column(scale=1, min_width=320):
                    status = gr.Markdown(elem_id="qa-status")
                    files = gr.File(
                        label="Workspace files", elem_id="qa-files", file_count="multiple", interactive=False
                    )
                    with gr.Accordion("Settings", open=False, elem_id="qa-settings"):
                        tools = gr.CheckboxGroup(
                            list(self.tool_names),
                            value=list(self.tool_names),
                            label="Tools",
                            elem_id="qa-tools",
                        )
                        steps = gr.Slider(1, 20, value=8, step=1, label="Max steps", elem_id="qa-steps")
                        temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="Temperature")
                        greedy = gr.Checkbox(value=False, label="Greedy decoding", elem_id="qa-greedy")
                        system = gr.Textbox(
                            value=DEFAULT_SYSTEM, label="System prompt", lines=2, elem_id="qa-system"
                        )
            settings = [tools, steps, temperature, greedy, system]
            turn = box.submit(
                self._respond,
                [box, *settings],
                [box, chatbot, files, status],
                concurrency_limit=None,  # sessions run side by side; a shared local engine serialises itself
            )
            stop.click(self._stop, None, None, queue=False)
            new_chat.click(self._new_chat, None, [chatbot, files, status, box], cancels=[turn], queue=False)
            chatbot.clear(self._new_chat, None, [chatbot, files, status, box], cancels=[turn], queue=False)
            blocks.load(self._status, None, status, queue=False)
            blocks.unload(self._unload)
        return blocks

    # -- handlers ----------------------------------------------------------------------------------------------

    def _session(self, request: gr.Request) -> WebSession:
        return self.pool.get(request.session_hash)

    def _status(self, request: gr.Request = None) -> str:
        session = self.pool.get(request.session_hash) if request is not None else None
        mine = "running" if session is not None and session.kernel_running else "not started"
        return f"This chat's kernel: **{mine}** · kernels on this server: **{self.pool.kernel_count()}**"

    def _files(self, session: WebSession) -> list[str]:
        return [str(p) for p in session.export_files()]

    def _respond(
        self,
        message: dict[str, Any] | None,
        tools: list[str],
        max_steps: float,
        temperature: float,
        greedy: bool,
        system: str,
        request: gr.Request = None,
    ) -> Iterator[tuple[Any, ...]]:
        session = self._session(request)
        chat = session.chat  # what the page shows, kept here rather than read back from the page
        text = (message or {}).get("text", "").strip()
        uploads = list((message or {}).get("files") or [])
        if not text and not uploads:
            yield gr.update(), chat, gr.update(), gr.update()
            return
        if session.busy:
            chat.append(_error_message("the previous answer is still running; press Stop first."))
            yield gr.update(), chat, gr.update(), gr.update()
            return
        try:
            names = session.upload(uploads) if uploads else []
        except (QwenAgentError, OSError) as exc:
            chat += [{"role": "user", "content": text or "(files)"}, _error_message(str(exc))]
            yield gr.update(), chat, gr.update(), self._status(request)
            return
        shown = text + (f"\n\n*Uploaded: {', '.join(names)}*" if names else "")
        chat.append({"role": "user", "content": shown.strip()})
        query = (f"[Upload file {', '.join(names)}]\n" if names else "") + (
            text or "Look at the uploaded file."
        )
        settings = Settings(
            tools=tuple(tools or ()),
            max_steps=int(max_steps),
            temperature=float(temperature),
            greedy=bool(greedy),
            system=system.strip() or None,
            max_tokens=self.max_tokens,
        )
        cleared = gr.MultimodalTextbox(value=None)
        yield cleared, chat, self._files(session), self._status(request)
        try:
            events = session.start_turn(query, settings)
        except QwenAgentError as exc:
            chat.append(_error_message(str(exc)))
            yield cleared, chat, gr.update(), self._status(request)
            return
        view = TurnView(self.args_formats, lambda: session.figure_dir)
        while True:
            try:
                item = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(item, TurnEnded):
                view.finish(item)
                break
            view.feed(item)
            if isinstance(item, (StepStarted, ObservationEvent)):
                yield cleared, chat + view.visible(), self._files(session), self._status(request)
            else:
                yield cleared, chat + view.visible(), gr.update(), gr.update()
        session.chat = chat + view.visible()
        yield cleared, session.chat, self._files(session), self._status(request)

    def _stop(self, request: gr.Request = None) -> None:
        self._session(request).stop()

    def _new_chat(self, request: gr.Request = None) -> tuple[Any, ...]:
        self._session(request).reset()
        return [], [], self._status(request), gr.MultimodalTextbox(value=None)

    def _unload(self, request: gr.Request = None) -> None:
        if request is not None:
            self.pool.close(request.session_hash)

    def launch(self, host: str = "127.0.0.1", port: int = 7860, **options: Any) -> None:
        """Serve the UI (never shared through Gradio's tunnel); ``options`` go to ``Blocks.launch``."""
        self.blocks.queue(default_concurrency_limit=None)
        self.blocks.launch(
            server_name=host, server_port=port, share=False, css=_CSS, footer_links=[], **options
        )

    def serve_until_signalled(self, host: str, port: int, shutdown_timeout: float = 30.0) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully: stop accepting connections, let running
        turns go on for ``shutdown_timeout`` seconds, stop the rest (their chats end as Stop ends them), close
        the server and every session's kernel. Returns normally, so the process exits 0."""
        signalled = threading.Event()
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, lambda *_: signalled.set()) for sig in handled}
        try:
            self.launch(host, port, prevent_thread_lock=True)
            server = self.blocks.server
            while not signalled.wait(0.5):
                if not server.thread.is_alive():
                    break
            print(f"shutting down: running turns get {shutdown_timeout:g} s to finish", file=sys.stderr)
            # uvicorn stops listening now and waits for open connections, at most this long
            server.config.timeout_graceful_shutdown = shutdown_timeout + 2.0
            server.should_exit = True
            stopped = self.pool.drain(shutdown_timeout)
            if stopped:
                print(f"stopped {stopped} running turn(s)", file=sys.stderr)
            # a turn's handler polls its events every 0.5 s: let the pages get their last update
            time.sleep(1.0)
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
            self.close()

    def close(self) -> None:
        """Close the server and every session's kernel."""
        self.blocks.close()
        self.pool.close_all()


def _tool_names(tool_names: Sequence[str] | None, registry: ToolRegistry = default_registry) -> list[str]:
    """The names checked against the registry (unknown ones raise ToolNotFoundError listing the valid ones)."""
    names = list(registry.names() if tool_names is None else tool_names)
    for name in names:
        registry.get(name)
    return names


def build_app(
    new_llm: Callable[[], LLM],
    tool_names: Sequence[str] | None = None,
    **options: Any,
) -> WebApp:
    """The UI for agents on ``new_llm()`` (called once per browser session; return one shared backend to share
    it) with the tools ``tool_names`` (default: every built-in tool). ``options`` go to :class:`WebApp`."""
    return WebApp(new_llm, _tool_names(tool_names, options.get("registry", default_registry)), **options)


def launch(
    model: str,
    *,
    tools: Sequence[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str | None = None,
    api_key: str | None = None,
    served_model: str | None = None,
    max_tokens: int = 512,
    idle_timeout: float = 1800.0,
    mcp: str | None = None,
    max_batch: int = 4,
    kv_cache_gb: float | None = None,
    shutdown_timeout: float = 30.0,
) -> None:
    """Serve the UI until SIGTERM or SIGINT (then shut down as :meth:`WebApp.serve_until_signalled` does).
    ``model`` is a local model directory (loaded once, shared by every session: their generations are decoded
    together, up to ``max_batch`` at a time, over one prefix cache of ``kv_cache_gb``; see
    :func:`~qwen_agent.runtime.engine.load_model`) or the URL of an OpenAI-compatible server (a client per
    session). ``mcp`` is an ``mcpServers`` config: its servers start
    once, and their tools join the built-in ones (all offered unless ``tools`` names some), shared by every
    session."""
    from ..llm import llm_from_spec

    registry = default_registry.select()  # the built-in tools' classes: each session makes its own instances
    engine = None
    try:
        if mcp is not None:
            for line in registry.add_mcp(mcp):  # tools renamed to avoid a clash
                print(line, file=sys.stderr)
        names = _tool_names(tools, registry)  # before a model is loaded: a typo fails at once
        if model.startswith(("http://", "https://")):

            def new_llm() -> LLM:
                return llm_from_spec(model, api_key=api_key, served_model=served_model)
        else:
            from ..llm import LocalLLM
            from ..runtime.engine import load_model

            engine = load_model(model, device=device, kv_cache_gb=kv_cache_gb)
            engine.scheduler.configure(max_batch=max_batch)
            shared = LocalLLM(engine)  # every session's calls go to the engine's one scheduler

            def new_llm() -> LLM:
                return shared

        app = build_app(
            new_llm,
            names,
            registry=registry,
            model_label=model,
            max_tokens=max_tokens,
            idle_timeout=idle_timeout,
        )
        app.serve_until_signalled(host, port, shutdown_timeout)
    finally:
        registry.close()  # stops the MCP servers
        if engine is not None:
            engine.close()
