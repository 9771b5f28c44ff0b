"""The code-interpreter benchmark: tasks run through the agent with the sandboxed Jupyter interpreter.

Three kinds of task ship in ``benchmarks/data/code_interpreter/tasks.jsonl``: ``math`` word problems with a
numeric answer, ``data`` questions over CSV files that ship beside them, and ``plot`` requests. Each task gets a
fresh interpreter whose workspace holds copies of its files; the query names them as Qwen's benchmark does
(``[Upload file sales.csv]`` / ``[上传文件sales.csv]``). As there, the agent may run code once for math and data
tasks and up to three times for plots, and prompts use the ``react_demo`` wording (code-format tool).

Metrics, as Qwen-Agent's benchmark defines them:

* executable rate: tasks where the model ran code and every run finished without an error or a timeout;
* math accuracy (and the same for data tasks): the last number in the whole ReAct transcript equals the answer
  (within the task's ``tolerance``, default 1e-6);
* plotting success: plot tasks where code that ran without error produced at least one figure.

Each task's record is appended to ``results.jsonl`` as it finishes; rerunning into the same directory skips the
tasks already recorded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BenchmarkError, ConfigError
from .metrics import read_jsonl

__all__ = [
    "CodeTask",
    "load_tasks",
    "last_number",
    "run_task",
    "summarize",
    "run_code_benchmark",
    "TASKS_DIR",
]

TASKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "code_interpreter"
KINDS = ("math", "data", "plot")
MAX_RUNS = {"math": 1, "data": 1, "plot": 3}
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class CodeTask:
    id: str
    kind: str
    lang: str
    query: str
    files: tuple[str, ...] = ()
    answer: float | None = None
    tolerance: float = 1e-6


def load_tasks(path: str | Path) -> list[CodeTask]:
    """Tasks from a jsonl file; files are looked up next to it. Errors name the file, line and field."""
    path = Path(path)
    tasks = []
    for where, raw in read_jsonl(path, "task"):
        try:
            task = CodeTask(
                raw["id"],
                raw["kind"],
                raw.get("lang", "en"),
                raw["query"],
                tuple(raw.get("files", ())),
                raw.get("answer"),
                float(raw.get("tolerance", 1e-6)),
            )
        except KeyError as exc:
            raise BenchmarkError(f"{where}: the task has no {exc.args[0]!r} field") from None
        except (TypeError, ValueError):
            raise BenchmarkError(f"{where}: 'files' must be a list and 'tolerance' a number") from None
        if task.kind not in KINDS:
            raise BenchmarkError(f"{where}: kind must be one of {', '.join(KINDS)}, got {task.kind!r}")
        if task.kind != "plot" and not isinstance(task.answer, (int, float)):
            raise BenchmarkError(f"{where}: a {task.kind} task needs a numeric 'answer'")
        for name in task.files:
            if not (path.parent / name).is_file():
                raise BenchmarkError(f"{where}: file {name!r} is not in {path.parent}")
        tasks.append(task)
    return tasks


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), as the GSM8K metric reads it."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


class _RecordingExecutor:
    """Passes calls to the interpreter and keeps every result, so figures and errors can be scored."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.results: list[Any] = []

    def run(self, code: str, timeout: float | None = None) -> Any:
        result = self.executor.run(code, timeout)
        self.results.append(result)
        return result

    def close(self) -> None:
        self.executor.close()


def _query(task: CodeTask) -> str:
    if not task.files:
        return task.query
    names = ", ".join(task.files)
    return (f"[上传文件{names}]" if task.lang == "zh" else f"[Upload file {names}]") + "\n" + task.query


def run_task(
    task: CodeTask, llm: Any, workdir: Path, files_dir: Path, *, max_tokens: int = 512, timeout: float = 30
) -> dict[str, Any]:
    """Run one task through the agent in a fresh interpreter rooted at ``workdir``; returns its record."""
    from ..agent import Agent
    from ..llm_protocol import Sampling
    from ..tools import CodeInterpreter, CodeInterpreterTool

    workdir.mkdir(parents=True, exist_ok=True)
    for name in task.files:
        shutil.copy(files_dir / name, workdir / name)
    recorder = _RecordingExecutor(CodeInterpreter(workdir=workdir, timeout=timeout))
    tool = CodeInterpreterTool(interpreter=recorder)
    try:
        agent = Agent(
            llm,
            [tool],
            max_iterations=MAX_RUNS[task.kind],
            variant="react_demo",
            sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
        )
        result = agent.run(_query(task))
    finally:
        tool.close()
    runs = recorder.results
    executable = bool(runs) and all(r.ok for r in runs)
    record: dict[str, Any] = {
        "id": task.id,
        "kind": task.kind,
        "query": task.query,
        "transcript": result.transcript,
        "answer": result.answer,
        "code_runs": len(runs),
        "executable": executable,
        "errors": [f"{r.error.name}: {r.error.value}" if r.error else "timeout" for r in runs if not r.ok],
        # the host's copies go with the interpreter; the code's copy of each stays in workdir under the same name
        "figures": [Path(image).name for r in runs if r.ok for image in r.images],
    }
    if task.kind == "plot":
        record["plot_ok"] = bool(record["figures"])
    else:
        predicted = last_number(result.transcript)
        record["predicted"] = predicted
        record["correct"] = predicted is not None and abs(predicted - float(task.answer)) <= task.tolerance
    return record


def _share(records: Sequence[dict[str, Any]], key: str) -> float | None:
    return sum(bool(r[key]) for r in records) / len(records) if records else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Executable rate overall and per kind, math and data accuracy, plotting success (fractions)."""
    by_kind = {kind: [r for r in records if r["kind"] == kind] for kind in KINDS}
    return {
        "tasks": len(records),
        "executable_rate": _share(records, "executable"),
        "executable_rate_by_kind": {kind: _share(rows, "executable") for kind, rows in by_kind.items()},
        "math_accuracy": _share(by_kind["math"], "correct"),
        "data_accuracy": _share(by_kind["data"], "correct"),
        "plot_success": _share(by_kind["plot"], "plot_ok"),
    }


def run_code_benchmark(
    model: str | None = None,
    *,
    llm: Any = None,
    tasks: str | Path | None = None,
    out_dir: str | Path = "bench-results/code-interpreter",
    limit: int | None = None,
    max_new_tokens: int = 512,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the tasks (the shipped set by default), appending each task's record to ``results.jsonl`` as it
    finishes (a rerun with the same ``out_dir`` skips tasks already recorded), and write ``report.json``."""
    from tqdm import tqdm

    from .tool_use import RunFile, open_llm

    task_file = Path(tasks) if tasks else TASKS_DIR / "tasks.jsonl"
    selected = load_tasks(task_file)[:limit] if limit else load_tasks(task_file)  # before loading a model
    if llm is None:
        if model is None:
            raise ConfigError("give a model (directory or URL) or an llm object")
        llm = open_llm(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = RunFile(out / "results.jsonl", key="id", fields=("kind", "executable"))
    for task in tqdm(selected, disable=not progress, unit="task"):
        if task.id not in results.done:
            results.append(run_task(task, llm, out / task.id, task_file.parent, max_tokens=max_new_tokens))
    report = summarize([results.done[task.id] for task in selected])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
