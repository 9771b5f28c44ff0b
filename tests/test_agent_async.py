"""The agent inside applications: arun/astream against run/stream (one step machine), many runs on one event loop
(a real `qwen-agent serve` subprocess, the local engine's scheduler), cancellation and deadlines (generation, a real
Jupyter cell, a real MCP server), and tracing with OpenTelemetry's in-memory exporter."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwen_agent.agent import (
    Agent,
    BudgetEvent,
    FinalAnswerEvent,
    ObservationEvent,
    RunResult,
    StepStarted,
)
from qwen_agent.llm import LocalLLM, Sampling, ScriptedLLM
from qwen_agent.tools import tool

WEATHER_CALL = (
    'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:'
)
FINAL = " I now know the final answer.\nFinal Answer: Sunny in Paris."


@tool(register=False)
async def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city
    """
    await asyncio.sleep(0)
    if city == "Atlantis":
        raise ValueError("no such city")
    return f"Sunny, 25 C in {city}."


@tool(register=False)
def population(city: str) -> str:
    """The population of a city (a blocking tool: runs on a worker thread under arun).

    Args:
        city: the city
    """
    time.sleep(0.01)
    return f"{city}: 2.1 million"


def without_times(result: RunResult) -> RunResult:
    """The result without timings, and without ``prefill_tokens`` and ``cached_tokens``: the second of two runs on
    one engine finds the first one's prompt in the cache, whichever API runs it."""
    steps = [
        dataclasses.replace(
            s,
            tool_seconds=0.0,
            completion=s.completion
            and dataclasses.replace(s.completion, seconds=0.0, prefill_tokens=0, cached_tokens=0),
        )
        for s in result.steps
    ]
    return dataclasses.replace(
        result,
        steps=steps,
        seconds=0.0,
        llm_seconds=0.0,
        tool_seconds=0.0,
        prefill_tokens=0,
        cached_tokens=0,
    )


def comparable(events: list) -> list:
    return [(e.type, without_times(e.result)) if isinstance(e, FinalAnswerEvent) else e for e in events]


async def collect(agent: Agent, query: str, history=None, **options) -> list:
    return [event async for event in agent.astream(query, history, **options)]


# ------------------------------------------------------------------------------------------- one implementation

SCRIPT = [
    'Thought: wrong tool\nAction: web_search\nAction Input: {"q": "x"}\nObservation:',
    'Thought: bad city\nAction: get_weather\nAction Input: {"city": "Atlantis"}\nObservation:',
    WEATHER_CALL,
    'Thought: again\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:',
    'Thought: people\nAction: population\nAction Input: {"city": "Paris"}\nObservation:',
    "no markers at all",
    FINAL,
]


@pytest.mark.parametrize("max_iterations", [8, 3])
def test_sync_and_async_give_the_same_events_and_results_scripted(max_iterations):
    def agent() -> tuple[Agent, ScriptedLLM]:
        llm = ScriptedLLM(SCRIPT, chunk_size=4)
        return Agent(llm, [get_weather, population], max_iterations=max_iterations), llm

    sync_agent, sync_llm = agent()
    async_agent, async_llm = agent()
    history = [("Hi", "Hello!")]
    sync_events = list(sync_agent.stream("Weather in Paris?", history))
    async_events = asyncio.run(collect(async_agent, "Weather in Paris?", history))
    assert comparable(sync_events) == comparable(async_events)
    assert sync_llm.calls == async_llm.calls
    kinds = {e.kind for e in sync_events if hasattr(e, "kind")}
    assert {"unknown_tool", "tool_error", "repeated_action"} <= kinds or max_iterations == 3
    result = sync_events[-1].result
    assert result.stop_reason == ("final_answer" if max_iterations == 8 else "max_iterations")


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from qwen_agent.runtime.engine import load_model
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen", seed=0, seq_length=8192)
    return load_model(path, device="cpu")


