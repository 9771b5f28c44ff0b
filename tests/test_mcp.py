"""MCP client: tools of real MCP servers (the SDK's MCPServer in tests/mcp_test_server.py, over stdio and HTTP, and
the published mcp-server-time) in the registry, the ReAct prompt and the agent loop; faults and process lifetime."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from qwen_agent.agent import Agent  # noqa: E402
from qwen_agent.errors import ConfigError, ToolError  # noqa: E402
from qwen_agent.llm import ScriptedLLM  # noqa: E402
from qwen_agent.runtime.tiny import write_tiny_checkpoint  # noqa: E402
from qwen_agent.tools import ToolRegistry  # noqa: E402
from qwen_agent.tools.mcp import read_mcp_config  # noqa: E402

SERVER = str(Path(__file__).with_name("mcp_test_server.py"))
ROOT = Path(__file__).resolve().parents[1]


def stdio_config(tag: str = "", *extra: str, timeout: float = 10, **entry) -> dict:
    args = [SERVER, "--tag", tag or uuid.uuid4().hex, *extra]
    return {"mcpServers": {"t": {"command": sys.executable, "args": args, "timeout": timeout, **entry}}}


def processes_tagged(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                status = (entry / "status").read_text()
            except OSError:
                continue
            if tag.encode() in cmdline and "\nState:\tZ" not in status:
                found.append(int(entry.name))
    return found


def wait_until_gone(tag: str, seconds: float = 15) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def registry():
    registry = ToolRegistry.from_mcp(stdio_config(env={"SECRET_X": "configured"}, timeout=3))
    yield registry
    registry.close()


# ---- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, '"mcpServers" object'),
        ({"mcpServers": {"a": {}}}, "mcpServers.a: give exactly one of 'command'"),
        ({"mcpServers": {"a": {"command": "x", "url": "http://h"}}}, "exactly one"),
        (
            {"mcpServers": {"a": {"command": "x", "args": "--flag"}}},
            "mcpServers.a.args: expected a list of strings",
        ),
        ({"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}, "mcpServers.a.env: expected an object"),
        ({"mcpServers": {"a": {"url": "ftp://h"}}}, "mcpServers.a.url: expected an http"),
        ({"mcpServers": {"a": {"command": "x", "tiemout": 3}}}, "mcpServers.a.tiemout: unknown field"),
        ({"mcpServers": {"a": {"command": "x", "timeout": 0}}}, "mcpServers.a.timeout: expected a positive"),
    ],
)
def test_a_malformed_config_names_the_field(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_mcp_config(config)


def test_a_config_file_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {\n  "a": {"command": "x",}\n}}')
    with pytest.raises(ConfigError, match=rf"{path}: not valid JSON at line 2"):
        read_mcp_config(path)
    path.write_text(
        json.dumps({"mcpServers": {"a": {"command": "x"}, "b": {"command": "y", "disabled": True}}})
    )
    assert [server.name for server in read_mcp_config(path)] == ["a"]


# ---- tools in the registry and the prompt ----------------------------------------------------------------------
def test_tools_are_listed_and_rendered_in_qwen_form(registry):
    assert {"add", "draw", "broken", "hang", "crash", "getenv"} <= set(registry.names())
    assert registry.get("add").tool_desc() == (
        "add: Call this tool to interact with the add API. What is the add API useful for? Add two integers. "
        'Parameters: [{"name": "a", "description": "", "required": true, "schema": {"type": "integer"}}, '
        '{"name": "b", "description": "", "required": true, "schema": {"type": "integer"}}] '
        "Format the arguments as a JSON object."
    )


def test_the_agent_calls_an_mcp_tool_and_sees_its_result(registry):
    llm = ScriptedLLM(
        [
            'Thought: add them\nAction: add\nAction Input: {"a": 2, "b": 40}',
            "Thought: I know\nFinal Answer: 42",
        ]
    )
    result = Agent(llm, registry.select(["add"])).run("2 + 40?")
    assert result.answer == "42"
    assert result.steps[0].observation == "42"
    assert llm.calls[1][0].assistant_prefix.endswith("Observation: 42\nThought:")


def test_arguments_are_validated_against_the_input_schema(registry):
    result = registry.get("add").invoke('{"a": 1, "b": "two"}')
    assert not result.ok and result.error_kind == "invalid_arguments"
    assert "'b' must be an integer" in result.observation


def test_images_are_saved_and_shown_like_figures(tmp_path):
    registry = ToolRegistry.from_mcp(stdio_config(), image_dir=tmp_path / "run")
    try:
        result = registry.get("draw").invoke("{}")
    finally:
        registry.close()
    assert result.ok, result.observation
    [image] = result.data.images
    assert Path(image).parent == tmp_path / "run" and Path(image).read_bytes().startswith(b"\x89PNG")
    assert result.observation == f"a red dot\n\n![image-1]({image})"


def test_an_error_result_is_a_failed_observation(registry):
    result = registry.get("broken").invoke('{"reason": "x"}')
    assert not result.ok and result.error_kind == "tool_error"
    assert result.observation.startswith("Error: tool 'broken' reported an error:")


def test_the_server_environment_holds_only_what_is_configured(registry, monkeypatch):
    assert registry.get("getenv").invoke('{"name": "SECRET_X"}').observation == "configured"
    # a variable of the host (set before the server started, as OPENAI_API_KEY would be) does not reach it
    assert "OPENAI_API_KEY" not in registry.get("getenv").invoke('{"name": "OPENAI_API_KEY"}').observation
    assert registry.get("getenv").invoke('{"name": "PYTEST_CURRENT_TEST"}').observation == "<unset>"


def test_a_clashing_name_is_prefixed_with_the_server_name():
    registry = ToolRegistry()
    registry.register(registry_tool_named("add"))
    renamed = registry.add_mcp(stdio_config())
    try:
        assert renamed == ["MCP server 't': tool 'add' registered as 't_add'"]
        assert registry.get("t_add").invoke('{"a": 1, "b": 2}').observation == "3"
        assert registry.get("draw").name == "draw"  # only the clashing tool is renamed
    finally:
        registry.close()


def registry_tool_named(name: str):
    from qwen_agent.tools import tool

    @tool(name=name, register=False)
    def local(x: int) -> int:
        """A local tool."""
        return x

    return local


# ---- faults ----------------------------------------------------------------------------------------------------
def test_a_call_that_hangs_ends_at_the_deadline_and_the_server_stays_usable(registry):
    started = time.monotonic()
    result = registry.get("hang").invoke("{}")
    assert time.monotonic() - started < 3 + 5
    assert (
        not result.ok and result.observation == "Error: MCP server 't': tool 'hang' did not answer within 3 s"
    )
    assert registry.get("add").invoke('{"a": 1, "b": 1}').observation == "2"


def test_a_server_that_crashes_is_restarted_once():
    tag = uuid.uuid4().hex
    registry = ToolRegistry.from_mcp(stdio_config(tag))
    try:
        first = registry.get("crash").invoke("{}")
        assert not first.ok and "stopped during the call to 'crash'" in first.observation
        assert "it was restarted" in first.observation
        assert registry.get("add").invoke('{"a": 2, "b": 2}').observation == "4"
        second = registry.get("crash").invoke("{}")
        assert "restarted once already and is not restarted again" in second.observation
        assert registry.get("add").invoke('{"a": 2, "b": 2}').observation.startswith("Error: MCP server 't'")
    finally:
        registry.close()
    assert wait_until_gone(tag) == []


def test_a_server_that_never_starts_is_a_clear_error(tmp_path):
    registry = ToolRegistry()
    with pytest.raises(ToolError) as raised:
        registry.add_mcp(stdio_config("", "--fail-start"))
    message = str(raised.value)
    assert message.startswith("MCP server 't' (") and "failed to start" in message
    assert "cannot open its database (refusing to start)" in message  # the stderr tail
    assert registry.names() == []
    with pytest.raises(ToolError, match="command 'no-such-mcp-server' not found on PATH"):
        ToolRegistry.from_mcp({"mcpServers": {"x": {"command": "no-such-mcp-server"}}})


def test_a_failing_server_stops_the_ones_started_before_it():
    tag = uuid.uuid4().hex
    config = stdio_config(tag)
    config["mcpServers"]["bad"] = {"command": sys.executable, "args": [SERVER, "--fail-start"]}
    registry = ToolRegistry()
    with pytest.raises(ToolError, match="MCP server 'bad'"):
        registry.add_mcp(config)
    assert registry.names() == [] and wait_until_gone(tag) == []


# ---- lifetime --------------------------------------------------------------------------------------------------
def test_close_leaves_no_process_behind_not_even_a_child_of_the_server():
    tag = uuid.uuid4().hex
    registry = ToolRegistry.from_mcp(stdio_config(tag))
    assert registry.get("spawn").invoke("{}").ok
    assert len(processes_tagged(tag)) >= 2  # the server and the child it forked
    registry.close()
    assert wait_until_gone(tag) == []


HOST = textwrap.dedent(
    """
    import sys
    from qwen_agent.tools import ToolRegistry
    registry = ToolRegistry.from_mcp({"mcpServers": {"t": {"command": sys.executable, "args": sys.argv[1:]}}})
    assert registry.get("spawn").invoke("{}").ok
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("as_user", [False, True], ids=["root", "user-namespace"])
def test_no_process_outlives_a_host_killed_with_sigkill(as_user):
    # as uid 1000 in a user namespace, the host takes the non-root path (its own user namespace for the server)
    prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"] if as_user else []
    if as_user and subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not permitted here")
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [*prefix, sys.executable, "-c", HOST, SERVER, "--tag", tag]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True) as host:
        try:
            assert host.stdout.readline().strip() == "ready"
            assert len(processes_tagged(tag)) >= 2
            os.kill(host.pid, signal.SIGKILL)
            host.wait(10)
            assert wait_until_gone(tag) == []
        finally:
            host.kill()


