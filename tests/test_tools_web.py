"""web_fetch against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen_agent.tools import WebFetchTool, html_to_text

PAGE = """<!DOCTYPE html><html><head><title>Qwen  Page</title><style>body{color:red}</style>
<script>var secret = 1;</script></head><body><h1>Hello</h1><p>First &amp; second
paragraph.</p><ul><li>one</li><li>two</li></ul><noscript>enable js</noscript></body></html>"""


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body: bytes, content_type="text/html; charset=utf-8", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/page":
            self._send(200, PAGE.encode())
        elif self.path == "/plain":
            self._send(200, "ünïcode text".encode(), "text/plain; charset=utf-8")
        elif self.path == "/big":
            self._send(200, b"x" * 100_000, "text/plain")
        elif self.path == "/missing":
            self._send(404, b"nope", "text/plain")
        elif self.path == "/loop":
            self._send(302, b"", extra=[("Location", "/loop")])
        elif self.path == "/hop":
            self._send(301, b"", extra=[("Location", "/plain")])
        elif self.path == "/image":
            self._send(200, b"\x89PNG....", "image/png")
        elif self.path == "/slow":
            time.sleep(2)
            self._send(200, b"late", "text/plain")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the client hung up on /slow on purpose


@pytest.fixture(scope="module")
def base_url():
    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fetch():
    t = WebFetchTool(timeout=0.5, max_bytes=10_000, max_redirects=3, max_chars=5000)
    yield t
    t.session.close()


def test_html_is_reduced_to_visible_text(fetch, base_url):
    res = fetch.invoke({"url": f"{base_url}/page"})
    assert res.ok
    assert res.observation == (
        f"URL: {base_url}/page\nTitle: Qwen Page\n\nHello\nFirst & second paragraph.\none\ntwo"
    )
    assert html_to_text("<p>a<script>b</script>c</p>") == ("", "ac")
    assert html_to_text("<pre>x = 1\ny = 2</pre>") == ("", "x = 1\ny = 2")


def test_plain_text_redirect_and_bare_url(fetch, base_url):
    assert fetch.invoke(f"{base_url}/hop").observation == f"URL: {base_url}/plain\n\nünïcode text"


def test_size_cap(fetch, base_url):
    obs = fetch.invoke({"url": f"{base_url}/big"}).observation
    assert "download stopped at the size cap" in obs
    assert "[5000 more characters not shown]" in obs


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing", "Error: HTTP 404 Not Found for {base}/missing"),
        ("/loop", "Error: more than 3 redirects fetching {base}/loop"),
        ("/slow", "Error: no response from {base}/slow within 0.5 s"),
        ("/image", "Error: {base}/image returned image/png, not text (8 bytes read)"),
    ],
)
def test_http_failures_are_clear_observations(fetch, base_url, path, message):
    res = fetch.invoke({"url": base_url + path})
    assert res.observation == message.format(base=base_url)


def test_connection_refused_and_dns_failure(fetch, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    obs = fetch.invoke({"url": f"http://127.0.0.1:{port}/"}).observation
    assert obs.startswith(f"Error: could not connect to http://127.0.0.1:{port}/ (") and "refused" in obs

    def no_dns(host, *args, **kwargs):  # the resolver's answer for an unknown name, without a network lookup
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    obs = fetch.invoke({"url": "http://no-such-host.invalid/"}).observation
    assert obs == "Error: could not resolve the host name of http://no-such-host.invalid/ (DNS lookup failed)"


def test_bad_urls_are_argument_errors(fetch):
    res = fetch.invoke({"url": "ftp://example.com"})
    assert (
        res.error_kind == "invalid_arguments"
        and "'url' must start with http:// or https://" in res.observation
    )
    assert fetch.invoke("{}").error.endswith("missing required argument 'url'")
