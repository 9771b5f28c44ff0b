"""Run reports that hold up to wild model output, and `bench compare` on runs made by the real runner.

Every run here goes through ``run_benchmark`` with a scripted model that answers each shipped question with a
planted output: the golden step, a wrong offered tool, a direct answer, a hallucinated 1,500-character tool
name full of ``|``, newlines and backticks, or the prompt's own "should be one of [...]" line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from qwen_agent.bench.compare import compare_runs, paired_bootstrap, render_comparison
from qwen_agent.bench.metrics import load_jobs
from qwen_agent.bench.tool_use import LLMGenerator, run_benchmark, shipped_path
from qwen_agent.errors import BenchmarkError, ConfigError
from qwen_agent.llm import Completion, cut_at_stop
from qwen_agent.runtime.tokenizer import QwenTokenizer

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = load_jobs(shipped_path("tool_use_positive.jsonl"))[:40]
NEGATIVE = load_jobs(shipped_path("tool_use_negative.jsonl"))[:20]
JOBS = {job["id"]: job for job in POSITIVE + NEGATIVE}
DATASETS = {"positive": POSITIVE, "negative": NEGATIVE}

LONG_NAME = ("web_search | results\n`grep` [all] *now*\n" * 40)[:1500]
ODD_NAME = "a|b\n`c` d"


def question(prompt: str) -> str:
    return prompt.rsplit("\nQuestion: ", 1)[1]


def golden(job_id: str) -> str:
    return JOBS[job_id]["response"] + "\nObservation:"


def call(tool: str, arguments: str = "{}") -> str:
    return f"Thought: I will use a tool.\nAction: {tool}\nAction Input: {arguments}\nObservation:"


def direct() -> str:
    return "Thought: I can answer this myself.\nFinal Answer: here you are"


def format_line(job_id: str) -> str:
    """The prompt's own format line, as a model that copies it writes it: 'the action to take, should be...'."""
    return re.search(
        r"\nAction: (the action to take, should be one of \[[^\]]*\])\n", JOBS[job_id]["prompt"]
    )[1]


def wrong_tool(job_id: str) -> str:
    job = JOBS[job_id]
    return next(t for t in job["tools"] if t != job["expected_tool"])


class QuestionScript:
    """A scripted model: the output planted for each question (thread-safe, so the runner may batch)."""

    def __init__(self, outputs: Mapping[str, str]) -> None:
        self.by_question = {question(JOBS[i]["prompt"]): text for i, text in outputs.items()}
        self.lock = threading.Lock()
        self.calls = 0

    def complete(self, prompt, *, stop=(), sampling=None):
        with self.lock:
            self.calls += 1
        text, stopped = cut_at_stop(self.by_question[question(prompt.query)], stop)
        return Completion(text, "stop", stopped)


def baseline_outputs() -> dict[str, str]:
    """Run A: golden everywhere except six planted jobs."""
    outputs = {i: golden(i) for i in JOBS}
    for job in NEGATIVE:
        outputs[job["id"]] = direct()
    outputs["pos-0008"] = call(LONG_NAME)
    outputs["pos-0009"] = call(format_line("pos-0009"))
    outputs["pos-0040"] = direct()  # missed: its tool is never called in this run
    outputs["neg-0006"] = call(NEGATIVE[5]["tools"][0], '{"q": "x"}')  # an offered tool, falsely
    return outputs


def changed_outputs() -> dict[str, str]:
    """Run B: three of A's failures fixed, two new ones."""
    outputs = baseline_outputs()
    outputs["pos-0008"] = golden("pos-0008")
    outputs["pos-0009"] = golden("pos-0009")
    outputs["pos-0001"] = call(wrong_tool("pos-0001"), '{"city": "Paris"}')
    outputs["neg-0006"] = direct()
    outputs["neg-0005"] = call(ODD_NAME)
    return outputs


