"""The tool examples of docs/tools.md run as written (the search API against a local stand-in server)."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "tools.md").read_text()


def _block(after: str) -> str:
    start = GUIDE.index(after)
    return re.search(r"```python\n(.*?)^```", GUIDE[start:], re.S | re.M).group(1)


class FakeSearchAPI(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        assert q["api_key"] == ["test-key"]
        results = [{"title": f"{q['q'][0]} {i}", "snippet": "s", "link": f"http://r/{i}"} for i in range(5)]
        body = json.dumps({"organic_results": results}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def search_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSearchAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/search"
    server.shutdown()
    server.server_close()


def test_readme_quick_example_runs(capsys):
    exec(compile(_block("# Tools and the sandboxed code interpreter"), "docs/tools.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("add: Call this tool to interact with the add API.")
    assert out[1:] == [
        "3",
        "Error: invalid arguments for tool 'add': 'a' must be an integer",
        "stdout:",
        "",
        "```",
        "42",
        "```",
    ]


def test_readme_api_tool_examples(search_api, monkeypatch, capsys):
    monkeypatch.delenv("SEARCH_API_KEY", raising=False)
    namespace: dict = {}
    exec(compile(_block("<!-- tools-example:start -->"), "docs/tools.md", "exec"), namespace)
    assert (
        capsys.readouterr().out
        == '{"image_url": "https://image.pollinations.ai/prompt/a%20cat%20on%20the%20moon"}\n'
    )
    my_tools = namespace["my_tools"]
    assert my_tools.names() == ["code_interpreter", "current_time", "web_search", "image_gen"]
    assert "web_search" not in namespace["default_registry"]

    unconfigured = my_tools.get("web_search")
    assert unconfigured.invoke('{"query": "qwen"}').observation == (
        "Error: web_search is not configured (set SEARCH_API_KEY)"
    )
    search = namespace["WebSearch"](endpoint=search_api, api_key="test-key")
    assert search.invoke("{'query': 'qwen', 'count': 2}").observation == (
        "qwen 0: s (http://r/0)\nqwen 1: s (http://r/1)"
    )
    assert search.invoke('{"query": "qwen", "count": "2"}').error_kind == "invalid_arguments"
    assert "image_gen: Call this tool" in my_tools.get("image_gen").tool_desc()
    my_tools.close()


def test_readme_interpreter_example_runs(capsys):
    exec(compile(_block("## The code interpreter"), "docs/tools.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("45\n ")
    assert re.search(r"^!\[fig-001\]\(/.+/fig-001\.png\)$", out, re.M)
    assert out.splitlines()[-1].startswith("{'process_group': True")
