"""Compare tool-use runs: what changed from run A to run B (and C, ...), and whether it is more than chance.

Each run directory is read as the runner wrote it (``positive.jsonl``, ``negative.jsonl``, ``report.json``'s
``meta``). Runs are compared on the jobs they all hold (same id; the prompt must match too), so a partial run
or one over a larger set is compared on the intersection. Every job is scored once per run
(:func:`~qwen_agent.bench.metrics.score_job`); each run's figures are those of the shared jobs, with percentile
bootstrap 95% intervals, and each later run is set against the first:

* the difference of every per-job figure with a **paired bootstrap**: the shared jobs are resampled with
  replacement, the same resample for both runs, and the difference of the means taken each round. The
  difference is called larger than chance when its 95% interval leaves out zero; ``p_value`` is twice the
  share of rounds on the far side of zero (at most 1). An identical rerun gives a zero interval and p = 1.
* per-tool precision and recall, side by side;
* the jobs whose outcome changed, with both outputs. A job's outcome is its official verdict (a positive's
  tool right or wrong, a negative answered without a call or not) and the tool it called.

The schema-validity rate is shown side by side only: its denominator (calls that were checked) is not the
same set of jobs in two runs, so it cannot be paired.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BenchmarkError, ConfigError
from .metrics import bootstrap_ci, generated_text, job_outcomes, load_jobs, summarize
from .report import EXAMPLE_CHARS, interval, md_cell, number, pct

__all__ = [
    "METRICS",
    "RecordedRun",
    "load_run",
    "compare_runs",
    "paired_bootstrap",
    "render_comparison",
    "write_comparison",
]

# report key -> (split the per-job value comes from, outcome field, label)
METRICS: dict[str, tuple[str, str, str]] = {
    "action_right_rate": ("positive", "right", "Tool selection (action_right_rate)"),
    "action_input_rouge": ("positive", "rouge", "Tool input (action_input_rouge)"),
    "bad_rate": ("negative", "bad", "False positive (bad_rate)"),
    "missed_tool_rate": ("positive", "missed", "Missed tool on positives"),
    "exact_argument_match": ("positive", "exact", "Exact argument match"),
    "not_offered_call_rate": ("all", "not_offered", "Calls to tools not offered"),
    "format_violation_rate": ("all", "violation", "Format violations"),
}
SPLITS = ("positive", "negative")


@dataclass
class RecordedRun:
    """A run directory: its jobs per split, keyed by job id in file order, and the ``meta`` of its report."""

    path: Path
    jobs: dict[str, dict[str, dict[str, Any]]]
    meta: dict[str, Any]


def load_run(path: str | Path) -> RecordedRun:
    """Read a run directory written by :func:`~qwen_agent.bench.tool_use.run_benchmark` (or a partial one)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run directory")
    files = {split: path / f"{split}.jsonl" for split in SPLITS}
    if not any(f.is_file() for f in files.values()):
        raise BenchmarkError(f"{path}: not a tool-use run directory (no positive.jsonl or negative.jsonl)")
    jobs: dict[str, dict[str, dict[str, Any]]] = {}
    for split, file in files.items():
        if file.is_file() and _torn(file):
            raise BenchmarkError(
                f"{file}: the last line is cut off (the run was killed while writing it); rerun bench tool-use "
                "with the same --out to resume the run, which drops that line"
            )
        records = load_jobs(file, require_gen=True) if file.is_file() else []
        jobs[split] = {str(r.get("_id", r.get("id", f"{split}-{i}"))): r for i, r in enumerate(records)}
    meta: dict[str, Any] = {}
    report = path / "report.json"
    if report.is_file():
        try:
            meta = dict(json.loads(report.read_text(encoding="utf-8")).get("meta") or {})
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise BenchmarkError(f"{report}: cannot read the run's meta ({exc})") from None
    return RecordedRun(path, jobs, meta)


