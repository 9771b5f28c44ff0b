"""Tool-use benchmark metrics: Qwen's three official numbers, exactly, and a fuller scorecard.

Jobs are dicts in the official format (``prompt``, ``response`` = the golden ReAct text, ``gen`` = the model's
output, a string or a list whose first item is used) plus optional metadata: ``tools`` (names offered),
``expected_tool``, ``category``, ``lang``, ``id``.

The official metrics (``QwenLM/Qwen:eval/evaluate_plugin.py``, December 2023 version)
--------------------------------------------------------------------------------------
* ``action_right_rate``: share of positive jobs whose ``gen`` contains the literal ``"\\nAction: "`` and whose
  :func:`process_res` action equals the golden one (stripped, lower-cased).
* ``action_input_rouge``: mean over *all* positive jobs of the Rouge-L F1 between the normalised action inputs
  (``json5`` then sorted-keys JSON, ``""`` on failure), each written as its Qwen tokens joined by spaces and split
  on whitespace again.
* ``bad_rate``: share of negative jobs whose ``gen`` contains ``"\\nAction: "``.

:func:`process_res` slices with ``str.find`` exactly as the original, so its quirks are kept on purpose: with two
actions in one output the first name wins and the action input runs into the second action, which then fails to
parse and scores 0.

The scorecard
-------------
Adds what the three numbers hide, using the project's own parser (:func:`qwen_agent.react.parse_output`, first
action wins): per-tool precision, recall and confusion; the missed-tool rate on positives; calls to tools that
were not offered; the schema-validity rate of arguments; exact-argument match; the format-violation rate with a
count per problem; bootstrap 95% confidence intervals for the three headline numbers; and, per ``category``
and ``lang`` of each split, the share of jobs where the tool called (or none) is the expected one. Each job is
scored once (:func:`score_job`); the report sums those outcomes, and a comparison of runs pairs them.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import json5
import numpy as np
from rouge_score import rouge_scorer

from ..errors import BenchmarkError, ToolArgumentError
from ..react import Action, FinalAnswer, Malformed, Problem, parse_output
from .report import render_markdown

__all__ = [
    "ACTION_MARKER",
    "load_jobs",
    "generated_text",
    "process_res",
    "normalize_action_input",
    "qwen_token_string",
    "rouge_l",
    "action_right_rate",
    "action_input_rouge",
    "bad_rate",
    "offered_tools",
    "bootstrap_ci",
    "score_job",
    "job_outcomes",
    "summarize",
    "scorecard",
    "render_markdown",
]

ACTION_MARKER = "\nAction: "  # the December 2023 script requires the newline and the trailing space
NO_TOOL = "(none)"
NOT_OFFERED = "(not offered)"
_FORMAT_PROBLEMS = {
    Problem.EMPTY,
    Problem.NO_FORMAT,
    Problem.MISSING_FINAL_ANSWER,
    Problem.MISSING_ACTION,
    Problem.MISSING_ACTION_INPUT,
    Problem.INVALID_ARGUMENTS,
    Problem.MULTIPLE_ACTIONS,
    Problem.INVENTED_OBSERVATION,
    Problem.TEXT_AFTER_ACTION,
    Problem.LEAKED_STOP_FRAGMENT,
}
_TOOL_NAMES_RE = re.compile(r"should be one of \[([^\]\n]*)\]")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def jsonl_lines(data: bytes, path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each non-blank line of jsonl ``data`` read from ``path``.

    Lines end at ``\\n`` only: ``str.splitlines`` would also end them at U+2028, U+2029 and U+0085, which a JSON
    string written with ``ensure_ascii=False`` holds as they are.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BenchmarkError(f"{path}:{line}: not UTF-8 text (byte {exc.start} of the file)") from None
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield number, line


def read_jsonl(path: str | Path, what: str = "job") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for each non-blank line of a jsonl file, ``where`` being ``"FILE:LINE"``.

    An unreadable file, a line that is not JSON, or one that is not an object raises BenchmarkError naming it.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BenchmarkError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    for number, line in jsonl_lines(data, path):
        where = f"{path}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise BenchmarkError(f"{where}: a {what} must be a JSON object")
        yield where, value


def load_jobs(path: str | Path, *, require_gen: bool = False) -> list[dict[str, Any]]:
    """Read a jsonl file of jobs; a malformed line raises BenchmarkError naming the file, line and field."""
    jobs = []
    for where, job in read_jsonl(path):
        needed = ("prompt", "response", "gen") if require_gen else ("prompt", "response")
        for key in needed:
            if key not in job:
                raise BenchmarkError(f"{where}: the job has no {key!r} field")
        for key in ("prompt", "response"):
            if not isinstance(job[key], str):
                raise BenchmarkError(f"{where}: field {key!r} must be a string")
        if "gen" in job:
            try:
                generated_text(job)
            except BenchmarkError as exc:
                raise BenchmarkError(f"{where}: {exc}") from None
        jobs.append(job)
    return jobs


def generated_text(job: Mapping[str, Any]) -> str:
    """The model output of a job (the official files store it as a one-item list)."""
    gen = job.get("gen")
    if isinstance(gen, list) and gen and isinstance(gen[0], str):
        return gen[0]
    if isinstance(gen, str):
        return gen
    raise BenchmarkError("field 'gen' must be a string or a non-empty list of strings")


# ----------------------------------------------------------------------------------------------------------------
# The official metrics


def process_res(response: str) -> dict[str, str]:
    """Split a ReAct text into its parts exactly as the official script does (``find`` slicing, quirks kept).

    The ``"\\n"`` appended first makes a missing marker (``find`` = -1) cut off only that newline.
    """
    response += "\n"
    act, act_in, obs = response.find("Action:"), response.find("Action Input:"), response.find("Observation:")
    last_thought, final = response.rfind("Thought:"), response.find("Final Answer:")
    return {
        "thought": response[:act].strip(),
        "action": response[act + len("Action:") : act_in].strip(),
        "action_input": normalize_action_input(response[act_in + len("Action Input:") : obs].strip()),
        "observation": response[obs + len("Observation:") : last_thought].strip(),
        "thought_last": response[last_thought + len("Thought:") : final].strip(),
        "final_answer": response[final + len("Final Answer:") :].strip(),
    }


def normalize_action_input(text: str) -> str:
    """``json5`` value re-dumped as sorted-keys JSON (non-ASCII kept), or ``""`` when it does not parse."""
    try:
        return json.dumps(json5.loads(text), ensure_ascii=False, sort_keys=True)
    except Exception:  # the original catches everything; json5 raises several types on odd input
        return ""


def qwen_token_string(text: str, tokenizer: Any) -> str:
    """The text's Qwen tokens, each decoded on its own (bad UTF-8 replaced), joined by spaces."""
    pieces = (tokenizer.id_to_piece(i) for i in tokenizer.encode(text, allowed_special="all"))
    return " ".join(p.decode("utf-8", errors="replace") if isinstance(p, bytes) else p for p in pieces)