def make_run(
    path: Path,
    outputs: Mapping[str, str],
    datasets: Mapping[str, list] = DATASETS,
    meta: Mapping[str, object] | None = None,
) -> Path:
    model = QuestionScript(outputs)
    run_benchmark(LLMGenerator(model, concurrency=4), path, datasets=datasets, progress=False, meta=meta)
    assert model.calls == sum(len(jobs) for jobs in datasets.values())
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    broken = baseline_outputs()
    for job in POSITIVE[10:30]:  # 20 more positives answered without a tool
        broken[job["id"]] = direct()
    return {
        "a": make_run(root / "a", baseline_outputs(), meta={"model": "m", "dtype": "bf16"}),
        "rerun": make_run(root / "rerun", baseline_outputs(), meta={"model": "m", "dtype": "bf16"}),
        "b": make_run(root / "b", changed_outputs(), meta={"model": "m", "dtype": "int4"}),
        "worse": make_run(root / "worse", broken),
        "part": make_run(
            root / "part", changed_outputs(), datasets={"positive": POSITIVE[:25], "negative": NEGATIVE[:10]}
        ),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return QwenTokenizer.from_pretrained()


def table_rows(markdown: str) -> list[list[str]]:
    """Each table's header and rows split into cells on unescaped pipes, checked to have the header's width."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    rows = []
    for table in tables:
        widths = [len(re.split(r"(?<!\\)\|", line)) for line in table]
        assert len(set(widths)) == 1, table  # every row as wide as the header: no cell broke out
        assert re.fullmatch(r"(\|---)+\|", table[1])
        assert all(line.endswith("|") for line in table)
        rows += [re.split(r"(?<!\\)\|", line)[1:-1] for line in table[:1] + table[2:]]
    return rows


# ------------------------------------------------------------------------------------------------------------
# The run report


def test_report_groups_names_not_offered_and_stays_a_short_valid_table(runs):
    markdown = (runs["a"] / "report.md").read_text()
    rows = table_rows(markdown)
    assert max(len(line) for line in markdown.splitlines()) < 400
    assert "grep" in markdown and LONG_NAME not in markdown
    tool_rows = {cells[0].strip(): cells for cells in rows if len(cells) == 5 and cells[0] != " Tool "}
    offered = {t for job in POSITIVE + NEGATIVE for t in job["tools"]}
    named = {name for name in tool_rows if not name.startswith("(not offered)")}
    assert named <= offered  # no row per model-written name
    # a row per tool expected, or called where offered: the 40 positives' tools and the negative's false call
    expected = {job["expected_tool"] for job in POSITIVE} | {NEGATIVE[5]["tools"][0]}
    assert named == expected
    (group,) = [cells for name, cells in tool_rows.items() if name.startswith("(not offered)")]
    assert group[0].startswith(" (not offered): 2 names, e.g. ")
    assert [c.strip() for c in group[1:]] == ["0", "2", "n/a", "n/a"]
    # each example cut to 60 characters (the last an ellipsis) before escaping, on one line
    examples = re.findall(r'"((?:[^"\\]|\\.)*)"', group[0])
    assert len(examples) == 2
    for example in examples:
        assert len(re.sub(r"\\(.)", r"\1", example)) <= 60
    assert any(e.startswith(r"web_search \| results \`grep\` \[all\] \*now\*") for e in examples)
    assert any(e.startswith(r"the action to take, should be one of \[") for e in examples)


def test_report_json_keeps_every_raw_name_and_undefined_ratios_are_none(runs):
    report = json.loads((runs["a"] / "report.json").read_text())
    should_be = format_line("pos-0009")
    assert report["not_offered"] == {"calls": 2, "names": {LONG_NAME.strip(): 1, should_be: 1}}
    assert report["confusion"][JOBS["pos-0008"]["expected_tool"]][LONG_NAME.strip()] == 1
    assert set(report["per_tool"]) == {job["expected_tool"] for job in POSITIVE} | {NEGATIVE[5]["tools"][0]}
    missed = report["per_tool"][JOBS["pos-0040"]["expected_tool"]]
    assert missed["predicted"] == 0 and missed["precision"] is None and missed["recall"] == 0.0
    false_call = report["per_tool"][NEGATIVE[5]["tools"][0]]
    assert false_call["support"] == 0 and false_call["recall"] is None and false_call["precision"] == 0.0
    missed_row = next(
        line
        for line in (runs["a"] / "report.md").read_text().splitlines()
        if line.startswith(f"| {JOBS['pos-0040']['expected_tool']} |")
    )
    assert missed_row.endswith("| 1 | 0 | n/a | 0.0% |")


# ------------------------------------------------------------------------------------------------------------
# The comparison


def test_comparison_numbers_and_changed_jobs_are_exact(runs, tokenizer):
    comparison = compare_runs([runs["a"], runs["b"]], tokenizer=tokenizer, bootstrap=300)
    assert comparison["shared"] == {"positive": 40, "negative": 20} and not comparison["intersection"]
    assert comparison["meta_differences"] == {"dtype": ["bf16", "int4"]}  # of everything report.json records:
    meta = comparison["runs"][0]["meta"]
    assert meta["backend"] == "QuestionScript" and meta["concurrency"] == 4 and meta["package_version"]
    metrics = comparison["metrics"]
    # A: 37 of 40 positives right (pos-0008, -0009, -0010 not); B: 38 (pos-0001 and -0010 not)
    assert metrics["action_right_rate"]["values"] == [37 / 40, 38 / 40]
    assert metrics["bad_rate"]["values"] == [1 / 20, 1 / 20]
    assert metrics["not_offered_call_rate"]["values"] == [2 / 60, 1 / 60]
    assert metrics["missed_tool_rate"]["values"] == [1 / 40, 1 / 40]
    for name in ("action_right_rate", "action_input_rouge", "bad_rate"):
        saved = json.loads((runs["a"] / "report.json").read_text())
        assert metrics[name]["values"][0] == pytest.approx(saved[name])  # the run's own report, same jobs
        low, high = metrics[name]["intervals"][1]
        assert low <= metrics[name]["values"][1] <= high
    (diff,) = comparison["differences"]
    assert diff["metrics"]["action_right_rate"]["difference"] == pytest.approx(1 / 40)
    assert diff["metrics"]["bad_rate"]["difference"] == 0.0
    changed = {job["id"]: job for job in diff["changed_jobs"]}
    assert list(changed) == ["pos-0001", "pos-0008", "pos-0009", "neg-0005", "neg-0006"]
    first = JOBS["pos-0001"]
    assert changed["pos-0001"]["change"] == "broken"
    assert changed["pos-0001"]["before"] == {
        "verdict": "right",
        "called": first["expected_tool"],
        "gen": golden("pos-0001"),
    }
    assert changed["pos-0001"]["after"]["called"] == wrong_tool("pos-0001")
    assert changed["pos-0001"]["after"]["gen"] == call(wrong_tool("pos-0001"), '{"city": "Paris"}')
    assert changed["pos-0008"]["before"]["gen"] == call(LONG_NAME)  # whole, in the JSON
    assert [changed[i]["change"] for i in ("pos-0008", "pos-0009", "neg-0006")] == ["fixed"] * 3
    assert changed["neg-0005"]["change"] == "broken"
    assert changed["neg-0005"]["after"] == {
        "verdict": "false call",
        "called": ODD_NAME,
        "gen": call(ODD_NAME),
    }
    tools = diff["per_tool"]
    # pos-0001 and pos-0008 expect the same tool: one fixed, one broken
    assert first["expected_tool"] == JOBS["pos-0008"]["expected_tool"]
    same = tools[first["expected_tool"]]
    assert same["recall"] == [7 / 8, 7 / 8] and same["recall_difference"] == 0.0
    fixed = tools[JOBS["pos-0009"]["expected_tool"]]
    n = sum(job["expected_tool"] == JOBS["pos-0009"]["expected_tool"] for job in POSITIVE)
    assert fixed["support"] == n and fixed["recall"] == [(n - 1) / n, 1.0]
    assert fixed["recall_difference"] == pytest.approx(1 / n)
    assert fixed["precision"] == [1.0, 1.0]
    # a tool only B calls (wrongly): precision 0 in B, undefined in A, so no difference
    only_b = tools[wrong_tool("pos-0001")]
    assert only_b["support"] == 0 and only_b["predicted"] == [0, 1]
    assert only_b["precision"] == [None, 0.0] and only_b["precision_difference"] is None
    assert diff["not_offered_calls"] == [2, 1]


def test_markdown_comparison_is_valid_and_lists_both_outputs(runs, tokenizer):
    comparison = compare_runs([runs["a"], runs["b"]], tokenizer=tokenizer, bootstrap=200)
    markdown = render_comparison(comparison)
    table_rows(markdown)
    assert "Compared on all 40 positive and 20 negative jobs" in markdown
    assert "| dtype | bf16 | int4 |" in markdown
    assert "| Tool selection (action_right_rate) | 92.5% | [" in markdown
    assert "| Tool selection (action_right_rate) | +2.5 pts | [" in markdown
    assert "### Jobs whose outcome changed: 5 (3 fixed, 2 broken, 0 another tool or no call)" in markdown
    assert (
        r"| neg-0005 | negative | (none) | no call: (none) | false call: a\|b \`c\` d | broken |" in markdown
    )
    # both outputs of a changed job, fenced; a long output is cut in the markdown
    section = markdown.split("#### pos-0008", 1)[1].split("####", 1)[0]
    assert "A:\n\n```text\nThought: I will use a tool.\nAction: web_search | results" in section
    assert f"B:\n\n```text\n{golden('pos-0008')}\n```" in section
    assert "more characters)" in section
    assert len(render_comparison(comparison, max_changed=1).split("\n#### ")) == 2


def test_paired_test_flags_a_planted_difference_and_not_an_identical_rerun(runs, tokenizer):
    comparison = compare_runs([runs["a"], runs["rerun"], runs["worse"]], tokenizer=tokenizer, bootstrap=1000)
    same, worse = comparison["differences"]
    assert (same["run"], worse["run"]) == ("B", "C")
    for test in same["metrics"].values():
        assert test == {"difference": 0.0, "interval": [0.0, 0.0], "p_value": 1.0, "significant": False}
    assert same["changed_jobs"] == []
    right = worse["metrics"]["action_right_rate"]
    assert right["difference"] == pytest.approx(-20 / 40) and right["significant"]
    assert right["interval"][1] < 0 and right["p_value"] < 0.01
    assert worse["metrics"]["missed_tool_rate"]["significant"]
    assert not worse["metrics"]["bad_rate"]["significant"]  # the negatives did not change
    assert len(worse["changed_jobs"]) == 20
    assert {job["change"] for job in worse["changed_jobs"]} == {"broken"}


def test_paired_bootstrap_interval_covers_a_small_difference():
    rng = np.random.default_rng(0)
    a, b = [1.0] * 100, [1.0] * 99 + [0.0]  # one job of 100 changed: not more than chance
    test = paired_bootstrap(a, b, 2000, rng)
    assert test["difference"] == pytest.approx(-0.01)
    assert test["interval"][0] < 0 and test["interval"][1] == 0.0 and not test["significant"]
    assert paired_bootstrap([], [], 10, rng)["difference"] is None


def test_runs_over_different_job_sets_are_compared_on_the_intersection(runs, tokenizer):
    comparison = compare_runs([runs["a"], runs["part"]], tokenizer=tokenizer, bootstrap=100)
    assert comparison["shared"] == {"positive": 25, "negative": 10} and comparison["intersection"]
    assert [run["jobs"] for run in comparison["runs"]] == [
        {"positive": 40, "negative": 20},
        {"positive": 25, "negative": 10},
    ]
    # A on its first 25 positives: pos-0008 and -0009 and -0010 wrong
    assert comparison["metrics"]["action_right_rate"]["values"][0] == 23 / 25
    changed = [job["id"] for job in comparison["differences"][0]["changed_jobs"]]
    assert changed == ["pos-0001", "pos-0008", "pos-0009", "neg-0005", "neg-0006"]
    assert "Compared on the intersection: the 25 positive and 10 negative jobs" in render_comparison(
        comparison
    )


def test_bad_inputs_are_clear_errors(runs, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="at least two run directories"):
        compare_runs([runs["a"]], tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="nowhere: no such run directory"):
        compare_runs([runs["a"], tmp_path / "nowhere"], tokenizer=tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="not a tool-use run directory"):
        compare_runs([runs["a"], tmp_path / "empty"], tokenizer=tokenizer)
    other = tmp_path / "other"
    make_run(
        other, baseline_outputs(), datasets={"positive": [{**POSITIVE[1], "id": "pos-0001"}], "negative": []}
    )
    with pytest.raises(
        BenchmarkError, match="'pos-0001' has a different prompt .* runs of different datasets"
    ):
        compare_runs([runs["a"], other], tokenizer=tokenizer)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "negative.jsonl").write_bytes((runs["a"] / "negative.jsonl").read_bytes() + b'{"_id": "neg-00')
    with pytest.raises(
        BenchmarkError, match="negative.jsonl: the last line is cut off .* same --out to resume"
    ):
        compare_runs([runs["a"], torn], tokenizer=tokenizer)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "positive.jsonl").write_text('{"_id": "x", "prompt": "p"}\n')
    with pytest.raises(BenchmarkError, match=r"positive.jsonl:1: the job has no 'response' field"):
        compare_runs([runs["a"], tmp_path / "bad"], tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------------------
# The command line


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_agent.cli", "bench", "compare", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_compare_end_to_end(runs, tmp_path):
    out = tmp_path / "cmp"
    done = cli(str(runs["a"]), str(runs["b"]), "--out", str(out), "--bootstrap", "200")
    assert done.returncode == 0, done.stderr
    assert "# Tool-use runs compared" in done.stdout and f"comparison: {out}/compare.json" in done.stdout
    assert (out / "compare.md").read_text() in done.stdout
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "compare.json").read_text())
    assert [job["id"] for job in saved["differences"][0]["changed_jobs"]] == [
        "pos-0001",
        "pos-0008",
        "pos-0009",
        "neg-0005",
        "neg-0006",
    ]
    done = cli(str(runs["a"]), str(runs["rerun"]), "--out", str(out), "--bootstrap", "50", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["differences"][0]["changed_jobs"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["only-one"], "at least two run directories"),
        (["{a}", "{missing}"], "no such run directory"),
        (["{a}", "{a}", "--max-changed", "-1"], "--max-changed must be 0 or more"),
    ],
)
def test_cli_compare_errors(runs, tmp_path, args: list[str], message: str):
    fill: Callable[[str], str] = lambda s: s.format(a=runs["a"], missing=tmp_path / "missing")  # noqa: E731
    done = cli(*map(fill, args), "--out", str(tmp_path / "cmp"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
