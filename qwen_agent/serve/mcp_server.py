"""``qwen-agent mcp``: this package's tools, the sandboxed code interpreter first, as a Model Context Protocol server.

Any MCP client (a desktop assistant, an IDE agent, another framework) can then run code in our sandboxed Jupyter
kernel. Each client gets tool instances of its own, so a kernel of its own: variables persist between its calls and
are never seen by another client. Over stdio the client is the one that started the process, and the kernel lives
as long as the process. Over HTTP a client that opens an MCP session (the ``initialize`` handshake) keeps one
kernel for the session, closed when the session ends; a stateless request (protocol 2026-07-28 without a session)
runs in a fresh kernel. Figures the code draws come back as PNG image content next to the text output.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ..errors import ConfigError
from ..tools.registry import ToolRegistry, default_registry

__all__ = ["DEFAULT_TOOLS", "build_server", "serve_stdio", "serve_http"]

DEFAULT_TOOLS = ("code_interpreter",)
_STATE_KEY = "qwen_agent.tools"


def build_server(
    tool_names: Sequence[str] = DEFAULT_TOOLS,
    registry: ToolRegistry | None = None,
    *,
    shared: ToolRegistry | None = None,
) -> Any:
    """A low-level ``mcp`` Server offering ``tool_names`` of ``registry`` (the default registry). Calls run on
    ``shared`` when given (one client: stdio), else on tool instances made for each connection."""
    import mcp_types as types
    from mcp.server.lowlevel import Server

    source = registry if registry is not None else default_registry
    unknown = [name for name in tool_names if name not in source]
    if unknown:
        raise ConfigError(
            f"--tools: no tool named {unknown[0]!r}; available tools: {', '.join(source.names())}"
        )
    catalogue = source.select(tool_names)  # for the listing only; calls run on the connection's own instances
    listing = types.ListToolsResult(
        tools=[
            types.Tool(name=tool.name, description=_description(tool), input_schema=tool.schema)
            for tool in catalogue.tools()
        ]
    )
    catalogue.close()

    async def list_tools(ctx: Any, params: Any) -> Any:
        return listing

    async def call_tool(ctx: Any, params: Any) -> Any:
        tools = shared if shared is not None else _connection_tools(ctx, source, tool_names)
        if params.name not in tools:
            message = f"no tool named {params.name!r}; available tools: {', '.join(tools.names())}"
            return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)
        tool = tools.get(params.name)
        # tool calls block (a kernel runs the code): off the event loop, so other connections are served meanwhile
        result = await anyio.to_thread.run_sync(tool.invoke, dict(params.arguments or {}))
        content: list[Any] = [types.TextContent(type="text", text=result.observation)]
        for image in getattr(result.data, "images", []):
            data = base64.b64encode(Path(image).read_bytes()).decode("ascii")
            content.append(types.ImageContent(type="image", data=data, mime_type="image/png"))
        return types.CallToolResult(content=content, is_error=not result.ok)

    return Server("qwen-agent", on_list_tools=list_tools, on_call_tool=call_tool)


def _description(tool: Any) -> str:
    if (
        tool.name == "code_interpreter"
    ):  # the declared text is Qwen's terse Chinese one; MCP clients need more
        return (
            "Run Python code in a sandboxed Jupyter kernel. Variables persist between the calls of this "
            "connection. Returns stdout, the last expression's value, errors, and matplotlib figures as images."
        )
    return tool.description


def _connection_tools(ctx: Any, source: ToolRegistry, names: Sequence[str]) -> ToolRegistry:
    """This connection's tools, made on its first call and closed (kernel and all) when it ends."""
    connection = ctx.session._connection  # the per-connection state and teardown the SDK keeps
    tools = connection.state.get(_STATE_KEY)
    if tools is None:
        tools = connection.state[_STATE_KEY] = source.select(names)
        connection.exit_stack.callback(tools.close)
    return tools


def serve_stdio(tool_names: Sequence[str] = DEFAULT_TOOLS) -> None:
    """Serve over stdin/stdout until the client closes them."""
    from mcp.server.stdio import stdio_server

    tools = default_registry.select(
        tool_names
    )  # an unknown name raises ToolNotFoundError listing the valid ones
    server = build_server(tool_names, shared=tools)

    async def main() -> None:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())

    try:
        anyio.run(main)
    finally:
        tools.close()


def serve_http(
    tool_names: Sequence[str] = DEFAULT_TOOLS, *, host: str = "127.0.0.1", port: int = 8000
) -> None:
    """Serve streamable HTTP at ``http://HOST:PORT/mcp``; each MCP session is a connection."""
    import uvicorn

    app = build_server(tool_names).streamable_http_app(host=host)
    uvicorn.run(app, host=host, port=port, log_level="warning")
