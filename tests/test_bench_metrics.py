"""The official metrics and the scorecard on hand-made jobs, checked against values worked out by hand."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_agent.bench.metrics import (
    action_input_rouge,
    action_right_rate,
    bad_rate,
    load_jobs,
    offered_tools,
    process_res,
    qwen_token_string,
    render_markdown,
    rouge_l,
    scorecard,
)
from qwen_agent.errors import BenchmarkError
from qwen_agent.runtime.tokenizer import QwenTokenizer

TOOLS = ["weather", "image_gen", "search"]
GOLD_WEATHER = 'Thought: 查天气\nAction: weather\nAction Input: {"city": "北京"}'
GOLD_IMAGE = 'Thought: 画图\nAction: image_gen\nAction Input: {"query": "五彩斑斓的黑"}'
CATALOG = {
    "weather": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "image_gen": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
}


def job(response: str, gen: str | list[str]) -> dict:
    return {
        "prompt": "Q",
        "response": response,
        "gen": gen if isinstance(gen, list) else [gen],
        "tools": TOOLS,
    }


# (golden, gen, right, rouge) worked out by hand
POSITIVE = [
    # 1. exact, with the stop word model.chat leaves at the end
    (GOLD_WEATHER, 'Thought: 好\nAction: weather\nAction Input: {"city": "北京"}\nObservation:', 1, 1.0),
    # 2. JSON5 arguments (unquoted key, single quotes, trailing comma) normalise to the same JSON
    (GOLD_WEATHER, "Thought: 好\nAction: weather\nAction Input: {city: '北京',}", 1, 1.0),
    # 3. arguments that do not parse become "" and score 0; the tool is still right
    (GOLD_WEATHER, 'Thought: 好\nAction: weather\nAction Input: {"city": "北京"', 1, 0.0),
    # 4. two actions: the first name counts, the input runs into the second action and fails to parse
    (
        GOLD_WEATHER,
        'Thought: 好\nAction: weather\nAction Input: {"city": "北京"}\nAction: weather\n'
        'Action Input: {"city": "上海"}',
        1,
        0.0,
    ),
    # 5. no newline before "Action: ": not a right action (literal "\nAction: "), but the input still scores
    (GOLD_WEATHER, 'Action: weather\nAction Input: {"city": "北京"}', 0, 1.0),
    # 6. Chinese arguments, one token missing: 10 reference tokens, 9 generated, LCS 9 -> F = 18/19
    (GOLD_IMAGE, "Thought: 画\nAction: image_gen\nAction Input: {'query': '五彩斑斓黑'}", 1, 18 / 19),
    # 7. no call at all
    (GOLD_WEATHER, "Thought: 不用工具\nFinal Answer: 晴", 0, 0.0),
]
NEGATIVE = [
    ("Thought: t\nFinal Answer: hi", 0),
    ("Thought: t\nAction: weather\nAction Input: {}", 1),
    ("Action: weather\nAction Input: {}", 0),  # no leading newline: not counted by the December script
    ("Thought: x\nAction:weather", 0),  # no space after the colon
    ("Thought: x\nAction: stock\nAction Input: {}", 1),  # a tool that was not offered
]


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_pretrained()


@pytest.fixture()
def positive():
    return [job(gold, gen) for gold, gen, _, _ in POSITIVE]


@pytest.fixture()
def negative():
    return [job("Thought: t\nFinal Answer: a", gen) for gen, _ in NEGATIVE]


def test_process_res_uses_first_occurrences_and_keeps_the_quirks():
    parts = process_res(
        'Thought: a\nAction: x\nAction Input: {"b": 1, "a": 2}\nObservation: ok\nThought: done\n'
        "Final Answer: 42"
    )
    assert parts == {
        "thought": "Thought: a",
        "action": "x",
        "action_input": '{"a": 2, "b": 1}',
        "observation": "ok",
        "thought_last": "done",
        "final_answer": "42",
    }
    # no Observation: the input runs to the end of the text
    assert process_res("Action: x\nAction Input: {'k': '中'}")["action_input"] == '{"k": "中"}'
    # no Action Input at all: find() = -1 slices garbage, which does not parse -> ""
    assert process_res("Thought: t\nFinal Answer: 1")["action_input"] == ""


def test_qwen_token_string_and_the_reference_example(tokenizer):
    assert qwen_token_string('{"query": "五彩斑斓的黑"}', tokenizer) == '{" query ":  " 五 彩 斑斓 的 黑 "}'
    assert rouge_l('{"query": "五彩斑斓的黑"}', '{"query": "五彩斑斓黑"}', tokenizer) == pytest.approx(
        18 / 19
    )
    assert rouge_l("", '{"a": 1}', tokenizer) == 0.0


@pytest.mark.parametrize("index", range(len(POSITIVE)))
def test_each_positive_job(index, tokenizer):
    gold, gen, right, rouge = POSITIVE[index]
    one = [job(gold, gen)]
    assert action_right_rate(one) == right
    assert action_input_rouge(one, tokenizer) == pytest.approx(rouge)


def test_official_metrics_over_the_set(positive, negative, tokenizer):
    assert action_right_rate(positive) == pytest.approx(5 / 7)
    assert action_input_rouge(positive, tokenizer) == pytest.approx(
        (3 + 18 / 19) / 7
    )  # mean over ALL positives
    assert bad_rate(negative) == pytest.approx(2 / 5)
    assert action_right_rate([{**positive[0], "gen": positive[0]["gen"][0]}]) == 1.0  # gen as a plain string


def test_scorecard_by_hand(positive, negative, tokenizer):
    report = scorecard(positive, negative, tokenizer, catalog=CATALOG, bootstrap=200)
    assert report["action_right_rate"] == pytest.approx(5 / 7)
    assert report["bad_rate"] == pytest.approx(2 / 5)
    assert report["missed_tool_rate"] == pytest.approx(1 / 7)  # job 7
    assert report["not_offered_call_rate"] == pytest.approx(1 / 12)  # the call to "stock"
    # checked calls: positives 1-6 and negatives 2-3 (job 3's input does not parse; the negatives lack "city")
    assert report["schema_checked_calls"] == 8
    assert report["schema_valid_rate"] == pytest.approx(5 / 8)
    assert report["exact_argument_match"] == pytest.approx(4 / 7)  # jobs 1, 2, 4 (first action), 5
    # invalid JSON (3), two actions (4), Action without Action Input (negative 4)
    assert report["format_violation_rate"] == pytest.approx(3 / 12)
    assert report["problems"] == {
        "invalid_arguments": 1,
        "missing_action_input": 1,
        "multiple_actions": 1,
        "unknown_tool": 1,
    }
    weather = report["per_tool"]["weather"]
    # expected weather 6 times, called right 5 times; called on 3 negatives (one without arguments)
    assert weather == {
        "support": 6,
        "predicted": 8,
        "precision": pytest.approx(5 / 8),
        "recall": pytest.approx(5 / 6),
    }
    assert report["per_tool"]["image_gen"]["recall"] == 1.0
    assert report["confusion"]["weather"] == {"weather": 5, "(none)": 1}
    assert report["confusion"]["(none)"] == {"(none)": 1, "weather": 3, "stock": 1}
    # "stock" was not offered: no row of its own, counted in the group that keeps the raw name
    assert set(report["per_tool"]) == {"weather", "image_gen"}
    assert report["not_offered"] == {"calls": 1, "names": {"stock": 1}}
    assert '| (not offered): 1 name, e.g. "stock" | 0 | 1 | n/a | n/a |' in render_markdown(report)
    for name in ("action_right_rate", "action_input_rouge", "bad_rate"):
        low, high = report["confidence_intervals"][name]
        assert low <= report[name] <= high and low < high
    json.dumps(report)  # the report is plain JSON
    assert "| Tool selection (action_right_rate) | 71.4% |" in render_markdown(report)


def test_bootstrap_is_seeded_and_degenerate_sets_have_point_intervals(positive, negative, tokenizer):
    a = scorecard(positive, negative, tokenizer, bootstrap=100, seed=3)
    b = scorecard(positive, negative, tokenizer, bootstrap=100, seed=3)
    assert a["confidence_intervals"] == b["confidence_intervals"]
    perfect = [job(GOLD_WEATHER, GOLD_WEATHER)] * 5
    report = scorecard(perfect, [], tokenizer, bootstrap=50)
    assert report["confidence_intervals"]["action_right_rate"] == [1.0, 1.0]
    # no negatives: the rate is undefined, not 0
    assert report["confidence_intervals"]["bad_rate"] is None and report["bad_rate"] is None
    assert "| False positive (bad_rate) | n/a | n/a |" in render_markdown(report)


def test_offered_tools_fall_back_to_the_prompt():
    prompt = "...\nAction: the action to take, should be one of [a_b,c]\n..."
    assert offered_tools({"prompt": prompt}) == ["a_b", "c"]
    assert offered_tools({"prompt": "no tools here"}) is None


def test_load_jobs_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"jobs.jsonl:2: not valid JSON"):
        load_jobs(path)
    path.write_text('{"prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"jobs.jsonl:1: the job has no 'response' field"):
        load_jobs(path)
    path.write_text('{"prompt": "p", "response": "r", "gen": 3}\n', encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"jobs.jsonl:1: field 'gen' must be"):
        load_jobs(path)
    with pytest.raises(BenchmarkError, match="cannot read"):
        load_jobs(tmp_path / "missing.jsonl")


def test_scorecard_refuses_jobs_without_generations(tokenizer):
    with pytest.raises(BenchmarkError, match="has no 'gen'"):
        scorecard([{"prompt": "p", "response": GOLD_WEATHER, "id": "x"}], [], tokenizer)


MARKERS = [
    "Thought:",
    "\nAction: ",
    "Action:",
    "\nAction Input: ",
    "Observation:",
    "Final Answer:",
    "{",
    "}",
    "'",
]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(MARKERS), st.text(max_size=12)), max_size=12).map("".join))
def test_any_output_scores_within_bounds(gen):
    tokenizer = QwenTokenizer.from_pretrained()
    positive, negative = [job(GOLD_WEATHER, gen)], [job("Thought: t\nFinal Answer: a", gen)]
    report = scorecard(positive, negative, tokenizer, catalog=CATALOG, bootstrap=10)
    for key in ("action_right_rate", "action_input_rouge", "bad_rate", "format_violation_rate"):
        assert 0.0 <= report[key] <= 1.0
    assert report["bad_rate"] == float("\nAction: " in gen)
    assert set(process_res(gen)) == {
        "thought",
        "action",
        "action_input",
        "observation",
        "thought_last",
        "final_answer",
    }


def test_md_cell_keeps_any_text_in_one_short_cell():
    from qwen_agent.bench.report import md_cell

    assert md_cell("a | b\n`c`  [d] *e* <f> \\") == r"a \| b \`c\` \[d\] \*e\* \<f\> \\"
    cut = md_cell("x" * 1500, 60)
    assert cut == "x" * 59 + "…"
    assert md_cell("short", 60) == "short"


def test_markdown_keeps_a_model_written_tool_name_in_one_row():
    job = {"prompt": "Question: hi", "response": "Thought: t\nAction: weather\nAction Input: {}"}
    wild = {**job, "gen": ["Thought: t\nAction: a | b\nAction Input: {}"]}
    report = scorecard([wild], [], QwenTokenizer.from_pretrained(), bootstrap=10)
    rows = [line for line in render_markdown(report).splitlines() if line.startswith("| a")]
    assert len(rows) == 1 and rows[0].startswith("| a \\| b | 0 | ")  # the called name, escaped, no support
