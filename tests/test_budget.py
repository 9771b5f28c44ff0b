"""The context budget on a real (tiny) checkpoint: a 200,000-character Observation, a 100-turn history and a prompt
that cannot fit each end in a typed result, never in the engine's context error."""

from __future__ import annotations

import asyncio

import pytest

from qwen_agent.agent import CONTEXT_FULL, Agent, BudgetEvent, FinalAnswerEvent, StepStarted
from qwen_agent.budget import ContextBudget
from qwen_agent.llm import LocalLLM, Sampling, ScriptedLLM
from qwen_agent.llm_protocol import ChatPrompt
from qwen_agent.tools import tool

WINDOW = 2048  # the tiny checkpoint's context, small so that tests cross it cheaply


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from qwen_agent.runtime.engine import load_model
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(
        tmp_path_factory.mktemp("budget") / "qwen2",
        "qwen2",
        seed=0,
        config_overrides={"max_position_embeddings": WINDOW},
    )
    engine = load_model(path, device="cpu")
    assert engine.config.max_context == WINDOW
    return engine


class ScriptThenModel:
    """The first outputs replayed (a planned tool call), then the real model: every prompt goes through the real
    tokenizer and the engine's context check, and its real length is recorded."""

    def __init__(self, script: list[str], llm: LocalLLM):
        self.script, self.llm = ScriptedLLM(script), llm
        self.prompt_lengths: list[int] = []
        self.prompts: list[ChatPrompt] = []

    context_window = property(lambda self: self.llm.context_window)
    tokenizer = property(lambda self: self.llm.tokenizer)

    def stream(self, prompt, *, stop=(), sampling=None):
        self.prompts.append(prompt)
        self.prompt_lengths.append(len(self.llm.prompt_ids(prompt)))
        if len(self.script.calls) < len(self.script.outputs):
            yield from self.script.stream(prompt, stop=stop, sampling=sampling)
        else:
            yield from self.llm.stream(prompt, stop=stop, sampling=sampling)


BIG = "".join(f"row {i:06d}: value={i * 7 % 1000}\n" for i in range(10_000))[:200_000]


@tool(register=False)
def dump(table: str) -> str:
    """Dump a table.

    Args:
        table: its name
    """
    return BIG


CALL = 'Thought: look at it\nAction: dump\nAction Input: {"table": "t"}\nObservation:'
SAMPLING = Sampling(max_tokens=8, temperature=0)


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_200000_character_observation_is_shortened_head_and_tail(engine, mode):
    assert len(BIG) == 200_000
    llm = ScriptThenModel([CALL], LocalLLM(engine))
    agent = Agent(llm, [dump], max_iterations=1, sampling=SAMPLING)
    if mode == "run":
        events = list(agent.stream("Summarise table t"))
    else:

        async def main():
            return [e async for e in agent.astream("Summarise table t")]

        events = asyncio.run(main())
    result = events[-1].result
    assert result.stop_reason == "max_iterations" and result.llm_calls == 2  # the real model wrote the answer
    observation = result.steps[0].observation
    tokens = len(engine.tokenizer.encode(observation))
    assert tokens <= WINDOW // 4 < len(engine.tokenizer.encode(BIG))
    assert observation.startswith(BIG[:200]) and observation.endswith(BIG[-200:])
    assert "characters elided; the Observation had" in observation and "its budget is 512]" in observation
    kinds = [e.kind for e in events if isinstance(e, BudgetEvent)]
    assert kinds == ["observation_shortened"]
    assert all(n <= WINDOW for n in llm.prompt_lengths)
    # what the budget counted is what the engine was sent, token for token
    steps = [e for e in events if isinstance(e, StepStarted)]
    assert [s.prompt_tokens for s in steps] == llm.prompt_lengths


def test_a_100_turn_history_is_trimmed_oldest_first(engine):
    history = [
        (f"Question {i}: " + "tell me more. " * 20, f"Answer {i}: " + "here it is. " * 20) for i in range(100)
    ]
    llm = ScriptThenModel([], LocalLLM(engine))
    agent = Agent(llm, [dump], max_iterations=1, sampling=SAMPLING)
    events = list(agent.stream("And now?", history))
    result = events[-1].result
    assert result.stop_reason in ("final_answer", "max_iterations") and result.completion_tokens > 0
    trimmed = [e for e in events if isinstance(e, BudgetEvent)]
    assert [e.kind for e in trimmed] == ["history_trimmed"]
    assert f"the {result.dropped_turns} oldest of 100 earlier turns" in trimmed[0].message
    sent = llm.prompts[0]
    kept = len(sent.history)
    assert 0 < kept < 100 and result.dropped_turns == 100 - kept
    assert sent.history[-1][0].endswith(history[-1][0].strip())  # the newest turn, with the ReAct instruction
    assert sent.history[0][0] == history[100 - kept][0].strip()
    assert llm.prompt_lengths[0] <= WINDOW - 8  # room left for the reply
    assert [e.prompt_tokens for e in events if isinstance(e, StepStarted)][0] == llm.prompt_lengths[0]
    assert result.history[:-1] == history  # the conversation itself keeps every turn


def test_a_prompt_that_cannot_fit_ends_with_a_typed_result(engine):
    agent = Agent(LocalLLM(engine), [dump], sampling=SAMPLING)
    events = list(agent.stream("Read this: " + "lorem ipsum dolor " * 2000))
    result = events[-1].result
    assert isinstance(events[-1], FinalAnswerEvent)
    assert result.stop_reason == "context" and result.answer == CONTEXT_FULL and result.llm_calls == 0
    [full] = [e for e in events if isinstance(e, BudgetEvent)]
    assert full.kind == "context_full" and f"the context holds {WINDOW}" in full.message
    assert "".join(e.text for e in events if e.type == "answer_delta") == CONTEXT_FULL


def test_a_run_whose_transcript_outgrows_the_context_ends_typed(engine):
    # an Observation budget as large as the context: after the step, the prompt no longer fits
    llm = ScriptThenModel([CALL], LocalLLM(engine))
    agent = Agent(llm, [dump], sampling=SAMPLING, max_observation_tokens=WINDOW)
    result = agent.run("Summarise table t")
    assert result.stop_reason == "context" and result.llm_calls == 1 and len(result.steps) == 1
    assert "characters elided" in result.steps[0].observation


def test_the_reply_is_shortened_to_the_room_left():
    budget = ContextBudget(300, None)
    prompt = ChatPrompt("q" * 600)
    fit = budget.fit(lambda turns: prompt, [], Sampling(max_tokens=512))
    assert fit.prompt is prompt and fit.sampling.max_tokens == 300 - fit.prompt_tokens


def test_without_a_window_nothing_is_counted_or_cut():
    budget = ContextBudget(None, None)
    fit = budget.fit(lambda turns: ChatPrompt("q"), [("a", "b")], None)
    assert fit.prompt_tokens is None and fit.sampling is None and fit.dropped_turns == 0
    assert budget.shorten("x" * 1_000_000) == ("x" * 1_000_000, 0)
    capped = ContextBudget(None, None, max_observation_tokens=100)
    text, elided = capped.shorten("y" * 10_000)
    assert elided > 9000 and capped.count(text) <= 100 and text.startswith("yyy") and text.endswith("yyy")
