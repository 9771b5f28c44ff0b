"""How the web UI turns agent events into chat messages (no browser): step blocks, answers, figures."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the web UI needs the [web] extra (gradio)")

from qwen_agent.agent import (  # noqa: E402
    ActionEvent,
    AnswerDelta,
    ErrorEvent,
    ObservationEvent,
    StepStarted,
    ThoughtDelta,
)
from qwen_agent.serve.web import TurnView  # noqa: E402
from qwen_agent.serve.web_session import TurnEnded  # noqa: E402


def _view(workdir: Path | None) -> TurnView:
    return TurnView({"code_interpreter": "code"}, lambda: workdir)


def test_a_tool_step_is_a_block_with_thought_code_and_observation_then_the_answer(tmp_path: Path) -> None:
    view = _view(tmp_path)
    view.feed(StepStarted(0))
    assert view.visible()[0]["metadata"]["status"] == "pending"
    view.feed(ThoughtDelta(0, "Use Python."))
    view.feed(ActionEvent(0, "code_interpreter", "```py\nprint(1)\n```", {"code": "print(1)"}))
    view.feed(ObservationEvent(0, "stdout:\n\n```\n1\n```", True))
    view.feed(StepStarted(1))
    view.feed(ThoughtDelta(1, "I now know the final answer."))
    view.feed(AnswerDelta(1, "It is "))
    view.feed(AnswerDelta(1, "1."))
    block, answer = view.visible()  # the second step says nothing beyond the answer: left out
    assert block["metadata"]["title"] == "Step 1 · code_interpreter" and block["metadata"]["status"] == "done"
    assert "```python\nprint(1)\n```" in block["content"]
    assert "````text\nstdout:\n\n```\n1\n```\n````" in block["content"]  # the inner fence stays inside
    assert answer == {"role": "assistant", "content": "It is 1."}


def test_failed_and_stopped_steps_are_marked(tmp_path: Path) -> None:
    view = _view(tmp_path)
    view.feed(StepStarted(0))
    view.feed(ActionEvent(0, "code_interpreter", "1/0", None))
    view.feed(ErrorEvent(0, "tool_error", "ZeroDivisionError"))
    view.feed(ObservationEvent(0, "error: ZeroDivisionError", False))
    view.feed(StepStarted(1))
    view.finish(TurnEnded("stopped"))
    failed, stopped, note = view.visible()
    assert failed["metadata"]["title"].endswith("· failed") and failed["metadata"]["log"] == "tool error"
    assert stopped["metadata"]["log"] == "stopped" and stopped["metadata"]["status"] == "done"
    assert note["content"] == "Stopped."


def test_only_figures_in_the_host_only_directory_are_shown(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "fig-001.png").write_bytes(b"\x89PNG")
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG")
    (workdir / "fig-002.png").symlink_to(outside)
    view = _view(workdir)
    view.feed(StepStarted(0))
    view.feed(
        ObservationEvent(
            0,
            f"![fig-001]({workdir}/fig-001.png)\n\n![fig-002]({workdir}/fig-002.png)\n\n![fig-003]({outside})",
            True,
        )
    )
    images = [m["content"]["path"] for m in view.visible() if isinstance(m["content"], dict)]
    assert images == [str(workdir / "fig-001.png")]
