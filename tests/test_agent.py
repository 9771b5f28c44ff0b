"""The ReAct loop driven by a scripted model replaying Qwen-style outputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from qwen_agent.agent import (
    ActionEvent,
    Agent,
    AnswerDelta,
    ErrorEvent,
    FinalAnswerEvent,
    ObservationEvent,
    StepStarted,
    ThoughtDelta,
)
from qwen_agent.errors import ConfigError
from qwen_agent.llm import ScriptedLLM
from qwen_agent.react import Problem, react_instruction
from qwen_agent.runtime.chat_format import DEFAULT_SYSTEM


@dataclass
class Result:
    observation: str
    ok: bool = True
    error: str | None = None


class Weather:
    """A small tool with the BaseTool surface the agent uses; it counts its calls."""

    name = "get_weather"
    args_format = "json"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def tool_desc(self, variant: str) -> str:
        return f"get_weather: the weather ({variant})"

    def invoke(self, raw_arguments: str) -> Result:
        self.calls.append(raw_arguments)
        if "Atlantis" in raw_arguments:
            return Result("Error: no such city: Atlantis", ok=False, error="no such city: Atlantis")
        if "boom" in raw_arguments:
            raise RuntimeError("sensor offline")
        return Result("sunny, 21 °C")


def call(city: str, thought: str = "Thought: I should look up the weather.") -> str:
    return f'{thought}\nAction: get_weather\nAction Input: {{"city": "{city}"}}\nObservation:'


FINAL = " I now know the final answer.\nFinal Answer: It is sunny and 21 °C in Paris."


def test_prompt_layout_and_transcript_of_a_two_step_run():
    llm = ScriptedLLM([call("Paris"), FINAL])
    agent = Agent(llm, [Weather()])
    result = agent.run("Weather in Paris?")
    assert result.answer == "It is sunny and 21 °C in Paris." and result.stop_reason == "final_answer"
    first, second = (prompt for prompt, _ in llm.calls)
    assert first.query.startswith("Answer the following questions as best you can.")
    assert (
        "following tools:\n\nget_weather: the weather (react_prompt)\n\nUse the following format:"
        in first.query
    )
    assert first.query.endswith("Begin!\n\nQuestion: Weather in Paris?")
    assert first.assistant_prefix == ""
    assert second.assistant_prefix == (
        'Thought: I should look up the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: sunny, 21 °C\nThought:"
    )
    assert all(stop == ("Observation:", "Observation:\n") for _, stop in llm.calls)
    assert result.transcript == second.assistant_prefix + FINAL
    assert [s.action for s in result.steps] == ["get_weather", None]
    assert result.steps[0].arguments == {"city": "Paris"} and result.steps[0].observation == "sunny, 21 °C"
    assert result.llm_calls == 2 and result.history == [("Weather in Paris?", result.transcript)]


def test_event_order_is_well_formed():
    llm = ScriptedLLM([call("Paris"), FINAL], chunk_size=4)
    events = list(Agent(llm, [Weather()]).stream("Weather in Paris?"))
    kinds = [e.type for e in events]
    assert kinds[0] == "step_started" and kinds[-1] == "final_answer"
    first_step = kinds[: kinds.index("step_started", 1)]
    assert first_step == ["step_started"] + ["thought_delta"] * (len(first_step) - 3) + [
        "action",
        "observation",
    ]
    second = kinds[kinds.index("step_started", 1) :]
    assert second[0] == "step_started" and set(second[1:-1]) == {"thought_delta", "answer_delta"}
    assert second.index("answer_delta") > max(i for i, k in enumerate(second) if k == "thought_delta")
    thoughts = "".join(e.text for e in events if isinstance(e, ThoughtDelta) and e.index == 0)
    assert thoughts == "I should look up the weather."
    answer = "".join(e.text for e in events if isinstance(e, AnswerDelta))
    assert answer == events[-1].answer == "It is sunny and 21 °C in Paris."


def test_unknown_tool_becomes_an_observation_listing_valid_tools():
    bad = 'Thought: search it\nAction: web_search\nAction Input: {"q": "Paris weather"}\nObservation:'
    llm = ScriptedLLM([bad, call("Paris", " Wrong tool; use get_weather."), FINAL])
    events = list(Agent(llm, [Weather()]).stream("Weather in Paris?"))
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [e.kind for e in errors] == ["unknown_tool"]
    assert "web_search" in errors[0].message and "get_weather" in errors[0].message
    assert "Observation: Error: there is no tool named 'web_search'." in llm.calls[1][0].assistant_prefix
    result = events[-1].result
    assert result.steps[0].ok is False and result.steps[0].problems == (Problem.UNKNOWN_TOOL,)
    assert result.answer.startswith("It is sunny")


def test_tool_error_and_tool_exception_are_observations():
    llm = ScriptedLLM([call("Atlantis"), call("boom", " Try another."), FINAL])
    tool = Weather()
    events = list(Agent(llm, [tool]).stream("Weather?"))
    errors = [(e.kind, e.message) for e in events if isinstance(e, ErrorEvent)]
    assert errors == [
        ("tool_error", "no such city: Atlantis"),
        ("tool_error", "RuntimeError: sensor offline"),
    ]
    observations = [e.observation for e in events if isinstance(e, ObservationEvent)]
    assert observations == [
        "Error: no such city: Atlantis",
        "Error: the tool get_weather failed: RuntimeError: sensor offline",
    ]
    assert len(tool.calls) == 2 and events[-1].result.answer.startswith("It is sunny")


def test_malformed_output_gets_the_expected_format_back():
    llm = ScriptedLLM(["Thought: I am thinking about the weather.", FINAL])
    result = Agent(llm, [Weather()]).run("Weather?")
    prefix = llm.calls[1][0].assistant_prefix
    assert prefix.startswith(
        "Thought: I am thinking about the weather.\nObservation: Error: the reply has neither"
    )
    assert "Reply in this format:" in prefix and prefix.endswith("\nThought:")
    assert result.steps[0].problems == (Problem.MISSING_FINAL_ANSWER,)


def test_an_invented_observation_cut_by_the_backend_never_reaches_the_transcript():
    """The backend cuts at the stop word (the protocol's contract, which ScriptedLLM keeps); the agent relies on
    it, streaming and carrying only what came before the stop word."""
    invented = call("Paris") + " rainy (made up)\nThought: ok\nFinal Answer: rainy"
    llm = ScriptedLLM([invented, FINAL])
    events = list(Agent(llm, [Weather()]).stream("Weather in Paris?"))
    result = events[-1].result
    assert (
        result.steps[0].problems == () and result.steps[0].output == call("Paris")[: -len("\nObservation:")]
    )
    assert "made up" not in llm.calls[1][0].assistant_prefix
    assert "Observation: sunny, 21 °C" in llm.calls[1][0].assistant_prefix
    assert result.answer == "It is sunny and 21 °C in Paris."
    assert not any("made up" in e.text or "Observ" in e.text for e in events if hasattr(e, "text"))


def test_repeated_identical_action_is_not_run_again():
    tool = Weather()
    repeat = call("Paris", " Let me check again.").replace('{"city": "Paris"}', '{ "city" : "Paris" }')
    llm = ScriptedLLM([call("Paris"), repeat, FINAL])
    events = list(Agent(llm, [tool]).stream("Weather in Paris?"))
    assert len(tool.calls) == 1
    (error,) = [e for e in events if isinstance(e, ErrorEvent)]
    assert (
        error.kind == "repeated_action"
        and "already called get_weather" in error.message
        and "step 1" in error.message
    )
    assert events[-1].result.steps[1].ok is False


def test_budget_exhaustion_forces_a_final_answer():
    llm = ScriptedLLM([call("Paris"), call("Lyon", " And Lyon."), " Both are sunny."])
    events = list(Agent(llm, [Weather()], max_iterations=2).stream("Weather in France?"))
    result = events[-1].result
    assert result.stop_reason == "max_iterations" and result.answer == "Both are sunny."
    forced = [e for e in events if isinstance(e, StepStarted) and e.forced]
    assert len(forced) == 1 and forced[0].index == 2
    assert llm.calls[2][0].assistant_prefix.endswith(
        "Observation: sunny, 21 °C\nThought: I now know the final answer.\nFinal Answer:"
    )
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "Both are sunny."
    assert result.transcript.endswith("Final Answer: Both are sunny.")


def test_forced_turn_with_nothing_usable_still_answers():
    llm = ScriptedLLM([call("Paris"), "   "])
    result = Agent(llm, [Weather()], max_iterations=1).run("Weather?")
    assert result.stop_reason == "max_iterations" and "could not find an answer" in result.answer


def test_plain_text_answer_is_accepted():
    llm = ScriptedLLM(["你好！很高兴见到你。"])
    events = list(Agent(llm, [Weather()]).stream("你好"))
    assert events[-1].answer == "你好！很高兴见到你。"
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == "你好！很高兴见到你。"


def test_multi_turn_history_moves_the_instruction_to_the_previous_turn():
    llm = ScriptedLLM([call("Paris"), FINAL, "Thought: I know it.\nFinal Answer: Also sunny tomorrow."])
    agent = Agent(llm, [Weather()], system="Be brief.")
    first = agent.run("Weather in Paris?")
    second = agent.run("And tomorrow?", history=first.history)
    prompt = llm.calls[2][0]
    assert prompt.system == "Be brief."
    assert prompt.query == "And tomorrow?"
    ((old_query, old_response),) = prompt.history
    assert old_query.startswith("Answer the following questions") and old_query.endswith(
        "Question: Weather in Paris?"
    )
    assert old_response == first.transcript
    # the first run's prompt is a prefix of the second's: a KV cache stays valid
    assert prompt.to_chatml().startswith(
        llm.calls[1][0].to_chatml()[: -len(llm.calls[1][0].assistant_prefix)]
    )
    assert second.history[0] == ("Weather in Paris?", first.transcript)
    assert second.answer == "Also sunny tomorrow."


def test_token_counts_and_timings_are_summed():
    llm = ScriptedLLM([call("Paris"), FINAL])
    result = Agent(llm, [Weather()]).run("Weather?")
    assert result.completion_tokens == len(call("Paris")) - len("Observation:") + len(FINAL)
    assert result.seconds >= result.tool_seconds >= 0


def test_configuration_errors():
    with pytest.raises(ConfigError, match="max_iterations"):
        Agent(ScriptedLLM([]), [Weather()], max_iterations=0)
    with pytest.raises(ConfigError, match="two tools"):
        Agent(ScriptedLLM([]), [Weather(), Weather()])


def test_variant_is_passed_to_tool_descriptions():
    llm = ScriptedLLM([FINAL])
    Agent(llm, [Weather()], variant="react_demo").run("x")
    assert "get_weather: the weather (react_demo)" in llm.calls[0][0].query
    assert "following APIs" in llm.calls[0][0].query


def test_final_answer_event_carries_the_result():
    llm = ScriptedLLM([FINAL])
    events = list(Agent(llm, [Weather()]).stream("x"))
    assert isinstance(events[-1], FinalAnswerEvent) and events[-1].result.answer == events[-1].answer
    assert not any(isinstance(e, ActionEvent) for e in events)


def test_a_failed_call_may_be_retried_unchanged():
    tool = Weather()
    llm = ScriptedLLM([call("Atlantis"), call("Atlantis", " Retry."), FINAL])
    result = Agent(llm, [tool]).run("Weather in Atlantis?")
    assert len(tool.calls) == 2 and [s.ok for s in result.steps] == [False, False, True]


def test_a_backend_whose_stream_forgets_the_completion_is_reported():
    from qwen_agent.errors import LLMError

    class Broken(ScriptedLLM):
        def stream(self, prompt, *, stop=(), sampling=None):
            yield "Final Answer: x"

    with pytest.raises(LLMError, match="Broken.stream"):
        Agent(Broken([]), [Weather()]).run("x")


# ------------------------------------------------------------------------------------ the prompt as react_demo

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def react_demo_prompt(system: str, turns: list[tuple[str, str]], instruction: str | None) -> str:
    """The ChatML text react_demo.py's build_input_text writes: the instruction goes into the only turn or the
    one before the last, then every query and response is stripped of leading newlines and trailing space."""
    text = f"{IM_START}system\n{system}{IM_END}"
    for i, (query, response) in enumerate(turns):
        if instruction is not None and (len(turns) == 1 or i == len(turns) - 2):
            query = f"{instruction}\n\nQuestion: {query}"
        query, response = query.lstrip("\n").rstrip(), response.lstrip("\n").rstrip()
        text += f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n{response}{IM_END}"
    return text[: -len(IM_END)]


QUERIES = ["Weather?", "\nWeather?", "\n\n  Weather?  \n", "Weather?\n\nin Paris", "   "]
HISTORIES = [[], [("\nHi", "\nHello!  ")], [("Hi", "Hello!"), ("\n\nAnd you?", " Fine. ")]]


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("history", HISTORIES, ids=["no history", "one turn", "two turns"])
@pytest.mark.parametrize("with_tools", [True, False], ids=["tools", "no tools"])
def test_the_prompt_is_react_demos(query, history, with_tools):
    tools = [Weather()] if with_tools else []
    agent = Agent(ScriptedLLM([]), tools)
    instruction = react_instruction([t.tool_desc("react_prompt") for t in tools], [t.name for t in tools])
    expected = react_demo_prompt(DEFAULT_SYSTEM, [*history, (query, "")], instruction if tools else None)
    assert agent.prompt(query, history).to_chatml() == expected


def test_an_agent_without_tools_chats_and_the_whole_reply_is_the_answer():
    llm = ScriptedLLM(["Hello! How can I help?\n", "Thought: x\nFinal Answer: y\nObservation: z"])
    agent = Agent(llm)
    events = list(agent.stream("\nhi"))
    assert llm.calls[0][0].query == "hi" and "Answer the following" not in llm.calls[0][0].to_chatml()
    assert [e.type for e in events] == ["step_started"] + ["answer_delta"] * (len(events) - 2) + [
        "final_answer"
    ]
    first = events[-1].result
    assert first.answer == "".join(e.text for e in events[1:-1]) == "Hello! How can I help?"
    assert first.history == [("\nhi", "Hello! How can I help?")] and first.llm_calls == 1
    second = agent.run("again", history=first.history)
    assert llm.calls[1][0].history == (("hi", "Hello! How can I help?"),)
    assert second.answer == "Thought: x\nFinal Answer: y"  # no ReAct without tools; cut at the stop word
    empty = Agent(ScriptedLLM([" \n"])).run("hi")
    assert empty.answer == "" and empty.steps[0].ok is False and empty.steps[0].problems == (Problem.EMPTY,)


@pytest.mark.parametrize("gap", ["", "  ", "\n", " \n\n", "\t \n "])
def test_the_text_before_the_observation_is_carried_as_written(gap):
    output = f'Thought: look it up\nAction: get_weather\nAction Input: {{"city": "Paris"}}{gap}\nObservation:'
    llm = ScriptedLLM([output, FINAL])
    Agent(llm, [Weather()]).run("Weather?")
    # react_demo: everything before "\nObservation:", then the observation and the cue for the next thought
    carried = output[: output.rfind("\nObservation:")]
    assert llm.calls[1][0].assistant_prefix == carried + "\nObservation: sunny, 21 °C\nThought:"


# --------------------------------------------------------------------------------------------------- streaming

# (outputs, Agent keyword arguments, ScriptedLLM keyword arguments)
STREAM_CASES = {
    "plain reply": (["Hello! How can I help?"], {}, {}),
    "plain reply, no tools": (["Hello!\n\nHow can I help?  "], {"tools": []}, {}),
    "partial stop word at the end": (["Thought: done\nFinal Answer: ans\nObserv\n"], {}, {}),
    "forced answer": ([call("Paris"), " Both are sunny.\nObserv\n"], {"max_iterations": 1}, {}),
    "forced answer, nothing usable": ([call("Paris"), "  \n"], {"max_iterations": 1}, {}),
    "backend cut at the stop word": (
        [call("Paris") + " made up\nThought: ok", "Thought: ok\nFinal Answer: ans\nObservation: made up"],
        {},
        {},
    ),
    "stop word after a plain reply": (["Hello!\nObservation: made up"], {}, {}),
    "text before the first marker": (["Let me see.\nThought: fine\nFinal Answer: 42"], {}, {}),
    "two thoughts": (["Thought: a\nThought: b\nFinal Answer: c\n\nd"], {}, {}),
    "malformed, then an answer": (["Thought: hmm\nObs\nmore", FINAL], {}, {}),
}


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
@pytest.mark.parametrize("case", STREAM_CASES)
def test_deltas_of_each_kind_join_to_the_final_texts(case, chunk_size):
    outputs, agent_kwargs, llm_kwargs = STREAM_CASES[case]
    tools = agent_kwargs.pop("tools", [Weather()])
    llm = ScriptedLLM(outputs, chunk_size=chunk_size, **llm_kwargs)
    events = list(Agent(llm, tools, **agent_kwargs).stream("Weather?"))
    result = events[-1].result
    for step in result.steps:
        thought = "".join(e.text for e in events if isinstance(e, ThoughtDelta) and e.index == step.index)
        assert thought == step.thought
    answer = [e for e in events if isinstance(e, AnswerDelta)]
    assert "".join(e.text for e in answer) == result.answer and result.answer
    assert {e.index for e in answer} == {result.steps[-1].index}
    assert "made up" not in result.transcript and "Observ" not in result.answer


# --------------------------------------------------------------------------------------------------- end to end
# Recorded Qwen-style outputs (react_demo wording, code in fences) replayed against the real code interpreter.


@pytest.fixture(scope="module")
def real_tools():
    from qwen_agent.tools import CodeInterpreterTool, CurrentTimeTool

    interpreter = CodeInterpreterTool(timeout=20)
    yield [interpreter, CurrentTimeTool()]
    interpreter.close()


def code_step(code: str, thought: str) -> str:
    return f"{thought}\nAction: code_interpreter\nAction Input:\n```py\n{code}\n```\nObservation:"


def test_e2e_recovers_after_a_bad_argument(real_tools):
    llm = ScriptedLLM(
        [
            "Thought: 我需要运行代码。\nAction: code_interpreter\nAction Input: \nObservation:",
            code_step("print(sum(range(1, 101)))", " 我忘了写代码。"),
            " I now know the final answer.\nFinal Answer: 5050",
        ]
    )
    events = list(Agent(llm, real_tools, variant="react_demo").stream("1 加到 100 等于多少？"))
    observations = [e for e in events if isinstance(e, ObservationEvent)]
    assert (
        observations[0].ok is False
        and "invalid arguments for tool 'code_interpreter'" in observations[0].observation
    )
    assert observations[1].ok is True and observations[1].observation == "stdout:\n\n```\n5050\n```"
    assert [e.kind for e in events if isinstance(e, ErrorEvent)] == ["tool_error"]
    assert events[-1].answer == "5050"
    assert "Observation: Error: invalid arguments" in llm.calls[1][0].assistant_prefix


def test_e2e_recovers_after_arguments_that_are_not_json(real_tools):
    llm = ScriptedLLM(
        [
            "Thought: 查一下上海时间。\nAction: current_time\nAction Input: Asia/Shanghai\nObservation:",
            ' 参数要用 JSON。\nAction: current_time\nAction Input: {"timezone": "Asia/Shanghai"}\nObservation:',
            " I now know the final answer.\nFinal Answer: 已查到上海时间。",
        ]
    )
    result = Agent(llm, real_tools, variant="react_demo").run("上海现在几点？")
    first, second, _ = result.steps
    assert first.problems == (Problem.INVALID_ARGUMENTS,) and "not valid JSON" in first.observation
    assert second.ok and "Asia/Shanghai" in second.observation
    assert result.stop_reason == "final_answer"


def test_e2e_recovers_after_an_unknown_tool(real_tools):
    llm = ScriptedLLM(
        [
            code_step("print(2 ** 100)", "Thought: 用 Python 计算。").replace(
                "Action: code_interpreter", "Action: python"
            ),
            code_step("print(2 ** 100)", " 工具名应为 code_interpreter。"),
            " I now know the final answer.\nFinal Answer: 1267650600228229401496703205376",
        ]
    )
    result = Agent(llm, real_tools, variant="react_demo").run("2 的 100 次方是多少？")
    assert result.steps[0].problems == (Problem.UNKNOWN_TOOL,)
    assert "code_interpreter, current_time" in result.steps[0].observation
    assert result.steps[1].observation == "stdout:\n\n```\n1267650600228229401496703205376\n```"
    assert result.answer == "1267650600228229401496703205376"


def test_e2e_recovers_after_a_tool_error_and_keeps_kernel_state(real_tools):
    llm = ScriptedLLM(
        [
            code_step("values = [3, 1, 2]\nprint(values[3])", "Thought: 先定义列表再取值。"),
            code_step("print(sorted(values))", " 下标越界了，列表还在，直接排序。"),
            " I now know the final answer.\nFinal Answer: [1, 2, 3]",
        ]
    )
    events = list(Agent(llm, real_tools, variant="react_demo").stream("把 3,1,2 排序"))
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert [e.kind for e in errors] == ["tool_error"] and "IndexError" in errors[0].message
    observations = [e.observation for e in events if isinstance(e, ObservationEvent)]
    assert "IndexError" in observations[0] and observations[1] == "stdout:\n\n```\n[1, 2, 3]\n```"
    assert events[-1].answer == "[1, 2, 3]"


def test_e2e_budget_exhaustion_forces_an_answer(real_tools):
    llm = ScriptedLLM(
        [
            code_step("n = 10\nprint(n)", "Thought: 先试试。"),
            code_step("n *= 2\nprint(n)", " 再算一步。"),
            " n 最后是 20。",
        ]
    )
    result = Agent(llm, real_tools, max_iterations=2, variant="react_demo").run("n 翻倍后是多少？")
    assert [s.observation for s in result.steps[:2]] == ["stdout:\n\n```\n10\n```", "stdout:\n\n```\n20\n```"]
    assert result.stop_reason == "max_iterations" and result.answer == "n 最后是 20。"
    assert result.transcript.endswith("Thought: I now know the final answer.\nFinal Answer: n 最后是 20。")


def test_e2e_invented_observation_is_replaced_by_the_real_one(real_tools):
    output = (
        code_step("print(6 * 7)", "Thought: 计算一下。")
        + " 41\nThought: I now know the final answer.\nFinal Answer: 41"
    )
    llm = ScriptedLLM([output, " I now know the final answer.\nFinal Answer: 42"])
    result = Agent(llm, real_tools, variant="react_demo").run("6 乘 7？")
    # the backend cuts at the stop word, so the invented part never reaches the parser or the transcript
    assert result.steps[0].problems == () and "41" not in result.transcript
    assert result.steps[0].observation == "stdout:\n\n```\n42\n```" and result.answer == "42"


def test_e2e_event_order_is_well_formed(real_tools):
    llm = ScriptedLLM(
        [
            "Thought: 用错工具。\nAction: search\nAction Input: {}\nObservation:",
            code_step("print('hi')", " 换用代码解释器。"),
            " I now know the final answer.\nFinal Answer: hi",
        ],
        chunk_size=5,
    )
    events = list(Agent(llm, real_tools, variant="react_demo").stream("say hi"))
    # a tiny grammar: step = started thought* (action error? observation | error observation | answer* final)
    i, steps = 0, 0
    while i < len(events):
        assert isinstance(events[i], StepStarted) and events[i].index == steps
        i += 1
        while isinstance(events[i], ThoughtDelta):
            assert events[i].index == steps
            i += 1
        if isinstance(events[i], ActionEvent):
            i += 1 + isinstance(events[i + 1], ErrorEvent)
            assert isinstance(events[i], ObservationEvent)
        elif isinstance(events[i], ErrorEvent):
            i += 1
            assert isinstance(events[i], ObservationEvent) and not events[i].ok
        else:
            while isinstance(events[i], AnswerDelta):
                i += 1
            assert isinstance(events[i], FinalAnswerEvent) and i == len(events) - 1
        i += 1
        steps += 1
    assert steps == 3


# --------------------------------------------------------------------------------------------------- CLI


def _sse_text(*pieces: str) -> list[dict]:
    return [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]


def test_run_command_prints_steps_as_they_happen(capsys):
    from fake_openai_server import FakeServer, json_reply, sse_reply

    from qwen_agent.cli import main

    server = FakeServer()
    server.replies += [
        json_reply(200, {"data": [{"id": "Qwen-7B-Chat"}]}),
        sse_reply(
            _sse_text(
                "Thought: 用代码算。\nAction: code_interpreter\n",
                "Action Input:\n```py\nprint(7 * 6)\n```\nObserv",
                "ation:",
            )
        ),
        sse_reply(_sse_text(" I now know the final answer.\n", "Final Answer: 42")),
    ]
    try:
        code = main(
            [
                "run",
                "--model",
                server.url,
                "--tools",
                "code_interpreter",
                "--variant",
                "react_demo",
                "7 乘 6？",
            ]
        )
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert code == 0
    assert out == (
        "\n--- step 1\nThought: 用代码算。\nAction: code_interpreter\nAction Input: ```py\nprint(7 * 6)\n```\n"
        "Observation: stdout:\n\n```\n42\n```\n"
        "\n--- step 2\nThought: I now know the final answer.\nFinal Answer: 42\n"
    )
    assert "[final_answer; 2 model turns;" in err
    second_prompt = server.requests[2][2]["prompt"]
    assert second_prompt.endswith("Observation: stdout:\n\n```\n42\n```\nThought:")


def test_run_command_prints_a_plain_reply_once(capsys):
    from fake_openai_server import FakeServer, json_reply, sse_reply

    from qwen_agent.cli import main

    server = FakeServer()
    server.replies += [
        json_reply(200, {"data": [{"id": "Qwen-7B-Chat"}]}),
        sse_reply(_sse_text("Hello! ", "How can I help?")),
    ]
    try:
        code = main(["run", "--model", server.url, "--tools", "current_time", "hi"])
    finally:
        server.close()
    out, _ = capsys.readouterr()
    assert code == 0
    assert out == "\n--- step 1\nFinal Answer: Hello! How can I help?\n"


def test_run_command_reports_an_unreachable_server(capsys):
    import socket

    from qwen_agent.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(
        ["run", "--model", f"http://127.0.0.1:{port}", "--served-model", "m", "--tools", "current_time", "hi"]
    )
    assert code == 2 and "cannot connect" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- local engine


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight checkpoint in Qwen-7B-Chat's exact layout (seq_length as in the real model, so dynamic NTK
    does not change between steps)."""
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen", seed=0, seq_length=8192)


@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoint):
    from qwen_agent.runtime.engine import load_model

    return load_model(tiny_checkpoint, device="cpu")