class _WhitespaceTokenizer:
    """The official script's tokenizer for rouge_score: the token string split on whitespace."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())


def rouge_l(reference: str, generated: str, tokenizer: Any) -> float:
    """Rouge-L F1 (``rouge_score``) of two action inputs written as Qwen-token strings; 0 when either is empty."""
    score = _SCORER.score(qwen_token_string(reference, tokenizer), qwen_token_string(generated, tokenizer))
    return float(score["rougeL"].fmeasure)


def _action_right(job: Mapping[str, Any]) -> bool:
    gen = generated_text(job)
    if ACTION_MARKER not in gen:
        return False
    return (
        process_res(gen)["action"].strip().lower() == process_res(job["response"])["action"].strip().lower()
    )


def _action_input_rouge(job: Mapping[str, Any], tokenizer: Any) -> float:
    reference = process_res(job["response"])["action_input"]
    return rouge_l(reference, process_res(generated_text(job))["action_input"], tokenizer)


def _is_bad(job: Mapping[str, Any]) -> bool:
    return ACTION_MARKER in generated_text(job)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def action_right_rate(positive: Sequence[Mapping[str, Any]]) -> float:
    """Share of positive jobs with the right tool (official definition), as a fraction."""
    return _mean([float(_action_right(job)) for job in positive])


def action_input_rouge(positive: Sequence[Mapping[str, Any]], tokenizer: Any) -> float:
    """Mean Rouge-L F1 of the action inputs over all positive jobs (official definition)."""
    return _mean([_action_input_rouge(job, tokenizer) for job in positive])


def bad_rate(negative: Sequence[Mapping[str, Any]]) -> float:
    """Share of negative jobs that call a tool anyway (official definition), as a fraction."""
    return _mean([float(_is_bad(job)) for job in negative])


# ----------------------------------------------------------------------------------------------------------------
# The scorecard


def offered_tools(job: Mapping[str, Any]) -> list[str] | None:
    """Tool names offered to the model: the ``tools`` field, else the names listed in the prompt's format line."""
    tools = job.get("tools")
    if isinstance(tools, list):
        return [t if isinstance(t, str) else str(t.get("name_for_model", "")) for t in tools]
    match = _TOOL_NAMES_RE.search(job.get("prompt", ""))
    if match is None:
        return None
    return [name.strip() for name in match.group(1).split(",") if name.strip()]


