"""Per-token cost of constrained ReAct decoding against unconstrained decoding, in one run.

For each batch size: the decode time per step of an unconstrained run and of a run under the ReAct grammar
(same prompts, sampled from the same seed, every row constrained), and the two parts of the mask's cost
measured inside the constrained run: llguidance filling a row's bitmask (host, per row and step) and
applying the bitmasks to the logits (per step). Defaults to a tiny random-weight checkpoint on CPU.

    PYTHONPATH=$PWD python benchmarks/constrained.py [--model DIR] [--batch 1 16] [--tokens 64] [--threads N]

Prints a table and writes benchmarks/results/constrained.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qwen_agent import LocalLLM, load_model, write_tiny_checkpoint
from qwen_agent.bench.tool_use import load_catalog, plugin_tools, shipped_path
from qwen_agent.constrained import ReActConstraints
from qwen_agent.llm_protocol import ChatPrompt
from qwen_agent.runtime import constraint as constraint_module


class Timed:
    """Wraps a TokenConstraint and records the seconds each mask fill takes in ``totals["fill"]``."""

    def __init__(self, inner, totals: dict[str, list[float]]) -> None:
        self.inner, self.totals = inner, totals

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        started = time.perf_counter()
        self.inner.fill_bitmask(bitmask)
        self.totals["fill"].append(time.perf_counter() - started)

    def accept(self, token: int) -> bool:
        return self.inner.accept(token)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model directory (default: a tiny random-weight checkpoint)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/constrained.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or write_tiny_checkpoint(tempfile.mkdtemp(), "qwen", seed=0)
    engine = load_model(model_dir, device=args.device)
    tools = plugin_tools(load_catalog(shipped_path("tool_use_plugins.json")))
    offered = {name: tools[name] for name in list(tools)[:4]}
    # free text unbounded, as an agent runs it (a character bound makes the lexer's states many and slow)
    grammar = ReActConstraints(engine.tokenizer, engine.config.vocab_size, offered)
    llm = LocalLLM(engine)

    # time apply_bitmask itself, wrapped, inside the constrained runs
    applying: list[float] = []
    plain_apply = constraint_module.apply_bitmask

    def timed_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = plain_apply(logits, bitmask)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        applying.append(time.perf_counter() - started)
        return out

    import qwen_agent.runtime.generate as generate_module

    generate_module.apply_bitmask = timed_apply

    rows = []
    for batch in args.batch:
        prompts = [
            llm.prompt_ids(ChatPrompt(f"Question {i}: what is the weather in Paris?")) for i in range(batch)
        ]
        options = dict(
            max_new_tokens=args.tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=0
        )
        engine.generate(prompts, **{**options, "max_new_tokens": 4})  # warm-up
        per_step = {}
        totals: dict[str, list[float]] = {"fill": []}
        applying.clear()
        for label in ("unconstrained", "constrained", "unconstrained", "constrained"):
            constraints = (
                [Timed(grammar.for_prefix(""), totals) for _ in prompts] if label == "constrained" else None
            )
            started = time.perf_counter()
            results = engine.generate(prompts, constraint=constraints, **options)
            steps = max(r.completion_tokens for r in results)
            per_step.setdefault(label, []).append((time.perf_counter() - started) / steps)
        free = statistics.median(per_step["unconstrained"])
        constrained = statistics.median(per_step["constrained"])
        row = {
            "batch": batch,
            "unconstrained_ms_per_step": 1e3 * free,
            "constrained_ms_per_step": 1e3 * constrained,
            "overhead_us_per_token": 1e6 * (constrained - free) / batch,
            "fill_us_per_row_step_median": 1e6 * statistics.median(totals["fill"]),
            "fill_us_per_row_step_mean": 1e6 * statistics.fmean(totals["fill"]),
            "apply_us_per_step_median": 1e6 * statistics.median(applying),
            "apply_us_per_step_mean": 1e6 * statistics.fmean(applying),
        }
        rows.append(row)

    header = (
        "batch  unconstrained ms/step  constrained ms/step  overhead µs/token  "
        "fill µs/row (median, mean)  apply µs/step (median, mean)"
    )
    print(f"model: {args.model or 'tiny random-weight checkpoint (vocab 151,936)'} on {engine.device}")
    print(header)
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['unconstrained_ms_per_step']:>21.2f}  {r['constrained_ms_per_step']:>19.2f}  "
            f"{r['overhead_us_per_token']:>17.0f}  "
            f"{r['fill_us_per_row_step_median']:>13.0f}, {r['fill_us_per_row_step_mean']:>10.0f}  "
            f"{r['apply_us_per_step_median']:>14.0f}, {r['apply_us_per_step_mean']:>12.0f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": args.model or "tiny",
        "device": str(engine.device),
        "tokens": args.tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
