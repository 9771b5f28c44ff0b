"""The agent's context budget on a real model: a 200,000-character Observation, a 100-turn history and a prompt
that cannot fit, each run once; prints a table and writes JSON.

    python benchmarks/agent_budget.py --model /work/models/qwen2.5-coder-0.5b --context-window 4096

The Observation comes from a tool that returns 200,000 characters; the first step's tool call is planned (the
model then writes the answer itself, with the shortened Observation in its prompt). ``--context-window`` is the
budget the agent works to (default: the model's own context).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from qwen_agent.agent import Agent, BudgetEvent, StepStarted
from qwen_agent.llm import LocalLLM, Sampling, ScriptedLLM
from qwen_agent.runtime.engine import load_model
from qwen_agent.tools import tool

BIG = "".join(f"row {i:06d}: value={i * 7 % 1000}\n" for i in range(10_000))[:200_000]
CALL = 'Thought: I will read the table.\nAction: dump\nAction Input: {"table": "t"}\nObservation:'


@tool(register=False)
def dump(table: str) -> str:
    """Dump a table of numbers.

    Args:
        table: the table's name
    """
    return BIG


class PlannedFirstStep:
    """The first call replayed (the tool call), every later one the real model."""

    def __init__(self, llm: LocalLLM):
        self.llm, self.first = llm, ScriptedLLM([CALL])
        self.context_window, self.tokenizer = llm.context_window, llm.tokenizer

    def stream(self, prompt, *, stop=(), sampling=None):
        if not self.first.calls:
            return self.first.stream(prompt, stop=stop, sampling=sampling)
        return self.llm.stream(prompt, stop=stop, sampling=sampling)


def run_case(name: str, agent: Agent, query: str, history=None) -> dict:
    started = time.perf_counter()
    events = list(agent.stream(query, history))
    result = events[-1].result
    steps = [e for e in events if isinstance(e, StepStarted)]
    return {
        "case": name,
        "stop_reason": result.stop_reason,
        "llm_calls": result.llm_calls,
        "prompt_tokens": [s.prompt_tokens for s in steps],
        "context_window": result.context_window,
        "budget_events": [f"{e.kind}: {e.message}" for e in events if isinstance(e, BudgetEvent)],
        "observation_chars": [len(s.observation) for s in result.steps if s.observation is not None],
        "answer": result.answer[:120],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--context-window", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/agent_budget.json")
    args = parser.parse_args()

    llm = LocalLLM(load_model(args.model, device="cpu"))
    options = {
        "context_window": args.context_window,
        "sampling": Sampling(max_tokens=args.max_tokens, temperature=0),
        "max_iterations": 1,
    }
    history = [(f"Question {i}: what is {i} squared?", f"{i} squared is {i * i}.") for i in range(100)]
    history = [(q + " Explain in detail." * 8, a + " That is all." * 8) for q, a in history]
    rows = [
        run_case(
            "200,000-character Observation", Agent(PlannedFirstStep(llm), [dump], **options), "Summarise t."
        ),
        run_case("100-turn history", Agent(llm, [dump], **options), "And 100 squared?", history),
        run_case("prompt that cannot fit", Agent(llm, [dump], **options), "Read: " + "lorem ipsum " * 20_000),
    ]
    print(f"{'case':32} {'stop_reason':15} {'calls':>5} {'prompt tokens':>16} {'window':>7} {'s':>7}")
    for row in rows:
        prompts = ",".join(str(p) for p in row["prompt_tokens"])
        print(
            f"{row['case']:32} {row['stop_reason']:15} {row['llm_calls']:>5} {prompts:>16} "
            f"{row['context_window']:>7} {row['seconds']:>7}"
        )
        for line in row["budget_events"]:
            print(f"    {line}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "device": "cpu", "machine": platform.platform(), "date": time.strftime("%F")}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
