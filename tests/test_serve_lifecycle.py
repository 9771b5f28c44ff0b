"""``qwen-agent serve`` as an operator runs it: a real process on 127.0.0.1 over the tiny checkpoint, stopped with
SIGTERM, held to its limits, scraped at ``/metrics``, probed at ``/health``; and the app in-process under uvicorn
where the test must control when the model is ready."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen_agent.runtime.engine import load_model
from qwen_agent.serve.openai_api import BackgroundServer, create_app

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
CONTEXT = 32767  # the tiny Qwen v1 checkpoint's context


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A ``qwen-agent serve`` process; its output is collected on a thread."""

    def __init__(self, model: Path, *options: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "qwen_agent.cli", "serve", "--model", str(model)]
        command += ["--port", str(self.port), "--served-model-name", "tiny", "--max-batch", "4", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def wait_ready(self) -> list[int]:
        """Poll /health until 200; the statuses seen on the way."""
        seen, deadline = [], time.monotonic() + 180
        while not seen or seen[-1] != 200:
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.output)
            try:
                seen.append(httpx.get(self.url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                time.sleep(0.05)
        return seen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self.reader.join(10)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def served(tiny_qwen_dir) -> Iterator[Served]:
    server = Served(
        tiny_qwen_dir, "--max-body-mb", "1", "--max-prompt-tokens", "200", "--request-timeout", "3"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed with prometheus_client's parser: (name, labels) -> value."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sse_lines(response: httpx.Response, into: list[str]) -> None:
    for line in response.iter_lines():
        if line.startswith("data: "):
            into.append(line[6:])


# -- shutdown -------------------------------------------------------------------------------------------------


def test_sigterm_drains_then_aborts_what_is_left_and_exits_0_within_the_timeout(tiny_qwen_dir):
    # 12 rows allow a cache of 24,576 slots: three rows of the 8,192 that the two long requests need
    server = Served(tiny_qwen_dir, "--shutdown-timeout", "5", "--max-batch", "12")
    try:
        server.wait_ready()
        long_stream: list[str] = []
        short_stream: list[str] = []
        whole: dict[str, httpx.Response] = {}

        def stream(body: dict, into: list[str]) -> None:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
                _sse_lines(r, into)

        def huge() -> None:  # a waiting client: the whole answer, minutes of decoding on this model
            body = {**CHAT, "max_tokens": 8000}
            whole["r"] = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)

        threads = [
            threading.Thread(target=stream, args=({**CHAT, "max_tokens": 8000, "stream": True}, long_stream)),
            threading.Thread(target=huge),
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(long_stream) < 3 or _metrics(server.url)[("qwen_agent_requests_running", ())] < 2:
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.1)
        # one that finishes within the grace period: a few tokens, started just before the signal
        short = threading.Thread(
            target=stream, args=({**CHAT, "max_tokens": 3, "stream": True, "temperature": 0}, short_stream)
        )
        short.start()
        while len(short_stream) < 2:  # past the role chunk: decoding
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.02)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting connections
            httpx.get(server.url + "/health", timeout=5)
        assert server.process.wait(30) == 0
        took = time.monotonic() - signalled
        for thread in [*threads, short]:
            thread.join(10)
            assert not thread.is_alive(), "a client is still waiting"
    finally:
        server.stop()
    assert 5 <= took < 5 + 10, "".join(server.output)
    # the long stream ends with the abort chunk, then [DONE]
    assert long_stream[-1] == "[DONE]"
    last = json.loads(long_stream[-2])
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "abort"}]
    assert sum(bool(json.loads(c)["choices"][0]["delta"].get("content")) for c in long_stream[:-2]) >= 1
    # the waiting client gets a 503 saying why
    assert whole["r"].status_code == 503
    assert whole["r"].json()["error"]["code"] == "server_shutting_down"
    # the short one finished normally during the grace period
    assert short_stream[-1] == "[DONE]"
    assert json.loads(short_stream[-2])["choices"][0]["finish_reason"] in ("length", "stop"), short_stream