# ---- other transports and a published server -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_streamable_http_server_with_headers():
    port = free_port()
    server = subprocess.Popen([sys.executable, SERVER, "--http", str(port)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        config = {"mcpServers": {"web": {"url": f"http://127.0.0.1:{port}/mcp", "headers": {"X-Test": "1"}}}}
        registry = ToolRegistry.from_mcp(config)
        try:
            assert registry.get("add").invoke('{"a": 20, "b": 22}').observation == "42"
        finally:
            registry.close()
    finally:
        server.terminate()
        server.wait(10)


def test_the_published_time_server():
    pytest.importorskip("mcp_server_time")
    config = {"mcpServers": {"time": {"command": sys.executable, "args": ["-m", "mcp_server_time"]}}}
    registry = ToolRegistry.from_mcp(config)
    try:
        assert "get_current_time" in registry.names()
        assert "timezone" in registry.get("get_current_time").tool_desc()
        result = registry.get("get_current_time").invoke('{"timezone": "Asia/Shanghai"}')
        assert result.ok and "Asia/Shanghai" in result.observation, result.observation
        bad = registry.get("get_current_time").invoke('{"timezone": "Mars/Olympus"}')
        assert not bad.ok and "Mars/Olympus" in bad.observation
    finally:
        registry.close()


# ---- the command line ------------------------------------------------------------------------------------------
def test_run_takes_the_tools_of_an_mcp_config(tmp_path):
    from qwen_agent.cli import build_parser
    from qwen_agent.cli.run import tool_registry

    path = tmp_path / "mcp.json"
    path.write_text(json.dumps(stdio_config()))
    args = build_parser().parse_args(
        ["run", "q", "--model", "m", "--tools", "current_time", "--mcp", str(path)]
    )
    tools = tool_registry(args)
    try:
        assert tools.names()[0] == "current_time" and "add" in tools.names()
    finally:
        tools.close()
    only_mcp = tool_registry(
        build_parser().parse_args(["run", "q", "--model", "m", "--tools", "", "--mcp", str(path)])
    )
    try:
        assert "current_time" not in only_mcp.names() and "add" in only_mcp.names()
    finally:
        only_mcp.close()


def test_a_bad_mcp_config_is_a_one_line_error(tmp_path):
    path = tmp_path / "mcp.json"
    path.write_text('{"mcpServers": {"a": {"command": "x", "args": "y"}}}')
    model = write_tiny_checkpoint(tmp_path / "model", "qwen", seq_length=64)
    done = subprocess.run(
        [sys.executable, "-m", "qwen_agent.cli", "run", "q", "--model", str(model), "--mcp", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2
    assert (
        done.stderr
        == f"qwen-agent run: error: {path}: mcpServers.a.args: expected a list of strings, got 'y'\n"
    )


def test_web_sessions_share_the_mcp_servers_tools():
    from qwen_agent.serve.web_session import SessionPool, Settings, TurnEnded
    from qwen_agent.tools import default_registry

    registry = default_registry.select(["current_time"])
    registry.add_mcp(stdio_config())
    outputs = [
        'Thought: add\nAction: add\nAction Input: {"a": 2, "b": 3}',
        "Thought: done\nFinal Answer: 5",
    ] * 2
    pool = SessionPool(lambda: ScriptedLLM(list(outputs)), ["current_time", "add"], registry=registry)
    try:
        for tab in ("tab-1", "tab-2"):
            events, items = pool.get(tab).start_turn("2 + 3?", Settings(tools=("add",))), []
            while not items or not isinstance(items[-1], TurnEnded):
                items.append(events.get(timeout=60))
            assert items[-1] == TurnEnded("done")
            assert [getattr(item, "observation", None) for item in items if hasattr(item, "observation")] == [
                "5"
            ]
    finally:
        pool.close_all()
        registry.close()
