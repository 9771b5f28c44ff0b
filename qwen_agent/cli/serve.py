"""``qwen-agent serve``: a local model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import sys

from ..errors import QwenAgentError
from .options import number_at_least, positive_int


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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise QwenAgentError("serve needs FastAPI and uvicorn: pip install 'qwen-react-agent[serve]'")
    import logging
    from pathlib import Path

    import uvicorn

    from ..runtime.engine import load_model
    from ..serve.openai_api import create_app

    engine = load_model(args.model, device=args.device, dtype=args.dtype)
    name = args.served_model_name or Path(args.model).name or "qwen"
    app = create_app(
        engine, model_name=name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
