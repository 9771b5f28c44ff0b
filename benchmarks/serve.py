"""Throughput of the OpenAI-compatible server: N concurrent streaming clients against the same requests sent one
at a time, in the same run.

Starts ``qwen-agent serve``'s app (uvicorn on 127.0.0.1, a free port) over a model directory, or by default a
tiny random-weight checkpoint, and sends streaming greedy chat requests (distinct prompts, ``max_tokens`` each)
with httpx: for each N in ``--clients``, all N at once, then the same N one after another. Reports aggregate
completion tokens/s, time to first token (first content chunk) p50/p95, the speed-up of concurrent over
sequential, and the largest batch the scheduler decoded. Then a load test: ``--load`` concurrent clients, every
one of which must finish with a complete answer. Prints a table and writes benchmarks/results/serve.json.
``--metrics both`` runs it all without ``/metrics`` and with it, alternating, ``--repeat`` times each (a fresh
engine for each app, which closes its scheduler), and prints the ratio of their median throughputs, and what the metrics add to each streamed delta
(``RequestTrace.event`` timed alone: the only per-token work they do).

    PYTHONPATH=$PWD python benchmarks/serve.py                       # tiny random weights, CPU
    PYTHONPATH=$PWD python benchmarks/serve.py --model /models/Qwen-7B-Chat --device cuda
    PYTHONPATH=$PWD python benchmarks/serve.py --metrics both --repeat 3 --clients 1,8,32 --load 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from qwen_agent.runtime.engine import load_model
from qwen_agent.runtime.tiny import write_tiny_checkpoint
from qwen_agent.serve.metrics import ServerMetrics
from qwen_agent.serve.openai_api import BackgroundServer, create_app


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, usage, finish = time.perf_counter(), None, None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter() - started
                finish = choice["finish_reason"] or finish
    return {"ttft": first, "tokens": usage["completion_tokens"], "finish": finish}


async def run(url: str, prompts: list[str], max_tokens: int, concurrent: bool) -> dict:
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)
    ) as client:
        started = time.perf_counter()
        if concurrent:
            answers = await asyncio.gather(*(one_request(client, p, max_tokens) for p in prompts))
        else:
            answers = [await one_request(client, p, max_tokens) for p in prompts]
        seconds = time.perf_counter() - started
    ttfts = sorted(a["ttft"] for a in answers if a["ttft"] is not None)
    tokens = sum(a["tokens"] for a in answers)
    return {
        "requests": len(prompts),
        "completed": sum(a["finish"] in ("stop", "length") for a in answers),
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "ttft_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] if ttfts else None,
    }


def seconds_per_traced_delta(deltas: int = 200_000) -> float:
    """What the metrics add to each streamed delta: one ``RequestTrace.event`` (a histogram observation)."""
    trace = ServerMetrics(lambda: None).trace(1)
    started = time.perf_counter()
    for _ in range(deltas):
        trace.event(0, "x")
    return (time.perf_counter() - started) / deltas


def measure(model: str, args: argparse.Namespace, metrics: bool) -> tuple[list[dict], dict, dict]:
    """The runs for each client count, the load test and the scheduler's stats, on an app over ``model``."""
    engine = load_model(model, device=args.device)
    app = create_app(engine, model_name="bench", max_batch=args.max_batch, metrics=metrics)
    with BackgroundServer(app) as server:
        asyncio.run(run(server.url, ["warm-up"], 4, concurrent=False))
        rows = []
        for n in (int(c) for c in args.clients.split(",")):
            prompts = [f"Request {i}: write a short note about the number {i}." for i in range(n)]
            for concurrent in (True, False):
                before = app.state.scheduler.stats()["max_rows"]
                row = asyncio.run(run(server.url, prompts, args.max_tokens, concurrent))
                row |= {
                    "clients": n,
                    "mode": "concurrent" if concurrent else "sequential",
                    "metrics": metrics,
                }
                row["max_rows"] = app.state.scheduler.stats()["max_rows"] if concurrent else before
                rows.append(row)
        load_prompts = [f"Load {i}: count to {i % 10 + 3}." for i in range(args.load)]
        load = asyncio.run(run(server.url, load_prompts, args.max_tokens, concurrent=True))
        scheduler = app.state.scheduler.stats()
    return rows, load, scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: a tiny random checkpoint)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--load", type=int, default=64, help="clients of the load test")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--metrics", choices=("on", "off", "both"), default="on", help="serve /metrics (both: off and on)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting with --metrics both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_tiny_checkpoint(Path(tmp) / "tiny", seq_length=8192)
        settings = {"on": [True], "off": [False], "both": [False, True] * args.repeat}[args.metrics]
        measured: dict[bool, list] = {False: [], True: []}
        for metrics in settings:  # alternating, so a change in the machine's load hits both alike
            measured[metrics].append(measure(model, args, metrics))
    rows, load, scheduler = measured[settings[-1]][-1]
    if args.metrics == "both":
        print(f"with /metrics against without, median tokens/s of {args.repeat} runs each:")
        for i, row in enumerate(rows):
            off = statistics.median(runs[i]["tokens_per_s"] for runs, _, _ in measured[False])
            on = statistics.median(runs[i]["tokens_per_s"] for runs, _, _ in measured[True])
            print(
                f"  {row['clients']:>3} clients {row['mode']:>10}: {off:8.1f} off {on:8.1f} on  {on / off:.3f}x"
            )
        per_delta = seconds_per_traced_delta()
        per_token = 1 / rows[1]["tokens_per_s"]  # one client alone: a decode step per token
        print(
            f"metrics per streamed delta: {per_delta * 1e6:.1f} us, against {per_token * 1e3:.1f} ms a token "
            f"for one client alone ({per_delta / per_token:.4%})"
        )

    print(
        f"{'clients':>7} {'mode':>10} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9}"
    )
    for row in rows:
        print(
            f"{row['clients']:>7} {row['mode']:>10} {row['completion_tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>8.1f} {row['ttft_p50']:>9.3f} {row['ttft_p95']:>9.3f}"
        )
    for concurrent, sequential in zip(rows[::2], rows[1::2], strict=True):
        speedup = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
        print(f"{concurrent['clients']} clients: concurrent/sequential tokens/s = {speedup:.2f}x")
    print(
        f"load test: {load['completed']}/{load['requests']} completed, {load['completion_tokens']} tokens "
        f"in {load['seconds']:.2f} s; largest decode batch {scheduler['max_rows']} rows"
    )
    result = {
        "device": args.device,
        "model": args.model or "tiny random checkpoint (write_tiny_checkpoint)",
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "metrics": args.metrics,
        "runs": rows,
        "load": load,
        "scheduler": scheduler,
    }
    if args.metrics == "both":
        result["alternating"] = {
            "repeat": args.repeat,
            "without_metrics": [runs for runs, _, _ in measured[False]],
            "with_metrics": [runs for runs, _, _ in measured[True]],
            "seconds_per_traced_delta": seconds_per_traced_delta(),
        }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    if load["completed"] != load["requests"]:
        raise SystemExit("the load test lost requests")


if __name__ == "__main__":
    main()