def _expected_tool(job: Mapping[str, Any], positive: bool) -> str:
    if not positive:
        return NO_TOOL
    expected = job.get("expected_tool")
    return expected if isinstance(expected, str) and expected else process_res(job["response"])["action"]


def _golden_arguments(job: Mapping[str, Any]) -> Any:
    parsed = parse_output(job["response"])
    return parsed.arguments if isinstance(parsed, Action) else None


def _called_tool(parsed: Action | FinalAnswer | Malformed) -> str:
    if isinstance(parsed, Action):
        return parsed.tool
    if isinstance(parsed, Malformed) and parsed.tool:
        return parsed.tool
    return NO_TOOL


def _is_format_violation(parsed: Action | FinalAnswer | Malformed) -> bool:
    if isinstance(parsed, Malformed) and parsed.problem in _FORMAT_PROBLEMS:
        return True
    return any(p in _FORMAT_PROBLEMS for p in parsed.problems)


def _schema_valid(tool: str, arguments: Any, catalog: Mapping[str, Mapping[str, Any]]) -> bool:
    from ..tools.schema import validate_arguments  # imported here: the tools package pulls in Jupyter

    if not isinstance(arguments, dict):
        return False
    try:
        validate_arguments(arguments, catalog[tool])
    except ToolArgumentError:
        return False
    return True