TINY_SAMPLING = Sampling(max_tokens=10, temperature=0)


def idle_stats(scheduler) -> dict:
    """The scheduler's counters once the last request has left (it is released just after its result is sent)."""
    deadline = time.monotonic() + 2
    while scheduler.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return scheduler.stats()


def test_sync_and_async_give_the_same_events_and_results_on_the_tiny_checkpoint(tiny_engine):
    options = {"max_iterations": 2, "sampling": TINY_SAMPLING}
    sync_events = list(Agent(LocalLLM(tiny_engine), [get_weather], **options).stream("What is the weather?"))
    async_agent = Agent(LocalLLM(tiny_engine), [get_weather], **options)
    async_events = asyncio.run(collect(async_agent, "What is the weather?"))
    assert comparable(sync_events) == comparable(async_events)
    result = async_events[-1].result
    assert result.completion_tokens > 0 and result.answer  # the random model really ran


# --------------------------------------------------------------------------------------------- many runs, one loop


def test_64_concurrent_runs_on_the_local_engine_share_batches(tiny_engine):
    scheduler = tiny_engine.scheduler
    scheduler.configure(max_batch=64)
    agent = Agent(LocalLLM(tiny_engine), [get_weather], max_iterations=1, sampling=TINY_SAMPLING)
    before = scheduler.stats()

    async def main():
        return await asyncio.gather(*(agent.arun(f"Question {i}?") for i in range(64)))

    threads = threading.active_count()
    results = asyncio.run(main())
    after = idle_stats(scheduler)
    assert threading.active_count() <= threads + 1  # no thread per run (the loop's executor may have one)
    calls = sum(r.llm_calls for r in results)
    assert calls >= 64 and after["completed"] - before["completed"] == calls
    assert after["batches"] - before["batches"] < calls / 8  # the runs' calls were decoded together
    assert after["max_rows"] >= 16


@pytest.fixture(scope="module")
def served(tiny_engine, tmp_path_factory):
    """`qwen-agent serve` on a tiny checkpoint, in a subprocess on 127.0.0.1."""
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("served") / "qwen", seed=0, seq_length=8192)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "qwen_agent.cli", "serve", "--model", str(path), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--max-batch", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # the server answers while the model loads: /health is 200 once it is ready
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    yield url
    process.terminate()
    process.communicate(timeout=30)


def test_64_concurrent_runs_against_the_server_on_a_fixed_number_of_threads(served):
    from qwen_agent.openai_client import OpenAICompatibleLLM

    llm = OpenAICompatibleLLM(served + "/v1", max_retries=0)
    agent = Agent(llm, [get_weather, population], max_iterations=1, sampling=TINY_SAMPLING)
    peak = 0

    async def main():
        nonlocal peak
        done = asyncio.Event()

        async def count_threads():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, threading.active_count())
                await asyncio.sleep(0.005)

        counter = asyncio.create_task(count_threads())
        try:
            return await asyncio.gather(*(agent.arun(f"Question {i}?") for i in range(64)))
        finally:
            done.set()
            await counter
            await llm.aclose()

    threads = threading.active_count()
    results = asyncio.run(main())
    assert len(results) == 64 and all(r.answer and r.completion_tokens > 0 for r in results)
    # 64 runs in flight, each with an open stream: the thread count stays what it was, give or take the few
    # worker threads asyncio or anyio may start (bounded, independent of the number of runs)
    assert peak - threads <= 4, (threads, peak)
    assert llm.context_window == 32767  # read from the server's /v1/models
    stats = httpx.get(served + "/health").json()["scheduler"]
    assert stats["max_rows"] >= 8  # and the server decoded them together


def test_sync_and_async_give_the_same_events_against_the_server(served):
    from qwen_agent.openai_client import OpenAICompatibleLLM

    def agent() -> Agent:
        return Agent(
            OpenAICompatibleLLM(served + "/v1"), [get_weather], max_iterations=2, sampling=TINY_SAMPLING
        )

    sync_events = list(agent().stream("Weather?"))
    async_agent = agent()

    async def main():
        try:
            return await collect(async_agent, "Weather?")
        finally:
            await async_agent.llm.aclose()

    assert comparable(sync_events) == comparable(asyncio.run(main()))