def test_local_engine_runs_the_loop_mechanically(tiny_engine):
    from qwen_agent.llm import LocalLLM, Sampling

    llm = LocalLLM(tiny_engine)
    result = Agent(llm, [Weather()], max_iterations=2, sampling=Sampling(max_tokens=16, temperature=0)).run(
        "hi"
    )
    assert result.answer and 1 <= result.llm_calls <= 3
    assert result.prompt_tokens > result.prefill_tokens > 0 or result.llm_calls == 1
    assert all(s.completion.completion_tokens <= 16 for s in result.steps)


class _Steered:
    """Runs the real tiny network, so the KV cache is filled and reused for real, then puts a planned token on top
    of its logits so that the loop takes a known path (random weights would never write a ReAct step)."""

    def __init__(self, model):
        self.model, self.config, self.tok_embeddings = model, model.config, model.tok_embeddings
        self.plan: list[int] = []
        self.position = 0

    def prefill(self, ids, lengths, cache, rows, starts=None):
        return self._steer(self.model.prefill(ids, lengths, cache, rows, starts))

    def decode_step(self, tokens, slots, cache, kv_len, fused=False):
        return self._steer(self.model.decode_step(tokens, slots, cache, kv_len, fused=fused))

    def _steer(self, logits):
        logits[:, self.plan[min(self.position, len(self.plan) - 1)]] += 1e4
        self.position += 1
        return logits


