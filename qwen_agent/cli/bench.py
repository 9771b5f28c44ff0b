"""``qwen-agent bench``: run, score and compare the tool-use benchmark; run the code-interpreter benchmark."""

from __future__ import annotations

import argparse
import json

from ..errors import QwenAgentError
from .options import CONSTRAINED_HELP, add_kv_cache_gb, positive_int

_PLUGINS_HELP = "plugin catalog for schema checks (default: the shipped one)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run or score the tool-use and code-interpreter benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    p = bench_sub.add_parser("tool-use", help="generate and score the tool-use benchmark (resumable)")
    p.add_argument(
        "--model", required=True, help="model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N jobs of each set")
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts per batch (requests in flight for a URL)"
    )
    p.add_argument("--out", default="bench-results/tool-use", help="run directory; rerunning resumes it")
    p.add_argument("--positive", default=None, help="positive jobs (default: the shipped set)")
    p.add_argument("--negative", default=None, help="negative jobs (default: the shipped set)")
    p.add_argument("--plugins", default=None, help=_PLUGINS_HELP)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's (512)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="default: the checkpoint's (1.1 for Qwen-7B-Chat); for a URL, the server's default",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or auto (local models)")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16 or fp32 (local models)")
    p.add_argument("--constrained", action="store_true", help=CONSTRAINED_HELP)
    p.add_argument("--json", action="store_true", help="also print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_kv_cache_gb(p)
    p.set_defaults(func=run_tool_use)

    p = bench_sub.add_parser("score", help="score recorded generations without a model")
    p.add_argument(
        "--positive", required=True, help="positive jobs with 'gen' (e.g. the official .cache file)"
    )
    p.add_argument("--negative", required=True, help="negative jobs with 'gen'")
    p.add_argument("--plugins", default=None, help=_PLUGINS_HELP)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the 95%% intervals")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run_score)

    p = bench_sub.add_parser(
        "compare", help="compare tool-use runs: side-by-side figures, paired differences, changed jobs"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories of bench tool-use; the first is the baseline"
    )
    p.add_argument(
        "--out", default="bench-results/compare", help="where compare.json, compare.md, compare.png go"
    )
    p.add_argument("--plugins", default=None, help=_PLUGINS_HELP)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for intervals and tests")
    p.add_argument(
        "--max-changed", type=int, default=50, help="changed jobs whose outputs the markdown shows"
    )
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=run_compare)

    p = bench_sub.add_parser("code-interpreter", help="run the code-interpreter benchmark through the agent")
    p.add_argument(
        "--model", required=True, help="model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--tasks", default=None, help="task file (default: the shipped set)")
    p.add_argument(
        "--out", default="bench-results/code-interpreter", help="directory for results and figures"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report on one line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_code_interpreter)


def run_tool_use(args: argparse.Namespace) -> int:
    from ..bench.report import official_lines, render_markdown
    from ..bench.tool_use import load_datasets, open_generator, run_benchmark

    if args.batch_size < 1:
        raise QwenAgentError(f"--batch-size must be at least 1, got {args.batch_size}")
    datasets = load_datasets(args.positive, args.negative)  # before the model: a bad path fails at once
    generator = open_generator(
        args.model,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        device=args.device,
        dtype=args.dtype,
        constrained=args.constrained,
        plugins=args.plugins,
        kv_cache_gb=args.kv_cache_gb,
    )
    meta = {
        "constrained": args.constrained,
        "model": args.model,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "repetition_penalty": args.repetition_penalty,
    }
    report = run_benchmark(
        generator,
        args.out,
        datasets=datasets,
        plugins=args.plugins,
        limit=args.limit,
        progress=not args.quiet,
        meta=meta,
    )
    print(render_markdown(report))
    print(f"report: {args.out}/report.json, report.md, per_tool.png")
    print("\n".join(official_lines(report)))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from ..bench.metrics import render_markdown
    from ..bench.tool_use import score_files

    report = score_files(args.positive, args.negative, plugins=args.plugins, bootstrap=args.bootstrap)
    print(json.dumps(report, ensure_ascii=False) if args.json else render_markdown(report))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from ..bench.compare import compare_runs, render_comparison, write_comparison
    from ..bench.tool_use import plugin_schemas

    if args.max_changed < 0:
        raise QwenAgentError(f"--max-changed must be 0 or more, got {args.max_changed}")
    comparison = compare_runs(args.runs, catalog=plugin_schemas(args.plugins), bootstrap=args.bootstrap)
    write_comparison(comparison, args.out, max_changed=args.max_changed)
    if args.json:
        print(json.dumps(comparison, ensure_ascii=False))
    else:
        print(render_comparison(comparison, max_changed=args.max_changed))
        print(f"comparison: {args.out}/compare.json, compare.md, compare.png")
    return 0


def run_code_interpreter(args: argparse.Namespace) -> int:
    from ..bench.code_interpreter import run_code_benchmark

    report = run_code_benchmark(
        args.model,
        tasks=args.tasks,
        out_dir=args.out,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )
    print(json.dumps(report, ensure_ascii=False, indent=None if args.json else 2))
    return 0
