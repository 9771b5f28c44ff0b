"""The Qwen network in plain PyTorch: Qwen v1 (``QWenLMHeadModel``) and the Qwen2 family, with a static KV cache.

Both families are the same pre-norm decoder: RMSNorm computed in fp32, fused q|k|v projection with bias, an
output projection without bias, rotate-half RoPE applied in fp32, a SiLU-gated MLP ``down(up(x) * silu(gate(x)))``
(Qwen v1's ``w2`` is the gate, ``w1`` the up branch), a final RMSNorm and an ``lm_head``. Qwen2 adds grouped KV
heads and optionally ties ``lm_head`` to the embedding.

Qwen v1's long-context rules, both exact no-ops up to ``config.seq_length``:

- **Dynamic NTK.** The rotary base becomes ``theta * alpha ** (d / (d - 2))`` with ``alpha`` from
  :func:`qwen_agent.runtime.config.ntk_alpha` of the prefill length. The alpha is computed when a sequence is prefilled
  (a call without a cache, or the first call on an empty cache) and *frozen* in the cache for every later step,
  exactly as the reference caches it at prefill. So a cached decode past ``seq_length`` is not the same as a
  full recomputation of the longer sequence; that is the reference behaviour.
- **LogN attention.** The query at 0-based position ``p`` is multiplied by ``log(p + 1) / log(seq_length)`` when
  ``p + 1 > seq_length`` (after RoPE, queries only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .config import QwenConfig
from .gptq import GPTQConfig, GPTQLinear

__all__ = ["KVCache", "Transformer"]


class KVCache:
    """Pre-allocated keys and values of every layer for a batch of rows, and what the rotary rules freeze at prefill.

    ``length`` is how many slots are filled (the same for every row) for calls through
    :meth:`Transformer.forward`. Setting ``length`` lower forgets the tail, which is how a cached prefix is
    reused. :meth:`Transformer.prefill` (prompts into chosen rows) and :meth:`Transformer.decode_step` (each
    row's slot as a tensor) leave it alone, so rows of one cache can hold sequences of different lengths.
    """

    def __init__(
        self,
        config: QwenConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.ntk_alpha = torch.ones(batch_size, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self,
        layer: int,
        start: int | Tensor,
        k: Tensor,
        v: Tensor,
        rows: Tensor | None = None,
        kv_len: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` ([B, Hkv, S, D]) at slots ``start..start+S`` of ``layer`` in cache rows ``rows`` (every
        row when None); return those rows' slots so far. ``start`` [B], one per row, needs ``rows`` and
        ``kv_len``, the slots to return; slots past a row's end take its last slot (padding: a decode step
        writes a slot before it reads it)."""
        if isinstance(start, Tensor):
            slots = (start[:, None] + torch.arange(k.shape[2], device=k.device)).clamp(max=self.capacity - 1)
            self.k[layer, rows[:, None], :, slots] = k.transpose(1, 2)  # [B, S, Hkv, D] at [row, slot]
            self.v[layer, rows[:, None], :, slots] = v.transpose(1, 2)
            return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]
        end = start + k.shape[2]
        index = slice(None) if rows is None else rows
        self.k[layer, index, :, start:end] = k
        self.v[layer, index, :, start:end] = v
        if start == 0:
            return k, v  # nothing before them: no need to read the rows back
        return self.k[layer, index, :, :end], self.v[layer, index, :, :end]

    def write_at(
        self, layer: int, rows: Tensor, slots: Tensor, k: Tensor, v: Tensor, kv_len: int
    ) -> tuple[Tensor, Tensor]:
        """Store one position per row, ``k, v`` [B, Hkv, 1, D], at slot ``slots[b]`` of row ``rows[b]`` (the rows
        ``0..B-1`` as a tensor); return those rows' first ``kv_len`` slots."""
        B = k.shape[0]
        self.k[layer, rows, :, slots] = k[:, :, 0]
        self.v[layer, rows, :, slots] = v[:, :, 0]
        return self.k[layer, :B, :, :kv_len], self.v[layer, :B, :, :kv_len]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in fp32, cast back, then scale: the reference's order (it matters in bf16)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.wqkv = nn.Linear(config.hidden_size, config.qkv_size, bias=True)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: Tensor, layer: int, ctx: _StepContext) -> Tensor:
        cfg = self.config
        B, S, _ = x.shape
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, S, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = k.view(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = v.view(B, S, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.q_scale is not None:
            q = q * ctx.q_scale.to(q.dtype)
        if ctx.slots is not None:
            k, v = ctx.cache.write_at(layer, ctx.rows, ctx.slots, k, v, ctx.kv_len)  # [B, Hkv, kv_len, D]
        elif ctx.cache is not None:
            k, v = ctx.cache.update(layer, ctx.start, k, v, ctx.rows, ctx.kv_len)  # [B, Hkv, T, D]
        if cfg.num_kv_heads != cfg.num_heads:
            groups = cfg.num_heads // cfg.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.is_causal)
        return self.wo(out.transpose(1, 2).reshape(B, S, q_size))

    def fused_decode(self, qkv: Tensor, layer: int, ctx: _StepContext, *, pdl: bool = False) -> Tensor:
        """The fused decode step's attention from the q|k|v product ``qkv`` [B, 1, ...] without its bias: bias,
        RoPE, logN and the cache write in one kernel, then attention over each row's slots; [B, 1, H * D], the
        input of ``wo``. ``pdl``: the kernels use programmatic dependent launch."""
        from . import kernels

        cfg, cache = self.config, ctx.cache
        q = kernels.rotary_to_cache(
            qkv, self.wqkv.bias, ctx.cos, ctx.sin, ctx.q_scale, cache.k[layer], cache.v[layer], ctx.slots,
            cfg.num_heads, cfg.num_kv_heads, pdl=pdl,
        )  # fmt: skip
        return kernels.decode_attention(q, cache.k[layer], cache.v[layer], ctx.slots, pdl=pdl)


class FeedForward(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        # gate and up rows in one matrix: one matrix product (at decode, one pass over the weights) for both
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(up * F.silu(gate))


class Block(nn.Module):
    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, layer: int, ctx: _StepContext) -> Tensor:
        x = x + self.attention(self.attention_norm(x), layer, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class _StepContext:
    """What every layer of one forward call shares: rotary tables, logN scale, mask, cache slot."""

    __slots__ = ("cos", "sin", "q_scale", "mask", "is_causal", "cache", "start", "rows", "slots", "kv_len")

    def __init__(self, cos, sin, q_scale, mask, is_causal, cache, start, rows=None, slots=None, kv_len=0):  # noqa: ANN001
        self.cos, self.sin, self.q_scale = cos, sin, q_scale
        self.mask, self.is_causal, self.cache, self.start = mask, is_causal, cache, start
        self.rows, self.slots, self.kv_len = rows, slots, kv_len  # cache rows; decode: slots; slots read


class Transformer(nn.Module):
    """A Qwen decoder. ``model(ids)`` with ``ids`` [B, S] and no cache returns logits [B, S, vocab].

    With a :class:`KVCache`, the call appends ``ids`` after the ``cache.length`` slots already filled and
    advances ``cache.length``; ``last_only=True`` computes the logits of the last position only ([B, 1, vocab]).
    """

    def __init__(self, config: QwenConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.quantization: GPTQConfig | None = None  # GPTQ layers (see gptq.quantize_linears)

    def forward(self, ids: Tensor, cache: KVCache | None = None, *, last_only: bool = False) -> Tensor:
        B, S = ids.shape
        start = cache.length if cache is not None else 0
        x = self._encode(ids, torch.full((B,), S, device=ids.device), cache, None, start)
        if cache is not None:
            cache.length = start + S
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))  # [B, S, V]

    def prefill(
        self, ids: Tensor, lengths: Tensor, cache: KVCache, rows: Tensor, starts: Sequence[int] | None = None
    ) -> Tensor:
        """Several prompts in one call: ``ids`` [B, S] right-padded, prompt ``b`` being its first ``lengths[b]``
        ids, go to cache row ``rows[b]`` after the ``starts[b]`` slots it already holds (a cached prefix; host
        ints, as they fix shapes; None: nothing cached); logits [B, V] in fp32 of each prompt's last id.
        Attention is causal, so no prompt sees the padding after it; the padding's keys land in slots past the
        prompt (or the row's last slot), which a decode step overwrites before it reads them. Each prompt's NTK
        alpha is that of its full length ``starts[b] + lengths[b]``, as a prefill of the whole prompt would fix
        it: the keys of a cached prefix must have been rotated with that alpha too. ``cache.length`` is not
        used or changed."""
        starts = list(starts) if starts is not None else [0] * ids.shape[0]
        start: int | Tensor = starts[0]
        if any(s != starts[0] for s in starts):  # rows at their own offsets
            start = torch.tensor(starts, device=ids.device)
        x = self._encode(
            ids, lengths + torch.tensor(starts, device=ids.device), cache, rows, start, max(starts)
        )
        last = x[torch.arange(ids.shape[0], device=ids.device), lengths - 1]  # [B, E]
        return self.output(self.norm(last)).float()

    def _encode(
        self,
        ids: Tensor,
        lengths: Tensor,
        cache: KVCache | None,
        rows: Tensor | None,
        start: int | Tensor,
        last_start: int | None = None,
    ) -> Tensor:
        """The layers over ``ids`` [B, S] at positions ``start..start+S`` of each row (``start`` an int, or [B]
        per row with ``last_start`` its largest), ``lengths`` [B] the rows' full lengths (they fix the NTK
        alpha at prefill; a call from :meth:`prefill` always fixes it, one from :meth:`forward` only at 0)."""
        B, S = ids.shape
        device = ids.device
        index = slice(None) if rows is None else rows
        if cache is None or last_start is not None or start == 0:
            alpha = self._ntk_alpha(lengths)  # the prefill fixes alpha ...
            if cache is not None:
                cache.ntk_alpha[index] = alpha
        else:
            alpha = cache.ntk_alpha[index]  # ... and every later step reuses it
        last_start = start if last_start is None else last_start
        offsets = start[:, None] if isinstance(start, Tensor) else start
        positions = (offsets + torch.arange(S, device=device)[None, :]).expand(B, S)
        cos, sin = self._rotary(positions, alpha)
        # logN scales only positions past seq_length; short of it (a chat prompt, as a rule) it multiplies by 1
        logn = self.config.use_logn_attn and last_start + S > self.config.seq_length
        q_scale = self._logn_scale(positions) if logn else None
        kv_len = 0
        if isinstance(start, Tensor):
            # [B, 1, S, T]: each row's queries see its own slots up to themselves; padding can run past the
            # cache's end (its keys go to the last slot), a prompt cannot
            kv_len = min(last_start + S, cache.capacity)
            mask = (torch.arange(kv_len, device=device) <= positions[:, :, None])[:, None]
            is_causal = False
        else:
            mask, is_causal = self._mask(start, S, device)
        ctx = _StepContext(cos, sin, q_scale, mask, is_causal, cache, start, rows, kv_len=kv_len)
        return self._layers(ids, ctx)

    def decode_step(
        self,
        tokens: Tensor,
        slots: Tensor,
        cache: KVCache,
        kv_len: int,
        *,
        fused: bool = False,
        matvec: bool = False,
    ) -> Tensor:
        """One new token per row at fixed shapes; logits [B, V] in fp32.

        ``tokens[b]`` goes to slot ``slots[b]`` of cache row ``b`` (rows 0..B-1, each with its own length) and
        attends to that row's slots ``0..slots[b]``; PyTorch attention reads the first ``kv_len`` slots and masks
        the rest. Nothing here reads a tensor's value on the host or makes a shape from one, so the step can be
        captured as a CUDA graph and replayed. ``cache.length`` is not used or changed; the NTK alpha is each
        row's frozen one. ``fused`` runs the layers through the Triton kernels of :mod:`qwen_agent.runtime.kernels`
        (same maths), whose attention reads exactly each row's slots, whatever ``kv_len``; with ``matvec`` too, a
        one-row step also runs its matrix products through :func:`qwen_agent.runtime.kernels.matvec` (see
        :meth:`_matvec_logits`); it takes float weights only (a GPTQ layer's one-row product has its own kernel).
        """
        if matvec and self.quantization is not None:
            raise ConfigError("matvec reads float weights; this model's layers are GPTQ-quantized")
        B = tokens.shape[0]
        positions = slots[:, None]  # [B, 1]
        cos, sin = self._rotary(positions, cache.ntk_alpha[:B])
        q_scale = self._logn_scale(positions) if self.config.use_logn_attn else None
        ctx = _StepContext(cos, sin, q_scale, None, False, cache, 0, None, slots, kv_len)
        if fused and matvec and B == 1:
            return self._matvec_logits(self.tok_embeddings(tokens[:, None]), ctx)[:, -1].float()
        if fused:
            return self.output(self._fused_layers(self.tok_embeddings(tokens[:, None]), ctx))[:, -1].float()
        # [B, kv_len]: each row's slots so far; later slots may hold a previous sequence's keys
        allowed = torch.arange(kv_len, device=tokens.device)[None, :] <= slots[:, None]
        # additive, as attention would turn a boolean mask in every layer; built once per step
        mask = torch.zeros(allowed.shape, dtype=cache.k.dtype, device=tokens.device)
        ctx.mask = mask.masked_fill(~allowed, float("-inf"))[:, None, None]
        ctx.rows = torch.arange(B, device=tokens.device)  # once per step, not once per layer
        return self.output(self.norm(self._layers(tokens[:, None], ctx)))[:, -1].float()

    def _fused_layers(self, x: Tensor, ctx: _StepContext) -> Tensor:
        """The decode step's layers and final norm, one position per row, through the fused kernels: per layer
        two norms (each with the residual add before it), the bias-rotary-and-cache kernel, attention over each
        row's slots and SiLU-times-up, besides the four matrix products."""
        from . import kernels  # needs Triton, which only this path does

        cfg = self.config
        norms = [norm for layer in self.layers for norm in (layer.attention_norm, layer.ffn_norm)]
        norms.append(self.norm)
        h, x = kernels.add_rms_norm(x, norms[0].weight, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            attention, ff = layer.attention, layer.feed_forward
            attended = attention.wo(attention.fused_decode(_without_bias(attention.wqkv, h), i, ctx))
            h, x = kernels.add_rms_norm(x, norms[2 * i + 1].weight, cfg.rms_norm_eps, attended)
            up = kernels.silu_mul(ff.w_gate_up(h))
            h, x = kernels.add_rms_norm(x, norms[2 * i + 2].weight, cfg.rms_norm_eps, ff.w_down(up))
        return h

    def _matvec_logits(self, x: Tensor, ctx: _StepContext) -> Tensor:
        """The fused step for one row, its logits [1, 1, V]: every matrix product a matrix-vector product in
        :func:`~qwen_agent.runtime.kernels.matvec`, which also applies the RMSNorm before it (``norm``) and the residual
        add or the SiLU gate after it, so a layer is seven kernels: four products, the bias-rotary-and-cache
        kernel, attention and its merge."""
        from . import kernels

        eps = self.config.rms_norm_eps
        pdl = kernels.pdl_supported(x.device)  # every kernel of a layer overlaps the end of the one before it
        for i, layer in enumerate(self.layers):
            attention, ff = layer.attention, layer.feed_forward
            qkv = kernels.matvec(x, attention.wqkv.weight, norm=(layer.attention_norm.weight, eps))
            attended = attention.fused_decode(qkv, i, ctx, pdl=pdl)
            x = kernels.matvec(attended, attention.wo.weight, residual=x)
            up = kernels.matvec(x, ff.w_gate_up.weight, norm=(layer.ffn_norm.weight, eps), gated=True)
            x = kernels.matvec(up, ff.w_down.weight, residual=x)
        return kernels.matvec(x, self.output.weight, norm=(self.norm.weight, eps))

    def _layers(self, ids: Tensor, ctx: _StepContext) -> Tensor:
        x = self.tok_embeddings(ids)  # [B, S, E]
        for i, layer in enumerate(self.layers):
            x = layer(x, i, ctx)
        return x

    def _ntk_alpha(self, lengths: Tensor) -> Tensor:
        """Per-row dynamic-NTK alpha (see :func:`qwen_agent.runtime.config.ntk_alpha`); 1 when the rule is off."""
        if not self.config.use_dynamic_ntk:
            return torch.ones(lengths.shape, device=lengths.device)
        context_value = torch.log2(lengths.double() / self.config.seq_length) + 1
        return torch.clamp(2 ** torch.ceil(context_value) - 1, min=1).float()

    def _rotary(self, positions: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin tables [B, 1, S, D] in fp32 for per-row positions and NTK alphas."""
        dim = self.config.head_dim
        base = self.config.rope_theta * alpha.double() ** (dim / (dim - 2))  # [B]
        exponents = torch.arange(0, dim, 2, device=positions.device).float() / dim
        inv_freq = 1.0 / (base.float()[:, None] ** exponents)  # [B, D/2]
        freqs = positions.float()[:, :, None] * inv_freq[:, None, :]  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]
        return emb.cos(), emb.sin()

    def _logn_scale(self, positions: Tensor) -> Tensor:
        """Query scale [B, 1, S, 1]: log(p+1)/log(seq_length) past seq_length, else 1."""
        n = (positions + 1).double()
        scale = torch.where(
            n > self.config.seq_length, n.clamp(min=1).log() / math.log(self.config.seq_length), 1.0
        )
        return scale.float()[:, None, :, None]

    @staticmethod
    def _mask(start: int, S: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """Attention mask [S, T] (True = attend) for ``S`` tokens after ``start`` cached ones, or a shortcut."""
        if S == 1:
            return None, False  # one new token sees every slot
        if start == 0:
            return None, True  # plain causal prefill
        q_slot = torch.arange(start, start + S, device=device)[:, None]
        return torch.arange(start + S, device=device)[None, :] <= q_slot, False


def _without_bias(linear: nn.Linear | GPTQLinear, x: Tensor) -> Tensor:
    """The layer's product without its bias (the fused step adds the bias in its rotary kernel)."""
    return linear.product(x) if isinstance(linear, GPTQLinear) else F.linear(x, linear.weight)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE computed in fp32 and cast back, as the reference does."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).type_as(x)