# ---------------------------------------------------------------------------------------------- cancellation


class _NeverEnds:
    """The tiny network with its end-of-turn ids masked, so a reply runs until it is stopped."""

    def __init__(self, model, banned):
        self.model, self.config, self.tok_embeddings = model, model.config, model.tok_embeddings
        self.banned = list(banned)

    def prefill(self, *args, **kwargs):
        return self._mask(self.model.prefill(*args, **kwargs))

    def decode_step(self, *args, **kwargs):
        return self._mask(self.model.decode_step(*args, **kwargs))

    def _mask(self, logits):
        logits[..., self.banned] = float("-inf")
        return logits


def test_a_deadline_stops_generation_at_the_next_token(tiny_engine):
    from qwen_agent.runtime.engine import QwenEngine

    tok = tiny_engine.tokenizer
    model = _NeverEnds(tiny_engine.model, [tok.im_end_id, tok.im_start_id, tok.eod_id])
    engine = QwenEngine(model, tok, tiny_engine.generation_config, tiny_engine.default_system, max_batch=4)
    scheduler = engine.scheduler
    try:
        agent = Agent(LocalLLM(engine), sampling=Sampling(max_tokens=4000, temperature=0))
        events = []

        async def main():
            async for event in agent.astream("Talk forever", timeout=1.0):
                events.append(event)

        started = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - started < 1.0 + 2.0
        result = events[-1].result
        assert result.stop_reason == "cancelled" and result.history == []
        assert [e.kind for e in events if isinstance(e, BudgetEvent)] == ["cancelled"]
        assert any(e.type == "answer_delta" for e in events)  # it was generating when the deadline came
        stats = idle_stats(scheduler)
        assert stats["in_flight"] == 0 and stats["cancelled"] == 1
    finally:
        engine.close()


def code(source: str) -> str:
    return f"Thought: run it\nAction: code_interpreter\nAction Input:\n```py\n{source}\n```\nObservation:"


@pytest.fixture(scope="module")
def interpreter_tool():
    from qwen_agent.tools.builtin import CodeInterpreterTool

    tool = CodeInterpreterTool(timeout=60)
    tool.start().run("x = 41")
    yield tool
    tool.close()


@pytest.mark.parametrize("how", ["deadline", "task.cancel()"])
def test_cancelling_mid_cell_interrupts_it_and_keeps_the_kernel(interpreter_tool, how):
    interpreter = interpreter_tool.interpreter
    pid = interpreter.pid
    loop_forever = "import time\nwhile True:\n    time.sleep(0.05)"
    agent = Agent(ScriptedLLM([code(loop_forever), FINAL]), [interpreter_tool])

    async def main():
        if how == "deadline":
            result = await agent.arun("Loop", timeout=1.5)
            assert result.stop_reason == "cancelled"
            return time.monotonic() - 1.5
        task = asyncio.create_task(agent.arun("Loop"))
        await asyncio.sleep(1.5)
        task.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at

    stopped_at = asyncio.run(main())
    assert time.monotonic() - stopped_at < 2.0
    after = interpreter.run("print(x + 1)")
    assert after.stdout.strip() == "42" and interpreter.pid == pid and not after.restarted