def test_a_second_signal_aborts_at_once(tiny_qwen_dir):
    server = Served(tiny_qwen_dir, "--shutdown-timeout", "600")
    chunks: list[str] = []
    try:
        server.wait_ready()
        body = {**CHAT, "max_tokens": 2000, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
                _sse_lines(r, chunks)

        client = threading.Thread(target=stream)
        client.start()
        deadline = time.monotonic() + 120
        while len(chunks) < 2:
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(30) == 0
        assert time.monotonic() - signalled < 15  # not the 600 s grace period
        client.join(10)
    finally:
        server.stop()
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["choices"][0]["finish_reason"] == "abort"


# -- limits ---------------------------------------------------------------------------------------------------


def test_max_tokens_over_the_context_is_400_at_once(served):
    for field in ("max_tokens", "max_completion_tokens"):
        started = time.monotonic()
        response = httpx.post(served.url + "/v1/chat/completions", json={**CHAT, field: 10**9}, timeout=30)
        took = time.monotonic() - started
        assert response.status_code == 400 and took < 0.5, (response.text, took)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", field)
        assert f"context of {CONTEXT} tokens" in error["message"]
    response = httpx.post(
        served.url + "/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT},
        timeout=30,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_a_prompt_over_max_prompt_tokens_is_400(served):
    body = {**CHAT, "messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 1}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "--max-prompt-tokens" in error["message"]


def _read_status(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    head = b""
    while b"\r\n" not in head:
        part = sock.recv(4096)
        if not part:
            break
        head += part
    return head.split(b"\r\n", 1)[0].decode()


def test_a_body_over_the_limit_is_413_before_it_is_read(served):
    # a declared 1 GB body: refused on its headers, with 1 KB of it sent
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {2**30}\r\n\r\n"
        )
        started = time.monotonic()
        sock.sendall(head.encode() + b"{" + b" " * 1023)
        status = _read_status(sock, 5)
        assert status.startswith("HTTP/1.1 413") and time.monotonic() - started < 1.0

    # a chunked body streamed slowly (64 KiB every 10 ms: a gigabyte would take minutes): refused once past 1 MiB
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        sent, started = 0, time.monotonic()
        while sent < 2**30:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection after answering
                break
            sent += 0x10000
            time.sleep(0.01)
        status = _read_status(sock, 5)
        assert status.startswith("HTTP/1.1 413"), status
        assert sent <= 4 * 2**20 and time.monotonic() - started < 10, (sent, time.monotonic() - started)
    # the server is fine afterwards
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


def test_a_request_past_the_request_timeout_is_aborted(served):
    started = time.monotonic()
    whole = httpx.post(served.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 20000}, timeout=60)
    assert whole.status_code == 504 and whole.json()["error"]["code"] == "request_timeout"
    assert 3 <= time.monotonic() - started < 15
    chunks: list[str] = []
    body = {**CHAT, "max_tokens": 20000, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
        _sse_lines(response, chunks)
    assert chunks[-1] == "[DONE]"
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "abort"


# -- metrics ----------------------------------------------------------------------------------------------------


def test_metrics_move_after_a_request(served):
    before = _metrics(served.url)
    body = {
        **CHAT,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks: list[str] = []
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as response:
        _sse_lines(response, chunks)
    usage = json.loads(chunks[-2])["usage"]
    httpx.post(served.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 10**9}, timeout=30)
    after = _metrics(served.url)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("qwen_agent_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("qwen_agent_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert moved("qwen_agent_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("qwen_agent_generation_tokens_total") == usage["completion_tokens"]
    assert moved("qwen_agent_time_to_first_token_seconds_count") == 1
    assert moved("qwen_agent_e2e_request_latency_seconds_count") == 1
    assert moved("qwen_agent_inter_token_latency_seconds_count") >= 1
    assert moved("qwen_agent_decode_steps_total") >= 1
    assert moved("qwen_agent_decode_step_rows_count") == moved("qwen_agent_decode_steps_total")
    assert after[("qwen_agent_requests_running", ())] == 0 and after[("qwen_agent_requests_waiting", ())] == 0


def test_metrics_count_the_prefix_cache(served):
    before = _metrics(served.url)
    body = {**CHAT, "messages": [{"role": "user", "content": "count the prefix cache " * 8}], "max_tokens": 2}
    usages = [
        httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
        for _ in range(2)
    ]
    after = _metrics(served.url)

    def moved(name: str) -> float:
        return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)

    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[1] > 0  # the second request found the first one's blocks
    assert moved("qwen_agent_prefix_cache_requests_total") == 2
    assert moved("qwen_agent_prefix_cache_hits_total") >= 1
    assert moved("qwen_agent_prefix_cache_cached_tokens_total") == sum(cached)
    assert moved("qwen_agent_prefix_cache_prefilled_tokens_total") == sum(
        u["prompt_tokens"] - c for u, c in zip(usages, cached, strict=True)
    )
    assert after[("qwen_agent_prefix_cache_blocks_used", ())] > 0


def test_two_apps_in_one_process_keep_their_own_metrics(tiny_qwen_dir):
    first = create_app(load_model(tiny_qwen_dir), model_name="tiny")
    second = create_app(load_model(tiny_qwen_dir), model_name="tiny")
    with BackgroundServer(first) as a, BackgroundServer(second) as b:
        httpx.get(a.url + "/health")
        key = ("qwen_agent_requests_total", (("endpoint", "/health"), ("status", "200")))
        assert _metrics(a.url)[key] == 1 and key not in _metrics(b.url)


# -- health ------------------------------------------------------------------------------------------------------


def test_health_is_503_until_the_model_is_loaded_and_after_the_scheduler_stops(tiny_qwen_dir):
    release = threading.Event()

    def slow_load():
        release.wait(60)
        return load_model(tiny_qwen_dir)

    app = create_app(load=slow_load, model_name="tiny")
    with BackgroundServer(app) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        assert httpx.get(server.url + "/metrics").status_code == 200
        release.set()
        deadline = time.monotonic() + 60
        while (health := httpx.get(server.url + "/health")).status_code != 200:
            assert health.json()["status"] == "loading" and time.monotonic() < deadline
            time.sleep(0.05)
        assert health.json()["scheduler"]["alive"] is True
        reply = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200
        app.state.lifecycle.handlers.scheduler.close()  # the scheduler's thread ends
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "down"


def test_serve_with_a_model_that_fails_to_load_exits_2_with_the_error(tmp_path):
    bad = Served(tmp_path / "no-such-model")
    try:
        status = bad.process.wait(120)
    finally:
        bad.stop()
    assert status == 2
    assert "the model failed to load" in "".join(bad.output)