def _torn(path: Path) -> bool:
    """Whether the file ends in a partial line (each record is written whole, newline included)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if not size:
            return False
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], rounds: int, rng: np.random.Generator
) -> dict[str, Any]:
    """The mean of ``b - a`` over paired jobs, its percentile 95% interval from ``rounds`` resamples of the
    jobs, a two-sided p-value, and whether the interval leaves out zero."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if not len(diff):
        return {"difference": None, "interval": None, "p_value": None, "significant": False}
    means = diff[rng.integers(0, len(diff), size=(max(1, rounds), len(diff)))].mean(axis=1)
    low, high = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    p_value = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return {
        "difference": float(diff.mean()),
        "interval": [low, high],
        "p_value": p_value,
        "significant": low > 0 or high < 0,
    }


def _labels(count: int) -> list[str]:
    letters = string.ascii_uppercase
    return [letters[i] if i < len(letters) else f"R{i + 1}" for i in range(count)]


def _shared_ids(runs: Sequence[RecordedRun], split: str) -> list[str]:
    """Ids every run holds, sorted (a run file is in the order jobs finished); a shared id must have the same
    prompt everywhere."""
    first = runs[0].jobs[split]
    ids = sorted(i for i in first if all(i in run.jobs[split] for run in runs[1:]))
    for job_id in ids:
        for run in runs[1:]:
            if run.jobs[split][job_id].get("prompt") != first[job_id].get("prompt"):
                raise BenchmarkError(
                    f"{split} job {job_id!r} has a different prompt in {runs[0].path} and {run.path}: "
                    "these are runs of different datasets"
                )
    return ids


def _values(outcomes: Mapping[str, Sequence[Mapping[str, Any]]], split: str, field: str) -> list[float]:
    jobs = [*outcomes["positive"], *outcomes["negative"]] if split == "all" else outcomes[split]
    return [float(o[field]) for o in jobs]


def _verdict(outcome: Mapping[str, Any], split: str) -> str:
    if split == "positive":
        return "right" if outcome["right"] else "wrong"
    return "false call" if outcome["bad"] else "no call"


def _changed_jobs(
    ids: Mapping[str, Sequence[str]],
    runs: Sequence[RecordedRun],
    outcomes: Sequence[Mapping[str, Sequence[Mapping[str, Any]]]],
    a: int,
    b: int,
) -> list[dict[str, Any]]:
    changed = []
    for split in SPLITS:
        for job_id, oa, ob in zip(ids[split], outcomes[a][split], outcomes[b][split], strict=True):
            va, vb = _verdict(oa, split), _verdict(ob, split)
            if (va, oa["called"]) == (vb, ob["called"]):
                continue
            good = ("right", "no call")
            change = "changed" if (va in good) == (vb in good) else ("fixed" if vb in good else "broken")
            changed.append(
                {
                    "id": job_id,
                    "split": split,
                    "expected": oa["expected"],
                    "change": change,
                    "before": {
                        "verdict": va,
                        "called": oa["called"],
                        "gen": generated_text(runs[a].jobs[split][job_id]),
                    },
                    "after": {
                        "verdict": vb,
                        "called": ob["called"],
                        "gen": generated_text(runs[b].jobs[split][job_id]),
                    },
                }
            )
    return changed


