"""Fused Triton kernels for the decode step: fewer, larger kernels per layer.

A decode step of a 7B model reads 14 GB of weights, about 5 ms on an H100, but in plain PyTorch each of its 32
layers is also some forty small element-wise kernels (RMSNorm alone is eight: cast, square, mean, add, rsqrt,
multiply, cast, scale), each a few microseconds even when replayed from a CUDA graph. Three kernels here replace
most of them, rounding where the reference rounds so that the results match it to the last bit in all but the
order of a sum:

- :func:`add_rms_norm`: the residual add and the next RMSNorm (sum in the activation dtype, normalise in fp32,
  cast, then scale by the weight);
- :func:`rotary_to_cache`: RoPE of q and k in fp32 (and the logN query scale), k and v written to their cache
  slots, q returned;
- :func:`silu_mul`: ``up * silu(gate)`` from the fused gate-and-up projection.

Triton compiles each kernel once per dtype and block size, in about a second, and keeps the binaries in its
on-disk cache. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (slowly), which is how they are tested
without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["add_rms_norm", "rotary_to_cache", "silu_mul"]


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, sum_ptr, out_ptr, weight_ptr, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    offsets = row * n_cols + cols
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    if HAS_DELTA:  # the residual add, rounded to the activation dtype as a separate add would be
        x = (x.to(tl.float32) + tl.load(delta_ptr + offsets, mask=inside, other=0.0).to(tl.float32)).to(
            x_ptr.dtype.element_ty
        )
        tl.store(sum_ptr + offsets, x, mask=inside)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * inv_rms).to(out_ptr.dtype.element_ty)  # cast before scaling, as the reference does
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (normed.to(tl.float32) * weight).to(out_ptr.dtype.element_ty), mask=inside)


def add_rms_norm(x: Tensor, weight: Tensor, eps: float, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rms_norm(s) * weight, s)`` with ``s = x + delta`` (or ``x``), over the last dimension."""
    x = x.contiguous()
    n_cols = x.shape[-1]
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else x
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(x.numel() // n_cols,)](
        x,
        delta.contiguous() if delta is not None else x,
        total,
        out,
        weight,
        n_cols,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out, total


@triton.jit
def _rotary_to_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    scale_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    n_heads,
    n_kv_heads,
    cache_row_stride,
    cache_head_stride,
    HAS_SCALE: tl.constexpr,
    HALF: tl.constexpr,
):
    row, head = tl.program_id(0), tl.program_id(1)  # head over q, k, v heads in the fused projection's order
    dim = 2 * HALF
    i = tl.arange(0, HALF)
    src = qkv_ptr + (row * (n_heads + 2 * n_kv_heads) + head) * dim
    x1 = tl.load(src + i).to(tl.float32)
    x2 = tl.load(src + HALF + i).to(tl.float32)
    if head >= n_heads + n_kv_heads:  # a value head: stored as it is
        y1, y2 = x1, x2
    else:  # rotate-half RoPE in fp32: [x1, x2] * cos + [-x2, x1] * sin
        c1, c2 = tl.load(cos_ptr + row * dim + i), tl.load(cos_ptr + row * dim + HALF + i)
        s1, s2 = tl.load(sin_ptr + row * dim + i), tl.load(sin_ptr + row * dim + HALF + i)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out_type = q_ptr.dtype.element_ty
    y1, y2 = y1.to(out_type), y2.to(out_type)
    if head < n_heads:
        if HAS_SCALE:  # logN: the rotated query times the scale, both in the activation dtype
            scale = tl.load(scale_ptr + row).to(out_type).to(tl.float32)
            y1 = (y1.to(tl.float32) * scale).to(out_type)
            y2 = (y2.to(tl.float32) * scale).to(out_type)
        dst = q_ptr + (row * n_heads + head) * dim
    else:
        at = row * cache_row_stride + tl.load(slots_ptr + row) * dim
        if head < n_heads + n_kv_heads:
            dst = k_cache_ptr + at + (head - n_heads) * cache_head_stride
        else:
            dst = v_cache_ptr + at + (head - n_heads - n_kv_heads) * cache_head_stride
    tl.store(dst + i, y1)
    tl.store(dst + HALF + i, y2)


def rotary_to_cache(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_scale: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> Tensor:
    """One position per row: RoPE on q and k, the logN scale on q, k and v stored at slot ``slots[b]`` of cache row
    ``b``; returns q [B, H, 1, D].

    ``qkv`` [B, 1, (H + 2 Hkv) D] is the fused projection's output; ``cos``, ``sin`` [B, 1, 1, D] fp32;
    ``q_scale`` [B, 1, 1, 1] fp32 or None; ``k_cache``, ``v_cache`` [rows, Hkv, slots, D], one layer's cache.
    """
    B = qkv.shape[0]
    dim = k_cache.shape[-1]
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != dim or k_cache.stride() != v_cache.stride():
        raise ValueError("the cache's slots must be contiguous rows of head_dim values")
    q = torch.empty(B, num_heads, 1, dim, dtype=qkv.dtype, device=qkv.device)
    _rotary_to_cache_kernel[(B, num_heads + 2 * num_kv_heads)](
        qkv.contiguous(),
        cos.contiguous(),
        sin.contiguous(),
        q_scale.contiguous() if q_scale is not None else cos,
        q,
        k_cache,
        v_cache,
        slots,
        num_heads,
        num_kv_heads,
        k_cache.stride(0),
        k_cache.stride(1),
        HAS_SCALE=q_scale is not None,
        HALF=dim // 2,
    )
    return q


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n, width, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # into the output, ``width`` per row
    inside = offsets < n
    gate_at = (
        offsets + (offsets // width) * width
    )  # a row of the input is ``width`` gates, then ``width`` ups
    gate = tl.load(gate_up_ptr + gate_at, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + gate_at + width, mask=inside, other=0.0).to(tl.float32)
    out_type = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_type)  # rounded, as F.silu's output is
    tl.store(out_ptr + offsets, (up * silu.to(tl.float32)).to(out_type), mask=inside)


def silu_mul(gate_up: Tensor) -> Tensor:
    """``up * silu(gate)`` for ``gate_up`` [..., 2 I] holding the gates, then the ups; returns [..., I]."""
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    block = 1024
    _silu_mul_kernel[(triton.cdiv(out.numel(), block),)](gate_up, out, out.numel(), width, BLOCK=block)
    return out
