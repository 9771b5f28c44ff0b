"""The code-interpreter benchmark, driven by a scripted model against the real sandboxed Jupyter kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_agent.bench.code_interpreter import TASKS_DIR, last_number, load_tasks, run_code_benchmark
from qwen_agent.errors import BenchmarkError
from qwen_agent.llm import ScriptedLLM

ROOT = Path(__file__).resolve().parent.parent


def call(code: str, thought: str = "I will run some code.") -> str:
    return f"Thought: {thought}\nAction: code_interpreter\nAction Input: ```py\n{code}\n```\nObservation:"


def test_last_number():
    assert last_number("Thought: x\nFinal Answer: the total is 1,845.5 dollars.") == 1845.5
    assert last_number("答案是-3") == -3.0
    assert last_number("no digits") is None


def test_shipped_tasks_load_and_cover_three_kinds():
    tasks = load_tasks(TASKS_DIR / "tasks.jsonl")
    assert {t.kind for t in tasks} == {"math", "data", "plot"}
    assert {t.lang for t in tasks} == {"en", "zh"}
    assert all((TASKS_DIR / name).is_file() for t in tasks for name in t.files)


def test_bad_task_file_errors_name_the_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"id": "a", "kind": "math", "query": "q", "answer": 1}\n{"id": "b", "kind": "poem", "query": "q"}\n'
    )
    with pytest.raises(BenchmarkError, match=r"tasks.jsonl:2: kind must be one of"):
        load_tasks(path)
    path.write_text('{"id": "a", "kind": "data", "query": "q", "answer": 1, "files": ["x.csv"]}\n')
    with pytest.raises(BenchmarkError, match=r"tasks.jsonl:1: file 'x.csv' is not in"):
        load_tasks(path)
    path.write_text('{"id": "a", "kind": "math", "query": "q", "answer": 1}\n["not", "an", "object"]\n')
    with pytest.raises(BenchmarkError, match=r"tasks.jsonl:2: a task must be a JSON object"):
        load_tasks(path)
    path.write_text('{"id": "a", "kind": "math", "query": "q", "answer": 1, "tolerance": "tiny"}\n')
    with pytest.raises(
        BenchmarkError, match=r"tasks.jsonl:1: 'files' must be a list and 'tolerance' a number"
    ):
        load_tasks(path)


def test_a_task_with_line_separators_in_its_query_is_one_line(tmp_path):
    query = "first\u2028second\u2029third\x85fourth: what is 6*7?"
    task = {"id": "a", "kind": "math", "query": query, "answer": 42}
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(task, ensure_ascii=False) + "\n", encoding="utf-8")
    [loaded] = load_tasks(path)
    assert loaded.query == query


def test_scripted_run_through_the_real_interpreter(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    shipped = {t["id"]: t for t in map(json.loads, (TASKS_DIR / "tasks.jsonl").read_text().splitlines())}
    chosen = [shipped["math-03"], shipped["data-01"], shipped["plot-02"], shipped["math-01"]]
    tasks.write_text("".join(json.dumps(t) + "\n" for t in chosen))
    (tmp_path / "sales.csv").write_bytes((TASKS_DIR / "sales.csv").read_bytes())
    llm = ScriptedLLM(
        [
            # math-03: one run, then the forced final answer turn
            call("print(sum(p for p in range(2, 100) if all(p % d for d in range(2, p))))"),
            " 1060",
            # data-01: reads the uploaded CSV from the workspace
            call(
                "import csv\nrows = list(csv.DictReader(open('sales.csv')))\n"
                "print(sum(int(r['units']) * float(r['unit_price']) for r in rows))"
            ),
            " The total revenue is 1845.5.",
            # plot-02: a figure, then a final answer
            call(
                "import numpy as np, matplotlib.pyplot as plt\nx = np.linspace(0, 2 * np.pi, 100)\n"
                "plt.plot(x, np.sin(x))\nplt.show()"
            ),
            "Thought: The plot is shown above.\nFinal Answer: Here is y = sin(x).",
            # math-01: code that fails, then a wrong answer
            call("print(48 + 3 * 48 / 0)"),
            " 190",
        ]
    )
    report = run_code_benchmark(llm=llm, tasks=tasks, out_dir=tmp_path / "out", progress=False)
    assert report == {
        "tasks": 4,
        "executable_rate": 0.75,
        "executable_rate_by_kind": {"math": 0.5, "data": 1.0, "plot": 1.0},
        "math_accuracy": 0.5,
        "data_accuracy": 1.0,
        "plot_success": 1.0,
    }
    records = {
        r["id"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    }
    assert records["math-01"]["errors"] and "ZeroDivisionError" in records["math-01"]["errors"][0]
    figure = tmp_path / "out" / "plot-02" / records["plot-02"]["figures"][0]
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert "1060" in records["math-03"]["transcript"] and records["math-03"]["predicted"] == 1060
    # the model saw the upload line and the code-format tool description
    first_prompt = llm.calls[2][0].query
    assert "[Upload file sales.csv]" in first_prompt and "triple backticks" in first_prompt
    # a rerun of the same directory finds every task recorded and asks the model nothing
    assert (
        run_code_benchmark(llm=ScriptedLLM([]), tasks=tasks, out_dir=tmp_path / "out", progress=False)
        == report
    )


def test_cli_without_a_reachable_model_fails_cleanly(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_agent.cli",
            "bench",
            "code-interpreter",
            "--model",
            "http://127.0.0.1:9",
            "--limit",
            "1",
            "--out",
            str(tmp_path),
            "-q",
        ],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_cli_runs_a_local_tiny_checkpoint(tmp_path):
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "ckpt", seq_length=8192)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_agent.cli",
            "bench",
            "code-interpreter",
            "--model",
            str(model),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / "out"),
            "-q",
            "--json",
        ],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # random weights write no ReAct call: nothing ran, which counts against the executable rate
    assert report["tasks"] == 2 and report["executable_rate"] == 0.0
    records = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in records] == ["math-01", "math-02"]
