"""Where a decode step's time goes: the step against the bandwidth limit, each matrix product alone, the kernels.

    python benchmarks/decode_profile.py --random 7b --device cuda --dtype bf16 --batch 1 --context 1024
    python benchmarks/decode_profile.py --random tiny --steps 4      # CPU, seconds (CI runs it)

For ``--batch`` rows whose next token goes to slot ``--context - 1`` (so each step reads ``--context`` cached
positions per row), it measures:

- **step**: the decode step as generation runs it (:class:`~qwen_agent.runtime.decode_runner.DecodeRunner`: replayed
  CUDA graphs and the fused kernels on a GPU), ms per step and the bandwidth it achieves against a copy measured
  in the same run (bytes: every weight but the embedding table, and the keys and values read);
- **matmuls**: each distinct weight of a layer, and the output projection, multiplied alone at the step's batch
  (on a GPU inside a CUDA graph, so launch gaps do not count), µs and GB/s each, and their sum over the whole
  step: the floor the matrix products set, which the rest of the step (norms, RoPE, attention) adds to;
- **kernels**: the step run eagerly under ``torch.profiler``, device time per kernel name per step, longest
  first (eager, because a profiler does not see inside a graph replay on every CUDA version).

Where the fused kernels run (a GPU with Triton, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``, which
only shows that this script works) and ``--batch`` is 1, it also times the step whose matrix products are
:func:`qwen_agent.runtime.kernels.matvec` (``DecodeRunner(matvec=True)``) and each weight through that kernel, with the
norm, gate or residual add it takes in the step (on a GPU both also without programmatic dependent launch);
``--sweep`` times each weight at every block configuration of ``SWEEP`` and prints the fastest, for choosing
matvec's defaults.

Prints a table and writes JSON to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import ROOT, copy_bandwidth, new_runner, random_model, step_bytes, write_report  # noqa: E402

from qwen_agent.runtime.checkpoint import resolve_device, resolve_dtype  # noqa: E402
from qwen_agent.runtime.config import CONFIGS  # noqa: E402
from qwen_agent.runtime.decode_runner import DecodeRunner, fused_by_default  # noqa: E402
from qwen_agent.runtime.model import Transformer  # noqa: E402

# matvec's (block_n, block_k, num_warps) for --sweep: weight tiles of 2K to 16K elements (more spill registers)
SWEEP = [
    (n, k, w) for n in (2, 4, 8, 16, 32) for k in (256, 512, 1024) for w in (4, 8) if 2048 <= n * k <= 16384
]


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
    model: Transformer, batch: int, context: int, device: torch.device, repeats: int, **options: bool
) -> tuple[float, bool, bool]:
    """Seconds per decode step as generation runs it, and whether it ran as graphs and through the fused kernels.
    The runner and its cache are gone when this returns."""
    runner = ready_runner(model, batch, context, **options)
    return timed(device, lambda: runner(batch, context), repeats), runner.graphs, runner.fused


def step_weights(model: Transformer) -> dict[str, list[torch.Tensor]]:
    """Each kind of weight a step multiplies by, every layer's copy."""
    layers = model.layers
    return {
        "wqkv": [layer.attention.wqkv.weight for layer in layers],
        "wo": [layer.attention.wo.weight for layer in layers],
        "w_gate_up": [layer.feed_forward.w_gate_up.weight for layer in layers],
        "w_down": [layer.feed_forward.w_down.weight for layer in layers],
        "output": [model.output.weight],
    }


def products_of(name: str, group: list[torch.Tensor], batch: int, matvec: dict | None):
    """A call multiplying ``batch`` rows by every weight of ``group`` in turn (as a step does: one weight over and
    over could be served from the GPU's L2 cache), through cuBLAS, or with ``matvec`` (its block options) through
    :func:`kernels.matvec` with what the step fuses into it."""
    weight = group[0]
    x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
    if matvec is None:
        return lambda: [F.linear(x, w) for w in group]
    from qwen_agent.runtime import kernels

    norm = (torch.ones_like(x[0]), 1e-6) if name in ("wqkv", "w_gate_up", "output") else None
    residual = torch.zeros_like(x[:, : weight.shape[0]]) if name in ("wo", "w_down") else None
    gated = name == "w_gate_up"
    return lambda: [kernels.matvec(x, w, norm=norm, gated=gated, residual=residual, **matvec) for w in group]


