"""The prefix cache of KV blocks, measured: what an agent's steps prefill and how long they take, in process and
over ``qwen-agent serve``, with the cache on and off, in one run.

Scenarios (greedy, so every run writes the same text; the tool is scripted, so every observation is the same):

- ``agent``: a 3-step ReAct agent (two tool calls, then the answer; ``max_iterations=2`` forces the third step to
  answer) in process (:class:`~qwen_agent.llm.LocalLLM`) and over a ``qwen-agent serve`` subprocess
  (:class:`~qwen_agent.openai_client.OpenAICompatibleLLM`, the cached count read from
  ``usage.prompt_tokens_details.cached_tokens``): prefilled and cached tokens per step, and wall time, the two
  alternating ``--pairs`` times (pair i asks about city i on both, so both caches are equally warm; pair 0 is
  cold); then once over a server with the cache off. The goal: each later step prefills only its new tokens plus
  at most one 16-token block, and the server run is within 1.15x of the in-process one.
- ``concurrent``: 8 such agents at once over the server (different cities, the same tools).
- ``chat``: a 4-turn chat over the server's /v1/chat/completions, each turn re-sending the conversation.
- ``bench``: ``qwen-agent bench tool-use --limit N --batch-size B`` throughput (jobs per second), cache on and
  off. Prompts admitted in the same wave are all prefilled before any of them is stored, so they share nothing;
  ``B`` below the number of jobs lets the later waves reuse the ReAct instructions every prompt starts with.

The chat and concurrent scenarios run against a fresh server with the cache on and one with ``--kv-cache-gb 0``.
Prints a table and writes benchmarks/results/prefix_cache.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/prefix_cache.py --model /work/models/qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from qwen_agent.agent import Agent
from qwen_agent.llm import LocalLLM
from qwen_agent.llm_protocol import Sampling
from qwen_agent.openai_client import OpenAICompatibleLLM
from qwen_agent.runtime.engine import load_model
from qwen_agent.tools import tool

ROOT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon", "Oslo", "Prague"]


@tool(register=False)
def get_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: the name of the city
    """
    return f"{city}: sunny, 25 C, wind 10 km/h from the west, humidity 40%."


@tool(register=False)
def get_time(city: str) -> str:
    """Get the local time of a city.

    Args:
        city: the name of the city
    """
    return f"{city}: 14:05 local time."


def question(city: str) -> str:
    return f"What is the weather in {city} and what time is it there? Look both up, one tool call at a time."


def run_agent(llm: Any, city: str, max_tokens: int) -> dict[str, Any]:
    agent = Agent(
        llm,
        [get_weather, get_time],
        max_iterations=2,
        sampling=Sampling(max_tokens=max_tokens, temperature=0),
    )
    started = time.perf_counter()
    result = agent.run(question(city))
    return {
        "seconds": time.perf_counter() - started,
        "steps": [
            {
                "prompt": s.completion.prompt_tokens,
                "prefilled": s.completion.prefill_tokens,
                "cached": s.completion.cached_tokens,
                "completion": s.completion.completion_tokens,
                "action": s.action,
            }
            for s in result.steps
        ],
        "answer": result.answer,
    }


# -- the server --------------------------------------------------------------------------------------------------


class Server:
    """``qwen-agent serve`` in a subprocess on a free port."""

    def __init__(self, model: str, kv_cache_gb: float | None, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "qwen_agent.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(self.port),
        ]
        command += ["--device", "cpu", "--max-batch", str(max_batch), "--served-model-name", "bench"]
        if kv_cache_gb is not None:
            command += ["--kv-cache-gb", str(kv_cache_gb)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(self.url + "/health", timeout=2).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(1)
        raise RuntimeError("the server did not start in 300 s")

    def health(self) -> dict[str, Any]:
        return httpx.get(self.url + "/health", timeout=10).json()

    def llm(self) -> OpenAICompatibleLLM:
        return OpenAICompatibleLLM(self.url + "/v1", "bench", timeout=1200)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def chat_turns(server: Server, turns: int, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in two sentences."}]
    questions = [
        "What is a KV cache in a transformer?",
        "Why does reusing it help a chat server?",
        "What is a block in a paged KV cache?",
        "How is a block found again later?",
    ][:turns]
    rows, started = [], time.perf_counter()
    for q in questions:
        messages.append({"role": "user", "content": q})
        body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1200).json()
        usage = reply["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        rows.append(
            {"prompt": usage["prompt_tokens"], "cached": cached, "prefilled": usage["prompt_tokens"] - cached}
        )
        messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return {"seconds": time.perf_counter() - started, "turns": rows}


def concurrent_agents(server: Server, n: int, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda city: run_agent(server.llm(), city, max_tokens), CITIES[:n]))
    steps = [s for r in runs for s in r["steps"]]
    return {
        "seconds": time.perf_counter() - started,
        "agents": n,
        "steps": len(steps),
        "prompt": sum(s["prompt"] for s in steps),
        "prefilled": sum(s["prefilled"] for s in steps),
        "cached": sum(s["cached"] for s in steps),
        "answers": [r["answer"] for r in runs],
    }