def bootstrap_ci(values: Sequence[float], rounds: int, rng: np.random.Generator) -> list[float] | None:
    """Percentile 95% interval of the mean, resampling jobs with replacement."""
    if not values or rounds <= 0:
        return None
    data = np.asarray(values, dtype=np.float64)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(low), float(high)]


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def score_job(
    job: Mapping[str, Any], positive: bool, tokenizer: Any, catalog: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """One job's outcome, the unit every figure of the report is summed from (and :mod:`.compare` pairs).

    ``called`` and ``expected`` are tool names (``"(none)"`` for no call); ``not_offered`` says the call names
    a tool this job did not offer; ``schema_valid`` is None when the call was not checked. Positives add the
    official ``right`` and ``rouge`` and the scorecard's ``missed`` and ``exact``; negatives add ``bad``.
    """
    offered = offered_tools(job)
    parsed = parse_output(generated_text(job), offered)
    called, expected = _called_tool(parsed), _expected_tool(job, positive)
    problems = [p.value for p in parsed.problems]
    if isinstance(parsed, Malformed):
        problems.append(parsed.problem.value)
    schema_valid = None
    if isinstance(parsed, Action) and parsed.tool in catalog:
        schema_valid = _schema_valid(parsed.tool, parsed.arguments, catalog)
    elif (
        isinstance(parsed, Malformed)
        and parsed.problem == Problem.INVALID_ARGUMENTS
        and parsed.tool in catalog
    ):
        schema_valid = False  # arguments that do not parse are not valid
    outcome: dict[str, Any] = {
        "expected": expected,
        "called": called,
        "not_offered": called != NO_TOOL and offered is not None and called not in offered,
        "violation": _is_format_violation(parsed),
        "problems": problems,
        "schema_valid": schema_valid,
        "groups": {key: job[key] for key in ("category", "lang") if job.get(key)},
    }
    if positive:
        outcome["right"] = _action_right(job)
        outcome["rouge"] = _action_input_rouge(job, tokenizer)
        outcome["missed"] = called == NO_TOOL
        outcome["exact"] = (
            isinstance(parsed, Action) and called == expected and parsed.arguments == _golden_arguments(job)
        )
    else:
        outcome["bad"] = _is_bad(job)
    return outcome


def job_outcomes(
    positive: Sequence[Mapping[str, Any]],
    negative: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """:func:`score_job` for every job, per split; a job without ``gen`` raises BenchmarkError."""
    outcomes: dict[str, list[dict[str, Any]]] = {}
    for label, jobs in (("positive", positive), ("negative", negative)):
        for index, job in enumerate(jobs):
            if "gen" not in job:
                raise BenchmarkError(
                    f"{label} job {job.get('id', index)!r} has no 'gen' field (not generated yet)"
                )
        outcomes[label] = [score_job(job, label == "positive", tokenizer, catalog or {}) for job in jobs]
    return outcomes


def _per_tool(outcomes: Iterable[Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Precision and recall per tool that was expected, or called where it was offered; the calls to tools
    not offered are one group, every raw name kept with its count."""
    confusion: dict[str, Counter[str]] = defaultdict(Counter)
    not_offered: Counter[str] = Counter()
    for outcome in outcomes:
        called = outcome["called"]
        if outcome["not_offered"]:
            not_offered[called] += 1
            called = NOT_OFFERED
        confusion[outcome["expected"]][called] += 1
    tools = sorted(({t for row in confusion.values() for t in row} | set(confusion)) - {NO_TOOL, NOT_OFFERED})
    rows = {}
    for tool in tools:
        tp = confusion[tool][tool]
        fn = sum(confusion[tool].values()) - tp
        fp = sum(row[tool] for expected, row in confusion.items() if expected != tool)
        rows[tool] = {
            "support": tp + fn,
            "predicted": tp + fp,
            "precision": _rate(tp, tp + fp),
            "recall": _rate(tp, tp + fn),
        }
    group = {"calls": sum(not_offered.values()), "names": dict(not_offered.most_common())}
    return rows, group


def summarize(
    outcomes: Mapping[str, Sequence[Mapping[str, Any]]], *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The report from :func:`job_outcomes`: the three official numbers (fractions, None for an empty split)
    with bootstrap 95% intervals, then the scorecard."""
    positive, negative = outcomes.get("positive", []), outcomes.get("negative", [])
    every = [*positive, *negative]
    right = [float(o["right"]) for o in positive]
    rouge = [o["rouge"] for o in positive]
    bad = [float(o["bad"]) for o in negative]
    checked = [o["schema_valid"] for o in every if o["schema_valid"] is not None]
    problems = Counter(p for o in every for p in o["problems"])
    confusion: dict[str, Counter[str]] = defaultdict(Counter)
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for split, jobs in (("positive", positive), ("negative", negative)):
        for o in jobs:
            confusion[o["expected"]][o["called"]] += 1
            for key, value in o["groups"].items():
                groups[key][f"{split}/{value}"].append(float(o["called"] == o["expected"]))
    per_tool, not_offered = _per_tool(every)
    rng = np.random.default_rng(seed)
    return {
        "action_right_rate": _mean(right) if positive else None,
        "action_input_rouge": _mean(rouge) if positive else None,
        "bad_rate": _mean(bad) if negative else None,
        "counts": {"positive": len(positive), "negative": len(negative)},
        "confidence_intervals": {
            "level": 0.95,
            "bootstrap_rounds": bootstrap,
            "action_right_rate": bootstrap_ci(right, bootstrap, rng),
            "action_input_rouge": bootstrap_ci(rouge, bootstrap, rng),
            "bad_rate": bootstrap_ci(bad, bootstrap, rng),
        },
        "missed_tool_rate": _rate(sum(o["missed"] for o in positive), len(positive)),
        "not_offered_call_rate": _rate(sum(o["not_offered"] for o in every), len(every)),
        "schema_valid_rate": _rate(sum(checked), len(checked)),
        "schema_checked_calls": len(checked),
        "exact_argument_match": _rate(sum(o["exact"] for o in positive), len(positive)),
        "format_violation_rate": _rate(sum(o["violation"] for o in every), len(every)),
        "problems": dict(sorted(problems.items())),
        "per_tool": per_tool,
        "not_offered": not_offered,
        "confusion": {expected: dict(row) for expected, row in sorted(confusion.items())},
        "groups": {
            key: {name: {"jobs": len(v), "accuracy": _mean(v)} for name, v in sorted(named.items())}
            for key, named in sorted(groups.items())
        },
    }


def scorecard(
    positive: Sequence[Mapping[str, Any]],
    negative: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The full report: the three official numbers at the top level (fractions), then the scorecard.

    ``catalog`` maps tool names to their JSON-Schema parameters; calls to tools missing from it are left out of
    the schema-validity rate. Jobs without ``gen`` raise BenchmarkError. ``per_tool`` has a row per tool that
    was expected, or called in a job that offered it; calls to tools a job did not offer are counted in
    ``not_offered`` (``calls``, and ``names``: every raw name with its count), and every raw name is also kept
    in ``confusion``.
    """
    outcomes = job_outcomes(positive, negative, tokenizer, catalog)
    return summarize(outcomes, bootstrap=bootstrap, seed=seed)
