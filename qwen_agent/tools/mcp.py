"""Tools from Model Context Protocol servers, as registry tools.

The configuration is the ``mcpServers`` block that Claude Desktop, Qwen-Agent and Qwen Code read::

    {"mcpServers": {
        "time": {"command": "mcp-server-time", "args": ["--local-timezone", "UTC"]},
        "search": {"url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "Bearer ..."}}}}

A server with ``command`` runs as a child process spoken to over stdio; one with ``url`` is reached over streamable
HTTP. Each server gets an :class:`MCPServerConnection`: an event loop on a thread of its own, so the agent's
synchronous tool calls can wait on the official ``mcp`` SDK's async client with a deadline. A stdio server is
started through the interpreter's launcher (``_launcher.py``): it dies with the host, and where namespaces are
permitted it runs in a pid namespace of its own, so nothing it started outlives it either. Its environment is
the SDK's short safe list (PATH, HOME, USER, ...) plus the configured ``env``; no other host variable reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ToolError
from .base import BaseTool
from .sandbox import LAUNCHER, _probe_unshare

__all__ = ["MCPServerConfig", "MCPServerConnection", "MCPTool", "MCPCallResult", "read_mcp_config"]

log = logging.getLogger(__name__)

_KEYS = {"command", "args", "env", "cwd", "url", "headers", "type", "disabled", "timeout"}
_STDERR_TAIL = 1500
_NAME_CHARS = re.compile(r"[^\w.-]")


@dataclass(frozen=True)
class MCPServerConfig:
    """One entry of ``mcpServers``: ``command`` (+ ``args``, ``env``, ``cwd``) or ``url`` (+ ``headers``).
    ``timeout`` is the deadline of one tool call in seconds."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 60.0


def read_mcp_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> list[MCPServerConfig]:
    """The servers of an ``mcpServers`` config (a JSON file's path, or the parsed object), disabled ones left
    out. A malformed config raises ConfigError naming the file and the field."""
    where = "MCP config"
    if isinstance(source, Mapping):
        data: Any = source
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the MCP config ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
    servers = data.get("mcpServers") if isinstance(data, Mapping) else None
    if not isinstance(servers, Mapping):
        raise ConfigError(f'{where}: expected an object with an "mcpServers" object of servers')
    return [
        _server_config(name, entry, f"{where}: mcpServers.{name}")
        for name, entry in servers.items()
        if not (isinstance(entry, Mapping) and entry.get("disabled") is True)
    ]


