"""``qwen-agent run``: answer one question with the ReAct agent, printing each step as it streams."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .options import CONSTRAINED_HELP, add_kv_cache_gb, positive_int, tool_names

if TYPE_CHECKING:
    from ..agent import Event
    from ..tools.registry import ToolRegistry


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        "--max-iterations", type=positive_int, default=8, help="tool steps before a final answer is forced"
    )
    p.add_argument("--variant", default="react_prompt", choices=["react_prompt", "react_demo", "openai_api"])
    p.add_argument("--system", default=None, help="system message (default: You are a helpful assistant.)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="most tokens per model turn")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy decoding")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show-chars", type=int, default=2000, help="longest observation shown in full")
    p.add_argument("--constrained", action="store_true", help=CONSTRAINED_HELP)
    add_kv_cache_gb(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..agent import Agent
    from ..llm import Sampling, llm_from_spec

    llm = llm_from_spec(
        args.model,
        api_key=args.api_key,
        served_model=args.served_model,
        device=args.device,
        kv_cache_gb=args.kv_cache_gb,
    )
    tools = tool_registry(args)
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    agent = Agent(
        llm,
        tools,
        system=args.system,
        max_iterations=args.max_iterations,
        variant=args.variant,
        sampling=sampling,
        constrained=args.constrained,
    )
    try:
        print_events(agent.stream(args.question), show_chars=args.show_chars)
    finally:
        tools.close()
    return 0


def print_events(events: Iterable[Event], show_chars: int) -> None:
    """Write the agent's events to stdout as the ReAct transcript, and the run's summary line to stderr."""
    from ..agent import (
        ActionEvent,
        AnswerDelta,
        BudgetEvent,
        ErrorEvent,
        FinalAnswerEvent,
        ObservationEvent,
        StepStarted,
        ThoughtDelta,
    )

    out = sys.stdout
    section = ""
    for event in events:
        if isinstance(event, StepStarted):
            title = "final answer (step budget used up)" if event.forced else f"step {event.index + 1}"
            if event.prompt_tokens is not None:  # the context budget: how full the context is
                title += f" (prompt {event.prompt_tokens} of {event.context_window} tokens)"
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
        elif isinstance(event, BudgetEvent):
            out.write(f"[{event.kind}: {event.message}]\n")
        elif isinstance(event, ObservationEvent):
            text = event.observation
            if len(text) > show_chars:
                text = text[:show_chars] + f"... ({len(event.observation) - show_chars} more characters)"
            out.write(f"Observation: {text}\n")
        elif isinstance(event, FinalAnswerEvent):
            r = event.result
            out.write("\n")
            out.flush()
            print(
                f"[{r.stop_reason}; {len(r.steps)} model turns; {r.prompt_tokens} prompt / "
                f"{r.completion_tokens} completion tokens; {r.prefill_tokens} prefilled, {r.cached_tokens} cached; "
                f"{r.seconds:.1f} s]",
                file=sys.stderr,
            )
        out.flush()


def tool_registry(args: argparse.Namespace) -> ToolRegistry:
    """The built-in tools ``--tools`` names (all when it is not given; none for ``--tools ''``), plus the tools
    of the MCP servers in ``--mcp``."""
    from ..tools.registry import default_registry

    tools = default_registry.select(tool_names(args.tools))
    if args.mcp:
        try:
            for line in tools.add_mcp(args.mcp):
                print(line, file=sys.stderr)
        except BaseException:
            tools.close()
            raise
    return tools
