"""``qwen-agent web`` as a user starts it: a real process serving the page on 127.0.0.1, and its errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

pytest.importorskip("gradio", reason="the web UI needs the [web] extra (gradio)")

from qwen_agent.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_web_serves_the_page_for_a_local_model(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "qwen_agent.cli", "web", "--model", str(tiny_qwen_dir)),
            *("--port", str(port), "--max-batch", "2"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert page is not None, (tmp_path / "web.log").read_text()
        assert page.status_code == 200 and "Qwen ReAct agent" in page.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_web_reports_a_bad_model_or_tool_without_a_traceback(tmp_path: Path, capsys) -> None:
    assert main(["web", "--model", str(tmp_path / "missing"), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen-agent web: error:") and "missing" in err and "Traceback" not in err
    assert main(["web", "--model", str(tmp_path), "--tools", "code_interpreter,nope"]) == 2
    err = capsys.readouterr().err
    assert "no tool named 'nope'" in err and "code_interpreter" in err


def test_web_sigterm_ends_a_running_turn_and_exits_0_within_the_shutdown_timeout(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    """Over Gradio's HTTP queue API: a turn generating (a 30000-token budget) when SIGTERM arrives gets the
    grace period, is then stopped, and its event stream ends with the turn's last update; the process exits 0."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "web.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "qwen_agent.cli", "web", "--model", str(tiny_qwen_dir)),
            *("--port", str(port), "--tools", "", "--max-tokens", "30000", "--shutdown-timeout", "3"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    events: list[dict] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "web.log").read_text()
            try:
                if requests.get(url + "/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        config = requests.get(url + "/config", timeout=10).json()
        [respond] = [d for d in config["dependencies"] if d.get("api_name") == "_respond"]
        data = [{"text": "hello", "files": []}, [], 8, 0.7, True, "You are a helpful assistant."]
        join = {
            "data": data,
            "fn_index": respond["id"],
            "session_hash": "s1",
            "trigger_id": respond["targets"][0][0],
        }
        assert requests.post(url + "/gradio_api/queue/join", json=join, timeout=10).status_code == 200

        def read_events() -> None:
            with requests.get(
                url + "/gradio_api/queue/data?session_hash=s1", stream=True, timeout=60
            ) as stream:
                for line in stream.iter_lines(decode_unicode=True):
                    if line and line.startswith("data: "):
                        events.append(json.loads(line[6:]))

        reader = threading.Thread(target=read_events)
        reader.start()
        while sum(e["msg"] == "process_generating" for e in events) < 3:  # the answer is streaming
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - signalled
        reader.join(10)
        assert not reader.is_alive(), "the page's event stream is still open"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert 3 <= took < 3 + 10, (tmp_path / "web.log").read_text()
    messages = [e["msg"] for e in events]
    assert "process_completed" in messages and "unexpected_error" not in messages, messages
    assert "stopped 1 running turn(s)" in (tmp_path / "web.log").read_text()
