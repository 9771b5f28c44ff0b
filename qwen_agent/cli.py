"""The ``qwen-agent`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import QwenAgentError

if TYPE_CHECKING:
    from .tools.registry import ToolRegistry


def _cmd_tokenize(args: argparse.Namespace) -> int:
    from .runtime.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(args.vocab)
    if args.decode:
        try:
            ids = [int(x) for x in args.text.replace(",", " ").split()]
        except ValueError:
            raise QwenAgentError(
                f"--decode expects integer ids separated by spaces or commas, got {args.text!r}"
            ) from None
        unknown = [i for i in ids if not 0 <= i < len(tokenizer)]
        if unknown:
            raise QwenAgentError(
                f"--decode: {unknown[0]} is not a token id of this vocabulary (0..{len(tokenizer) - 1})"
            )
        print(tokenizer.decode(ids))
        return 0
    allowed = "all" if args.allow_special else ()
    ids = tokenizer.encode(args.text, allowed_special=allowed)
    print(" ".join(str(i) for i in ids))
    if args.verbose:
        for i in ids:
            print(f"{i}\t{tokenizer.id_to_piece(i)!r}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .runtime.engine import load_model

    engine = load_model(args.model, device=args.device, dtype=args.dtype)
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "do_sample": False if args.greedy else None,
    }
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {args.model}. Empty line or :clear resets the history; Ctrl-D quits.")
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input("You> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and not query:
            break  # end of input
        query = query.rstrip("\n")
        if query.strip() in ("", ":clear"):
            history = []
            continue
        if interactive:
            print("Qwen> ", end="", flush=True)
        deltas = []
        for delta in engine.chat_stream(query, history, args.system, **generation):
            deltas.append(delta)
            print(delta, end="", flush=True)
        print(flush=True)
        history.append((query, "".join(deltas)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .agent import (
        ActionEvent,
        Agent,
        AnswerDelta,
        ErrorEvent,
        FinalAnswerEvent,
        ObservationEvent,
        StepStarted,
        ThoughtDelta,
    )
    from .llm import Sampling, llm_from_spec

    llm = llm_from_spec(args.model, api_key=args.api_key, served_model=args.served_model, device=args.device)
    tools = _tool_registry(args)
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    try:
        agent = Agent(
            llm,
            tools,
            system=args.system,
            max_iterations=args.max_iterations,
            variant=args.variant,
            sampling=sampling,
            constrained=_constrained(args, args.model),
            tool_format=args.tool_format,
        )
    except BaseException:
        tools.close()
        raise
    out = sys.stdout
    section = ""
    try:
        for event in agent.stream(args.question):
            if isinstance(event, StepStarted):
                title = "final answer (step budget used up)" if event.forced else f"step {event.index + 1}"
                out.write(f"\n--- {title}\n")
                section = ""
            elif isinstance(event, (ThoughtDelta, AnswerDelta)):
                label = "Thought: " if isinstance(event, ThoughtDelta) else "Final Answer: "
                if section != label:
                    out.write(("\n" if section else "") + label)
                    section = label
                out.write(event.text)
            elif isinstance(event, ActionEvent):
                out.write(f"\nAction: {event.tool}\nAction Input: {event.raw_arguments}\n")
                section = ""
            elif isinstance(event, ErrorEvent):
                out.write(f"[{event.kind}]\n")
            elif isinstance(event, ObservationEvent):
                text = event.observation
                if len(text) > args.show_chars:
                    text = (
                        text[: args.show_chars]
                        + f"... ({len(event.observation) - args.show_chars} more characters)"
                    )
                out.write(f"Observation: {text}\n")
            elif isinstance(event, FinalAnswerEvent):
                r = event.result
                out.write("\n")
                out.flush()
                print(
                    f"[{r.stop_reason}; {len(r.steps)} model turns; {r.prompt_tokens} prompt / "
                    f"{r.completion_tokens} completion / {r.prefill_tokens} prefilled tokens; {r.seconds:.1f} s]",
                    file=sys.stderr,
                )
            out.flush()
    finally:
        tools.close()
    return 0


def _constrained(args: argparse.Namespace, model: str) -> bool:
    """Whether to decode under the grammar: as asked, else by default for a local model (a server decodes by
    itself) when llguidance is installed (a note says so when it is not)."""
    if args.constrained is not None:
        return args.constrained
    if model.startswith(("http://", "https://")):
        return False
    import importlib.util

    if importlib.util.find_spec("llguidance") is None:
        print(
            "note: decoding without the tool grammar (pip install 'qwen-react-agent[constrained]' for valid calls)",
            file=sys.stderr,
        )
        return False
    return True


def _tool_registry(args: argparse.Namespace) -> ToolRegistry:
    """The built-in tools ``--tools`` names (all when it is not given; none for ``--tools ''``), plus the tools
    of the MCP servers in ``--mcp``."""
    from .tools.registry import default_registry

    names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools is not None else None
    tools = default_registry.select(names)
    if args.mcp:
        try:
            for line in tools.add_mcp(args.mcp):
                print(line, file=sys.stderr)
        except BaseException:
            tools.close()
            raise
    return tools


def _cmd_mcp(args: argparse.Namespace) -> int:
    try:
        from .serve.mcp_server import serve_http, serve_stdio
    except ImportError as exc:
        raise QwenAgentError(
            f"qwen-agent mcp needs the [mcp] extra (pip install 'qwen-react-agent[mcp]'): {exc}"
        ) from None

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    if args.http:
        serve_http(names, host=args.host, port=args.port)
    else:
        serve_stdio(names)
    return 0


def _cmd_sandbox(args: argparse.Namespace) -> int:
    import json

    from .tools import CodeInterpreter

    with CodeInterpreter(network=args.network) as interpreter:
        interpreter.execute("pass")  # waits until the kernel is up
        print(json.dumps(interpreter.sandbox_info(), indent=2))
    return 0


def _cmd_bench_tool_use(args: argparse.Namespace) -> int:
    import json

    from .bench.report import official_lines, render_markdown
    from .bench.tool_use import load_datasets, open_generator, run_benchmark

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
        tool_format=args.tool_format,
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


def _cmd_bench_score(args: argparse.Namespace) -> int:
    import json

    from .bench.metrics import render_markdown
    from .bench.tool_use import score_files

    report = score_files(args.positive, args.negative, plugins=args.plugins, bootstrap=args.bootstrap)
    print(json.dumps(report, ensure_ascii=False) if args.json else render_markdown(report))
    return 0


def _cmd_bench_compare(args: argparse.Namespace) -> int:
    import json

    from .bench.compare import compare_runs, render_comparison, write_comparison
    from .bench.tool_use import plugin_schemas

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


def _cmd_bench_code_interpreter(args: argparse.Namespace) -> int:
    import json

    from .bench.code_interpreter import run_code_benchmark

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


def _cmd_web(args: argparse.Namespace) -> int:
    try:
        from .serve.web import launch
    except ImportError as exc:
        raise QwenAgentError(
            f"the web UI needs the [web] extra (pip install 'qwen-react-agent[web]'): {exc}"
        ) from None
    names = [n.strip() for n in args.tools.split(",") if n.strip()] if args.tools is not None else None
    launch(
        args.model,
        tools=names,
        host=args.host,
        port=args.port,
        device=args.device,
        api_key=args.api_key,
        served_model=args.served_model,
        max_tokens=args.max_tokens,
        idle_timeout=args.session_timeout,
        mcp=args.mcp,
        max_batch=args.max_batch,
        tool_format=args.tool_format,
        constrained=_constrained(args, args.model),
    )
    return 0


def _add_web(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="chat with the agent in a browser (Gradio; the [web] extra)")
    p.add_argument(
        "--model",
        required=True,
        help="a model directory (shared by all sessions) or an OpenAI-compatible URL",
    )
    p.add_argument("--tools", default=None, help="comma-separated tool names (default: all, MCP ones too)")
    p.add_argument("--mcp", default=None, metavar="CONFIG", help="also the tools of an mcpServers JSON file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="device for a local model (default: cuda if available)")
    p.add_argument("--api-key", default=None, help="API key for a server (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--served-model", default=None, help="model name on the server (default: the first it lists)"
    )
    p.add_argument("--max-tokens", type=_positive_int, default=512, help="most tokens per model turn")
    p.add_argument(
        "--session-timeout",
        type=_number_at_least(float, 0, exclusive=True),
        default=1800.0,
        help="seconds after which an idle browser session and its kernel are closed",
    )
    p.add_argument(
        "--max-batch",
        type=_positive_int,
        default=4,
        help="a local model's generations decoded at once, across sessions (default: 4)",
    )
    _add_tool_format(p)
    _add_constrained_switch(p)
    p.set_defaults(func=_cmd_web)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="run or score the tool-use and code-interpreter benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    p = bench_sub.add_parser("tool-use", help="generate and score the tool-use benchmark (resumable)")
    p.add_argument(
        "--model", required=True, help="model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N jobs of each set")
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts per batch (requests in flight for a URL)"
    )
    p.add_argument("--out", default="bench-results/tool-use", help="run directory; rerunning resumes it")
    p.add_argument("--positive", default=None, help="positive jobs (default: the shipped set)")
    p.add_argument("--negative", default=None, help="negative jobs (default: the shipped set)")
    p.add_argument(
        "--plugins", default=None, help="plugin catalog for schema checks (default: the shipped one)"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the checkpoint's (512)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="default: the checkpoint's (1.1 for Qwen-7B-Chat); for a URL, the server's default",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or auto (local models)")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16 or fp32 (local models)")
    p.add_argument("--constrained", action="store_true", help=_CONSTRAINED_HELP)
    _add_tool_format(p)
    p.add_argument("--json", action="store_true", help="also print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_tool_use)

    p = bench_sub.add_parser("score", help="score recorded generations without a model")
    p.add_argument(
        "--positive", required=True, help="positive jobs with 'gen' (e.g. the official .cache file)"
    )
    p.add_argument("--negative", required=True, help="negative jobs with 'gen'")
    p.add_argument(
        "--plugins", default=None, help="plugin catalog for schema checks (default: the shipped one)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the 95%% intervals")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_cmd_bench_score)

    p = bench_sub.add_parser(
        "compare", help="compare tool-use runs: side-by-side figures, paired differences, changed jobs"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories of bench tool-use; the first is the baseline"
    )
    p.add_argument(
        "--out", default="bench-results/compare", help="where compare.json, compare.md, compare.png go"
    )
    p.add_argument(
        "--plugins", default=None, help="plugin catalog for schema checks (default: the shipped one)"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for intervals and tests")
    p.add_argument(
        "--max-changed", type=int, default=50, help="changed jobs whose outputs the markdown shows"
    )
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=_cmd_bench_compare)

    p = bench_sub.add_parser("code-interpreter", help="run the code-interpreter benchmark through the agent")
    p.add_argument(
        "--model", required=True, help="model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--tasks", default=None, help="task file (default: the shipped set)")
    p.add_argument(
        "--out", default="bench-results/code-interpreter", help="directory for results and figures"
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N tasks")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--json", action="store_true", help="print the report on one line")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench_code_interpreter)


def _cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise QwenAgentError("serve needs FastAPI and uvicorn: pip install 'qwen-react-agent[serve]'")
    import logging
    from pathlib import Path

    import uvicorn

    from .runtime.engine import load_model
    from .serve.openai_api import create_app

    engine = load_model(args.model, device=args.device, dtype=args.dtype)
    name = args.served_model_name or Path(args.model).name or "qwen"
    app = create_app(
        engine,
        model_name=name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        tool_format=args.tool_format,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a local model over an OpenAI-compatible HTTP API")
    p.add_argument(
        "--model", required=True, help="model directory (Qwen-7B-Chat or a Qwen2-family chat model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: the directory name)"
    )
    p.add_argument(
        "--max-batch", type=_positive_int, default=32, help="requests decoded at once (default: 32)"
    )
    p.add_argument(
        "--max-queue",
        type=_number_at_least(int, 0),
        default=256,
        help="requests that may wait beyond a full batch before 503",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or auto (default: a GPU when there is one)"
    )
    p.add_argument(
        "--dtype", default=None, help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)"
    )
    _add_tool_format(p)
    p.set_defaults(func=_cmd_serve)


_CONSTRAINED_HELP = (
    "local models: decode under the grammar of the offered tools in the tool format (valid steps, offered tool "
    "names, schema-valid arguments); needs the llguidance package"
)


def _add_constrained_switch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--constrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=_CONSTRAINED_HELP + " (default: on for a local model; --no-constrained turns it off)",
    )


def _add_tool_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tool-format",
        choices=["react", "hermes"],
        default=None,
        help="how tools are offered and calls read: react (Qwen-7B-Chat's) or hermes (the <tool_call> format of "
        "a Qwen2/Qwen2.5 chat template); default: the model's own",
    )


def _number_at_least(kind: type, minimum: float, exclusive: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) no smaller than ``minimum`` (larger, if ``exclusive``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if value < minimum or (exclusive and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'above' if exclusive else 'at least'} {minimum}, got {value}"
            )
        return value

    return parse


_positive_int = _number_at_least(int, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-agent", description="ReAct tool-use agents for Qwen-7B-Chat running locally."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tokenize", help="print the Qwen token ids of a text (or decode ids with --decode)")
    p.add_argument("text", help="the text to encode, or ids to decode")
    p.add_argument("--decode", action="store_true", help="treat TEXT as token ids and print the decoded text")
    p.add_argument(
        "--vocab", default=None, help="model directory or qwen.tiktoken file (default: dashscope's copy)"
    )
    p.add_argument(
        "--allow-special", action="store_true", help="parse <|im_start|> and friends as control tokens"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also print each token's bytes")
    p.set_defaults(func=_cmd_tokenize)

    p = sub.add_parser(
        "chat", help="chat with a local model in the terminal (reads lines until EOF when piped)"
    )
    p.add_argument(
        "--model", required=True, help="model directory (Qwen-7B-Chat or a Qwen2-family chat model) or Hub id"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or auto (default: a GPU when there is one)"
    )
    p.add_argument(
        "--dtype", default=None, help="auto, bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--system", default=None, help="system prompt (default: the checkpoint's)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="reply length limit (default: generation_config)"
    )
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument(
        "--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling"
    )
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser(
        "run", help="answer a question with the ReAct agent and the built-in tools, printing each step"
    )
    p.add_argument("question", help="the question to answer")
    p.add_argument(
        "--model", required=True, help="a model directory, or the URL of an OpenAI-compatible server"
    )
    p.add_argument("--api-key", default=None, help="API key for a server (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--served-model", default=None, help="model name on the server (default: the first it lists)"
    )
    p.add_argument("--device", default=None, help="device for a local model (default: cuda if available)")
    p.add_argument(
        "--tools", default=None, help="comma-separated built-in tool names (default: all; '' for none)"
    )
    p.add_argument("--mcp", default=None, metavar="CONFIG", help="also the tools of an mcpServers JSON file")
    p.add_argument(
        "--max-iterations", type=_positive_int, default=8, help="tool steps before a final answer is forced"
    )
    p.add_argument("--variant", default="react_prompt", choices=["react_prompt", "react_demo", "openai_api"])
    p.add_argument("--system", default=None, help="system message (default: You are a helpful assistant.)")
    p.add_argument("--max-tokens", type=_positive_int, default=512, help="most tokens per model turn")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show-chars", type=int, default=2000, help="longest observation shown in full")
    _add_constrained_switch(p)
    _add_tool_format(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sandbox", help="start a code-interpreter kernel and print the active sandbox layers")
    p.add_argument("--network", action="store_true", help="allow network access (no network namespace)")
    p.set_defaults(func=_cmd_sandbox)

    p = sub.add_parser("mcp", help="serve the sandboxed code interpreter (and other tools) as an MCP server")
    p.add_argument(
        "--tools",
        default="code_interpreter",
        help="comma-separated tools to offer: code_interpreter, current_time, web_fetch (default: code_interpreter)",
    )
    p.add_argument(
        "--http", action="store_true", help="streamable HTTP at http://HOST:PORT/mcp instead of stdio"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_mcp)

    _add_bench(sub)
    _add_serve(sub)
    _add_web(sub)
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