def _per_tool_deltas(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for tool in sorted(set(before["per_tool"]) | set(after["per_tool"])):
        a, b = before["per_tool"].get(tool, {}), after["per_tool"].get(tool, {})
        # a tool without a row in a run was neither expected nor called there
        row: dict[str, Any] = {
            "support": max(a.get("support", 0), b.get("support", 0)),
            "predicted": [a.get("predicted", 0), b.get("predicted", 0)],
        }
        for key in ("precision", "recall"):
            va, vb = a.get(key), b.get(key)
            row[key] = [va, vb]
            row[f"{key}_difference"] = None if va is None or vb is None else vb - va
        rows[tool] = row
    return rows


def compare_runs(
    paths: Sequence[str | Path],
    *,
    tokenizer: Any = None,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare two or more run directories, each later one against the first (see the module docstring).

    ``tokenizer`` defaults to Qwen's (Rouge-L is always over Qwen-7B-Chat tokens), ``catalog`` to the shipped
    plugin schemas. Returns plain JSON data.
    """
    if len(paths) < 2:
        raise ConfigError(f"compare needs at least two run directories, got {len(paths)}")
    if bootstrap < 1:
        raise ConfigError(f"--bootstrap must be at least 1, got {bootstrap}")
    if tokenizer is None:
        from ..runtime.tokenizer import QwenTokenizer

        tokenizer = QwenTokenizer.from_pretrained()
    if catalog is None:
        from .tool_use import plugin_schemas

        catalog = plugin_schemas()
    runs = [load_run(path) for path in paths]
    labels = _labels(len(runs))
    ids = {split: _shared_ids(runs, split) for split in SPLITS}
    if not any(ids.values()):
        raise BenchmarkError(f"the runs share no jobs ({', '.join(str(run.path) for run in runs)})")
    outcomes = []
    for run in runs:
        positive, negative = ([run.jobs[split][i] for i in ids[split]] for split in SPLITS)
        outcomes.append(job_outcomes(positive, negative, tokenizer, catalog))
    reports = [summarize(o, bootstrap=bootstrap, seed=seed) for o in outcomes]
    rng = np.random.default_rng(seed)
    metrics = {}
    for name, (split, field, label) in METRICS.items():
        vectors = [_values(o, split, field) for o in outcomes]
        metrics[name] = {
            "label": label,
            "split": split,
            "values": [report[name] for report in reports],
            "intervals": [bootstrap_ci(v, bootstrap, rng) for v in vectors],
        }
    differences = []
    for b in range(1, len(runs)):
        tests = {}
        for name, (split, field, _) in METRICS.items():
            tests[name] = paired_bootstrap(
                _values(outcomes[0], split, field), _values(outcomes[b], split, field), bootstrap, rng
            )
        differences.append(
            {
                "run": labels[b],
                "against": labels[0],
                "metrics": tests,
                "per_tool": _per_tool_deltas(reports[0], reports[b]),
                "not_offered_calls": [reports[0]["not_offered"]["calls"], reports[b]["not_offered"]["calls"]],
                "changed_jobs": _changed_jobs(ids, runs, outcomes, 0, b),
            }
        )
    # settings only: the prefix cache's counters say what a run did, and differ between any two runs
    meta_keys = sorted({key for run in runs for key in run.meta} - {"prefix_cache"})
    return {
        "runs": [
            {
                "label": label,
                "path": str(run.path),
                "jobs": {split: len(run.jobs[split]) for split in SPLITS},
                "meta": run.meta,
            }
            for label, run in zip(labels, runs, strict=True)
        ],
        "shared": {split: len(ids[split]) for split in SPLITS},
        "intersection": any(len(run.jobs[s]) != len(ids[s]) for run in runs for s in SPLITS),
        "meta_differences": {
            key: [run.meta.get(key) for run in runs]
            for key in meta_keys
            if len({json.dumps(run.meta.get(key), sort_keys=True) for run in runs}) > 1
        },
        "level": 0.95,
        "bootstrap_rounds": bootstrap,
        "metrics": metrics,
        "schema_valid_rate": {
            "values": [report["schema_valid_rate"] for report in reports],
            "checked_calls": [report["schema_checked_calls"] for report in reports],
        },
        "differences": differences,
    }


# ----------------------------------------------------------------------------------------------------------------
# Rendering

OUTPUT_CHARS = 800  # each output shown in the markdown is cut to this; the JSON keeps it whole


def _value(name: str, value: float | None) -> str:
    return number(value) if name == "action_input_rouge" else pct(value)


def _delta(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if name == "action_input_rouge" else f"{100 * value:+.1f} pts"


def _delta_interval(name: str, bounds: Sequence[float] | None) -> str:
    if bounds is None:
        return "n/a"
    return "[" + ", ".join(_delta(name, x).removesuffix(" pts") for x in bounds) + "]"


def _fenced(text: str) -> str:
    """``text`` (cut short) in a code fence longer than any backtick run inside it."""
    if len(text) > OUTPUT_CHARS:
        text = text[:OUTPUT_CHARS] + f"... ({len(text) - OUTPUT_CHARS} more characters)"
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _header(comparison: Mapping[str, Any]) -> list[str]:
    runs, shared = comparison["runs"], comparison["shared"]
    labels = [run["label"] for run in runs]
    lines = [
        "# Tool-use runs compared",
        "",
        "| Run | Directory | Jobs (positive / negative) |",
        "|---|---|---|",
    ]
    for run in runs:
        jobs = run["jobs"]
        lines.append(f"| {run['label']} | {md_cell(run['path'])} | {jobs['positive']} / {jobs['negative']} |")
    jobs = f"{shared['positive']} positive and {shared['negative']} negative jobs"
    if comparison["intersection"]:
        lines += [
            "",
            f"Compared on the intersection: the {jobs} that every run holds; the others are left out.",
        ]
    else:
        lines += ["", f"Compared on all {jobs}; every run holds the same jobs."]
    differing = comparison["meta_differences"]
    if differing:
        lines += ["", "Settings that differ (report.json meta):", ""]
        lines += ["| Setting | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for key, values in differing.items():
            cells = " | ".join("n/a" if v is None else md_cell(v, EXAMPLE_CHARS) for v in values)
            lines.append(f"| {md_cell(key)} | {cells} |")
    return lines


def _side_by_side(comparison: Mapping[str, Any]) -> list[str]:
    labels = [run["label"] for run in comparison["runs"]]
    head = " | ".join(f"{label} | {label} 95% CI" for label in labels)
    lines = ["", f"| Metric | {head} |", "|---" * (2 * len(labels) + 1) + "|"]
    for name, metric in comparison["metrics"].items():
        scale, digits = (1.0, 3) if name == "action_input_rouge" else (100.0, 1)
        cells = " | ".join(
            f"{_value(name, v)} | {interval(ci, scale, digits)}"
            for v, ci in zip(metric["values"], metric["intervals"], strict=True)
        )
        lines.append(f"| {metric['label']} | {cells} |")
    schema = comparison["schema_valid_rate"]
    cells = " | ".join(
        f"{pct(v)} (of {n} calls) | n/a"
        for v, n in zip(schema["values"], schema["checked_calls"], strict=True)
    )
    lines.append(f"| Arguments valid for the schema | {cells} |")
    return lines


def _difference(name_pair: str, difference: Mapping[str, Any], max_changed: int) -> list[str]:
    a, b = difference["against"], difference["run"]
    lines = [
        "",
        f"## {name_pair}",
        "",
        f"| Metric | {b} − {a} | 95% CI (paired bootstrap) | p | Larger than chance |",
        "|---|---|---|---|---|",
    ]
    for name, test in difference["metrics"].items():
        p = "n/a" if test["p_value"] is None else f"{test['p_value']:.3f}"
        lines.append(
            f"| {METRICS[name][2]} | {_delta(name, test['difference'])} | "
            f"{_delta_interval(name, test['interval'])} | {p} | {'yes' if test['significant'] else 'no'} |"
        )
    rows = {
        tool: row
        for tool, row in difference["per_tool"].items()
        if row["recall"][0] != row["recall"][1] or row["precision"][0] != row["precision"][1]
    }
    lines += ["", f"Per tool: {len(rows)} of {len(difference['per_tool'])} tools changed."]
    if rows:
        lines += [
            "",
            f"| Tool | Expected | Recall {a} | Recall {b} | Change | Precision {a} | Precision {b} | Change |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for tool, row in rows.items():
            recall, precision = row["recall"], row["precision"]
            lines.append(
                f"| {md_cell(tool, EXAMPLE_CHARS)} | {row['support']} | {pct(recall[0])} | {pct(recall[1])} | "
                f"{_delta('', row['recall_difference'])} | {pct(precision[0])} | {pct(precision[1])} | "
                f"{_delta('', row['precision_difference'])} |"
            )
    before, after = difference["not_offered_calls"]
    lines += ["", f"Calls to tools not offered: {before} in {a}, {after} in {b}."]
    changed = difference["changed_jobs"]
    counts = {kind: sum(job["change"] == kind for job in changed) for kind in ("fixed", "broken", "changed")}
    lines += [
        "",
        f"### Jobs whose outcome changed: {len(changed)} ({counts['fixed']} fixed, {counts['broken']} broken, "
        f"{counts['changed']} another tool or no call)",
    ]
    if changed:
        lines += ["", f"| Job | Split | Expected | {a} | {b} | Change |", "|---|---|---|---|---|---|"]
        for job in changed:
            lines.append(
                f"| {md_cell(job['id'], EXAMPLE_CHARS)} | {job['split']} | {md_cell(job['expected'], EXAMPLE_CHARS)} | "
                f"{_outcome(job['before'])} | {_outcome(job['after'])} | {job['change']} |"
            )
    for job in changed[:max_changed]:
        lines += [
            "",
            f"#### {md_cell(job['id'], EXAMPLE_CHARS)} ({job['split']}, expected {md_cell(job['expected'], EXAMPLE_CHARS)}): "
            f"{_outcome(job['before'])} → {_outcome(job['after'])}",
            "",
            f"{a}:",
            "",
            _fenced(job["before"]["gen"]),
            "",
            f"{b}:",
            "",
            _fenced(job["after"]["gen"]),
        ]
    if len(changed) > max_changed:
        lines += ["", f"The outputs of {len(changed) - max_changed} more changed jobs are in compare.json."]
    return lines


def _outcome(side: Mapping[str, Any]) -> str:
    return f"{side['verdict']}: {md_cell(side['called'], EXAMPLE_CHARS)}"


def render_comparison(comparison: Mapping[str, Any], *, max_changed: int = 50) -> str:
    """The comparison as markdown: the runs and what differs in their settings, the figures side by side, then
    per later run its differences against the first, per-tool changes and the changed jobs with both outputs
    (the first ``max_changed`` of them)."""
    lines = _header(comparison) + _side_by_side(comparison)
    for difference in comparison["differences"]:
        pair = f"{difference['run']} against {difference['against']}"
        lines += _difference(pair, difference, max_changed)
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Mapping[str, Any], path: str | Path) -> None:
    """compare.png: each figure per run with its 95% interval, and the per-tool recall changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [run["label"] for run in comparison["runs"]]
    names = list(comparison["metrics"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    height = 0.8 / len(labels)
    for index, label in enumerate(labels):
        ys = [row + index * height for row in range(len(names))]
        values, errors = [], [[], []]
        for name in names:
            metric = comparison["metrics"][name]
            value, ci = metric["values"][index], metric["intervals"][index]
            value = 0.0 if value is None else 100 * value
            values.append(value)
            errors[0].append(0.0 if ci is None else max(0.0, value - 100 * ci[0]))
            errors[1].append(0.0 if ci is None else max(0.0, 100 * ci[1] - value))
        left.barh(ys, values, height=height, xerr=errors, capsize=2, label=label)
    left.set_yticks([row + 0.4 - height / 2 for row in range(len(names))])
    left.set_yticklabels([comparison["metrics"][n]["label"] for n in names], fontsize=7)
    left.invert_yaxis()
    left.set_xlim(0, 100)
    left.set_xlabel("% (action_input_rouge: Rouge-L F1 x 100), with 95% intervals")
    left.legend(fontsize=7)
    bars = [
        (f"{_axis_label(tool)} ({d['run']})", 100 * row["recall_difference"])
        for d in comparison["differences"]
        for tool, row in d["per_tool"].items()
        if row["recall_difference"]
    ]
    if bars:
        bars.sort(key=lambda item: item[1])
        right.barh([name for name, _ in bars], [value for _, value in bars], height=0.6, color="#4c72b0")
        right.set_ylim(-0.5, max(len(bars), 4) - 0.5)  # a few bars stay bars, not blocks
        right.axvline(0, color="black", linewidth=0.8)
        right.tick_params(axis="y", labelsize=7)
    else:
        right.text(0.5, 0.5, "no tool's recall changed", ha="center", va="center")
        right.set_yticks([])
    right.set_xlabel(f"recall change against {labels[0]} (points)")
    fig.suptitle("Tool-use runs compared: " + ", ".join(labels))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _axis_label(tool: str) -> str:
    """A tool name short enough for a chart's axis."""
    flat = " ".join(tool.split())
    return flat if len(flat) <= 30 else flat[:29] + "…"


def write_comparison(comparison: Mapping[str, Any], out_dir: str | Path, *, max_changed: int = 50) -> None:
    """compare.json (everything, every output whole), compare.md and compare.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(comparison, ensure_ascii=False, indent=2) + "\n"
    (out / "compare.json").write_text(text, encoding="utf-8")
    (out / "compare.md").write_text(render_comparison(comparison, max_changed=max_changed), encoding="utf-8")
    plot_comparison(comparison, out / "compare.png")
