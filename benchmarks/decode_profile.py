"""Where a decode step's time goes: the step against the bandwidth limit, each matrix product alone, the kernels.

    python benchmarks/decode_profile.py --random 7b --device cuda --dtype bf16 --batch 1 --context 1024
    python benchmarks/decode_profile.py --random tiny --steps 4      # CPU, seconds (CI runs it)

For ``--batch`` rows whose next token goes to slot ``--context - 1`` (so each step reads ``--context`` cached
positions per row), it measures:

- **step**: the decode step as generation runs it (:class:`~qwen_agent.decode_runner.DecodeRunner`: replayed
  CUDA graphs and the fused kernels on a GPU), ms per step and the bandwidth it achieves against a copy measured
  in the same run (bytes: every weight but the embedding table, and the keys and values read);
- **matmuls**: each distinct weight of a layer, and the output projection, multiplied alone at the step's batch
  (on a GPU inside a CUDA graph, so launch gaps do not count), µs and GB/s each, and their sum over the whole
  step: the floor the matrix products set, which the rest of the step (norms, RoPE, attention) adds to;
- **kernels**: the step run eagerly under ``torch.profiler``, device time per kernel name per step, longest
  first (eager, because a profiler does not see inside a graph replay on every CUDA version).

Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import ROOT, copy_bandwidth, new_runner, random_model, step_bytes, write_report  # noqa: E402

from qwen_agent.checkpoint import resolve_device, resolve_dtype  # noqa: E402
from qwen_agent.config import CONFIGS  # noqa: E402
from qwen_agent.decode_runner import DecodeRunner  # noqa: E402
from qwen_agent.model import Transformer  # noqa: E402


def timed(device: torch.device, fn, repeats: int) -> float:
    """Seconds per call of ``fn``, the fastest of three batches of ``repeats`` calls (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            best = min(best, begin.elapsed_time(end) / 1000 / repeats)
        else:
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            best = min(best, (time.perf_counter() - start) / repeats)
    return best


def as_graph(device: torch.device, fn):
    """``fn`` captured as a CUDA graph (replayed per call) on a GPU; ``fn`` itself elsewhere."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # lazy set-up (cuBLAS workspace) before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ready_runner(model: Transformer, batch: int, context: int, **options: bool) -> DecodeRunner:
    """A runner whose ``batch`` rows each write slot ``context - 1`` and read the slots before it, every step."""
    runner = new_runner(model, batch, context, **options)
    runner.tokens.fill_(1)
    runner.slots.fill_(context - 1)
    return runner


def step_time(
    model: Transformer, batch: int, context: int, device: torch.device, repeats: int
) -> tuple[float, bool, bool]:
    """Seconds per decode step as generation runs it, and whether it ran as graphs and through the fused kernels.
    The runner and its cache are gone when this returns."""
    runner = ready_runner(model, batch, context)
    return timed(device, lambda: runner(batch, context), repeats), runner.graphs, runner.fused


def matmul_times(model: Transformer, batch: int, device: torch.device, repeats: int) -> list[dict]:
    """Each kind of weight multiplied alone at ``batch`` rows, every layer's own copy in turn as in a step (one
    weight over and over could be served from the GPU's L2 cache, which a step never does)."""
    layers = model.layers
    weights = {
        "wqkv": [layer.attention.wqkv.weight for layer in layers],
        "wo": [layer.attention.wo.weight for layer in layers],
        "w_gate_up": [layer.feed_forward.w_gate_up.weight for layer in layers],
        "w_down": [layer.feed_forward.w_down.weight for layer in layers],
        "output": [model.output.weight],
    }
    rows = []
    for name, group in weights.items():
        x = torch.randn(batch, group[0].shape[1], dtype=group[0].dtype, device=device)

        def products(x: torch.Tensor = x, group: list[torch.Tensor] = group) -> None:
            for weight in group:
                F.linear(x, weight)

        seconds = timed(device, as_graph(device, products), repeats)
        nbytes = sum(w.numel() * w.element_size() for w in group)
        rows.append({"weight": name, "shape": list(group[0].shape), "per_step": len(group),
                     "us_per_step": seconds * 1e6, "gb_per_s": nbytes / seconds / 1e9})  # fmt: skip
    return rows


def kernel_times(
    runner: DecodeRunner, batch: int, context: int, device: torch.device, steps: int
) -> list[dict]:
    """Device time per kernel name per step of ``steps`` eager steps, longest first."""
    on_cuda = device.type == "cuda"
    runner(batch, context)  # compiles and sets up outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner(batch, context)
        if on_cuda:
            torch.cuda.synchronize()
    events = [
        e for e in prof.key_averages() if (e.self_device_time_total if on_cuda else e.self_cpu_time_total)
    ]
    rows = [
        {
            "kernel": e.key,
            "calls_per_step": e.count / steps,
            "us_per_step": (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / steps,
        }
        for e in events
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--random", choices=sorted(CONFIGS), default="7b", help="model shape (random weights)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--context", type=int, default=1024, help="cached positions each row reads")
    parser.add_argument("--steps", type=int, default=50, help="steps per timing")
    parser.add_argument("--top", type=int, default=15, help="kernels listed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.context < 1 or args.steps < 1:
        parser.error("--batch, --context and --steps must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.set_grad_enabled(False)
    model = random_model(CONFIGS[args.random], device, dtype)
    copy = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    step_s, graphs, fused = step_time(model, args.batch, args.context, device, args.steps)
    nbytes = step_bytes(model, args.batch * args.context)
    products = matmul_times(model, args.batch, device, args.steps)
    floor_s = sum(r["us_per_step"] for r in products) / 1e6
    eager = ready_runner(model, args.batch, args.context, graphs=False)
    by_kernel = kernel_times(eager, args.batch, args.context, device, min(args.steps, 10))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "model": f"random {args.random}",
        "dtype": str(dtype),
        "batch": args.batch,
        "context": args.context,
        "graphs": graphs,
        "fused_kernels": fused,
        "copy_gb_per_s": copy / 1e9,
        "step_ms": step_s * 1e3,
        "tokens_per_s": args.batch / step_s,
        "step_gb_per_s": nbytes / step_s / 1e9,
        "matmuls_ms_per_step": floor_s * 1e3,
        "matmuls": products,
        "kernels": by_kernel,
    }
    print(
        f"random {args.random} on {report['device']} ({dtype}), batch {args.batch}, {args.context} cached "
        f"positions; graphs {graphs}, fused kernels {fused}; copy {copy / 1e9:.1f} GB/s"
    )
    print(
        f"step: {step_s * 1e3:.3f} ms = {args.batch / step_s:.1f} tokens/s, {nbytes / step_s / 1e9:.1f} GB/s "
        f"({nbytes / step_s / copy:.0%} of copy); the matrix products alone: {floor_s * 1e3:.3f} ms "
        f"({floor_s / step_s:.0%} of the step)"
    )
    print(f"{'weight':<12}{'shape':>16}{'x/step':>8}{'us/step':>10}{'GB/s':>9}{'of copy':>9}")
    for r in products:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['weight']:<12}{shape:>16}{r['per_step']:>8}{r['us_per_step']:>10.1f}{r['gb_per_s']:>9.1f}"
            f"{r['gb_per_s'] * 1e9 / copy:>9.0%}"
        )
    print(f"kernels of an eager step ({'device' if device.type == 'cuda' else 'CPU'} time, us per step):")
    for r in by_kernel[: args.top]:
        print(f"{r['us_per_step']:>10.1f}  x{r['calls_per_step']:<6g} {r['kernel'][:100]}")
    write_report(args.out, "decode-profile", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
