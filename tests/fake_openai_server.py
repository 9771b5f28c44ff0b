"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 for client, agent and CLI tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = Callable[[BaseHTTPRequestHandler], None]


class FakeServer:
    """An HTTP server on 127.0.0.1 that answers each request with the next scripted reply and records requests."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[tuple[str, str, dict | None, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append((self.command, self.path, body, dict(self.headers)))
                reply = (
                    server.replies.pop(0) if server.replies else json_reply(500, {"error": "no reply left"})
                )
                reply(self)

            do_GET = do_POST = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def json_reply(status: int, body, headers: dict | None = None, delay: float = 0.0) -> Reply:
    def reply(h: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    return reply


def raw_reply(data: bytes, stall: float = 0.0) -> Reply:
    """Exactly ``data`` on the socket (status line and headers included), then ``stall`` seconds, then close."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        try:
            h.wfile.write(data)
            h.wfile.flush()
            time.sleep(stall)
        except (BrokenPipeError, ConnectionResetError):
            pass
        h.close_connection = True

    return reply


def json_head(length: int, extra: str = "") -> bytes:
    """The status line and headers of a 200 JSON answer that declares ``length`` body bytes."""
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def sse_reply(events: list, stall_after: int | None = None, stall: float = 0.0, done: bool = True) -> Reply:
    """Server-sent events, one write per event; optionally stall before event ``stall_after``; ``done=False``
    closes the stream without ``data: [DONE]``."""

    def reply(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        try:
            h.wfile.write(b": keep-alive comment\n\n")
            for i, event in enumerate(events):
                if i == stall_after:
                    time.sleep(stall)
                payload = event if isinstance(event, str) else json.dumps(event)
                h.wfile.write(f"data: {payload}\n\n".encode())
                h.wfile.flush()
            if done:
                h.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        h.close_connection = True

    return reply