def _server_config(name: str, entry: Any, where: str) -> MCPServerConfig:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected an object with 'command' or 'url'")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(_KEYS))})")
    if ("command" in entry) == ("url" in entry):
        raise ConfigError(
            f"{where}: give exactly one of 'command' (a stdio server) or 'url' (streamable HTTP)"
        )

    def text(key: str) -> str | None:
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
        return value

    def strings(key: str, kind: type) -> Any:
        value = entry.get(key, kind())
        items = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else None
        )
        if items is None or not all(isinstance(v, str) for _, v in items):
            shape = "a list of strings" if kind is list else "an object of string values"
            raise ConfigError(f"{where}.{key}: expected {shape}, got {value!r}")
        return value

    timeout = entry.get("timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"{where}.timeout: expected a positive number of seconds, got {timeout!r}")
    url = text("url")
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {url!r}")
    return MCPServerConfig(
        name=name,
        command=text("command"),
        args=tuple(strings("args", list)),
        env=dict(strings("env", dict)),
        cwd=text("cwd"),
        url=url,
        headers=dict(strings("headers", dict)),
        timeout=float(timeout),
    )


class MCPServerConnection:
    """One running MCP server: started by :meth:`start`, called from any thread, stopped by :meth:`close`.

    A call that outlives its deadline is cancelled and reported; a server that stops during a call is started
    again once (the call reports the failure), so one crash does not take its tools away for the rest of a run.
    """

    def __init__(self, config: MCPServerConfig, *, start_timeout: float = 60.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.tools: list[Any] = []  # mcp_types.Tool, as the server lists them
        self.restarts = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"mcp-{config.name}", daemon=True)
        self._thread.start()
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace")
        self._client: Any = None
        self._session: concurrent.futures.Future[None] | None = None
        self._stop: asyncio.Event | None = None

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> list[Any]:
        """Start the server and list its tools; raises ToolError naming the server (and its stderr tail)."""
        ready: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._session = asyncio.run_coroutine_threadsafe(self._run_session(ready), self._loop)
        try:
            self._client, self.tools = ready.result(self.start_timeout)
        except concurrent.futures.TimeoutError:
            self._end_session()
            raise ToolError(self._describe(f"did not start within {self.start_timeout:g} s")) from None
        except Exception as exc:
            self._end_session()
            raise ToolError(self._describe(f"failed to start: {_reason(exc)}")) from None
        return self.tools

    def call(self, tool: str, arguments: dict[str, Any]) -> Any:
        """``tools/call`` on the server: the ``CallToolResult``, or ToolError on a deadline or a dead server."""
        if self._client is None:
            raise ToolError(self._describe("is not running"))
        future = asyncio.run_coroutine_threadsafe(self._client.call_tool(tool, arguments), self._loop)
        try:
            return future.result(self.config.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ToolError(
                f"MCP server {self.name!r}: tool {tool!r} did not answer within {self.config.timeout:g} s"
            ) from None
        except Exception as exc:
            if self._alive():
                raise ToolError(f"MCP server {self.name!r}: tool {tool!r} failed: {_reason(exc)}") from None
            raise ToolError(
                self._restart_after(f"stopped during the call to {tool!r} ({_reason(exc)})")
            ) from None

    async def acall(self, tool: str, arguments: dict[str, Any]) -> Any:
        """:meth:`call` awaited from another event loop: no thread waits on it, and cancelling the awaiting task
        cancels the request's task on the connection's loop."""
        if self._client is None:
            raise ToolError(self._describe("is not running"))
        future = asyncio.run_coroutine_threadsafe(self._client.call_tool(tool, arguments), self._loop)
        try:
            # wrap_future: cancelling the awaiting task cancels the call's task on the connection's loop
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.timeout)
        except TimeoutError:
            raise ToolError(
                f"MCP server {self.name!r}: tool {tool!r} did not answer within {self.config.timeout:g} s"
            ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if await asyncio.to_thread(self._alive):
                raise ToolError(f"MCP server {self.name!r}: tool {tool!r} failed: {_reason(exc)}") from None
            what = f"stopped during the call to {tool!r} ({_reason(exc)})"
            raise ToolError(await asyncio.to_thread(self._restart_after, what)) from None

    def close(self) -> None:
        """Stop the server (stdin closed, then the process group killed) and the connection's thread."""
        self._end_session()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
        self._stderr.close()

    # ---- inside -------------------------------------------------------------------------------------------
    async def _run_session(self, ready: concurrent.futures.Future[Any]) -> None:
        from mcp import Client

        self._stop = asyncio.Event()
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = await stack.enter_async_context(Client(await self._transport(stack)))
                tools, cursor = [], None
                while True:  # tools/list is paginated
                    page = await client.list_tools(cursor=cursor)
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                ready.set_result((client, tools))
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            elif not self._stop.is_set():
                log.warning("MCP server %r: the connection ended: %s", self.name, _reason(exc))
            if not isinstance(exc, Exception):
                raise

    async def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        if self.config.url is not None:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            # the SDK closes only an HTTP client it made itself; this one carries the headers, so the stack does
            http = await stack.enter_async_context(create_mcp_http_client(headers=dict(self.config.headers)))
            return streamable_http_client(self.config.url, http_client=http)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(
            command=sys.executable,
            args=["-I", "-S", str(LAUNCHER), json.dumps(self._launcher_config())],
            env=dict(self.config.env),
            cwd=self.config.cwd,
        )
        return stdio_client(params, errlog=self._stderr)

    def _launcher_config(self) -> dict[str, Any]:
        command = self.config.command or ""
        search_path = self.config.env.get("PATH", os.environ.get("PATH"))
        executable = shutil.which(command, path=search_path) if os.sep not in command else command
        if executable is None:
            raise ToolError(f"MCP server {self.name!r}: command {command!r} not found on PATH")
        unshare, _ = _probe_unshare(False)  # a pid namespace: the server's own children die with it
        return {
            "stage": "outer",
            "parent": os.getpid(),
            "unshare": list(unshare),
            "limits": {},
            "argv": [os.path.abspath(executable), *self.config.args],
        }

    def _alive(self) -> bool:
        if self._session is None or self._session.done():
            return False
        # tools/list as the probe: ping is gone from the newer protocol revisions
        probe = self._client.list_tools(cache_mode="bypass")
        ping = asyncio.run_coroutine_threadsafe(probe, self._loop)
        try:
            ping.result(5.0)
            return True
        except Exception:
            ping.cancel()
            return False

    def _restart_after(self, what: str) -> str:
        self._end_session()
        if self.restarts:
            return self._describe(f"{what}; it was restarted once already and is not restarted again")
        self.restarts += 1
        try:
            self.start()
        except ToolError as exc:
            return f"{self._describe(what)}; restarting it failed: {exc}"
        return f"MCP server {self.name!r} {what}; it was restarted, and a new call may succeed"

    def _end_session(self) -> None:
        session, self._session, self._client = self._session, None, None
        if session is None or session.done():
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        try:
            session.result(15.0)  # the SDK closes stdin, waits, then kills the process group
        except Exception:
            session.cancel()

    def _describe(self, what: str) -> str:
        where = self.config.url or " ".join([self.config.command or "", *self.config.args])
        message = f"MCP server {self.name!r} ({where}) {what}"
        tail = self._stderr_tail()
        return f"{message}\nits stderr ends with:\n{tail}" if tail else message

    def _stderr_tail(self) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-_STDERR_TAIL:].strip()


@dataclass
class MCPCallResult:
    """A tool call's result: ``ok`` is False when the server flagged it ``isError``; ``images`` are the files
    written for its image content."""

    ok: bool
    images: list[str] = field(default_factory=list)
    raw: Any = None


class MCPTool(BaseTool):
    """A tool of an MCP server: its name (renamed only on a clash), description and ``inputSchema``."""

    def __init__(self, connection: MCPServerConnection, spec: Any, *, name: str, image_dir: Path) -> None:
        self.name = name  # instance attributes: each MCP tool is its own declaration
        self.name_for_human = spec.title or spec.name
        self.description = spec.description or ""
        self.parameters = _object_schema(spec.input_schema)
        super().__init__()
        self.remote_name = spec.name
        self.connection = connection
        self.image_dir = image_dir

    def _run(self, arguments: dict[str, Any]) -> tuple[str, MCPCallResult]:
        try:
            result = self.connection.call(self.remote_name, arguments)
        except ToolError as exc:  # a deadline or a dead server: the message says it all, no traceback
            return f"Error: {exc}", MCPCallResult(False)
        return self._observation(result)

    async def _arun(self, arguments: dict[str, Any]) -> tuple[str, MCPCallResult]:
        try:
            result = await self.connection.acall(self.remote_name, arguments)
        except ToolError as exc:
            return f"Error: {exc}", MCPCallResult(False)
        return self._observation(result)

    def _observation(self, result: Any) -> tuple[str, MCPCallResult]:
        parts, images = [], []
        for item in result.content:
            kind = getattr(item, "type", "")
            if kind == "text":
                parts.append(item.text)
            elif kind in ("image", "audio"):
                images.append(self._save(item.data, item.mime_type))
                parts.append(f"![{kind}-{len(images)}]({images[-1]})")
            elif kind == "resource_link":
                parts.append(f"[resource: {item.name}]({item.uri})")
            elif kind == "resource":
                resource = item.resource
                text = getattr(resource, "text", None)
                parts.append(
                    text if text is not None else f"[resource: {resource.uri} ({resource.mime_type})]"
                )
        if not parts and result.structured_content is not None:
            parts.append(json.dumps(result.structured_content, ensure_ascii=False))
        observation = "\n\n".join(parts) or "(no content)"
        if result.is_error:
            observation = f"Error: tool '{self.name}' reported an error:\n{observation}"
        return observation, MCPCallResult(not result.is_error, images, result)

    def call(self, arguments: dict[str, Any]) -> str:
        return self._run(arguments)[0]

    def _save(self, data: str, mime_type: str) -> str:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        suffix = "." + (mime_type.split("/")[-1].split("+")[0] or "bin")
        fd, path = tempfile.mkstemp(prefix=f"mcp-{self.connection.name}-", suffix=suffix, dir=self.image_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64decode(data))
        return path


def _object_schema(schema: Any) -> dict[str, Any]:
    """An ``inputSchema`` as a tool's parameters (MCP allows an object schema without ``properties``)."""
    schema = dict(schema or {})
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return schema


def tool_name(server: str, tool: str, taken: set[str]) -> str:
    """The registry name for ``tool`` of ``server``: its own name, made identifier-like where it is not, and
    prefixed with the server's name only when that name is taken."""
    name = _NAME_CHARS.sub("_", tool)
    if not re.match(r"[A-Za-z_]", name):
        name = "_" + name
    if name in taken:
        name = f"{_NAME_CHARS.sub('_', server)}_{name}"
    return name


def _reason(exc: BaseException) -> str:
    group = getattr(exc, "exceptions", None)  # an ExceptionGroup from the SDK's task groups
    if group:
        return "; ".join(_reason(e) for e in group)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
