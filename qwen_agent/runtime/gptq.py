"""GPTQ checkpoints in auto-gptq's layout (Qwen-7B-Chat-Int4/Int8, Qwen2.5-*-GPTQ-Int4), loaded without auto-gptq.

The format, per quantized ``nn.Linear`` of ``K`` inputs and ``N`` outputs, with ``P = 32 // bits`` values a word:

- ``qweight`` int32 [K / P, N]: word ``r`` of column ``n`` holds the weights of inputs ``r*P .. r*P + P-1``, input
  ``r*P + j`` in bits ``bits*j .. bits*j + bits-1`` (unsigned);
- ``qzeros`` int32 [G, N / P]: the zero points of each group, packed the same way along the outputs, each stored
  as ``zero - 1`` (auto-gptq's "v1" convention: the reader adds the 1 back);
- ``scales`` fp16 [G, N]; ``g_idx`` int32 [K]: the group of each input (``k // group_size`` unless ``desc_act``
  quantized the inputs in another order); ``bias`` as the float layer's, where it has one.

A weight is ``scales[g, n] * (q[k, n] - zero[g, n])`` with ``g = g_idx[k]``. ``G`` is ``ceil(K / group_size)``, one
group when ``group_size`` is -1. Embeddings, norms and ``lm_head`` stay in fp16.

:class:`GPTQLinear` keeps these packed tensors (the memory of the file, not of the float weights). Its plain
PyTorch path dequantizes the layer per call and is exact (every dequantized weight is an fp16 scale times a small
integer); on CUDA a one-row (decode) product runs through the Triton kernel of
:mod:`qwen_agent.runtime.gptq_kernels`, which reads the packed words directly, and longer inputs dequantize the
layer with a Triton kernel into a buffer the allocator reuses layer after layer, then use the matrix units.
Inputs that ``desc_act`` ordered differently are sorted by group once at load: the words are repacked in group
order and the activations gathered to match, so every kernel sees groups of consecutive inputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError

__all__ = [
    "GPTQConfig",
    "GPTQLinear",
    "QUANTIZED_LINEARS",
    "read_gptq_config",
    "quantize_linears",
    "quantize_model",
    "quantize_rtn",
    "pack_rows",
    "unpack_rows",
]

# our module names (in each Block) that a GPTQ checkpoint quantizes; lm_head, embeddings and norms stay float
QUANTIZED_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w_gate_up", "feed_forward.w_down")
PACKED = ("qweight", "qzeros", "scales", "g_idx")
DECODE_MAX_ROWS = 64  # inputs of up to this many rows take the packed-weight kernel on CUDA
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # without it, CUDA too dequantizes in PyTorch

# quantize_config.json / quantization_config keys that do not change the file layout or the arithmetic
_NOTES = {
    "damp_percent", "damp_auto_increment", "true_sequential", "static_groups", "model_name_or_path",
    "model_file_base_name", "dataset", "tokenizer", "batch_size", "pad_token_id", "use_cuda_fp16", "model_seqlen",
    "max_input_length", "cache_block_outputs", "block_name_to_quantize", "module_name_preceding_first_block",
    "use_exllama", "disable_exllama", "exllama_config", "use_marlin", "meta",
}  # fmt: skip
# keys whose only accepted value is the one auto-gptq's plain layout has
_MUST_BE = {
    "quant_method": ("gptq",),
    "checkpoint_format": ("gptq",),
    "is_marlin_format": (False,),
    "lm_head": (False,),
    "pack_dtype": ("int32",),
    "modules_in_block_to_quantize": (None,),
}


@dataclass(frozen=True)
class GPTQConfig:
    """What the arithmetic of a GPTQ checkpoint depends on. ``group_size`` -1: one group over all inputs."""

    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True

    @property
    def pack(self) -> int:
        """Values per int32 word."""
        return 32 // self.bits

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_width(in_features))

    def to_json(self) -> dict[str, Any]:
        """``quantize_config.json`` as auto-gptq writes it."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": 0.01,
            "desc_act": self.desc_act,
            "static_groups": False,
            "sym": self.sym,
            "true_sequential": True,
            "model_name_or_path": None,
            "model_file_base_name": "model",
        }