def test_cancelling_mid_mcp_call_returns_and_the_server_stays_up():
    pytest.importorskip("mcp")
    from qwen_agent.tools import ToolRegistry

    server = str(Path(__file__).with_name("mcp_test_server.py"))
    config = {"mcpServers": {"t": {"command": sys.executable, "args": [server], "timeout": 60}}}
    registry = ToolRegistry.from_mcp(config)
    try:
        hang = "Thought: wait\nAction: hang\nAction Input: {}\nObservation:"
        agent = Agent(ScriptedLLM([hang, FINAL]), registry)
        started = time.monotonic()
        result = asyncio.run(agent.arun("Hang", timeout=1.0))
        assert time.monotonic() - started < 1.0 + 2.0
        assert result.stop_reason == "cancelled"
        connection = registry.get("add").connection
        assert registry.get("add").invoke('{"a": 2, "b": 3}').observation == "5"
        assert connection.restarts == 0
    finally:
        registry.close()


# ------------------------------------------------------------------------------------------------------ tracing


def test_spans_of_a_two_step_run():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records = []
    script = [WEATHER_CALL, FINAL]
    agent = Agent(ScriptedLLM(script), [get_weather], tracer_provider=provider, callbacks=[records.append])
    result = agent.run("Weather in Paris?")
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "chat ScriptedLLM",
        "execute_tool get_weather",
        "chat ScriptedLLM",
        "invoke_agent qwen-agent",
    ]
    run = spans[-1]
    assert run.parent is None and run.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert run.attributes["qwen_agent.stop_reason"] == "final_answer"
    assert run.attributes["gen_ai.usage.output_tokens"] == result.completion_tokens
    for child in spans[:-1]:
        assert child.parent.span_id == run.context.span_id
        assert child.context.trace_id == run.context.trace_id
        assert run.start_time <= child.start_time <= child.end_time <= run.end_time
    first, tool_span = spans[0], spans[1]
    assert first.attributes["gen_ai.operation.name"] == "chat"
    assert first.attributes["gen_ai.request.model"] == "ScriptedLLM"
    assert first.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert first.attributes["gen_ai.usage.output_tokens"] == result.steps[0].completion.completion_tokens
    assert tool_span.attributes["gen_ai.tool.name"] == "get_weather"
    assert tool_span.attributes["gen_ai.tool.call.arguments"] == '{"city": "Paris"}'
    assert tool_span.status.status_code == StatusCode.UNSET
    # the callback hook saw the same spans, in the same order
    assert [(r.kind, r.name) for r in records] == [
        ("model", "chat ScriptedLLM"),
        ("tool", "execute_tool get_weather"),
        ("model", "chat ScriptedLLM"),
        ("run", "invoke_agent qwen-agent"),
    ]

    # a failing tool: an error span; the async run gives the same structure
    exporter.clear()
    failing = 'Thought: x\nAction: get_weather\nAction Input: {"city": "Atlantis"}\nObservation:'
    agent = Agent(ScriptedLLM([failing, FINAL]), [get_weather], tracer_provider=provider)
    asyncio.run(agent.arun("Weather in Atlantis?"))
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans][1:] == [
        "execute_tool get_weather",
        "chat ScriptedLLM",
        "invoke_agent qwen-agent",
    ]
    assert (
        spans[1].status.status_code == StatusCode.ERROR and spans[1].attributes["error.type"] == "tool_error"
    )
    assert "no such city" in spans[1].status.description


def test_tracing_is_off_without_a_tracer_provider():
    agent = Agent(ScriptedLLM([FINAL]), [get_weather])
    assert agent.tracing._tracer() is None  # no provider configured in this process: no spans made
    assert agent.run("Hi").answer == "Sunny in Paris."


def test_a_failing_callback_does_not_break_the_run():
    def broken(record):
        raise RuntimeError("hook bug")

    agent = Agent(ScriptedLLM([WEATHER_CALL, FINAL]), [get_weather], callbacks=[broken])
    assert agent.run("Weather?").answer == "Sunny in Paris."


def test_a_timeout_that_is_not_positive_is_a_config_error():
    from qwen_agent.errors import ConfigError

    agent = Agent(ScriptedLLM([FINAL]), [get_weather])
    with pytest.raises(ConfigError, match="timeout must be a positive number of seconds, got 0"):
        asyncio.run(agent.arun("Hi", timeout=0))


