"""A prefix cache of KV blocks that every request of an engine shares: a prompt prefills only what is not cached.

**Blocks.** A sequence's keys and values are cut into blocks of :data:`BLOCK_TOKENS` (16) positions. Sixteen
keeps what a request recomputes of a cached prefix small (at most 15 tokens past the last full block, plus the
prompt's last token, which must run for its logits) while a block still moves as one copy and costs one hash of
16 ids; vLLM chose the same size for the same reasons. Only full blocks are cached.

**Keys.** A full block is found by a chain digest: ``blake2b(digest of the block before it + its 16 ids)``,
starting from a root digest of the NTK alpha. So a block's key names every token up to and including it, and
the same 16 ids after a different prefix are a different block (their keys and values differ: attention saw
other tokens). The alpha is in the root because Qwen v1's dynamic NTK rotates keys with a base fixed by the
alpha of the prompt's length at prefill (:func:`~qwen_agent.runtime.config.ntk_alpha`, frozen for every later
step), so the same ids at the same positions have other keys under another alpha; a prompt looks up blocks
under its own alpha, and a block computed under alpha 3 is never handed to a prompt whose fresh prefill would
use alpha 1. Up to ``seq_length`` (and for every model without dynamic NTK) the alpha is 1 and all share one
root. LogN attention scales queries only (after RoPE), never keys or values, so it does not touch cached
blocks: queries are always computed afresh. The model's weights, dtype and device are fixed per engine, which
owns one pool.

**Pool and copies.** The pool is two tensors ``[layers, blocks, kv_heads, 16, head_dim]`` (keys, values)
allocated once under the byte budget. A request's cache row stays the dense per-row tensor the decode step, its
CUDA graphs and its fused kernels read: on admission the row's cached blocks are copied into its first slots
(one gather), and its new full blocks are copied out into the pool once its prompt is prefilled (so concurrent
requests with the same prefix reuse it at once) and again when it finishes (the generated tokens too). This
copy-in/copy-out design leaves the decode path unchanged and is exact (the same numbers move); the price is
copy bandwidth: ``2 * layers * kv_heads * head_dim * dtype bytes`` per token each way, e.g. 24 KiB per token
for Qwen2.5-0.5B in fp32 (a 2,000-token prefix is 48 MiB, milliseconds on a CPU) and 512 KiB per token for
Qwen-7B in bf16 (1 GiB for 2,000 tokens, about half a millisecond on an H100, against tens of milliseconds to
prefill them). A paged cache (block tables read by attention) would avoid the copies but change every
attention path.

**Ownership and eviction.** A request holds a reference on every block it took or stored (a
:class:`PrefixLease`) until it finishes; referenced blocks are never evicted. Unreferenced blocks stay cached
and are evicted least recently used first when a store needs room; a request's deepest blocks are released
first, so a chain is evicted from its tail and its shared head lives longest. When every block is referenced,
new blocks are not stored (nothing fails; they are recomputed next time).

The numbers, in floating point: cached keys and values are those a prefill (or a decode step) computed for the
same tokens at the same positions under the same alpha; a prompt prefilled after them runs the same maths as a
whole-prompt prefill, with its own rounding, as any change of batch shape has.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import QwenConfig, ntk_alpha
from .model import KVCache

__all__ = ["BLOCK_TOKENS", "PrefixCache", "PrefixLease", "default_budget_bytes"]

BLOCK_TOKENS = 16


@dataclass
class PrefixLease:
    """What one cache row holds of the pool: its full blocks in order (each referenced) and their chain digests.

    ``cached`` is how many prompt tokens came from the pool on admission."""

    alpha: float
    cached: int = 0
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)


def default_budget_bytes(device: torch.device) -> int:
    """A quarter of the memory free on ``device`` now (after the weights are loaded), at most 16 GiB; on a CPU,
    of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_ram()
    return min(free // 4, 16 << 30)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # unknown: assume a small machine


class PrefixCache:
    """A pool of KV blocks of ``config``'s model under ``budget_bytes``, shared by every cache row of an engine.

    A row's life: :meth:`admit` (copy the longest cached block prefix of its prompt into the row) → prefill the
    rest → :meth:`store` (the prompt's new full blocks into the pool) → decode → :meth:`store` (prompt and
    generated ids) → :meth:`release`. Thread-safe: the server's scheduler thread and ``stats()`` readers share it.
    """

    def __init__(
        self,
        config: QwenConfig,
        budget_bytes: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        block_tokens: int = BLOCK_TOKENS,
    ) -> None:
        self.config, self.block_tokens = config, block_tokens
        self.num_blocks = budget_bytes // self.block_bytes(config, dtype, block_tokens)
        if self.num_blocks < 1:
            raise ValueError(f"a budget of {budget_bytes} bytes holds no block of {block_tokens} tokens")
        shape = (config.num_layers, self.num_blocks, config.num_kv_heads, block_tokens, config.head_dim)
        # empty: memory is touched only as blocks are written (on a CPU, pages are committed lazily)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: list[bytes | None] = [None] * self.num_blocks
        self._refs = [0] * self.num_blocks
        self._unreferenced: OrderedDict[int, None] = OrderedDict()  # cached, evictable; oldest first
        self._never_used = list(range(self.num_blocks - 1, -1, -1))
        self._counts = dict.fromkeys(
            ("requests", "hits", "cached_tokens", "prefilled_tokens", "stored_blocks", "evictions"), 0
        )

    @staticmethod
    def block_bytes(config: QwenConfig, dtype: torch.dtype, block_tokens: int = BLOCK_TOKENS) -> int:
        """Bytes of one block: keys and values of every layer."""
        per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
        return per_token * block_tokens

    def alpha(self, prompt_len: int) -> float:
        """The NTK alpha a fresh prefill of ``prompt_len`` tokens fixes (1 for a model without dynamic NTK)."""
        if not self.config.use_dynamic_ntk:
            return 1.0
        return float(ntk_alpha(prompt_len, self.config.seq_length))

    # -- a row's life ----------------------------------------------------------------------------------------

    def admit(self, prompt: Sequence[int], cache: KVCache, row: int) -> PrefixLease:
        """Copy the longest cached run of ``prompt``'s full blocks (never its last token, which must run for its
        logits) into the first slots of ``cache`` row ``row``; the lease references them."""
        B = self.block_tokens
        lease = PrefixLease(self.alpha(len(prompt)))
        with self._lock:
            digest = self._root(lease.alpha)
            for i in range((len(prompt) - 1) // B):
                digest = _chain(digest, prompt[i * B : (i + 1) * B])
                block = self._by_digest.get(digest)
                if block is None:
                    break
                self._reference(block)
                lease.blocks.append(block)
                lease.digests.append(digest)
            lease.cached = len(lease.blocks) * B
            counts = self._counts
            counts["requests"] += 1
            counts["hits"] += bool(lease.blocks)
            counts["cached_tokens"] += lease.cached
            counts["prefilled_tokens"] += len(prompt) - lease.cached
            if lease.blocks:
                index = torch.tensor(lease.blocks, device=self.k.device)
                for pool, rows in ((self.k, cache.k), (self.v, cache.v)):
                    # [L, n, Hkv, B, D] -> [L, Hkv, n * B, D]
                    blocks = pool[:, index].transpose(1, 2).flatten(2, 3)
                    rows[:, row, :, : lease.cached] = blocks
        return lease

    def store(self, lease: PrefixLease, ids: Sequence[int], cache: KVCache, row: int) -> None:
        """Put the full blocks of ``ids`` (whose keys and values fill ``cache`` row ``row``'s first slots) that the
        lease does not hold yet into the pool; the lease references them. Stops where the pool has no room."""
        B = self.block_tokens
        new: list[tuple[int, int]] = []  # (block of the row, pool block) to copy out
        with self._lock:
            digest = lease.digests[-1] if lease.digests else self._root(lease.alpha)
            for i in range(len(lease.blocks), len(ids) // B):
                digest = _chain(digest, ids[i * B : (i + 1) * B])
                block = self._by_digest.get(digest)
                if block is None:
                    block = self._allocate()
                    if block is None:
                        break
                    self._by_digest[digest], self._digest_of[block] = block, digest
                    new.append((i, block))
                self._reference(block)
                lease.blocks.append(block)
                lease.digests.append(digest)
            self._counts["stored_blocks"] += len(new)
            if new:
                device = self.k.device
                at = torch.tensor([i for i, _ in new], device=device)
                index = torch.tensor([b for _, b in new], device=device)
                end = (max(i for i, _ in new) + 1) * B
                for pool, rows in ((self.k, cache.k), (self.v, cache.v)):
                    # the row's slots [L, Hkv, n * B, D] as blocks [L, n, Hkv, B, D]
                    blocks = rows[:, row, :, :end].unflatten(2, (-1, B)).transpose(1, 2)
                    pool[:, index] = blocks[:, at]

    def release(self, lease: PrefixLease) -> None:
        """Drop the lease's references; blocks no request holds become evictable, its deepest ones first."""
        with self._lock:
            for block in reversed(lease.blocks):
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    self._unreferenced[block] = None
            lease.blocks, lease.digests = [], []

    def stats(self) -> dict[str, Any]:
        """Requests admitted, ``hits`` among them (reused at least one block), prompt tokens taken from the pool
        (``cached_tokens``) and computed (``prefilled_tokens``), blocks used and free, evictions."""
        with self._lock:
            used = len(self._by_digest)
            return {
                **self._counts,
                "block_tokens": self.block_tokens,
                "blocks_used": used,
                "blocks_free": self.num_blocks - used,
                "blocks_referenced": used - len(self._unreferenced),
                "budget_bytes": self.num_blocks
                * self.block_bytes(self.config, self.k.dtype, self.block_tokens),
            }

    # -- the pool --------------------------------------------------------------------------------------------

    @staticmethod
    def _root(alpha: float) -> bytes:
        return hashlib.blake2b(f"ntk alpha {alpha!r}".encode(), digest_size=16).digest()

    def _reference(self, block: int) -> None:
        if self._refs[block] == 0:
            self._unreferenced.pop(block, None)
        self._refs[block] += 1

    def _allocate(self) -> int | None:
        """A pool block to write: one never used, else the least recently used unreferenced one (evicted)."""
        if self._never_used:
            return self._never_used.pop()
        if not self._unreferenced:
            return None
        block, _ = self._unreferenced.popitem(last=False)
        del self._by_digest[self._digest_of[block]]
        self._counts["evictions"] += 1
        return block


def _chain(digest: bytes, ids: Sequence[int]) -> bytes:
    """The digest of a block of ``ids`` after the block whose digest is ``digest``."""
    return hashlib.blake2b(digest + array("q", ids).tobytes(), digest_size=16).digest()
