"""Code-interpreter latency: kernel cold start and the warm round trip of a trivial cell.

Measures the sandboxed CodeInterpreter with its file-system layer on and off and, as the baseline in the same
run, a stock jupyter_client kernel (KernelManager over TCP, no sandbox, execute_interactive). Prints a table and
writes
benchmarks/results/interpreter.json.

    PYTHONPATH=$PWD /work/venv/bin/python benchmarks/interpreter.py --calls 300 --starts 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from qwen_agent.tools import CodeInterpreter

TRIVIAL = "1 + 1"


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "min_ms": 1000 * ordered[0],
    }


def _cold_start(filesystem: bool) -> float:
    t0 = time.perf_counter()
    with CodeInterpreter(filesystem=filesystem) as ci:
        result = ci.execute(TRIVIAL)  # waits for the kernel, then runs the cell
        elapsed = time.perf_counter() - t0
        assert result.result == "2", result
    return elapsed


def sandboxed(calls: int, starts: int) -> dict[str, dict[str, object]]:
    """The sandboxed kernel with the file-system layer on and off, measured alternately (cold starts and warm
    calls) so that load from other jobs hits both alike."""
    cold: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(starts):
        for filesystem in (True, False):
            cold[filesystem].append(_cold_start(filesystem))
    with CodeInterpreter(filesystem=True) as on, CodeInterpreter(filesystem=False) as off:
        interpreters = {True: on, False: off}
        for ci in interpreters.values():
            for _ in range(20):  # warm-up
                ci.execute(TRIVIAL)
        warm: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(calls):
            for filesystem, ci in interpreters.items():
                t0 = time.perf_counter()
                ci.execute(TRIVIAL)
                warm[filesystem].append(time.perf_counter() - t0)
        return {
            label: {
                "cold_start": _summary(cold[filesystem]),
                "warm_round_trip": _summary(warm[filesystem]),
                "sandbox": interpreters[filesystem].sandbox_info(),
            }
            for filesystem, label in ((True, "sandboxed"), (False, "sandboxed_filesystem_off"))
        }


# The launcher's file-system steps, timed inside a fresh namespace as the kernel launch runs them.
_LAYER_STEPS = """
import json, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import _launcher
workspace = tempfile.mkdtemp(prefix="qa-bench-")
print(workspace, flush=True)
read = json.loads(sys.argv[2])
t0 = time.perf_counter()
if sys.argv[3] == "private_root":
    _launcher.enter_new_root({"read": read, "write": [workspace], "devices": [], "cwd": workspace})
    _launcher.proc_sys_read_only()
else:
    _launcher.make_mounts_read_only([workspace])
