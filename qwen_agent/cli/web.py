"""``qwen-agent web``: the agent in a browser (Gradio; the [web] extra)."""

from __future__ import annotations

import argparse

from ..errors import QwenAgentError
from .options import add_kv_cache_gb, add_shutdown_timeout, number_at_least, positive_int, tool_names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="chat with the agent in a browser (Gradio; the [web] extra)")
    p.add_argument(
        "--model",
        required=True,
        help="a model directory (shared by all sessions) or an OpenAI-compatible URL",
    )
    p.add_argument("--tools", default=None, help="comma-separated tool names (default: all, MCP ones too)")
    p.add_argument("--mcp", default=None, metavar="CONFIG", help="also the tools of an mcpServers JSON file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="device for a local model (default: cuda if available)")
    p.add_argument("--api-key", default=None, help="API key for a server (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--served-model", default=None, help="model name on the server (default: the first it lists)"
    )
    p.add_argument("--max-tokens", type=positive_int, default=512, help="most tokens per model turn")
    p.add_argument(
        "--session-timeout",
        type=number_at_least(float, 0, exclusive=True),
        default=1800.0,
        help="seconds after which an idle browser session and its kernel are closed",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=4,
        help="a local model's generations decoded at once, across sessions (default: 4)",
    )
    add_kv_cache_gb(p)
    add_shutdown_timeout(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve.web import launch
    except ImportError as exc:
        raise QwenAgentError(
            f"the web UI needs the [web] extra (pip install 'qwen-react-agent[web]'): {exc}"
        ) from None
    launch(
        args.model,
        tools=tool_names(args.tools),
        host=args.host,
        port=args.port,
        device=args.device,
        api_key=args.api_key,
        served_model=args.served_model,
        max_tokens=args.max_tokens,
        idle_timeout=args.session_timeout,
        mcp=args.mcp,
        max_batch=args.max_batch,
        kv_cache_gb=args.kv_cache_gb,
        shutdown_timeout=args.shutdown_timeout,
    )
    return 0