def without_pdl(measure):
    """``measure()`` with programmatic dependent launch off: the kernels ask ``kernels.pdl_supported``."""
    from qwen_agent.runtime import kernels

    supported = kernels.pdl_supported
    kernels.pdl_supported = lambda device: False
    try:
        return measure()
    finally:
        kernels.pdl_supported = supported


def matmul_times(
    model: Transformer, batch: int, device: torch.device, repeats: int, matvec: bool
) -> list[dict]:
    """Each kind of weight multiplied alone at ``batch`` rows, inside a CUDA graph on a GPU; with ``matvec``, also
    through the Triton matrix-vector kernel at its default blocks, and on a GPU also without programmatic dependent
    launch."""
    rows = []
    for name, group in step_weights(model).items():
        nbytes = sum(w.numel() * w.element_size() for w in group)
        seconds = timed(device, as_graph(device, products_of(name, group, batch, None)), repeats)
        row = {"weight": name, "shape": list(group[0].shape), "per_step": len(group),
               "us_per_step": seconds * 1e6, "gb_per_s": nbytes / seconds / 1e9}  # fmt: skip
        if matvec:
            seconds = timed(device, as_graph(device, products_of(name, group, batch, {})), repeats)
            row |= {"matvec_us_per_step": seconds * 1e6, "matvec_gb_per_s": nbytes / seconds / 1e9}
        if matvec and device.type == "cuda":  # what programmatic dependent launch (on from an H100 on) adds
            seconds = timed(
                device, as_graph(device, products_of(name, group, batch, {"pdl": False})), repeats
            )
            row["matvec_no_pdl_us_per_step"] = seconds * 1e6
        rows.append(row)
    return rows


