"""Compile each fused decode kernel for an H100 (sm_90) with Triton's own compiler, down to machine code through
the ptxas Triton ships, on a machine with no GPU. The launch configurations are those qwen_agent/runtime/kernels.py uses
for Qwen-7B (32 heads of 128, hidden 4,096, MLP 11,008; matvec's blocks for its matrices) and for grouped heads
(28 over 4), in bf16 and fp32, with programmatic dependent launch (pdl) and without; and the GPTQ kernels of
qwen_agent/runtime/gptq_kernels.py at 4 and 8 bits with their 7B blocks.

Triton's CPU interpreter, which runs the other kernel tests, accepts code the compiler rejects (a pointer of one
type in one branch and another in the other, for one); this catches that. It runs in its own process, without
TRITON_INTERPRET. Prints a line per kernel; exits 1 if any fails.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qwen_agent.runtime import gptq_kernels, kernels  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
FLOATS = ("eps", "scale")


def arg_type(name: str, pointers: dict[str, str]) -> str:
    if name.endswith("_ptr"):
        return "*" + pointers[name]
    return "fp32" if name in FLOATS else "i32"


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int = 4) -> str:
    """Compile ``kernel`` with the given pointer element types (the rest of the arguments i32, or fp32 for
    ``eps`` and ``scale``) and constexprs; every pointer and integer taken as 16-byte aligned, as Triton
    specialises them at launch for the tensors qwen_agent passes."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else arg_type(n, pointers) for n in names}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if signature[n] not in ("constexpr", "fp32")
    }
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    try:
        triton.compile(source, target=H100, options={"num_warps": num_warps})
    except Exception as exc:  # report every kernel, then fail
        return f"FAIL {exc}"
    return "OK"


def typed(dtype: str, *names: str) -> dict[str, str]:
    return dict.fromkeys(names, dtype)


def main() -> int:
    results = {}
    for dt in ("bf16", "fp32"):
        for delta in (True, False):
            results[f"add_rms_norm {dt} delta={delta}"] = compile_kernel(
                kernels._add_rms_norm_kernel,
                typed(dt, "x_ptr", "delta_ptr", "sum_ptr", "out_ptr", "weight_ptr"),
                {"HAS_DELTA": delta, "BLOCK": 4096},
                num_warps=8,
            )
        for scale in (True, False):
            results[f"rotary_to_cache {dt} logN={scale} pdl={scale}"] = compile_kernel(
                kernels._rotary_to_cache_kernel,
                typed(dt, "qkv_ptr", "bias_ptr", "q_ptr", "k_cache_ptr", "v_cache_ptr")
                | typed("fp32", "cos_ptr", "sin_ptr", "scale_ptr")
                | {"slots_ptr": "i64"},
                {"HAS_SCALE": scale, "HALF": 64, "PDL": scale},
            )
        results[f"silu_mul {dt}"] = compile_kernel(
            kernels._silu_mul_kernel, typed(dt, "gate_up_ptr", "out_ptr"), {"BLOCK": 1024}
        )
        for group, splits in ((1, 1), (1, 8), (7, 1), (7, 64)):
            scratch = "fp32" if splits > 1 else dt
            results[f"decode_attention {dt} group={group} splits={splits} pdl={splits > 1}"] = compile_kernel(
                kernels._decode_attention_kernel,
                typed(dt, "q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")
                | typed(scratch, "part_ptr", "max_ptr", "sum_ptr")
                | {"slots_ptr": "i64"},
                {
                    "GROUP": group,
                    "GROUP_PAD": 16,
                    "DIM": 128,
                    "BLOCK_N": 64,
                    "SPLITS": splits,
                    "PRECISION": "ieee" if dt == "fp32" else "tf32",
                    "PDL": splits > 1,
                },
            )
        results[f"merge_splits {dt} pdl={dt == 'bf16'}"] = compile_kernel(
            kernels._merge_splits_kernel,
            typed("fp32", "part_ptr", "max_ptr", "sum_ptr") | {"out_ptr": dt},
            {"DIM": 128, "SPLITS": 64, "PDL": dt == "bf16"},
        )
        for norm, gated, residual, block_n in (
            (True, False, False, 16),
            (False, False, True, 4),
            (True, True, False, 8),
        ):
            results[f"matvec {dt} norm={norm} gated={gated} residual={residual} pdl={dt == 'bf16'}"] = (
                compile_kernel(
                    kernels._matvec_kernel,
                    typed(dt, "x_ptr", "w_ptr", "out_ptr", "norm_ptr", "residual_ptr"),
                    {
                        "NORM": norm,
                        "GATED": gated,
                        "RESIDUAL": residual,
                        "BLOCK_N": block_n,
                        "BLOCK_K": 512,
                        "PDL": dt == "bf16",
                    },
                )
            )
    packed = {"qweight_ptr": "i32", "qzeros_ptr": "i32", "scales_ptr": "fp16"}
    for bits in (4, 8):
        for block_m in (1, 16):
            results[f"gptq_matvec bf16 bits={bits} rows={block_m}"] = compile_kernel(
                gptq_kernels._gptq_matvec_kernel,
                typed("bf16", "x_ptr", "out_ptr") | packed,
                {"BITS": bits, "BLOCK_M": block_m, "BLOCK_N": 32, "BLOCK_K": 128, "PRECISION": "tf32"},
            )
        results[f"gptq_dequantize bf16 bits={bits}"] = compile_kernel(
            gptq_kernels._gptq_dequantize_kernel,
            {"out_ptr": "bf16"} | packed,
            {"BITS": bits, "BLOCK_WORDS": 8, "BLOCK_N": 64},
        )
    for name, result in results.items():
        print(f"{name}: {result}")
    return 0 if all(r == "OK" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