def test_local_engine_reuses_the_kv_cache_across_steps(tiny_engine, real_tools):
    from qwen_agent.llm import LocalLLM
    from qwen_agent.runtime.engine import QwenEngine

    tok = tiny_engine.tokenizer
    steered = _Steered(tiny_engine.model)
    engine = QwenEngine(steered, tok, tiny_engine.generation_config, tiny_engine.default_system)
    outputs = [
        code_step("total = sum(range(1, 101))\nprint(total)", "Thought: 用代码计算。"),
        code_step("print(total * 2)", " 再乘以 2。"),
        " I now know the final answer.\nFinal Answer: 10100",
    ]
    seen: list[tuple[list[int], list[int]]] = []  # (prompt ids, generated ids) of every call
    handles = []  # every request's handle, which holds its result
    submit = engine.submit
    engine.submit = lambda request, on_event=None: handles.append(submit(request, on_event)) or handles[-1]

    class Recording(LocalLLM):
        def stream(self, prompt, *, stop=(), sampling=None):
            steered.plan, steered.position = tok.encode(outputs[len(seen)]) + [tok.im_end_id], 0
            ids = self.prompt_ids(prompt)
            for item in super().stream(prompt, stop=stop, sampling=sampling):
                if not isinstance(item, str):
                    seen.append((ids, handles[-1].result.token_ids))
                yield item

    from qwen_agent.llm import Sampling

    result = Agent(Recording(engine), real_tools, variant="react_demo", sampling=Sampling(max_tokens=64)).run(
        "1 加到 100 再乘 2？"
    )
    assert result.answer == "10100"
    assert [s.observation for s in result.steps[:2]] == [
        "stdout:\n\n```\n5050\n```",
        "stdout:\n\n```\n10100\n```",
    ]

    prefills = [s.completion.prefill_tokens for s in result.steps]
    prompts = [s.completion.prompt_tokens for s in result.steps]
    assert prefills[0] == prompts[0]  # nothing cached before the first call
    for k in (1, 2):
        (old_prompt, old_generated), (new_prompt, _) = seen[k - 1], seen[k]
        cached = (
            old_prompt + old_generated
        )  # the step run while the host reads a token feeds even the last one
        common = next(
            (i for i, (a, b) in enumerate(zip(cached, new_prompt, strict=False)) if a != b),
            min(len(cached), len(new_prompt)),
        )
        assert common > len(old_prompt)  # the whole previous prompt and most of the step's output are reused
        # only the Observation and what follows it is encoded, and the rest of the last full 16-token block
        assert prefills[k] == len(new_prompt) - common // 16 * 16
        observation = tok.encode(render_observation_text(result.steps[k - 1].observation))
        assert prefills[k] <= len(observation) + 4 + 15
    assert result.prefill_tokens < result.prompt_tokens / 2


