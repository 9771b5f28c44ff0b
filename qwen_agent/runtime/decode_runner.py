"""The decode step at a few fixed shapes, replayed as CUDA graphs on a GPU.

A decode step of a 7B model at batch 1 is several hundred small kernels; launched one at a time from Python
they take longer than the GPU needs to read the weights. :class:`DecodeRunner` runs
:meth:`~qwen_agent.runtime.model.Transformer.decode_step` for the first rows of a cache at *bucketed* shapes (rows
1, 2, 4, 8, ...; slots read in steps of 256 up to 2,048, then four sizes per doubling, up to the cache's
capacity), so a handful of shapes serve a whole
generation. On CUDA each shape is captured as a graph the first time it is needed and replayed after that;
elsewhere the step runs eagerly at the same shapes. On CUDA with Triton installed, the step also runs its layers
through the fused kernels of :mod:`qwen_agent.runtime.kernels`, a few kernels per layer instead of some forty.

Capturing a shape runs the step once eagerly first (lazy set-up such as cuBLAS workspaces must not happen
during capture). That run writes exactly the keys and values the replay that follows writes again, so it is
harmless. Captured graphs hold the addresses of the cache and of the input buffers, so a runner belongs to
one cache.
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings

import torch
from torch import Tensor

from ..errors import ConfigError, GenerationError
from .model import KVCache, Transformer

__all__ = ["DecodeRunner", "MIN_SLOT_BUCKET", "fused_by_default"]

MIN_SLOT_BUCKET = 256  # the smallest number of cache slots a step reads


def fused_by_default(device: torch.device, head_dim: int) -> bool:
    """The Triton kernels are used unless told otherwise on a CUDA device with Triton installed (and a head size
    they can take)."""
    return (
        device.type == "cuda" and importlib.util.find_spec("triton") is not None and _fits_kernels(head_dim)
    )


def _fits_kernels(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0  # Triton's blocks span a power of two


class DecodeRunner:
    """One decode step for the first rows of ``cache``: write ``tokens[b]`` and ``slots[b]`` (the runner's
    buffers, one entry per cache row), then call. ``graphs`` defaults to True on CUDA, ``fused`` (the Triton
    kernels) to True on CUDA when Triton is installed; off CUDA either is a :class:`ConfigError`, except ``fused``
    under ``TRITON_INTERPRET=1``, Triton's CPU interpreter. If the kernels fail on their first use (a Triton that
    cannot compile for this GPU), a default choice falls back to plain PyTorch ops with a warning, while an
    explicit ``fused=True`` raises :class:`GenerationError`. ``matvec`` makes a fused one-row step run its matrix
    products through Triton's matrix-vector kernel rather than cuBLAS (see ``benchmarks/decode_profile.py``)."""

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        graphs: bool | None = None,
        fused: bool | None = None,
        matvec: bool = False,
    ) -> None:
        self.model, self.cache = model, cache
        device = cache.k.device
        on_cuda = device.type == "cuda"
        if graphs and not on_cuda:
            raise ConfigError(f"cuda_graphs=True needs a CUDA device; the model is on {device}")
        if fused and importlib.util.find_spec("triton") is None:
            raise ConfigError("fused_kernels=True needs Triton installed (pip install triton)")
        if fused and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                f"fused_kernels=True needs a CUDA device (or TRITON_INTERPRET=1); the model is on {device}"
            )
        head_dim = model.config.head_dim
        if matvec and model.quantization is not None:
            raise ConfigError("matvec=True reads float weights; this model's layers are GPTQ-quantized")
        if fused and not _fits_kernels(head_dim):
            raise ConfigError(
                f"fused_kernels=True needs a head size that is a power of two >= 16, not {head_dim}"
            )
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.slots = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        self.graphs = on_cuda if graphs is None else graphs
        self.fused = fused_by_default(device, head_dim) if fused is None else fused
        self.matvec = matvec
        self._may_fall_back = fused is None  # until a fused step has run once
        self._captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self.capture_seconds = 0.0  # spent capturing graphs so far (the rest of a first call is the step)

    def buckets(self, rows: int, kv_len: int) -> tuple[int, int]:
        """The shape that serves the first ``rows`` rows reading ``kv_len`` slots: (rows, slots) rounded up. The
        fused step reads exactly each row's slots, so for it one shape per row count serves every length."""
        batch = min(1 << (rows - 1).bit_length(), self.cache.batch_size)
        if self.fused:
            return batch, self.cache.capacity
        # four slot buckets per doubling: a step reads at most 25% more cache than it needs (at 32 rows the
        # cache read outweighs the weights), and a few dozen shapes cover the whole context
        step = max(MIN_SLOT_BUCKET, 1 << max(kv_len.bit_length() - 3, 0))
        return batch, min(-(-kv_len // step) * step, self.cache.capacity)

    def __call__(self, rows: int, kv_len: int) -> Tensor:
        """Logits [B, V] (fp32) of one step of rows ``0..B-1``, B = ``rows`` rounded up to its bucket; each row
        reads at least its first ``kv_len`` slots. The tensor is overwritten by the next call of the same shape."""
        if not 0 < kv_len <= self.cache.capacity:
            raise ValueError(f"kv_len {kv_len} is outside the cache's 1..{self.cache.capacity} slots")
        shape = self.buckets(rows, kv_len)
        if not self.graphs:
            return self._step(*shape)
        if shape not in self._captured:
            self._captured[shape] = self._capture(*shape)
        graph, logits = self._captured[shape]
        graph.replay()
        return logits

    def _step(self, batch: int, slots: int) -> Tensor:
        with torch.no_grad():
            if not self.fused:
                return self.model.decode_step(self.tokens[:batch], self.slots[:batch], self.cache, slots)
            try:
                logits = self.model.decode_step(
                    self.tokens[:batch], self.slots[:batch], self.cache, slots, fused=True, matvec=self.matvec
                )
            except Exception as exc:  # Triton compiles on first use, for this GPU with this Triton
                if not self._may_fall_back:
                    raise GenerationError(
                        f"the fused decode kernels failed: {exc} (fused_kernels=False decodes with plain PyTorch ops)"
                    ) from exc
                warnings.warn(
                    f"the fused decode kernels failed ({exc}); decoding with plain PyTorch ops", stacklevel=3
                )
                self.fused = self._may_fall_back = False
                return self._step(batch, slots)  # rewrites the same cache slots
            self._may_fall_back = False
            return logits

    def _capture(self, batch: int, slots: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        started = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(batch, slots)  # the eager run that sets up what capture cannot
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool: the shapes never run at once
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(batch, slots)
        self.capture_seconds += time.perf_counter() - started
        return graph, logits
