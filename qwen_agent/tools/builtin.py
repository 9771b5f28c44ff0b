"""The built-in tools: ``code_interpreter``, ``web_fetch`` and ``current_time``."""

from __future__ import annotations

import asyncio
import datetime as dt
import html.parser
import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import requests

from ..errors import ToolArgumentError
from .base import BaseTool
from .interpreter import CodeInterpreter, ExecutionResult, Executor

__all__ = ["BUILTIN_TOOLS", "CodeInterpreterTool", "WebFetchTool", "CurrentTimeTool", "html_to_text"]


class CodeInterpreterTool(BaseTool):
    """Runs Python in a sandboxed Jupyter kernel; name and description as in Qwen's code-interpreter benchmark.

    The kernel starts on the first call, or at once with :meth:`start`; pass ``interpreter=`` to share a
    configured :class:`CodeInterpreter` (or any Executor), or keyword arguments to configure a new one.
    """

    name = "code_interpreter"
    name_for_human = "代码解释器"
    description = "代码解释器，可用于执行Python代码。"
    parameters = {
        "type": "object",
        "properties": {"code": {"type": "string", "description": "待执行的代码"}},
        "required": ["code"],
    }
    args_format = "code"

    def __init__(self, interpreter: Executor | None = None, **interpreter_kwargs: Any) -> None:
        super().__init__()
        self._interpreter = interpreter
        self._kwargs = interpreter_kwargs

    @property
    def interpreter(self) -> Executor | None:
        """The running interpreter, or None before the first call (and after close)."""
        return self._interpreter

    def start(self) -> Executor:
        if self._interpreter is None:
            self._interpreter = CodeInterpreter(**self._kwargs)
        return self._interpreter

    def _run(self, arguments: dict[str, Any]) -> tuple[str, ExecutionResult]:
        result = self.start().run(arguments["code"])
        return result.to_observation(), result

    async def _arun(self, arguments: dict[str, Any]) -> tuple[str, ExecutionResult]:
        """The cell runs on a worker thread; if the awaiting task is cancelled, the cell is interrupted (its
        variables stay) and the cancellation goes on once the kernel is free again."""
        interpreter = await asyncio.to_thread(self.start)
        cell = asyncio.ensure_future(asyncio.to_thread(interpreter.run, arguments["code"]))
        try:
            result = await asyncio.shield(cell)
        except asyncio.CancelledError:
            interrupt = getattr(interpreter, "interrupt", None)
            while interrupt is not None and not cell.done():
                interrupt()  # False while the kernel is still starting: try again
                await asyncio.wait({cell}, timeout=0.2)
            raise
        return result.to_observation(), result

    def call(self, arguments: dict[str, Any]) -> str:
        return self._run(arguments)[0]

    def close(self) -> None:
        if self._interpreter is not None:
            self._interpreter.close()
            self._interpreter = None


