"""The web UI's sessions without a browser: idle sessions are reaped with their kernels; turns and Stop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from qwen_agent.errors import ConfigError
from qwen_agent.llm import ScriptedLLM
from qwen_agent.serve.web_session import SessionPool, Settings, TurnEnded
from qwen_agent.tools.workspace import Workspace


def _drain(events) -> list:
    items = []
    while not items or not isinstance(items[-1], TurnEnded):
        items.append(events.get(timeout=60))
    return items


def test_idle_sessions_are_reaped_with_their_kernels(tmp_path: Path) -> None:
    pool = SessionPool(lambda: ScriptedLLM([]), ["code_interpreter"], idle_timeout=1.0, reap_every=0.2)
    try:
        csv = tmp_path / "data.csv"
        csv.write_text("x\n1\n")
        session = pool.get("tab-1")
        assert session.upload([csv]) == ["data.csv"]
        workdir = session.workspace
        assert pool.kernel_count() == 1 and (workdir / "data.csv").read_text() == "x\n1\n"
        deadline = time.monotonic() + 30
        while (
            workdir.exists() and time.monotonic() < deadline
        ):  # the temporary workspace goes with the kernel
            time.sleep(0.1)
        assert not workdir.exists() and pool.kernel_count() == 0
    finally:
        pool.close_all()


def test_a_turn_ends_with_its_reason_and_grows_the_history_only_on_an_answer() -> None:
    outputs = ["Final Answer: hi", "Action: nope\nAction Input: {}\nObservation:"]
    pool = SessionPool(lambda: ScriptedLLM(outputs), ["current_time"])
    try:
        session = pool.get("tab")
        assert _drain(session.start_turn("hello", Settings(tools=())))[-1] == TurnEnded("done")
        assert session.history[0][0] == "hello"
        # with a tool offered the agent loops: the unknown tool is observed, then the script has run out
        ended = _drain(session.start_turn("again", Settings(tools=("current_time",), max_steps=2)))[-1]
        assert ended.reason == "error" and "LLMError" in ended.error  # the script ran out: a backend failure
        assert len(session.history) == 1
        with pytest.raises(ConfigError, match="'web_fetch' is not served here"):
            session.start_turn("x", Settings(tools=("web_fetch",)))
    finally:
        pool.close_all()


def test_workspace_listing_leaves_out_links_and_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "link").symlink_to("/etc/hostname")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.csv").write_text("x")
    workspace = Workspace(tmp_path)
    assert workspace.files() == ["out.txt", "sub/deep.csv"]
    export = tmp_path.parent / "export"
    assert workspace.export(export) == [export / "out.txt", export / "sub" / "deep.csv"]
    (tmp_path / "out.txt").unlink()
    (tmp_path / "out.txt").symlink_to("/etc/hostname")  # swapped for a link: neither listed nor followed
    assert workspace.export(export) == [export / "sub" / "deep.csv"]
    workspace.close()


def test_stop_ends_a_generation_at_its_next_piece_and_closes_the_backend_stream() -> None:
    closed = threading.Event()

    class Endless:
        def complete(self, prompt, *, stop=(), sampling=None):
            raise AssertionError("the agent streams")

        def stream(self, prompt, *, stop=(), sampling=None):
            try:
                while True:
                    time.sleep(0.02)
                    yield "Thought: more "
            finally:
                closed.set()

    pool = SessionPool(Endless, ["current_time"])
    try:
        session = pool.get("tab")
        events = session.start_turn("go on forever", Settings(tools=("current_time",)))
        events.get(timeout=30)  # the turn is running
        session.stop()
        items = _drain(events)
        assert items[-1] == TurnEnded("stopped")
        assert closed.wait(5) and session.history == []
        deadline = time.monotonic() + 5
        while session.busy and time.monotonic() < deadline:  # the worker exits right after its last item
            time.sleep(0.01)
        assert not session.busy
    finally:
        pool.close_all()


def test_an_upload_replaces_a_symlink_the_kernel_planted_and_never_writes_through_it(tmp_path: Path) -> None:
    host_file = tmp_path / "host.txt"
    host_file.write_text("host data\n")
    upload = tmp_path / "data.csv"
    upload.write_text("x\n1\n")
    pool = SessionPool(lambda: ScriptedLLM([]), ["code_interpreter"])
    try:
        session = pool.get("tab")
        session.upload([upload])  # starts the kernel
        tool = session._code_tool()
        planted = tool.start().run(
            f"import os\nos.remove('data.csv')\nos.symlink({str(host_file)!r}, 'data.csv')"
        )
        assert planted.ok, planted.to_observation()
        assert session.upload([upload]) == ["data.csv"]
        assert host_file.read_text() == "host data\n"
        placed = session.workspace / "data.csv"
        assert not placed.is_symlink() and placed.read_text() == "x\n1\n"
    finally:
        pool.close_all()
