"""Triton kernels for :class:`~qwen_agent.runtime.gptq.GPTQLinear`: the packed weights read directly.

Each takes a layer's ``qweight``, ``qzeros`` and ``scales`` (see :mod:`qwen_agent.runtime.gptq`), its ``bits`` and
``group_size``, the number of inputs a group spans (the whole input for auto-gptq's -1).

- :func:`matvec`: ``x @ W`` for a few rows (a decode step): each program takes a block of outputs and walks the
  inputs, reading ``P = 32 // bits`` weights per int32 word, subtracting each group's zero, summing against the
  activations in fp32 and scaling once per group. At 4 bits it reads a quarter of the bytes of a bf16 product.
  One row is summed on the vector units; up to 64 rows (a batched decode step) share each unpacked weight tile
  through the matrix units (``tl.dot``, rows padded to 16).
- :func:`dequantize`: the float weight [K, N] of a layer, for longer inputs (prefill), which then use the matrix
  units; the buffer goes back to PyTorch's allocator after the product, so one layer's worth is reused.

Both expect groups of consecutive inputs (``GPTQLinear.sort_groups`` has put ``desc_act`` layers in group order).
Like :mod:`qwen_agent.runtime.kernels`, they run on Triton's CPU interpreter under ``TRITON_INTERPRET=1``, which is
how the tests compare them with the PyTorch path, and ``tests/sm90_compile.py`` compiles them for an H100.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dequantize", "matvec", "matvec_fits"]


@triton.jit
def _gptq_matvec_kernel(
    x_ptr,
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    out_ptr,
    rows,
    n_out,
    k,
    group_size,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PACK
    mask_bits = (1 << BITS) - 1
    first_row = tl.program_id(1) * BLOCK_M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    real = cols < n_out
    words, lane = tl.arange(0, WORDS), tl.arange(0, PACK)
    shifts = lane * BITS  # [PACK]: the bits of the j-th value of a word
    zero_shift = (cols % PACK) * BITS  # [BLOCK_N]: the bits of each output's zero in its word
    m = first_row + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for at in range(0, k, BLOCK_K):  # BLOCK_K divides the group size: one group per step
        word_rows = at // PACK + words  # [WORDS]
        packed = tl.load(
            qweight_ptr + word_rows[:, None].to(tl.int64) * n_out + cols[None, :],
            mask=(word_rows * PACK < k)[:, None] & real[None, :],
            other=0,
        )  # [WORDS, BLOCK_N]
        q = (packed[:, None, :] >> shifts[None, :, None]) & mask_bits  # [WORDS, PACK, BLOCK_N]
        group = at // group_size
        zero = tl.load(qzeros_ptr + group * (n_out // PACK) + cols // PACK, mask=real, other=0) >> zero_shift
        zero = (zero & mask_bits) + 1  # stored as zero - 1
        scale = tl.load(scales_ptr + group * n_out + cols, mask=real, other=0.0).to(tl.float32)
        centred = q - zero[None, None, :]  # integers within +-255: exact in any float type
        if BLOCK_M == 1:  # one row: products and sums on the vector units
            ks = at + words[:, None] * PACK + lane[None, :]  # [WORDS, PACK]: the inputs, in word order
            x = tl.load(x_ptr + first_row * k + ks, mask=ks < k, other=0.0).to(tl.float32)
            partial = tl.sum(tl.sum(centred.to(tl.float32) * x[:, :, None], axis=1), axis=0)  # [BLOCK_N]
            acc += (partial * scale)[None, :]
        else:  # a few rows: the weight tile, unpacked once, through the matrix units for every row
            ks = at + tl.arange(0, BLOCK_K)
            tile = (m < rows)[:, None] & (ks < k)[None, :]
            x = tl.load(x_ptr + m[:, None].to(tl.int64) * k + ks[None, :], mask=tile, other=0.0)
            # rows in input order (word, then lane); fp32 operands, as Triton's interpreter computes a bf16 dot
            # wrongly, and tf32 keeps bf16 and fp16 activations and the integers exact
            w = tl.reshape(centred.to(tl.float32), (BLOCK_K, BLOCK_N))
            acc += tl.dot(x.to(tl.float32), w, input_precision=PRECISION) * scale[None, :]
    out = out_ptr + m[:, None].to(tl.int64) * n_out + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(m < rows)[:, None] & real[None, :])


def matvec_fits(group_size: int) -> bool:
    """Whether :func:`matvec` takes a layer: a block of inputs, a power of two, must divide its group size."""
    return _block_k(group_size) >= 16


def _block_k(group_size: int) -> int:
    return min(256, group_size & -group_size)  # the largest power of two dividing the group size, at most 256


def matvec(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    bits: int,
    group_size: int,
    *,
    block_n: int | None = None,
) -> Tensor:
    """``x @ W`` (no bias) for ``x`` [..., K] of a few rows, in ``x``'s dtype; sums in fp32. ``block_n`` outputs
    per program (a power of two; by default enough programs to fill a GPU several times over)."""
    k, n_out = x.shape[-1], qweight.shape[1]
    rows = x.numel() // k
    x = x.contiguous()
    out = x.new_empty(*x.shape[:-1], n_out)
    block_m = 1 if rows == 1 else max(16, triton.next_power_of_2(rows))  # the matrix units take >= 16 rows
    if block_n is None:
        block_n = 128 if os.environ.get("TRITON_INTERPRET") == "1" else (32 if n_out >= 8192 else 16)
        block_n = max(block_n, 16 if block_m > 1 else 1)
    _gptq_matvec_kernel[(triton.cdiv(n_out, block_n), triton.cdiv(rows, block_m))](
        x,
        qweight,
        qzeros,
        scales,
        out,
        rows,
        n_out,
        k,
        group_size,
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=_block_k(group_size),
        # bf16 and fp16 activations and the small integers are exact in tf32; fp32 activations need ieee
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


@triton.jit
def _gptq_dequantize_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    out_ptr,
    n_out,
    n_words,
    group_size,
    BITS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    mask_bits = (1 << BITS) - 1
    words = tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lane = tl.arange(0, PACK)
    tile = (words < n_words)[:, None] & (cols < n_out)[None, :]
    packed = tl.load(qweight_ptr + words[:, None].to(tl.int64) * n_out + cols[None, :], mask=tile, other=0)
    q = (packed[:, None, :] >> (lane * BITS)[None, :, None]) & mask_bits  # [BLOCK_WORDS, PACK, BLOCK_N]
    ks = words[:, None] * PACK + lane[None, :]  # [BLOCK_WORDS, PACK]
    group = (ks // group_size)[:, :, None]
    inside = tile[:, None, :]
    zero = tl.load(qzeros_ptr + group * (n_out // PACK) + (cols // PACK)[None, None, :], mask=inside, other=0)
    zero = ((zero >> ((cols % PACK) * BITS)[None, None, :]) & mask_bits) + 1
    scale = tl.load(scales_ptr + group * n_out + cols[None, None, :], mask=inside, other=0.0).to(tl.float32)
    weight = ((q - zero).to(tl.float32) * scale).to(
        out_ptr.dtype.element_ty
    )  # as GPTQLinear.dequantize rounds
    tl.store(out_ptr + ks[:, :, None].to(tl.int64) * n_out + cols[None, None, :], weight, mask=inside)


def dequantize(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The float weight [K, N] in ``dtype``, equal to :meth:`~qwen_agent.runtime.gptq.GPTQLinear.dequantize`'s."""
    n_words, n_out = qweight.shape
    out = torch.empty(n_words * (32 // bits), n_out, dtype=dtype, device=qweight.device)
    block_words, block_n = (8, 64) if os.environ.get("TRITON_INTERPRET") != "1" else (64, 256)
    _gptq_dequantize_kernel[(triton.cdiv(n_words, block_words), triton.cdiv(n_out, block_n))](
        qweight,
        qzeros,
        scales,
        out,
        n_out,
        n_words,
        group_size,
        BITS=bits,
        BLOCK_WORDS=block_words,
        BLOCK_N=block_n,
    )
    return out
