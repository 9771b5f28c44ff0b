"""``qwen-agent mcp``: the sandboxed code interpreter (and other tools) as an MCP server."""

from __future__ import annotations

import argparse

from ..errors import QwenAgentError
from .options import tool_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mcp", help="serve the sandboxed code interpreter (and other tools) as an MCP server")
    p.add_argument(
        "--tools",
        default="code_interpreter",
        help="comma-separated tools to offer: code_interpreter, current_time, web_fetch (default: code_interpreter)",
    )
    p.add_argument(
        "--http", action="store_true", help="streamable HTTP at http://HOST:PORT/mcp instead of stdio"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve.mcp_server import serve_http, serve_stdio
    except ImportError as exc:
        raise QwenAgentError(
            f"qwen-agent mcp needs the [mcp] extra (pip install 'qwen-react-agent[mcp]'): {exc}"
        ) from None

    names = tool_names(args.tools)
    if args.http:
        serve_http(names, host=args.host, port=args.port)
    else:
        serve_stdio(names)
    return 0
