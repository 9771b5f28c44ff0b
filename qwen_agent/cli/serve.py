"""``qwen-agent serve``: a local model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import sys

from ..errors import QwenAgentError
from .options import add_kv_cache_gb, add_shutdown_timeout, number_at_least, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a local model over an OpenAI-compatible HTTP API")
    p.add_argument(
        "--model", required=True, help="model directory (Qwen-7B-Chat or a Qwen2-family chat model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: the directory name)"
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=32, help="requests decoded at once (default: 32)"
    )
    p.add_argument(
        "--max-queue",
        type=number_at_least(int, 0),
        default=256,
        help="requests that may wait beyond a full batch before 503",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or auto (default: a GPU when there is one)"
    )
    p.add_argument(
        "--dtype", default=None, help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)"
    )
    add_kv_cache_gb(p)
    add_shutdown_timeout(p)
    p.add_argument(
        "--max-body-mb",
        type=number_at_least(float, 0, exclusive=True),
        default=32.0,
        help="largest request body in MiB; larger ones get 413 unread (default: 32)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help="longest prompt in tokens; longer ones get 400 (default: what the context holds)",
    )
    p.add_argument(
        "--request-timeout",
        type=number_at_least(float, 0, exclusive=True),
        default=None,
        help="seconds a request may run; then it is aborted (504, or a stream's finish_reason 'abort')",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise QwenAgentError(
            f"serve needs {', '.join(missing)} (the [serve] extra): pip install 'qwen-react-agent[serve]'"
        )
    import logging
    from pathlib import Path

    import uvicorn

    from ..runtime.engine import load_model
    from ..serve.lifecycle import GracefulServer
    from ..serve.limits import ServerLimits
    from ..serve.openai_api import create_app

    name = args.served_model_name or Path(args.model).name or "qwen"
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_prompt_tokens=args.max_prompt_tokens,
        request_timeout=args.request_timeout,
    )
    app = create_app(
        load=lambda: load_model(
            args.model, device=args.device, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb
        ),
        model_name=name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        limits=limits,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(
        f"serving {name!r} on http://{args.host}:{args.port}/v1 (loading the model: /health answers 503 until "
        "it is ready)",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
    GracefulServer(config, app.state.lifecycle, args.shutdown_timeout).run()
    if app.state.lifecycle.load_error is not None:
        raise QwenAgentError(f"the model failed to load: {app.state.lifecycle.load_error}")
    return 0