class _TextExtractor(html.parser.HTMLParser):
    _SKIP = frozenset("script style noscript template svg head".split())
    _BLOCK = frozenset(
        "p div br li tr h1 h2 h3 h4 h5 h6 section article pre table ul ol header footer title "
        "blockquote".split()
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._pre = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self._SKIP:
            self._skip += 1
        if tag == "title":
            self._in_title = True
        if tag == "pre":
            self._pre += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip:
            self._skip -= 1
        if tag == "title":
            self._in_title = False
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            # outside <pre>, line breaks in the markup are just spaces
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> tuple[str, str]:
    """``(title, visible text)`` of an HTML page: scripts and styles dropped, whitespace collapsed."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in "".join(parser.parts).split("\n"))
    return " ".join(parser.title.split()), "\n".join(ln for ln in lines if ln)


class WebFetchTool(BaseTool):
    """HTTP GET a URL and return its text (HTML reduced to visible text), capped in size and time."""

    name = "web_fetch"
    name_for_human = "Web Fetch"
    description = (
        "Fetch a web page or text file by URL and return its readable text. Use it to read a page "
        "whose address you know."
    )
    parameters = {
        "type": "object",
        "properties": {"url": {"type": "string", "description": "http or https URL"}},
        "required": ["url"],
    }

    def __init__(
        self,
        timeout: float = 10.0,
        max_bytes: int = 2_000_000,
        max_redirects: int = 5,
        max_chars: int = 8000,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__()
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_chars = max_chars
        self.session = session or requests.Session()
        self.session.max_redirects = max_redirects
        self.session.headers.setdefault("User-Agent", "qwen-agent-web-fetch/0.1")

    def parse_arguments(self, raw: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(raw, str) and re.fullmatch(r"\s*https?://\S+\s*", raw):
            raw = {"url": raw.strip()}  # a bare URL is a common Action Input
        args = super().parse_arguments(raw)
        if not re.match(r"https?://[^/\s]+", args["url"]):
            raise ToolArgumentError("'url' must start with http:// or https:// and name a host")
        return args

    def call(self, arguments: dict[str, Any]) -> str:
        url = arguments["url"]
        try:
            with self.session.get(url, timeout=self.timeout, stream=True) as resp:
                if resp.status_code >= 400:
                    return f"Error: HTTP {resp.status_code} {resp.reason} for {url}"
                body, clipped = self._read_capped(resp)
                content_type = resp.headers.get("Content-Type", "")
                encoding = resp.encoding or "utf-8"
                final_url = resp.url
        except requests.exceptions.TooManyRedirects:
            return f"Error: more than {self.session.max_redirects} redirects fetching {url}"
        except requests.exceptions.Timeout:
            return f"Error: no response from {url} within {self.timeout:g} s"
        except requests.exceptions.ConnectionError as exc:
            text = str(exc)
            if any(
                s in text
                for s in (
                    "Name or service not known",
                    "nodename nor servname",
                    "getaddrinfo failed",
                    "Temporary failure in name resolution",
                    "No address associated",
                )
            ):
                return f"Error: could not resolve the host name of {url} (DNS lookup failed)"
            return f"Error: could not connect to {url} ({_reason(text)})"
        except requests.exceptions.RequestException as exc:
            return f"Error: request to {url} failed ({_reason(str(exc))})"
        if not (
            content_type.startswith("text/")
            or "json" in content_type
            or "xml" in content_type
            or not content_type
        ):
            return (
                f"Error: {final_url} returned {content_type.split(';')[0]}, not text ({len(body)} bytes read)"
            )
        text = body.decode(encoding, errors="replace")
        title = ""
        if "html" in content_type or text.lstrip()[:15].lower().startswith(("<!doctype html", "<html")):
            title, text = html_to_text(text)
        if len(text) > self.max_chars:
            text = text[: self.max_chars] + f"\n...[{len(text) - self.max_chars} more characters not shown]"
        notes = " (download stopped at the size cap)" if clipped else ""
        header = f"URL: {final_url}{notes}\n" + (f"Title: {title}\n" if title else "")
        return header + "\n" + text

    def _read_capped(self, resp: requests.Response) -> tuple[bytes, bool]:
        chunks, size = [], 0
        for chunk in resp.iter_content(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size >= self.max_bytes:
                return b"".join(chunks)[: self.max_bytes], True
        return b"".join(chunks), False


def _reason(text: str) -> str:
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text.split(":")[-1].strip()[:100]


class CurrentTimeTool(BaseTool):
    """The current date and time, in UTC or a named IANA time zone."""

    name = "current_time"
    name_for_human = "Current Time"
    description = (
        "Get the current date, time and weekday. Use it whenever the answer depends on today's date."
    )
    parameters = {
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "IANA time zone such as 'Asia/Shanghai' or 'UTC'",
                "default": "UTC",
            }
        },
        "required": [],
    }

    def __init__(self, clock: Any = None) -> None:
        super().__init__()
        self._clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))

    def parse_arguments(self, raw: str | dict[str, Any]) -> dict[str, Any]:
        args = super().parse_arguments(raw)
        try:
            args["timezone"] = ZoneInfo(args.get("timezone") or "UTC")
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolArgumentError(
                f"unknown time zone '{args['timezone']}'; use an IANA name such as 'Asia/Shanghai'"
            ) from None
        return args

    def call(self, arguments: dict[str, Any]) -> str:
        zone = arguments.get("timezone") or ZoneInfo("UTC")
        if isinstance(zone, str):
            zone = ZoneInfo(zone)
        now = self._clock().astimezone(zone)
        return f"{now:%Y-%m-%d %H:%M:%S} {now.tzname()} ({now:%A}), time zone {zone.key}"


# registered in the default registry, in this order, the first time it is used
BUILTIN_TOOLS: tuple[type[BaseTool], ...] = (CodeInterpreterTool, WebFetchTool, CurrentTimeTool)