def test_step_started_carries_the_budget():
    agent = Agent(ScriptedLLM([FINAL], context_window=4096), [get_weather])
    events = list(agent.stream("Weather?"))
    started = [e for e in events if isinstance(e, StepStarted)]
    assert started[0].context_window == 4096 and 0 < started[0].prompt_tokens < 4096
    assert not [e for e in events if isinstance(e, (BudgetEvent,))]
    assert [e for e in events if isinstance(e, ObservationEvent)] == []


# -------------------------------------------------------------------------------------------------- docs example


def test_docs_fastapi_example_streams_events_and_keeps_the_conversation():
    import json
    import re

    from qwen_agent.serve.openai_api import BackgroundServer

    readme = (Path(__file__).resolve().parents[1] / "docs" / "apps.md").read_text()
    start = readme.index("<!-- fastapi-example:start -->")
    code = re.search(r"```python\n(.*?)^```", readme[start:], re.S | re.M).group(1)
    namespace = {"__name__": "readme_fastapi"}
    exec(compile(code, "docs/apps.md", "exec"), namespace)
    with BackgroundServer(namespace["app"]) as server:
        events = []
        with httpx.stream(
            "GET", server.url + "/chat/c1", params={"q": "Weather in Paris?"}, timeout=30
        ) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "step_started" and kinds[-1] == "final_answer"
    assert {"action", "observation", "thought_delta", "answer_delta"} <= set(kinds)
    observation = next(e for e in events if e["type"] == "observation")
    assert observation["observation"] == "Sunny, 25 C in Paris."
    assert events[-1]["answer"] == "Sunny, 25 C."
    saved = namespace["Conversation"].from_json(namespace["conversations"]["c1"])
    assert saved.history == [("Weather in Paris?", events[-1]["result"]["transcript"])]


class SyncOnly:
    """A backend with only the sync ``stream`` (as LocalLLM): arun reads it on a worker thread, one call at a
    time; it records how many of its streams were open at once."""

    def __init__(self, outputs: list[str]):
        self.script = ScriptedLLM(outputs)
        self.open = self.most_open = 0

    def stream(self, prompt, *, stop=(), sampling=None):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            for item in self.script.stream(prompt, stop=stop, sampling=sampling):
                time.sleep(0.002)
                yield item
        finally:
            self.open -= 1


def test_a_backend_without_astream_runs_one_call_at_a_time_on_a_worker_thread():
    backend = SyncOnly([WEATHER_CALL, FINAL] * 8)
    agent = Agent(backend, [get_weather])

    async def main():
        return await asyncio.gather(*(agent.arun(f"Weather {i}?") for i in range(8)))

    results = asyncio.run(main())
    assert [r.answer for r in results] == ["Sunny in Paris."] * 8
    assert backend.most_open == 1 and backend.open == 0

    # a deadline mid-stream: the worker finishes its token, the stream is closed, the next call may start
    slow = SyncOnly(["Thought: " + "word " * 2000 + "\nFinal Answer: done", FINAL])
    agent = Agent(slow, [get_weather])
    result = asyncio.run(agent.arun("Long?", timeout=0.3))
    assert result.stop_reason == "cancelled" and slow.open == 0
    assert asyncio.run(agent.arun("Again?")).answer == "Sunny in Paris."


def test_a_deadline_fires_at_an_await_and_never_while_paused():
    from qwen_agent.aio import Deadline

    async def main():
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with Deadline(0.2):
                await asyncio.sleep(5)
        assert time.monotonic() - started < 1.0
        deadline = Deadline(0.1)
        with pytest.raises(TimeoutError):
            async with deadline:
                with deadline.paused():  # the caller's code, between two events: never interrupted
                    await asyncio.sleep(0.3)
                assert not deadline.expired()
                await asyncio.sleep(5)  # already past: it fires here, at once
        assert deadline.expired() and time.monotonic() - started < 2.0

    asyncio.run(main())
