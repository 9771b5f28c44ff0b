"""``qwen-agent web`` as a user starts it: a real process serving the page on 127.0.0.1, and its errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
