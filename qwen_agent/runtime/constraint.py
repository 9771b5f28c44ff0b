"""Constrained decoding: what the generator asks of a grammar, and the token mask it applies.

A :class:`TokenConstraint` follows one completion: before each token the generator has it fill a bitmask of the
ids that may come next, and after each token it hands the id over with :meth:`TokenConstraint.accept`. Id ``i``
is allowed when bit ``i % 32`` of word ``i // 32`` is set (the layout of vLLM's structured-output backends, so a
grammar library's own mask filler writes straight into it). The generator knows nothing of grammars; the ReAct
grammar built from the offered tools lives above the runtime (:mod:`qwen_agent.constrained`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["TokenConstraint", "bitmask_words", "apply_bitmask"]


@runtime_checkable
class TokenConstraint(Protocol):
    """The next-token rule of one completion; stateful, so each prompt needs its own."""

    def fill_bitmask(self, bitmask: Tensor) -> None:
        """Write the allowed next ids into ``bitmask``, a contiguous int32 CPU tensor of
        :func:`bitmask_words` ``(vocab_size)`` words."""
        ...

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False when the constraint did not allow it."""
        ...


def bitmask_words(vocab_size: int) -> int:
    """Words of 32 bits that cover ``vocab_size`` ids."""
    return (vocab_size + 31) // 32


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """``logits`` [B, V] (float32) with every id that ``bitmask`` [B, W] does not allow set to -inf, on the
    logits' device, without reading anything back on the host. Integer ops only: each float's bits are kept or
    replaced by those of -inf, several times faster on a CPU than a masked_fill with a boolean mask."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    keep = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1).neg_()  # [B, W, 32]: -1 (allowed) or 0
    keep = keep.flatten(-2)[:, : logits.shape[-1]]  # [B, V]
    out = logits.float().view(torch.int32) & keep
    out.bitwise_or_(keep.bitwise_not_().bitwise_and_(_NEG_INF_BITS))  # in place: two allocations in all
    return out.view(torch.float32).to(logits.dtype)


_NEG_INF_BITS = -8388608  # 0xFF800000, float32 -inf as a signed int32
