"""``qwen-agent mcp``: the sandboxed code interpreter as an MCP server, driven by the official ``mcp`` client
over stdio and streamable HTTP."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from qwen_agent.errors import ConfigError  # noqa: E402
from qwen_agent.serve.mcp_server import build_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"


def stdio_server(*extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "qwen_agent.cli", "mcp", *extra], env={"PYTHONPATH": str(ROOT)}
    )


def text_of(result) -> str:
    return "".join(item.text for item in result.content if item.type == "text")


async def one_session(server, codes: list[str]) -> list:
    async with Client(server) as client:
        return [await client.call_tool("code_interpreter", {"code": code}) for code in codes]


def test_code_runs_and_figures_come_back_as_png():
    async def main():
        async with Client(stdio_server()) as client:
            listed = await client.list_tools()
            assert [tool.name for tool in listed.tools] == ["code_interpreter"]
            assert listed.tools[0].input_schema["required"] == ["code"]
            printed = await client.call_tool("code_interpreter", {"code": "x = 6 * 7\nprint(x)"})
            plotted = await client.call_tool("code_interpreter", {"code": PLOT})
            failed = await client.call_tool("code_interpreter", {"code": "1 / 0"})
            bad = await client.call_tool("code_interpreter", {"cod": "1"})
            return printed, plotted, failed, bad

    printed, plotted, failed, bad = asyncio.run(main())
    assert not printed.is_error and "stdout:\n\n```\n42\n```" in text_of(printed)
    [image] = [item for item in plotted.content if item.type == "image"]
    assert image.mime_type == "image/png" and base64.b64decode(image.data).startswith(b"\x89PNG")
    assert failed.is_error and "ZeroDivisionError" in text_of(failed)
    assert bad.is_error and "missing required argument 'code'" in text_of(bad)


def test_variables_persist_within_a_session_and_not_across_sessions():
    first = asyncio.run(one_session(stdio_server(), ["secret = 'kept'", "print(secret)"]))
    second = asyncio.run(one_session(stdio_server(), ["print(secret)"]))
    assert "kept" in text_of(first[1])
    assert second[0].is_error and "NameError" in text_of(second[0])


def test_http_sessions_have_a_kernel_each():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "qwen_agent.cli",
        "mcp",
        "--http",
        "--port",
        str(port),
        "--tools",
        "code_interpreter,current_time",
    ]
    with subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL
    ) as server:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.2)
            url = f"http://127.0.0.1:{port}/mcp"

            async def main():
                # MCP sessions: the initialize handshake (a stateless request gets a fresh kernel)
                async with Client(url, mode="legacy") as a, Client(url, mode="legacy") as b:
                    names = [tool.name for tool in (await a.list_tools()).tools]
                    await a.call_tool("code_interpreter", {"code": "who = 'a'"})
                    await b.call_tool("code_interpreter", {"code": "who = 'b'"})
                    seen = [await c.call_tool("code_interpreter", {"code": "print(who)"}) for c in (a, b)]
                    return names, seen

            names, (seen_a, seen_b) = asyncio.run(main())
        finally:
            server.terminate()
            server.wait(30)
    assert names == ["code_interpreter", "current_time"]
    assert "```\na\n```" in text_of(seen_a) and "```\nb\n```" in text_of(seen_b)


def test_an_unknown_tool_is_a_clear_error():
    with pytest.raises(
        ConfigError, match="--tools: no tool named 'shell'; available tools: code_interpreter"
    ):
        build_server(["code_interpreter", "shell"])