def read_gptq_config(model_dir: Path, hf_config: dict[str, Any]) -> GPTQConfig | None:
    """The directory's GPTQ settings (``quantize_config.json`` and/or ``quantization_config`` in ``config.json``),
    or None for a float checkpoint. Anything this loader cannot run exactly is a :class:`CheckpointError` naming
    the file, the field and its value."""
    found: list[tuple[str, dict[str, Any]]] = []
    if "quantization_config" in hf_config:
        found.append((f"{model_dir / 'config.json'}: quantization_config", hf_config["quantization_config"]))
    path = model_dir / "quantize_config.json"
    if path.exists():
        try:
            found.append((str(path), json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    configs = [(where, _parse(where, raw)) for where, raw in found]
    for (where, config), (other_where, other) in zip(configs, configs[1:], strict=False):
        for field in ("bits", "group_size", "desc_act", "sym"):
            if getattr(config, field) != getattr(other, field):
                raise CheckpointError(
                    f"{where} and {other_where} disagree on {field}: "
                    f"{getattr(config, field)!r} against {getattr(other, field)!r}"
                )
    return configs[0][1] if configs else None


def _parse(where: str, raw: Any) -> GPTQConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key, allowed in _MUST_BE.items():  # first: another method's config has fields of its own
        if key in raw and raw[key] not in allowed:
            raise CheckpointError(
                f"{where}: {key} {raw[key]!r} is not supported "
                f"(only {' or '.join(repr(v) for v in allowed)}: auto-gptq's GPTQ layout)"
            )
    for key, value in raw.items():
        if key not in _MUST_BE and key not in _NOTES and key not in ("bits", "group_size", "desc_act", "sym"):
            raise CheckpointError(
                f"{where}: unknown field {key!r} (value {value!r}); cannot tell how it changes the weights"
            )
    bits = raw.get("bits")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise CheckpointError(f"{where}: bits {bits!r} is not supported (4 or 8)")
    group_size = raw.get("group_size", -1)
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or not (group_size == -1 or group_size > 0)
    ):
        raise CheckpointError(
            f"{where}: group_size {group_size!r} is not supported (a positive integer or -1)"
        )
    if group_size != -1 and group_size % (32 // bits):
        raise CheckpointError(
            f"{where}: group_size {group_size} is not supported (a multiple of {32 // bits} for {bits}-bit words)"
        )
    flags = {}
    for key in ("desc_act", "sym"):
        value = raw.get(key, key == "sym")
        if not isinstance(value, bool):
            raise CheckpointError(f"{where}: {key} {value!r} is not supported (true or false)")
        flags[key] = value
    return GPTQConfig(bits=bits, group_size=group_size, **flags)


# -- packing ---------------------------------------------------------------------------------------------------


def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """int32 [R, N] -> int32 [R * P, N]: the ``P = 32 // bits`` values each word holds, lowest bits first."""
    values = (words[:, None, :] >> _shifts(bits, words.device)[None, :, None]) & ((1 << bits) - 1)
    return values.reshape(-1, words.shape[1])


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """int [R * P, N] of unsigned ``bits``-bit values -> int32 [R, N]; the inverse of :func:`unpack_rows`."""
    per_word = values.to(torch.int64).reshape(-1, 32 // bits, values.shape[1])
    words = (per_word << _shifts(bits, values.device).to(torch.int64)[None, :, None]).sum(dim=1)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # the same 32 bits, signed


def quantize_rtn(weight: Tensor, config: GPTQConfig, order: Tensor | None = None) -> dict[str, Tensor]:
    """Round-to-nearest quantization of a float ``weight`` [N, K] into auto-gptq's tensors (see the module
    docstring). ``order`` (a permutation of the inputs, with ``desc_act``) is the order in which the inputs fill
    the groups, as GPTQ's activation order does; otherwise input ``k`` is in group ``k // group_size``.

    As GPTQ's quantizer: each group's range includes 0; ``sym`` centres it (zero ``2**(bits-1)``); otherwise the
    zero is ``round(-min / scale)``, here kept >= 1 so that the stored ``zero - 1`` is never negative."""
    n_out, k = weight.shape
    device = weight.device
    maxq = (1 << config.bits) - 1
    width = config.group_width(k)
    # where each input falls in the order
    position = torch.arange(k, device=device) if order is None else torch.argsort(order.to(device))
    g_idx = (position // width).to(torch.int32)
    groups = config.num_groups(k)
    w = weight.float()
    scales = torch.empty(groups, n_out, device=device)
    zeros = torch.empty(groups, n_out, dtype=torch.int64, device=device)
    for g in range(groups):
        block = w[:, g_idx == g]
        low, high = block.min(dim=1).values.clamp(max=0), block.max(dim=1).values.clamp(min=0)
        if config.sym:
            high = torch.maximum(low.abs(), high)
            low = -high
        span = torch.where(high > low, high - low, torch.ones_like(high))
        scales[g] = (span / maxq).half().float()  # stored in fp16: quantize against the stored value
        zeros[g] = (maxq + 1) // 2 if config.sym else torch.round(-low / scales[g]).clamp(1, maxq).long()
    group_of = g_idx.long()
    q = torch.round(w / scales[group_of].T) + zeros[group_of].T  # [N, K]
    q = q.clamp(0, maxq).to(torch.int64)
    return {
        "qweight": pack_rows(q.T.contiguous(), config.bits),
        "qzeros": pack_rows((zeros - 1).T.contiguous(), config.bits).T.contiguous(),
        "scales": scales.half(),
        "g_idx": g_idx,
    }


# -- the layer -------------------------------------------------------------------------------------------------


class GPTQLinear(nn.Module):
    """A linear layer whose weights stay packed (see the module docstring); ``forward`` as ``nn.Linear``'s.

    ``kernels_on_cpu`` (a test switch) sends CPU inputs through the Triton kernels too, which then run on Triton's
    CPU interpreter."""

    kernels_on_cpu = False

    def __init__(self, in_features: int, out_features: int, bias: bool, config: GPTQConfig) -> None:
        super().__init__()
        self.in_features, self.out_features, self.config = in_features, out_features, config
        pack, groups = config.pack, config.num_groups(in_features)
        self.register_buffer("qweight", torch.empty(in_features // pack, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // pack, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))
        # set by sort_groups when the groups are not in input order: the input gathered into group order
        self.register_buffer("perm", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def group_width(self) -> int:
        """Inputs per group."""
        return self.config.group_width(self.in_features)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={c.bits}, "
            f"group_size={c.group_size}, bias={self.bias is not None}, sorted={self.perm is not None}"
        )

    def sort_groups(self, where: str) -> None:
        """Check ``g_idx`` and, where the groups are not runs of consecutive inputs, repack the words in group order
        (called once, after the tensors are loaded). ``where`` names the layer in errors."""
        width, groups = self.config.group_width(self.in_features), self.scales.shape[0]
        g_idx = self.g_idx.long()
        if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
            raise CheckpointError(f"{where}.g_idx: group numbers must lie in 0..{groups - 1}")
        in_order = torch.arange(self.in_features, device=g_idx.device) // width
        if torch.equal(g_idx, in_order):
            return
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], in_order):
            raise CheckpointError(
                f"{where}.g_idx: the groups do not each hold group_size ({width}) inputs; not supported"
            )
        values = unpack_rows(self.qweight, self.config.bits)[perm]
        self.qweight = pack_rows(values, self.config.bits)
        self.g_idx = in_order.to(torch.int32)
        self.perm = perm

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """The float weight [K, N] (rows in group order once sorted), each ``scale * (q - zero)`` computed in fp32
        (exact) and rounded to ``dtype``."""
        bits, group = self.config.bits, self.g_idx.long()
        q = unpack_rows(self.qweight, bits)
        zeros = unpack_rows(self.qzeros.T.contiguous(), bits).T + 1  # [G, N]
        return ((q - zeros[group]).float() * self.scales[group].float()).to(dtype)

    def product(self, x: Tensor) -> Tensor:
        """``x @ W`` without the bias, for ``x`` [..., K]."""
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if (x.is_cuda and _HAS_TRITON) or self.kernels_on_cpu:
            from . import gptq_kernels  # needs Triton, which only this path does

            packed = (self.qweight, self.qzeros, self.scales, self.config.bits, self.group_width)
            if x.numel() // x.shape[-1] <= DECODE_MAX_ROWS and gptq_kernels.matvec_fits(self.group_width):
                return gptq_kernels.matvec(x, *packed)
            weight = gptq_kernels.dequantize(*packed, x.dtype)
        else:
            weight = self.dequantize(x.dtype)
        return x @ weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.product(x)
        return out if self.bias is None else out + self.bias


def quantize_linears(model: nn.Module, config: GPTQConfig) -> None:
    """Replace each block's quantized linears (:data:`QUANTIZED_LINEARS`) by :class:`GPTQLinear` of the same shape,
    on the device of the model's parameters (``meta`` before loading); sets ``model.quantization``."""
    for block in model.layers:
        for name in QUANTIZED_LINEARS:
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            linear: nn.Linear = getattr(parent, attr)
            with torch.device(linear.weight.device):
                setattr(
                    parent,
                    attr,
                    GPTQLinear(linear.in_features, linear.out_features, linear.bias is not None, config),
                )
    model.quantization = config


def quantize_model(model: nn.Module, config: GPTQConfig) -> nn.Module:
    """A copy of a float :class:`~qwen_agent.runtime.model.Transformer` whose block projections are GPTQ layers
    quantized round-to-nearest (no calibration: for speed and memory figures, not for quality); embeddings, norms,
    biases and ``lm_head`` are the float model's own tensors, shared."""
    with torch.device("meta"):
        quantized = type(model)(model.config)
        quantize_linears(quantized, config)
    float_state = model.state_dict()
    state = {name: float_state[name] for name in quantized.state_dict() if name in float_state}
    for i, block in enumerate(model.layers):
        for name in QUANTIZED_LINEARS:
            packed = quantize_rtn(block.get_submodule(name).weight, config)
            state |= {f"layers.{i}.{name}.{kind}": tensor for kind, tensor in packed.items()}
    quantized.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        quantized.output.weight = quantized.tok_embeddings.weight
    return quantized.eval().requires_grad_(False)
