"""The ``qwen-agent`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import QwenAgentError


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(args.vocab)
    if args.decode:
        try:
            ids = [int(x) for x in args.text.replace(",", " ").split()]
        except ValueError:
            raise QwenAgentError(f"--decode expects integer ids separated by spaces or commas, got {args.text!r}") from None
        print(tokenizer.decode(ids))
        return 0
    allowed = "all" if args.allow_special else ()
    ids = tokenizer.encode(args.text, allowed_special=allowed)
    print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tokenizer.id_to_piece(i)!r}")
    return 0


def _cmd_bench_tool_use(args: argparse.Namespace) -> int:
    import json

    from .bench import load_datasets, open_generator, run_benchmark
    from .evaluation import render_markdown

    if args.batch_size < 1:
        raise QwenAgentError(f"--batch-size must be at least 1, got {args.batch_size}")
    datasets = load_datasets(args.positive, args.negative)  # before the model: a bad path fails at once
    generator = open_generator(args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               repetition_penalty=args.repetition_penalty, device=args.device, dtype=args.dtype)
    meta = {"model": args.model, "batch_size": args.batch_size, "limit": args.limit,
            "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty}
    report = run_benchmark(generator, args.out, datasets=datasets, plugins=args.plugins, limit=args.limit,
                           progress=not args.quiet, meta=meta)
    print(render_markdown(report))
    print(f"report: {args.out}/report.json, report.md, per_tool.png")
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    return 0


def _cmd_bench_score(args: argparse.Namespace) -> int:
    import json

    from .bench import score_files
    from .evaluation import render_markdown

    report = score_files(args.positive, args.negative, plugins=args.plugins, bootstrap=args.bootstrap)
    print(json.dumps(report, ensure_ascii=False) if args.json else render_markdown(report))
    return 0


def _cmd_bench_code_interpreter(args: argparse.Namespace) -> int:
    import json

    from .bench_code import run_code_benchmark

    report = run_code_benchmark(args.model, tasks=args.tasks, out_dir=args.out, limit=args.limit,
                                max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    print(json.dumps(report, ensure_ascii=False, indent=None if args.json else 2))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run or score the tool-use and code-interpreter benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    p = bench_sub.add_parser("tool-use", help="generate and score the tool-use benchmark (resumable)")
    p.add_argument("--model", required=True, help="model directory, or the URL of an OpenAI-compatible server")
    p.add_argument("--limit", type=int, default=None, help="only the first N jobs of each set")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (requests in flight for a URL)")
    p.add_argument("--out", default="bench-results/tool-use", help="run directory; rerunning resumes it")
    p.add_argument("--positive", default=None, help="positive jobs (default: the shipped set)")
    p.add_argument("--negative", default=None, help="negative jobs (default: the shipped set)")
    p.add_argument("--plugins", default=None, help="plugin catalog for schema checks (default: the shipped one)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's (512)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (local models)")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16 or fp32 (local models)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_tool_use)

    p = bench_sub.add_parser("score", help="score recorded generations without a model")
    p.add_argument("--positive", required=True, help="positive jobs with 'gen' (e.g. the official .cache file)")
    p.add_argument("--negative", required=True, help="negative jobs with 'gen'")
    p.add_argument("--plugins", default=None, help="plugin catalog for schema checks (default: the shipped one)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the 95%% intervals")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_cmd_bench_score)

    p = bench_sub.add_parser("code-interpreter", help="run the code-interpreter benchmark through the agent")
    p.add_argument("--model", required=True, help="model directory, or the URL of an OpenAI-compatible server")
    p.add_argument("--tasks", default=None, help="task file (default: the shipped set)")
    p.add_argument("--out", default="bench-results/code-interpreter", help="directory for results and figures")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report on one line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_code_interpreter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-agent", description="ReAct tool-use agents for Qwen-7B-Chat running locally."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tokenize", help="print the Qwen token ids of a text (or decode ids with --decode)")
    p.add_argument("text", help="the text to encode, or ids to decode")
    p.add_argument("--decode", action="store_true", help="treat TEXT as token ids and print the decoded text")
    p.add_argument("--vocab", default=None, help="model directory or qwen.tiktoken file (default: dashscope's copy)")
    p.add_argument("--allow-special", action="store_true", help="parse <|im_start|> and friends as control tokens")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each token's bytes")
    p.set_defaults(func=_cmd_tokenize)

    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except QwenAgentError as exc:
        print(f"qwen-agent {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
