"""Markdown for benchmark reports: table cells that stay valid whatever a model wrote, and a run's report.

Tool names in a report come from model output: a name may be 1,500 characters of hallucinated text, hold ``|``
(which would end a table cell), newlines (which would end the row), backticks or brackets. :func:`md_cell`
writes any text as one short cell.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["EXAMPLE_CHARS", "md_cell", "pct", "number", "interval", "render_markdown", "official_lines"]

EXAMPLE_CHARS = 60  # a model-written name shown as an example is cut to this many characters
NOT_OFFERED_EXAMPLES = 3
_MARKDOWN_SPECIAL = re.compile(r"[\\|`*<>\[\]]")


def md_cell(text: Any, limit: int | None = None) -> str:
    """``text`` as one table cell: whitespace runs (newlines included) become one space, the text is cut to
    ``limit`` characters (the last one an ellipsis), and markdown's special characters are escaped."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return _MARKDOWN_SPECIAL.sub(lambda m: "\\" + m.group(0), flat)


def pct(value: float | None) -> str:
    """A fraction as a percentage; ``n/a`` when it is undefined (nothing to divide by)."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def interval(bounds: Iterable[float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if bounds is None:
        return "n/a"
    low, high = bounds
    return f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def _not_offered_cell(names: Mapping[str, int]) -> str:
    """The "(not offered)" row's name cell: how many distinct names, and the most frequent few, cut short."""
    examples = ", ".join(f'"{md_cell(name, EXAMPLE_CHARS)}"' for name in list(names)[:NOT_OFFERED_EXAMPLES])
    count = len(names)
    return f"(not offered): {count} name{'s' if count != 1 else ''}" + (
        f", e.g. {examples}" if examples else ""
    )


def render_markdown(report: Mapping[str, Any]) -> str:
    """A markdown summary: the headline table with 95% intervals, the scorecard, then per-tool rows (tools
    offered and expected or called; calls to tools not offered in one row)."""
    ci = report["confidence_intervals"]
    lines = [
        "| Metric | Value | 95% CI |",
        "|---|---|---|",
        f"| Tool selection (action_right_rate) | {pct(report['action_right_rate'])} | "
        f"{interval(ci['action_right_rate'])} |",
        f"| Tool input (action_input_rouge) | {number(report['action_input_rouge'])} | "
        f"{interval(ci['action_input_rouge'], 1.0, 3)} |",
        f"| False positive (bad_rate) | {pct(report['bad_rate'])} | {interval(ci['bad_rate'])} |",
        "",
        "| Scorecard | Value |",
        "|---|---|",
        f"| Jobs (positive / negative) | {report['counts']['positive']} / {report['counts']['negative']} |",
        f"| Missed tool on positives | {pct(report['missed_tool_rate'])} |",
        f"| Calls to tools not offered | {pct(report['not_offered_call_rate'])} |",
        f"| Arguments valid for the schema | {pct(report['schema_valid_rate'])} "
        f"(of {report['schema_checked_calls']} calls) |",
        f"| Exact argument match | {pct(report['exact_argument_match'])} |",
        f"| Format violations | {pct(report['format_violation_rate'])} |",
    ]
    if report["problems"]:
        problems = ", ".join(f"{md_cell(k)}: {v}" for k, v in report["problems"].items())
        lines.append(f"| Problems | {problems} |")
    lines += ["", "| Tool | Expected | Called | Precision | Recall |", "|---|---|---|---|---|"]
    for tool, row in report["per_tool"].items():
        lines.append(
            f"| {md_cell(tool, EXAMPLE_CHARS)} | {row['support']} | {row['predicted']} | "
            f"{pct(row['precision'])} | {pct(row['recall'])} |"
        )
    not_offered = report.get("not_offered") or {}
    if not_offered.get("calls"):
        lines.append(
            f"| {_not_offered_cell(not_offered['names'])} | 0 | {not_offered['calls']} | n/a | n/a |"
        )
    return "\n".join(lines) + "\n"


def official_lines(report: Mapping[str, Any]) -> list[str]:
    """The three official numbers, one line each with its 95% interval, in the units of Qwen's table."""
    ci = report["confidence_intervals"]
    return [
        f"action_right_rate   {pct(report['action_right_rate']):>7}  95% CI {interval(ci['action_right_rate'])}",
        f"action_input_rouge  {number(report['action_input_rouge']):>7}  95% CI "
        f"{interval(ci['action_input_rouge'], 1.0, 3)}",
        f"bad_rate            {pct(report['bad_rate']):>7}  95% CI {interval(ci['bad_rate'])}",
    ]