def render_observation_text(observation: str) -> str:
    from qwen_agent.react import render_observation

    return render_observation(observation)


def test_a_reply_cut_at_the_token_limit_is_explained():
    from qwen_agent.llm import Completion

    class Truncating(ScriptedLLM):
        def stream(self, prompt, *, stop=(), sampling=None):
            for item in super().stream(prompt, stop=stop, sampling=sampling):
                yield (
                    Completion(item.text, "length")
                    if isinstance(item, Completion) and len(self.calls) == 1
                    else item
                )

    llm = Truncating(['Thought: x\nAction: get_weather\nAction Input: {"city": "Par', FINAL])
    result = Agent(llm, [Weather()]).run("Weather?")
    assert result.steps[0].problems == (Problem.INVALID_ARGUMENTS,)
    assert "cut off at the token limit" in result.steps[0].observation


def test_run_command_with_a_local_checkpoint(tiny_checkpoint, capsys):
    from qwen_agent.cli import main

    args = ["run", "--model", str(tiny_checkpoint), "--device", "cpu", "--tools", "current_time"]
    code = main(
        [*args, "--max-iterations", "1", "--max-tokens", "8", "--temperature", "0", "What time is it?"]
    )
    out, err = capsys.readouterr()
    # the step line shows how full the context is (the tiny checkpoint holds 32767 tokens, as Qwen-7B-Chat)
    assert code == 0 and re.match(r"\n--- step 1 \(prompt \d+ of 32767 tokens\)\n", out)
    assert "prompt /" in err and re.search(r"\d+ prefilled, \d+ cached", err)
