"""The LocalLLM the web UI shares between sessions, whose calls the engine's scheduler decodes together, on a real
engine: the tiny checkpoint (greedy results must equal ``engine.generate`` on a second copy of it), or the
engine driving ``ScriptedModel`` where a generation must run until it is stopped."""

from __future__ import annotations

import threading
import time

import pytest
from tiny_models import ScriptedModel

from qwen_agent.llm import LocalLLM
from qwen_agent.llm_protocol import ChatPrompt, Sampling
from qwen_agent.runtime.config import GenerationConfig
from qwen_agent.runtime.engine import QwenEngine, load_model
from qwen_agent.serve.web_session import SessionPool, Settings, TurnEnded


def _drain(events) -> list:
    items = []
    while not items or not isinstance(items[-1], TurnEnded):
        items.append(events.get(timeout=120))
    return items


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Recording:
    """Passes calls through, keeping each stream's arguments and its Completion."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def complete(self, prompt, *, stop=(), sampling=None):
        raise AssertionError("the agent streams")

    def stream(self, prompt, *, stop=(), sampling=None):
        items = list(self.llm.stream(prompt, stop=stop, sampling=sampling))
        self.calls.append((prompt, tuple(stop), sampling, items[-1]))
        yield from items


@pytest.fixture
def endless(tokenizer):
    """An engine whose model writes "Thought: a", then " a" for as long as it is let."""
    engine = QwenEngine(
        ScriptedModel([tokenizer.encode("Thought: a")]), tokenizer, GenerationConfig(), max_batch=2
    )
    yield engine
    engine.close()


def test_sessions_turns_are_decoded_in_shared_batches_with_the_greedy_results_they_get_alone(
    tiny_qwen_dir,
) -> None:
    engine, reference = load_model(tiny_qwen_dir, device="cpu"), load_model(tiny_qwen_dir, device="cpu")
    engine.scheduler.configure(max_batch=4)
    scheduler = engine.scheduler
    # the first prefill waits until every session has submitted, so that all of them decode together
    gate, prefill = threading.Event(), engine.model.prefill

    def gated_prefill(*args, **kwargs):
        assert gate.wait(60)
        return prefill(*args, **kwargs)

    engine.model.prefill = gated_prefill
    shared = Recording(LocalLLM(engine))
    pool = SessionPool(lambda: shared, ["current_time"])
    try:
        settings = Settings(tools=(), greedy=True, max_tokens=12, max_steps=1)
        turns = [
            pool.get(f"tab-{i}").start_turn(f"Question {i}: what is {i} plus {i}?", settings)
            for i in range(4)
        ]
        _wait_for(lambda: scheduler.stats()["in_flight"] == 4, "the four sessions' requests")
        gate.set()
        assert [_drain(events)[-1] for events in turns] == [TurnEnded("done")] * 4
        stats = scheduler.stats()
        assert stats["max_rows"] == 4 and stats["step_rows"][4] > 0, stats
        assert len(shared.calls) >= 4
        alone_llm = LocalLLM(reference)
        for prompt, stop, sampling, completion in shared.calls:
            alone = reference.submit(alone_llm.request(prompt, stop=stop, sampling=sampling)).wait()
            assert (completion.text, completion.completion_tokens) == (alone.text, alone.completion_tokens)
    finally:
        pool.close_all()
        engine.close()


def test_closing_a_stream_cancels_its_row_and_the_next_call_is_served(endless) -> None:
    llm = LocalLLM(endless)
    stream = llm.stream(ChatPrompt("go on"), sampling=Sampling(max_tokens=5000))
    assert next(stream) == "Thought"
    stream.close()
    _wait_for(lambda: endless.scheduler.stats()["cancelled"] == 1, "the cancelled row")
    assert endless.scheduler.stats()["in_flight"] == 0
    completion = llm.complete(ChatPrompt("again"), sampling=Sampling(max_tokens=4))
    assert (completion.text, completion.finish_reason) == ("Thought: a a", "length")  # " a" repeats


def test_stop_in_a_session_cancels_its_row(endless) -> None:
    pool = SessionPool(lambda: LocalLLM(endless), ["current_time"])
    try:
        session = pool.get("tab")
        events = session.start_turn("go on forever", Settings(tools=("current_time",), max_tokens=5000))
        events.get(timeout=60)  # decoding
        session.stop()
        assert _drain(events)[-1] == TurnEnded("stopped")
        _wait_for(lambda: endless.scheduler.stats()["cancelled"] == 1, "the cancelled row")
        assert endless.scheduler.stats()["in_flight"] == 0
    finally:
        pool.close_all()


def test_an_engine_error_ends_the_turn_with_the_error_the_chat_shows(tiny_qwen_dir) -> None:
    engine = load_model(tiny_qwen_dir, device="cpu")
    prefill = engine.model.prefill

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    engine.model.prefill = failing_prefill
    scheduler = engine.scheduler
    pool = SessionPool(lambda: LocalLLM(engine), ["current_time"])
    try:
        session = pool.get("tab")
        ended = _drain(session.start_turn("hi", Settings(tools=(), max_tokens=4)))[-1]
        assert ended == TurnEnded(
            "error", "LLMError: the local model failed: RuntimeError: CUDA out of memory"
        )
        assert session.history == [] and scheduler.stats()["in_flight"] == 0
        engine.model.prefill = prefill  # the failed batch failed its request, not the scheduler
        assert _drain(session.start_turn("hi", Settings(tools=(), max_tokens=4)))[-1] == TurnEnded("done")
    finally:
        pool.close_all()
        engine.close()
