"""How long scoring recorded tool-use generations takes: the three official metrics plus the full scorecard.

    PYTHONPATH=. python benchmarks/scoring.py [--jobs 1000] [--bootstrap 1000]

Builds N recorded jobs from the shipped datasets (positives and negatives in their shipped ratio) with a mix of
outputs a real model writes: the golden step, JSON5 arguments, wrong or missing arguments, a wrong tool, two
actions, a direct answer, and a false call on negatives. Times, in one process: loading the Qwen tokenizer, and
``scorecard`` (official metrics, parser-based scorecard, bootstrap intervals); then ``qwen-agent bench score``
end to end as a user runs it (a fresh process, imports included). Prints a table, writes
benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_agent.bench.metrics import load_jobs, scorecard  # noqa: E402
from qwen_agent.bench.tool_use import catalog_schemas, load_catalog, shipped_path  # noqa: E402
from qwen_agent.runtime.tokenizer import QwenTokenizer  # noqa: E402


def positive_output(job: dict, variant: int) -> str:
    gold = job["response"]
    head, args = gold.rsplit("\nAction Input: ", 1)
    thought, tool = head.rsplit("\nAction: ", 1)
    if variant == 0:
        return gold + "\nObservation:"
    if variant == 1:  # JSON5: single quotes
        return f"{head}\nAction Input: {args.replace(chr(34), chr(39))}\nObservation:"
    if variant == 2:  # one argument dropped
        parsed = json.loads(args)
        parsed.pop(next(iter(parsed)))
        return f"{head}\nAction Input: {json.dumps(parsed, ensure_ascii=False)}\nObservation:"
    if variant == 3:  # another offered tool
        other = next(t for t in job["tools"] if t != tool)
        return f"{thought}\nAction: {other}\nAction Input: {args}\nObservation:"
    if variant == 4:  # two actions in one turn
        return f"{gold}\nAction: {tool}\nAction Input: {args}\nObservation:"
    return "Thought: I can answer this myself.\nFinal Answer: I am not sure."


def negative_output(job: dict, variant: int) -> str:
    if variant % 4 == 0:
        return (
            f'Thought: let me check\nAction: {job["tools"][0]}\nAction Input: {{"query": "x"}}\nObservation:'
        )
    return job["response"]


def recorded_jobs(total: int) -> tuple[list[dict], list[dict]]:
    positive = load_jobs(shipped_path("tool_use_positive.jsonl"))
    negative = load_jobs(shipped_path("tool_use_negative.jsonl"))
    n_pos = round(total * len(positive) / (len(positive) + len(negative)))
    pos = [
        {**positive[i % len(positive)], "gen": [positive_output(positive[i % len(positive)], i % 6)]}
        for i in range(n_pos)
    ]
    neg = [
        {**negative[i % len(negative)], "gen": [negative_output(negative[i % len(negative)], i)]}
        for i in range(total - n_pos)
    ]
    return pos, neg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()

    pos, neg = recorded_jobs(args.jobs)
    catalog = catalog_schemas(load_catalog(shipped_path("tool_use_plugins.json")))
    start = time.perf_counter()
    tokenizer = QwenTokenizer.from_pretrained()
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    report = scorecard(pos, neg, tokenizer, catalog=catalog, bootstrap=args.bootstrap)
    score_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        for name, jobs in (("positive", pos), ("negative", neg)):
            Path(tmp, f"{name}.jsonl").write_text(
                "".join(json.dumps(j, ensure_ascii=False) + "\n" for j in jobs)
            )
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen_agent.cli",
                "bench",
                "score",
                "--positive",
                f"{tmp}/positive.jsonl",
                "--negative",
                f"{tmp}/negative.jsonl",
                "--json",
                "--bootstrap",
                str(args.bootstrap),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        cli_s = time.perf_counter() - start

    result = {
        "jobs": args.jobs,
        "positive": len(pos),
        "negative": len(neg),
        "bootstrap": args.bootstrap,
        "tokenizer_load_s": load_s,
        "scorecard_s": score_s,
        "cli_end_to_end_s": cli_s,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "metrics": {k: report[k] for k in ("action_right_rate", "action_input_rouge", "bad_rate")},
    }
    print(f"{'jobs':>6} {'tokenizer load':>15} {'scorecard':>10} {'bench score CLI':>16}")
    print(f"{args.jobs:>6} {load_s:>14.2f}s {score_s:>9.2f}s {cli_s:>15.2f}s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scoring.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