def matvec_sweep(model: Transformer, device: torch.device, repeats: int) -> list[dict]:
    """Every weight through :func:`kernels.matvec` at each (block_n, block_k, num_warps) of ``SWEEP``."""
    rows = []
    for name, group in step_weights(model).items():
        for block_n, block_k, num_warps in SWEEP:
            options = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps}
            try:
                seconds = timed(device, as_graph(device, products_of(name, group, 1, options)), repeats)
            except Exception as exc:  # one configuration Triton cannot build must not end the sweep
                print(f"matvec sweep, {name} {options}: failed: {exc}")
                continue
            rows.append({"weight": name, **options, "us_per_step": seconds * 1e6})
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
    parser.add_argument("--sweep", action="store_true", help="time matvec's block configurations (batch 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.context < 1 or args.steps < 1:
        parser.error("--batch, --context and --steps must be at least 1")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.set_grad_enabled(False)
    model = random_model(CONFIGS[args.random], device, dtype)
    copy = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**28)
    # the kernels where generation uses them, and under Triton's CPU interpreter (which tests this script)
    kernels_on = fused_by_default(device, model.config.head_dim) or os.environ.get("TRITON_INTERPRET") == "1"
    one_row_matvec = kernels_on and args.batch == 1
    if args.sweep and not one_row_matvec:
        parser.error(
            "--sweep times the one-row kernel: it needs --batch 1 and the fused kernels (a CUDA GPU)"
        )
    # on a GPU the runner's own choice (kernels that fail fall back to plain ops, reported as fused False)
    fused_option = {"fused": True} if kernels_on and device.type != "cuda" else {}
    step_s, graphs, fused = step_time(model, args.batch, args.context, device, args.steps, **fused_option)
    nbytes = step_bytes(model, args.batch * args.context)
    matvec_s, matvec_error = None, None
    if one_row_matvec and fused:
        try:
            matvec_s = step_time(model, 1, args.context, device, args.steps, fused=True, matvec=True)[0]
        except Exception as exc:  # the opt-in kernel must not cost the figures of the default step
            matvec_error = str(exc)
            print(f"the step with matvec products failed: {exc}")
    one_row_matvec = matvec_s is not None
    matvec_no_pdl_s = None
    if one_row_matvec and device.type == "cuda":
        matvec_no_pdl_s = without_pdl(
            lambda: step_time(model, 1, args.context, device, args.steps, fused=True, matvec=True)[0]
        )
    products = matmul_times(model, args.batch, device, args.steps, one_row_matvec)
    floor_s = sum(r["us_per_step"] for r in products) / 1e6
    eager = ready_runner(model, args.batch, args.context, graphs=False, fused=fused)
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
    if matvec_error:
        report["matvec_error"] = matvec_error
    if one_row_matvec:
        report |= {
            "step_matvec_ms": matvec_s * 1e3,
            "matvec_tokens_per_s": 1 / matvec_s,
            "step_matvec_no_pdl_ms": matvec_no_pdl_s * 1e3 if matvec_no_pdl_s else None,
            "matvec_matmuls_ms_per_step": sum(r["matvec_us_per_step"] for r in products) / 1e3,
        }
    if args.sweep and one_row_matvec:
        report["matvec_sweep"] = matvec_sweep(model, device, args.steps)
    print(
        f"random {args.random} on {report['device']} ({dtype}), batch {args.batch}, {args.context} cached "
        f"positions; graphs {graphs}, fused kernels {fused}; copy {copy / 1e9:.1f} GB/s"
    )
    print(
        f"step: {step_s * 1e3:.3f} ms = {args.batch / step_s:.1f} tokens/s, {nbytes / step_s / 1e9:.1f} GB/s "
        f"({nbytes / step_s / copy:.0%} of copy); the matrix products alone: {floor_s * 1e3:.3f} ms "
        f"({floor_s / step_s:.0%} of the step)"
    )
    if one_row_matvec:
        print(
            f"step with matvec products: {matvec_s * 1e3:.3f} ms = {1 / matvec_s:.1f} tokens/s, "
            f"{nbytes / matvec_s / 1e9:.1f} GB/s ({nbytes / matvec_s / copy:.0%} of copy); the products alone "
            f"{report['matvec_matmuls_ms_per_step']:.3f} ms"
            + (f"; without PDL {matvec_no_pdl_s * 1e3:.3f} ms" if matvec_no_pdl_s else "")
        )
    matvec_head = f"{'matvec us':>10}{'GB/s':>9}{'of copy':>9}" if one_row_matvec else ""
    matvec_head += f"{'no PDL us':>10}" if one_row_matvec and device.type == "cuda" else ""
    print(f"{'weight':<12}{'shape':>16}{'x/step':>8}{'us/step':>10}{'GB/s':>9}{'of copy':>9}{matvec_head}")
    for r in products:
        shape = "x".join(map(str, r["shape"]))
        matvec = ""
        if one_row_matvec:
            matvec = (
                f"{r['matvec_us_per_step']:>10.1f}{r['matvec_gb_per_s']:>9.1f}"
                f"{r['matvec_gb_per_s'] * 1e9 / copy:>9.0%}"
            )
        if "matvec_no_pdl_us_per_step" in r:
            matvec += f"{r['matvec_no_pdl_us_per_step']:>10.1f}"
        print(
            f"{r['weight']:<12}{shape:>16}{r['per_step']:>8}{r['us_per_step']:>10.1f}{r['gb_per_s']:>9.1f}"
            f"{r['gb_per_s'] * 1e9 / copy:>9.0%}{matvec}"
        )
    for name in {r["weight"]: None for r in report.get("matvec_sweep", [])}:
        best = min((r for r in report["matvec_sweep"] if r["weight"] == name), key=lambda r: r["us_per_step"])
        print(
            f"matvec sweep, {name}: fastest block_n {best['block_n']}, block_k {best['block_k']}, num_warps "
            f"{best['num_warps']}: {best['us_per_step']:.1f} us per step"
        )
    print(f"kernels of an eager step ({'device' if device.type == 'cuda' else 'CPU'} time, us per step):")
    for r in by_kernel[: args.top]:
        print(f"{r['us_per_step']:>10.1f}  x{r['calls_per_step']:<6g} {r['kernel'][:100]}")
    write_report(args.out, "decode-profile", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
