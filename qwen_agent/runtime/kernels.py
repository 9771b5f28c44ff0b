"""Fused Triton kernels for the decode step: fewer, larger kernels per layer.

A decode step of a 7B model reads 14 GB of weights, about 5 ms on an H100, but in plain PyTorch each of its 32
layers is also some forty small element-wise kernels (RMSNorm alone is eight: cast, square, mean, add, rsqrt,
multiply, cast, scale), each a few microseconds even when replayed from a CUDA graph. The kernels here replace
most of them. They round to the activation dtype where the reference does, so results differ from it only
through the order of sums and, on a GPU, fused multiply-adds and fast ``exp``: rarely more than one bf16 step.

- :func:`add_rms_norm`: the residual add and the next RMSNorm (sum in the activation dtype, normalise in fp32,
  cast, then scale by the weight);
- :func:`rotary_to_cache`: the q|k|v projection's bias added, RoPE of q and k in fp32 (and the logN query
  scale), k and v written to their cache slots, q returned (at one row, a matrix product with a bias is two
  kernels: the bias copied into the output, then the product added to it);
- :func:`silu_mul`: ``up * silu(gate)`` from the fused gate-and-up projection;
- :func:`decode_attention`: one query per row over exactly that row's cached positions (no mask, no padding
  slots read), split along the positions so that a single row still spreads over the whole GPU;
- :func:`matvec`: a one-row matrix product (a matrix-vector product: at batch 1 every product of the step is one)
  that also applies the RMSNorm before it and the residual add or the SiLU gate after it, which removes the norm
  and SiLU kernels, and from an H100 on starts reading its weights before the kernel ahead of it has ended;
  whether it beats cuBLAS's own on a given GPU is for ``benchmarks/decode_profile.py`` to show. In the one-row
  step built on it, the other kernels also use programmatic dependent launch (:func:`pdl_supported`).

Triton compiles each kernel once per dtype and block size, in about a second, and keeps the binaries in its
on-disk cache. ``TRITON_INTERPRET=1`` runs the same kernels on the CPU (slowly), which is how their results are
tested without a GPU; the tests also compile each one for an H100 with Triton's compiler, which needs no GPU.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["add_rms_norm", "decode_attention", "matvec", "pdl_supported", "rotary_to_cache", "silu_mul"]


@triton.jit
def _follow_kernel_ahead():
    """Under programmatic dependent launch (see :func:`pdl_supported`): wait until the kernel ahead has ended and
    its writes are visible, then let the kernel after this one launch in turn."""
    gdc_wait()
    gdc_launch_dependents()


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


def _check_cache(k_cache: Tensor, v_cache: Tensor, dtype: torch.dtype) -> None:
    """The kernels address a slot as ``row * stride(0) + head * stride(1) + slot * head_dim``, and store into
    the cache what they store into activations (one pointer type in both branches)."""
    dim = k_cache.shape[-1]
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != dim or k_cache.stride() != v_cache.stride():
        raise ValueError("the cache's slots must be contiguous rows of head_dim values")
    if not k_cache.dtype == v_cache.dtype == dtype:
        raise ValueError(f"the cache holds {k_cache.dtype}, the activations are {dtype}: they must match")


@triton.jit
def _rotary_to_cache_kernel(
    qkv_ptr,
    bias_ptr,
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
    PDL: tl.constexpr,
):
    if PDL:  # everything read below may be the output of the kernel ahead
        _follow_kernel_ahead()
    row, head = tl.program_id(0), tl.program_id(1)  # head over q, k, v heads in the fused projection's order
    dim = 2 * HALF
    i = tl.arange(0, HALF)
    src = qkv_ptr + (row * (n_heads + 2 * n_kv_heads) + head) * dim
    out_type = q_ptr.dtype.element_ty
    bias = bias_ptr + head * dim  # added and rounded to the activation dtype, as a separate add would be
    x1 = (tl.load(src + i).to(tl.float32) + tl.load(bias + i).to(tl.float32)).to(out_type)
    x2 = (tl.load(src + HALF + i).to(tl.float32) + tl.load(bias + HALF + i).to(tl.float32)).to(out_type)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    if head >= n_heads + n_kv_heads:  # a value head: stored as it is
        y1, y2 = x1, x2
    else:  # rotate-half RoPE in fp32: [x1, x2] * cos + [-x2, x1] * sin
        c1, c2 = tl.load(cos_ptr + row * dim + i), tl.load(cos_ptr + row * dim + HALF + i)
        s1, s2 = tl.load(sin_ptr + row * dim + i), tl.load(sin_ptr + row * dim + HALF + i)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y1, y2 = y1.to(out_type), y2.to(out_type)
    if head < n_heads:
        if HAS_SCALE:  # logN: the rotated query times the scale, both in the activation dtype
            scale = tl.load(scale_ptr + row).to(out_type).to(tl.float32)
            y1 = (y1.to(tl.float32) * scale).to(out_type)
            y2 = (y2.to(tl.float32) * scale).to(out_type)
        dst = q_ptr + (row * n_heads + head) * dim
    else:
        at = row.to(tl.int64) * cache_row_stride + tl.load(slots_ptr + row) * dim
        if head < n_heads + n_kv_heads:
            dst = k_cache_ptr + at + (head - n_heads) * cache_head_stride
        else:
            dst = v_cache_ptr + at + (head - n_heads - n_kv_heads) * cache_head_stride
    tl.store(dst + i, y1)
    tl.store(dst + HALF + i, y2)


def rotary_to_cache(
    qkv: Tensor,
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_scale: Tensor | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    num_heads: int,
    num_kv_heads: int,
    *,
    pdl: bool = False,
) -> Tensor:
    """One position per row: the bias added, RoPE on q and k, the logN scale on q, k and v stored at slot
    ``slots[b]`` of cache row ``b``; returns q [B, H, 1, D]. ``pdl``: launched with programmatic dependent
    launch (see :func:`pdl_supported`).

    ``qkv`` [B, 1, (H + 2 Hkv) D] is the fused projection's output without its bias ``bias`` [(H + 2 Hkv) D];
    ``cos``, ``sin`` [B, 1, 1, D] fp32; ``q_scale`` [B, 1, 1, 1] fp32 or None; ``k_cache``, ``v_cache``
    [rows, Hkv, slots, D], one layer's cache.
    """
    B = qkv.shape[0]
    dim = k_cache.shape[-1]
    _check_cache(k_cache, v_cache, qkv.dtype)
    q = torch.empty(B, num_heads, 1, dim, dtype=qkv.dtype, device=qkv.device)
    _rotary_to_cache_kernel[(B, num_heads + 2 * num_kv_heads)](
        qkv.contiguous(),
        bias.contiguous(),
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
        PDL=pdl,
        launch_pdl=pdl,
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


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    part_ptr,
    max_ptr,
    sum_ptr,
    out_ptr,
    n_heads,
    cache_row_stride,
    cache_head_stride,
    scale,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        _follow_kernel_ahead()
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(slots_ptr + row) + 1  # the row's positions 0..slot, the new one included
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    g, d, n = tl.arange(0, GROUP_PAD), tl.arange(0, DIM), tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g  # the query heads that share this key/value head
    real = g < GROUP
    # GROUP_PAD >= 16 query rows, so that both products run on the matrix units; extra rows are zeros
    q = tl.load(q_ptr + (row * n_heads + heads)[:, None] * DIM + d[None, :], mask=real[:, None], other=0.0)
    q = q.to(tl.float32)
    base = row.to(tl.int64) * cache_row_stride + kv_head * cache_head_stride
    best = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
    for at in range(start, end, BLOCK_N):  # online softmax over this split's positions
        pos = at + n
        inside = pos < end
        offsets = base + pos[:, None] * DIM + d[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
        scores = tl.where(inside[None, :], scores, float("-inf"))  # scale includes log2(e): exp2 below
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        rescale = tl.exp2(best - new_best)
        p = tl.exp2(scores - new_best[:, None])
        v = tl.load(v_cache_ptr + offsets, mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=PRECISION)
        total = total * rescale + tl.sum(p, axis=1)
        best = new_best
    if SPLITS == 1:
        out = acc / total[:, None]
        dst = out_ptr + (row * n_heads + heads)[:, None] * DIM + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=real[:, None])
    else:  # partial results, merged by _merge_splits_kernel (an empty split leaves -inf and 0)
        at_split = (row * n_heads + heads) * SPLITS + split
        tl.store(part_ptr + at_split[:, None] * DIM + d[None, :], acc, mask=real[:, None])
        tl.store(max_ptr + at_split, best, mask=real)
        tl.store(sum_ptr + at_split, total, mask=real)


@triton.jit
def _merge_splits_kernel(
    part_ptr, max_ptr, sum_ptr, out_ptr, DIM: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr
):
    if PDL:
        _follow_kernel_ahead()
    head = tl.program_id(0)  # row * n_heads + head
    s, d = tl.arange(0, SPLITS), tl.arange(0, DIM)
    best = tl.load(max_ptr + head * SPLITS + s)
    weight = tl.exp2(best - tl.max(best, axis=0))
    total = tl.sum(tl.load(sum_ptr + head * SPLITS + s) * weight, axis=0)
    acc = tl.load(part_ptr + (head * SPLITS + s)[:, None] * DIM + d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + head * DIM + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    *,
    splits: int | None = None,
    pdl: bool = False,
) -> Tensor:
    """Softmax attention (scale 1/sqrt(D)) of q [B, H, 1, D] over slots ``0..slots[b]`` of cache row ``b``
    (``k_cache``, ``v_cache`` [rows, Hkv, slots, D], one layer's); returns [B, 1, H * D]. ``splits`` (a power of
    two) is how many programs share one row's head's positions; by default enough for about 256 programs (an
    H100 has 132 multiprocessors). ``pdl``: both kernels launched with programmatic dependent launch (see
    :func:`pdl_supported`)."""
    B, H, _, dim = q.shape
    kv_heads = k_cache.shape[1]
    _check_cache(k_cache, v_cache, q.dtype)
    group = H // kv_heads
    block = 64  # positions per step of a program's loop
    if (
        splits is None
    ):  # enough programs to cover the GPU even for one row, but no more than the cache's blocks
        wanted = triton.next_power_of_2(max(1, 256 // (B * kv_heads)))
        splits = min(64, wanted, triton.next_power_of_2(triton.cdiv(k_cache.shape[2], block)))
    out = q.new_empty(B, 1, H * dim)
    part = torch.empty(B, H, splits, dim, dtype=torch.float32, device=q.device) if splits > 1 else out
    best = torch.empty(B, H, splits, dtype=torch.float32, device=q.device) if splits > 1 else out
    total = torch.empty_like(best) if splits > 1 else out
    _decode_attention_kernel[(B, kv_heads, splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        slots,
        part,
        best,
        total,
        out,
        H,
        k_cache.stride(0),
        k_cache.stride(1),
        math.log2(math.e) / math.sqrt(dim),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        BLOCK_N=block,
        SPLITS=splits,
        # bf16 and fp16 values are exact in tf32, so the matrix units lose nothing on q, k and v (the softmax
        # weights are rounded to tf32, finer than the bf16 that flash attention rounds them to); fp32 needs ieee
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    if splits > 1:
        _merge_splits_kernel[(B * H,)](
            part, best, total, out, DIM=dim, SPLITS=splits, PDL=pdl, launch_pdl=pdl
        )
    return out


@triton.jit
def _matvec_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    norm_ptr,
    residual_ptr,
    n_out,
    k,
    eps,
    NORM: tl.constexpr,
    GATED: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    real = rows < n_out
    span = tl.arange(0, BLOCK_K)
    act = out_ptr.dtype.element_ty
    # each weight tile is loaded one loop step ahead, so that its read from memory overlaps the step before it
    # (and the norm's pass over x): the loop is otherwise a load, then a wait for it
    weights = w_ptr + rows[:, None].to(tl.int64) * k  # [BLOCK_N, 1]: the start of each output's row
    tile = real[:, None] & (span < k)[None, :]
    w = tl.load(weights + span[None, :], mask=tile, other=0.0)
    if GATED:
        ups = w_ptr + (rows[:, None] + n_out).to(tl.int64) * k  # the up row that goes with each gate row
        w_up = tl.load(ups + span[None, :], mask=tile, other=0.0)
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if (
        PDL
    ):  # launched before the kernel ahead of it ends: the weights are constant, but x and the residual are
        # that kernel's output, so wait for it here
        _follow_kernel_ahead()
    if NORM:  # the RMSNorm before the product, recomputed by every program from the row (an L2 hit)
        squares = tl.zeros((BLOCK_K,), tl.float32)
        for at in range(0, k, BLOCK_K):
            x = tl.load(x_ptr + at + span, mask=at + span < k, other=0.0).to(tl.float32)
            squares += x * x
        inv_rms = tl.rsqrt(tl.sum(squares, axis=0) / k + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # summed across at the end, not every step
    for at in range(0, k, BLOCK_K):
        cols = at + span
        ahead = cols + BLOCK_K  # past the end on the last step: fully masked, nothing read
        tile = real[:, None] & (ahead < k)[None, :]
        w_next = tl.load(weights + ahead[None, :], mask=tile, other=0.0)
        if GATED:
            w_up_next = tl.load(ups + ahead[None, :], mask=tile, other=0.0)
        inside = cols < k
        x = tl.load(x_ptr + cols, mask=inside, other=0.0)
        if NORM:  # normalise in fp32, cast, then scale by the weight and cast: RMSNorm's order
            x = (x.to(tl.float32) * inv_rms).to(act)
            x = (x.to(tl.float32) * tl.load(norm_ptr + cols, mask=inside, other=0.0).to(tl.float32)).to(act)
        x = x.to(tl.float32)[None, :]
        acc += w.to(tl.float32) * x
        w = w_next
        if GATED:
            acc_up += w_up.to(tl.float32) * x
            w_up = w_up_next
    y = tl.sum(acc, axis=1).to(act)  # rounded, as a matrix product's output is
    if GATED:  # up * silu(gate), each rounded where silu_mul rounds
        gate = y.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(act)
        y = (tl.sum(acc_up, axis=1).to(act).to(tl.float32) * silu.to(tl.float32)).to(act)
    if RESIDUAL:
        y = (tl.load(residual_ptr + rows, mask=real, other=0.0).to(tl.float32) + y.to(tl.float32)).to(act)
    tl.store(out_ptr + rows, y, mask=real)


def matvec(
    x: Tensor,
    weight: Tensor,
    *,
    norm: tuple[Tensor, float] | None = None,
    gated: bool = False,
    residual: Tensor | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    pdl: bool | None = None,
) -> Tensor:
    """``x @ weight.T`` for one row ``x`` [..., K] (its leading dimensions all 1) and ``weight`` [N, K]; returns
    [..., N], or [..., N / 2] when ``gated``. With ``norm=(w, eps)`` the row is first RMSNorm'ed with weight ``w``;
    ``gated`` takes the first N / 2 outputs as gates and the rest as ups and returns ``up * silu(gate)``;
    ``residual`` [..., N] is added to the result. Each is rounded to the activation dtype where the separate
    PyTorch op would round. ``block_n`` outputs per program (by default enough programs to cover an H100 several
    times over) and ``block_k`` weights per row per loop step (by default 512; powers of two) are tuning knobs.

    ``pdl`` (by default where :func:`pdl_supported`) launches the kernel with programmatic dependent launch; its
    programs read their first weight tile before they wait for the kernel ahead."""
    if x.numel() != x.shape[-1]:
        raise ValueError(f"matvec takes one row; x has shape {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k or x.dtype != weight.dtype or not weight.is_contiguous():
        raise ValueError(
            f"x [{x.shape[-1]}] {x.dtype} does not fit a contiguous weight {tuple(weight.shape)} {weight.dtype}"
        )
    n_out = n // 2 if gated else n
    if norm is not None and norm[0].numel() != k:
        raise ValueError(f"the norm's weight has {norm[0].numel()} values for rows of {k}")
    if residual is not None and residual.numel() != n_out:
        raise ValueError(f"the residual has {residual.numel()} values for {n_out} outputs")
    out = x.new_empty(*x.shape[:-1], n_out)
    block_k = block_k or min(512, triton.next_power_of_2(k))
    if pdl is None:
        pdl = pdl_supported(x.device)
    if block_n is None and os.environ.get("TRITON_INTERPRET") == "1":
        block_n = 2**18 // block_k  # the interpreter runs programs one after another: few large ones
    elif block_n is None:  # ~1,000 programs where the matrix allows (an H100 has 132 SMs), and at most 16
        # weight rows a program (gate and up rows both count): more, and the two tiles in flight spill registers
        block_n = min(8 if gated else 16, max(1, triton.next_power_of_2(n_out // 1024)))
    x = x.contiguous()
    _matvec_kernel[(triton.cdiv(n_out, block_n),)](
        x,
        weight,
        out,
        norm[0] if norm is not None else x,
        residual.contiguous() if residual is not None else x,
        n_out,
        k,
        norm[1] if norm is not None else 0.0,
        NORM=norm is not None,
        GATED=gated,
        RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PDL=pdl,
        num_warps=num_warps,
        launch_pdl=pdl,
    )
    return out


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch: CUDA GPUs of compute capability 9.0
    (H100) and later. A kernel so launched may start while the kernel ahead of it in the stream is still running;
    it waits for that kernel to end (``gdc_wait``: its writes are then visible) before it reads anything the
    kernel may have written and before it writes anything, and then lets the kernel after it launch early in
    turn (``gdc_launch_dependents``). What this saves is the gap between two kernels: a few microseconds each,
    several hundred times a step."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
