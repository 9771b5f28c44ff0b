"""Qwen ReAct prompts (byte for byte) and the total output parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_agent.errors import ConfigError
from qwen_agent.react import (
    STOP_WORDS,
    Action,
    FinalAnswer,
    Malformed,
    Problem,
    SectionStreamer,
    parse_arguments,
    parse_output,
    react_instruction,
    react_question,
    render_action,
    render_final_answer,
    render_observation,
    tool_desc_line,
)

SEARCH_PARAMS = [
    {
        "name": "search_query",
        "description": "搜索关键词或短语",
        "required": True,
        "schema": {"type": "string"},
    }
]
TOOLS = {"google_search": "json", "code_interpreter": "code", "image_gen": "json"}


# --------------------------------------------------------------------------------------------------- prompts


def test_tool_desc_react_prompt_variant_is_the_tutorial_line():
    line = tool_desc_line("google_search", "谷歌搜索", "谷歌搜索是一个通用搜索引擎。", SEARCH_PARAMS)
    assert line == (
        "google_search: Call this tool to interact with the 谷歌搜索 API. What is the 谷歌搜索 API useful for? "
        "谷歌搜索是一个通用搜索引擎。 Parameters: "
        '[{"name": "search_query", "description": "搜索关键词或短语", "required": true, '
        '"schema": {"type": "string"}}] Format the arguments as a JSON object.'
    )


def test_tool_desc_suffix_depends_on_variant_and_args_format():
    base = tool_desc_line("python", "Python", "Runs code.", [], variant="openai_api")
    assert (
        base
        == "python: Call this tool to interact with the Python API. What is the Python API useful for? Runs code. Parameters: []"
    )
    demo_code = tool_desc_line("python", "Python", "Runs code.", [], variant="react_demo", args_format="code")
    assert (
        demo_code
        == base + " Enclose the code within triple backticks (`) at the beginning and end of the code."
    )
    demo_json = tool_desc_line("python", "Python", "Runs code.", [], variant="react_demo")
    assert demo_json == base + " Format the arguments as a JSON object."
    with pytest.raises(ConfigError, match="args_format"):
        tool_desc_line("python", "Python", "Runs code.", [], variant="react_demo", args_format="yaml")
    with pytest.raises(ConfigError, match="variant"):
        tool_desc_line("python", "Python", "Runs code.", [], variant="react_chat")


def test_react_prompt_variant_matches_the_tutorial_template():
    prompt = react_question(react_instruction(["A_DESC", "B_DESC"], ["a", "b"]), "what?")
    assert prompt == (
        "Answer the following questions as best you can. You have access to the following tools:\n\n"
        "A_DESC\n\nB_DESC\n\n"
        "Use the following format:\n\n"
        "Question: the input question you must answer\n"
        "Thought: you should always think about what to do\n"
        "Action: the action to take, should be one of [a,b]\n"
        "Action Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n\n"
        "Begin!\n\n"
        "Question: what?"
    )


@pytest.mark.parametrize("variant", ["react_demo", "openai_api"])
def test_demo_and_openai_variants_say_apis_and_join_names_with_comma_space(variant):
    text = react_instruction(["A_DESC"], ["a", "b"], variant)
    assert "You have access to the following APIs:\n\nA_DESC\n\nUse" in text
    assert "should be one of [a, b]\n" in text
    assert text.endswith("Final Answer: the final answer to the original input question\n\nBegin!")


def test_stop_words_cover_both_tokenisations():
    assert STOP_WORDS == ("Observation:", "Observation:\n")


# --------------------------------------------------------------------------------------------------- parser

# Outputs in the shape Qwen-7B-Chat writes them (react_demo.py's recorded transcript and variations).
FIRST_STEP = 'Thought: 我应该使用Google搜索查找相关信息。\nAction: google_search\nAction Input: {"search_query": "周杰伦"}'


def test_action_with_kept_stop_word_as_model_chat_returns_it():
    result = parse_output(FIRST_STEP + "\nObservation:", TOOLS)
    assert isinstance(result, Action)
    assert (result.thought, result.tool, result.arguments) == (
        "我应该使用Google搜索查找相关信息。",
        "google_search",
        {"search_query": "周杰伦"},
    )
    assert result.raw_arguments == '{"search_query": "周杰伦"}'
    assert result.text == FIRST_STEP
    assert result.problems == ()


def test_action_with_stop_word_already_trimmed():
    result = parse_output(FIRST_STEP + "\n", TOOLS)
    assert isinstance(result, Action) and result.problems == () and result.text == FIRST_STEP


@pytest.mark.parametrize("gap", ["  ", "\n", " \n\t\n "])
def test_text_before_a_complete_stop_word_is_kept_as_written(gap):
    # react_demo carries everything before "\nObservation:" into the next prompt unchanged
    for tail in ("\nObservation:", "\nObservation:\n", "\nObservation: invented\nThought: x"):
        result = parse_output(FIRST_STEP + gap + tail, TOOLS)
        assert isinstance(result, Action) and result.text == FIRST_STEP + gap
        assert result.raw_arguments == '{"search_query": "周杰伦"}'
    # with the stop word already cut off, or indented, trailing space goes (react_demo: rstrip, then re-add it)
    assert parse_output(FIRST_STEP + gap, TOOLS).text == FIRST_STEP
    assert parse_output(FIRST_STEP + gap + "\n  Observation:", TOOLS).text == FIRST_STEP


def test_final_answer_after_observation_continuation():
    result = parse_output(
        " I now know the final answer.\nFinal Answer: 周杰伦的老婆是Hannah Quinlivan。", TOOLS
    )
    assert isinstance(result, FinalAnswer)
    assert result.thought == "I now know the final answer."
    assert result.answer == "周杰伦的老婆是Hannah Quinlivan。"


def test_final_answer_keeps_multiline_text_and_later_action_words():
    text = "Thought: 提供的工具帮助较小。\nFinal Answer: Steps:\n1. Do X\nAction: not a tool call, just prose"
    result = parse_output(text, TOOLS)
    assert isinstance(result, FinalAnswer)
    assert result.answer == "Steps:\n1. Do X\nAction: not a tool call, just prose"


def test_plain_text_is_the_final_answer_and_reported():
    result = parse_output("你好！很高兴见到你。有什么我可以帮忙的吗？", TOOLS)
    assert isinstance(result, FinalAnswer)
    assert result.answer == "你好！很高兴见到你。有什么我可以帮忙的吗？"
    assert result.problems == (Problem.NO_FORMAT,)


def test_inline_mention_of_action_is_not_a_tool_call():
    result = parse_output("The word Action: appears here but not at a line start.", TOOLS)
    assert isinstance(result, FinalAnswer) and result.problems == (Problem.NO_FORMAT,)


def test_output_starting_directly_with_action_is_detected():
    result = parse_output('Action: image_gen\nAction Input: {"prompt": "cute black cat"}', TOOLS)
    assert (
        isinstance(result, Action)
        and result.thought == ""
        and result.arguments == {"prompt": "cute black cat"}
    )


def test_thought_without_action_or_answer_is_malformed():
    result = parse_output("Thought: 我需要先想一想这个问题。", TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.MISSING_FINAL_ANSWER
    assert result.thought == "我需要先想一想这个问题。"


def test_missing_action_input():
    result = parse_output("Thought: 搜索一下。\nAction: google_search\nObservation:", TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.MISSING_ACTION_INPUT
    assert result.tool == "google_search"
    assert "Action Input" in result.detail


def test_action_input_without_action():
    result = parse_output('Thought: 搜索一下。\nAction Input: {"search_query": "x"}', TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.MISSING_ACTION
    assert result.thought == "搜索一下。"


def test_unknown_tool_lists_valid_names():
    result = parse_output('Thought: x\nAction: bing_search\nAction Input: {"q": "x"}', TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.UNKNOWN_TOOL
    assert result.tool == "bing_search" and result.raw_arguments == '{"q": "x"}'
    assert "bing_search" in result.detail and "google_search, code_interpreter, image_gen" in result.detail


def test_empty_tool_name_is_unknown_tool():
    result = parse_output("Thought: x\nAction:\nAction Input: {}", TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.UNKNOWN_TOOL
    assert "no tool name" in result.detail


def test_tool_name_in_backticks_is_accepted():
    result = parse_output("Thought: x\nAction: `google_search`\nAction Input: {'search_query': 'y'}", TOOLS)
    assert isinstance(result, Action) and result.tool == "google_search"
    assert result.arguments == {"search_query": "y"}  # JSON5: single quotes


def test_any_tool_name_accepted_when_tools_unknown():
    result = parse_output("Action: whatever\nAction Input: {}")
    assert isinstance(result, Action) and result.tool == "whatever" and result.arguments == {}


def test_invalid_json_arguments():
    result = parse_output("Thought: search\nAction: google_search\nAction Input: 周杰伦 老婆", TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.INVALID_ARGUMENTS
    assert result.raw_arguments == "周杰伦 老婆"
    assert "not valid JSON" in result.detail and "google_search" in result.detail


def test_deeply_nested_arguments_do_not_crash():
    result = parse_output("Action: google_search\nAction Input: " + "[" * 5000, TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.INVALID_ARGUMENTS


def test_code_tool_takes_fenced_code_raw():
    text = "Thought: 计算一下。\nAction: code_interpreter\nAction Input: ```py\nprint(1 + 1)\n```"
    result = parse_output(text, TOOLS)
    assert isinstance(result, Action)
    assert result.raw_arguments == "```py\nprint(1 + 1)\n```" and result.arguments is None


def test_fenced_json_arguments_are_unwrapped():
    text = 'Action: google_search\nAction Input: ```json\n{"search_query": "x"}\n```'
    result = parse_output(text, TOOLS)
    assert isinstance(result, Action) and result.arguments == {"search_query": "x"}


def test_several_actions_first_wins():
    text = FIRST_STEP + '\nAction: image_gen\nAction Input: {"prompt": "cat"}'
    result = parse_output(text, TOOLS)
    assert isinstance(result, Action) and result.tool == "google_search"
    assert result.text == FIRST_STEP
    assert result.problems == (Problem.MULTIPLE_ACTIONS,)


def test_invented_observation_is_dropped_and_first_action_runs():
    # No stop word took effect: the model wrote a whole fake trajectory.
    text = (
        FIRST_STEP
        + "\nObservation: Jay Chou is a singer.\nThought: 再画一张图。\nAction: image_gen\n"
        + 'Action Input: {"prompt": "cat"}\nObservation: {"image_url": "x"}\nThought: I now know the final answer.\n'
        + "Final Answer: 周杰伦是歌手。"
    )
    result = parse_output(text, TOOLS)
    assert isinstance(result, Action) and result.tool == "google_search" and result.text == FIRST_STEP
    assert result.problems == (Problem.INVENTED_OBSERVATION, Problem.MULTIPLE_ACTIONS)


def test_final_answer_written_before_waiting_for_the_observation():
    result = parse_output(FIRST_STEP + "\nFinal Answer: 周杰伦是歌手。", TOOLS)
    assert isinstance(result, Action) and result.problems == (Problem.TEXT_AFTER_ACTION,)


@pytest.mark.parametrize("fragment", ["\nObserv", "\nObservation", "\nObs", "\n Observ  "])
def test_leaked_stop_fragment_is_removed_from_arguments(fragment):
    result = parse_output(FIRST_STEP + fragment, TOOLS)
    assert isinstance(result, Action)
    assert result.raw_arguments == '{"search_query": "周杰伦"}'
    assert result.problems == (Problem.LEAKED_STOP_FRAGMENT,)


def test_leaked_stop_fragment_after_final_answer():
    result = parse_output("Thought: ok\nFinal Answer: 42\nObserv", TOOLS)
    assert isinstance(result, FinalAnswer) and result.answer == "42"
    assert result.problems == (Problem.LEAKED_STOP_FRAGMENT,)


@pytest.mark.parametrize("text", ["", "   \n", "Observation:", "Final Answer:   "])
def test_empty_outputs(text):
    result = parse_output(text, TOOLS)
    assert isinstance(result, Malformed) and result.problem is Problem.EMPTY


def test_empty_action_input_means_no_arguments():
    result = parse_output("Action: google_search\nAction Input:", TOOLS)
    assert isinstance(result, Action) and result.arguments == {}


def test_parse_arguments_reports_errors_without_raising():
    assert parse_arguments('{"a": [1, 2,],}') == ({"a": [1, 2]}, None)
    value, error = parse_arguments("{oops")
    assert value is None and error.startswith("not valid JSON")


# --------------------------------------------------------------------------------------------------- properties

any_text = st.text(st.characters(codec="utf-8"), max_size=300)


@settings(max_examples=400, deadline=None)
@given(any_text, st.one_of(st.none(), st.lists(st.text(max_size=10), max_size=3)))
def test_parser_is_total(text, tools):
    result = parse_output(text, tools)
    assert isinstance(result, (Action, FinalAnswer, Malformed))
    if isinstance(result, Action) and tools is not None:
        assert result.tool in tools


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "Thought:",
                "Action:",
                "Action Input:",
                "Final Answer:",
                "Observation:",
                "Observ",
                "\n",
                " ",
                "{",
                "}",
                '"a"',
                ":",
                "1",
                "search",
                "```",
            ]
        ),
        max_size=40,
    )
)
def test_parser_is_total_on_marker_soup(parts):
    result = parse_output("".join(parts), ["search"])
    assert isinstance(result, (Action, FinalAnswer, Malformed))


# Field text as a model writes it: no line starting with a marker, no surrounding blank space.
_MARKER_STARTS = ("thought:", "action", "final answer:", "observ")


def _clean(text: str) -> bool:
    if text != text.strip():
        return False
    return not any(
        line.lstrip(" \t").lower().startswith(_MARKER_STARTS) or line.strip().startswith("Obs")
        for line in text.split("\n")
    )


field_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")) | st.just("\n"), max_size=80
).filter(_clean)
tool_name = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(field_text, tool_name, st.dictionaries(st.text(max_size=8), json_value, max_size=4))
def test_render_then_parse_action_is_identity(thought, tool, arguments):
    raw = json.dumps(arguments, ensure_ascii=False)
    text = render_action(thought, tool, raw)
    for trailer in ("", "\nObservation:", "\nObservation:\n"):
        result = parse_output(text + trailer, [tool])
        assert result == Action(thought, tool, raw, arguments, text)


@settings(max_examples=300, deadline=None)
@given(field_text, field_text.filter(bool))
def test_render_then_parse_final_answer_is_identity(thought, answer):
    text = render_final_answer(thought, answer)
    assert parse_output(text, ["search"]) == FinalAnswer(thought, answer, text)


def test_observation_continues_with_a_thought_cue():
    assert render_observation("42") == "\nObservation: 42\nThought:"


# --------------------------------------------------------------------------------------------------- streaming


def _stream(text: str, step: int) -> list[tuple[str, str]]:
    streamer = SectionStreamer()
    out = []
    for i in range(0, len(text), step):
        out += streamer.feed(text[i : i + step])
    return out + streamer.finish()


def _joined(events, section):
    return "".join(t for s, t in events if s == section)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamer_splits_thought_and_answer(step):
    text = "Thought: I now know\nthe final answer.\nFinal Answer: Line one\n\nline two.\nObserv"
    events = _stream(text, step)
    parsed = parse_output(text)
    assert _joined(events, "thought") == parsed.thought == "I now know\nthe final answer."
    assert _joined(events, "answer") == parsed.answer == "Line one\n\nline two."


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_streamer_stops_at_the_action(step):
    events = _stream(FIRST_STEP + "\nObservation:", step)
    assert _joined(events, "thought") == "我应该使用Google搜索查找相关信息。"
    assert _joined(events, "answer") == ""


@settings(max_examples=200, deadline=None)
@given(field_text, field_text.filter(bool), st.integers(1, 9))
def test_streamed_answer_deltas_rebuild_the_parsed_answer(thought, answer, step):
    text = render_final_answer(thought, answer)
    events = _stream(text, step)
    assert _joined(events, "thought") == thought
    assert _joined(events, "answer") == answer


STREAM_SOUP = [
    "Thought:",
    "Thought :",
    "Action:",
    "Action Input:",
    "Final Answer:",
    "Final Ans",
    "wer:",
    "Observation:",
    "Observ",
    "Obs",
    "Ob",
    "\n",
    "\n",
    " ",
    "\t",
    "x",
    "yz",
    "search",
    "{}",
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from(STREAM_SOUP), max_size=30),
    st.integers(1, 7),
    st.sampled_from(["", "Final Answer:"]),
)
def test_streamed_deltas_join_to_the_parse_of_any_output(parts, step, prefix):
    text = "".join(parts)
    streamer = SectionStreamer(prefix)
    events = []
    for i in range(0, len(text), step):
        events += streamer.feed(text[i : i + step])
    events += streamer.finish()
    parsed = parse_output(prefix + text)
    assert _joined(events, "thought") == parsed.thought
    assert _joined(events, "answer") == (parsed.answer if isinstance(parsed, FinalAnswer) else "")


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_plain_text_is_held_until_it_is_known_to_be_the_answer(step):
    streamer = SectionStreamer()
    early = []
    for i in range(0, len("Hello there.\nHow are you?"), step):
        early += streamer.feed("Hello there.\nHow are you?"[i : i + step])
    assert early == []  # a marker may still follow and make it a thought
    assert streamer.finish() == [("answer", "Hello there.\nHow are you?")]


def test_code_lines_that_start_like_markers_stay_in_the_arguments():
    code = "```py\nObservation = 3\nObservations = [Observation]\nprint(Observations)\n```"
    result = parse_output(
        f"Thought: run it\nAction: code_interpreter\nAction Input: {code}\nObservation:", TOOLS
    )
    assert isinstance(result, Action) and result.raw_arguments == code and result.problems == ()


def test_a_stop_fragment_line_inside_the_output_ends_the_arguments():
    result = parse_output(FIRST_STEP + "\nObserv\nThought: more", TOOLS)
    assert isinstance(result, Action) and result.raw_arguments == '{"search_query": "周杰伦"}'
    assert result.problems == (Problem.INVENTED_OBSERVATION,)