def bench_tool_use(
    model: str, kv_cache_gb: float | None, limit: int, batch: int, max_new_tokens: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "qwen_agent.cli",
            "bench",
            "tool-use",
            "--model",
            model,
            "--device",
            "cpu",
        ]
        command += [
            "--limit",
            str(limit),
            "--batch-size",
            str(batch),
            "--max-new-tokens",
            str(max_new_tokens),
        ]
        command += ["--out", out, "-q"]
        if kv_cache_gb is not None:
            command += ["--kv-cache-gb", str(kv_cache_gb)]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
        seconds = time.perf_counter() - started
        meta = json.loads((Path(out) / "report.json").read_text())["meta"]
    jobs = 2 * limit  # the first ``limit`` of the positive and of the negative set
    return {
        "seconds": seconds,
        "jobs": jobs,
        "jobs_per_s": jobs / seconds,
        "prefix_cache": meta.get("prefix_cache"),
    }


# -- the run -----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=48, help="per agent step / chat turn")
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="in-process / server agent runs, alternately")
    parser.add_argument("--bench-limit", type=int, default=3, help="jobs of each tool-use set")
    parser.add_argument(
        "--bench-batch",
        type=int,
        default=2,
        help="prompts decoded at once; fewer than the jobs, as prompts admitted together cannot share blocks yet",
    )
    parser.add_argument("--only", default="agent,concurrent,chat,bench")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix_cache.json"))
    args = parser.parse_args()
    only = set(args.only.split(","))
    report: dict[str, Any] = {
        "model": args.model,
        "device": "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "max_tokens": args.max_tokens,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every scenario, so a long run that is cut short keeps what it measured
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False))

    if "agent" in only:
        # in process and over a fresh server (cache on), alternately, so both see the same machine load; pair i
        # asks about city i on both, so their caches are equally warm (pair 0: both cold)
        engine = load_model(args.model, device="cpu")
        server = Server(args.model, None, max_batch=8)
        pairs = []
        try:
            for i in range(args.pairs):
                local = run_agent(LocalLLM(engine), CITIES[i], args.max_tokens)
                remote = run_agent(server.llm(), CITIES[i], args.max_tokens)
                pairs.append({"city": CITIES[i], "in_process": local, "server": remote})
                report["agent_pairs"] = pairs
                save()
            report["agent_in_process"], report["agent_server_on"] = pairs[0]["in_process"], pairs[0]["server"]
            report["agent_cache_in_process"] = engine.stats()["prefix_cache"]
            report["agent_cache_server"] = server.health()["prefix_cache"]
        finally:
            server.close()
        del engine
        save()
    for label, budget in (("on", None), ("off", 0)):
        if not only & {"agent", "concurrent", "chat"} or (
            label == "on" and not only & {"concurrent", "chat"}
        ):
            continue
        server = Server(args.model, budget, max_batch=max(8, args.agents))
        try:
            if "agent" in only and label == "off":
                report["agent_server_off"] = run_agent(server.llm(), CITIES[0], args.max_tokens)
                save()
            if "chat" in only:
                report[f"chat_{label}"] = chat_turns(server, 4, args.max_tokens)
                save()
            if "concurrent" in only:
                report[f"concurrent_{label}"] = concurrent_agents(server, args.agents, args.max_tokens)
            report[f"health_{label}"] = server.health()
            save()
        finally:
            server.close()
    if "bench" in only:
        for label, budget in (("on", None), ("off", 0)):
            report[f"bench_{label}"] = bench_tool_use(
                args.model, budget, args.bench_limit, args.bench_batch, args.max_tokens
            )
            save()
    print_table(report)
    print(f"\nwrote {args.out}")


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['model']} on {report['device']} ({report['machine']}), greedy, {report['max_tokens']} tokens"
    )
    for key in ("agent_in_process", "agent_server_on", "agent_server_off"):
        if key in report:
            run = report[key]
            steps = "  ".join(f"{s['prefilled']}/{s['prompt']} ({s['cached']} cached)" for s in run["steps"])
            print(f"{key:18} {run['seconds']:7.1f} s  prefilled/prompt per step: {steps}")
    for pair in report.get("agent_pairs", []):
        local, remote = pair["in_process"]["seconds"], pair["server"]["seconds"]
        print(f"{pair['city']:18} in process {local:6.1f} s, server {remote:6.1f} s: {remote / local:.2f}x")
    for key in ("concurrent_on", "concurrent_off"):
        if key in report:
            r = report[key]
            print(
                f"{key:18} {r['seconds']:7.1f} s  {r['agents']} agents, {r['steps']} steps, "
                f"prefilled {r['prefilled']} of {r['prompt']} prompt tokens ({r['cached']} cached)"
            )
    for key in ("chat_on", "chat_off"):
        if key in report:
            r = report[key]
            turns = "  ".join(f"{t['prefilled']}/{t['prompt']}" for t in r["turns"])
            print(f"{key:18} {r['seconds']:7.1f} s  prefilled/prompt per turn: {turns}")
    for key in ("bench_on", "bench_off"):
        if key in report:
            r = report[key]
            print(f"{key:18} {r['seconds']:7.1f} s  {r['jobs']} jobs, {r['jobs_per_s']:.3f} jobs/s")


if __name__ == "__main__":
    main()