t1 = time.perf_counter()
_launcher.drop_capabilities()
_launcher.confine_filesystem({"read": read, "write": [workspace], "devices": []})
t2 = time.perf_counter()
_launcher.install_seccomp()
t3 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2]))
"""


def layer_setup(repeats: int) -> dict[str, object]:
    """What the file-system layer adds to a launch: planning it on the host, then in the launcher the read-only
    remounts and capabilities + Landlock; and, once per host process, the probe that the remounts work here."""
    from qwen_agent.tools import SandboxLimits, _landlock, sandbox
    from qwen_agent.tools.sandbox import plan_filesystem, plan_sandbox

    planning = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan_filesystem([], enabled=True, required=False)
        planning.append(time.perf_counter() - t0)

    plan = plan_sandbox(SandboxLimits(max_processes=None), network=False, sandbox_uid=None)
    probes: dict[str, list[float]] = {"read_only_mounts": [], "private_root": []}
    for _ in range(repeats):
        sandbox._probe_read_only_mounts.cache_clear()
        sandbox._probe_new_root.cache_clear()
        t0 = time.perf_counter()
        assert sandbox._probe_read_only_mounts(plan.unshare) == ""
        t1 = time.perf_counter()
        assert sandbox._probe_new_root(plan.unshare, tuple(plan.read_roots)) == ""
        probes["read_only_mounts"].append(t1 - t0)
        probes["private_root"].append(time.perf_counter() - t1)
    tools_dir = os.path.dirname(_landlock.__file__)
    steps: dict[str, list[float]] = {}
    for _ in range(repeats):
        for mode in ("read_only_mounts", "private_root"):
            out = subprocess.run(
                [
                    *plan.unshare,
                    plan.python,
                    "-I",
                    "-S",
                    "-c",
                    _LAYER_STEPS,
                    tools_dir,
                    json.dumps(plan.read_roots),
                    mode,
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()
            os.rmdir(out[0])
            for name, seconds in zip(
                (mode, f"caps_and_landlock_{mode}", "seccomp"), json.loads(out[1]), strict=True
            ):
                steps.setdefault(name, []).append(seconds)
    return {
        "host_planning": _summary(planning),
        **{name: _summary(samples) for name, samples in steps.items()},
        **{f"host_probe_once_per_process_{k}": _summary(v) for k, v in probes.items()},
    }


def stock_jupyter(calls: int, starts: int) -> dict[str, object]:
    from jupyter_client.manager import start_new_kernel

    def run(kc) -> None:
        reply = kc.execute_interactive(TRIVIAL, timeout=30, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok"

    cold = []
    for _ in range(starts):
        t0 = time.perf_counter()
        km, kc = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL)
        run(kc)
        cold.append(time.perf_counter() - t0)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    km, kc = start_new_kernel(kernel_name="python3", stderr=subprocess.DEVNULL)
    for _ in range(20):
        run(kc)
    warm = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run(kc)
        warm.append(time.perf_counter() - t0)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return {"cold_start": _summary(cold), "warm_round_trip": _summary(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="warm round trips to time (>= 200)")
    parser.add_argument("--starts", type=int, default=10, help="cold starts to time")
    parser.add_argument("--no-baseline", action="store_true", help="skip the stock jupyter_client baseline")
    parser.add_argument("--out", default="benchmarks/results/interpreter.json")
    args = parser.parse_args()

    results: dict[str, object] = {
        "benchmark": "interpreter",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_1m_at_start": os.getloadavg()[0],
        },
        "settings": {"calls": args.calls, "starts": args.starts, "cell": TRIVIAL},
        **sandboxed(args.calls, args.starts),
        "filesystem_layer_setup": layer_setup(args.starts * 2),
    }
    if not args.no_baseline:
        results["stock_jupyter_baseline"] = stock_jupyter(args.calls, args.starts)
    results["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]  # type: ignore[index]

    print(f"{'kernel':<26}{'metric':<18}{'median ms':>10}{'p95 ms':>10}{'min ms':>10}{'n':>6}")
    for label in ("sandboxed", "sandboxed_filesystem_off", "stock_jupyter_baseline"):
        if label not in results:
            continue
        for metric in ("cold_start", "warm_round_trip"):
            s = results[label][metric]  # type: ignore[index]
            print(
                f"{label:<26}{metric:<18}{s['median_ms']:>10.2f}{s['p95_ms']:>10.2f}{s['min_ms']:>10.2f}{s['n']:>6}"
            )
    for metric in ("cold_start", "warm_round_trip"):
        on = results["sandboxed"][metric]["median_ms"]  # type: ignore[index]
        off = results["sandboxed_filesystem_off"][metric]["median_ms"]  # type: ignore[index]
        print(f"file-system layer on/off {metric}: {on / off:.3f}")
    for step, s in results["filesystem_layer_setup"].items():  # type: ignore[union-attr]
        print(f"file-system layer setup, {step}: median {s['median_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms")
    if "stock_jupyter_baseline" in results:
        for metric in ("cold_start", "warm_round_trip"):
            ours = results["sandboxed"][metric]["median_ms"]  # type: ignore[index]
            base = results["stock_jupyter_baseline"][metric]["median_ms"]  # type: ignore[index]
            print(f"ratio sandboxed/stock {metric}: {ours / base:.2f}")
    print(
        f"load average (1 min) start/end: {results['machine']['load_avg_1m_at_start']:.2f} / "  # type: ignore[index]
        f"{results['machine']['load_avg_1m_at_end']:.2f}"
    )  # type: ignore[index]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
