"""Hugging Face model directories -> a :class:`~qwen_agent.runtime.model.Transformer` with its weights, and nothing else.

A directory may hold ``model.safetensors.index.json`` plus shards (always read through its ``weight_map``), a
single ``model.safetensors``, or ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` (read with
``torch.load(weights_only=True)``: no pickled code runs). No Python file from the checkpoint is ever imported.
A GPTQ directory (auto-gptq's layout, see :mod:`qwen_agent.runtime.gptq`) loads its quantized projections as
packed :class:`~qwen_agent.runtime.gptq.GPTQLinear` layers.

Loading is all-or-nothing: every file and tensor is checked (present, readable, right shape) while the weights are
read into a model built on the ``meta`` device; any problem raises :class:`~qwen_agent.errors.CheckpointError`
naming the file and the tensor, and no model is returned. Safetensors are read with plain file reads straight
into each tensor's buffer (no memory map), and each tensor goes to its final dtype and device before the next is
read, so host memory peaks near the loaded model's size plus one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .config import QwenConfig, _read_json
from .gptq import PACKED, QUANTIZED_LINEARS, GPTQConfig, GPTQLinear, quantize_linears, read_gptq_config
from .model import Transformer

__all__ = [
    "load_checkpoint",
    "resolve_model_dir",
    "weight_name_map",
    "resolve_dtype",
    "resolve_device",
    "to_transformers",
]

# Every tensor but GPTQ's packed int32 ones is a float weight: an integer, boolean or 8-bit float tensor in its place
# would be converted to numbers that mean nothing (quantised formats need their scales), so those are refused.
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SAFETENSORS_DTYPES = _FLOAT_DTYPES | {
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PACKED_SUFFIXES = (".qweight", ".qzeros", ".g_idx")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model", "*.jinja"]


def weight_name_map(config: QwenConfig, quantization: GPTQConfig | None = None) -> dict[str, list[str]]:
    """Our parameter name -> the checkpoint tensor names it is made of (several are concatenated on the output
    dimension).

    The gate and up projections are concatenated into our ``w_gate_up`` (Qwen v1's ``mlp.w2`` is the gate,
    ``mlp.w1`` the up branch), Qwen2's separate q/k/v projections into our ``wqkv``; a tied ``lm_head`` comes from
    the embedding. Everything else maps one to one. With ``quantization``, each quantized linear's ``weight`` is
    its packed tensors instead (``qweight``, ``qzeros``, ``scales``, ``g_idx``; see :mod:`.gptq`).
    """
    names = _float_name_map(config)
    if quantization is None:
        return names
    for i in range(config.num_layers):
        for module in QUANTIZED_LINEARS:
            sources = names.pop(f"layers.{i}.{module}.weight")
            for kind in PACKED:
                names[f"layers.{i}.{module}.{kind}"] = [s.removesuffix("weight") + kind for s in sources]
    return names


def _float_name_map(config: QwenConfig) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    if config.family == "qwen":
        names["tok_embeddings.weight"] = ["transformer.wte.weight"]
        for i in range(config.num_layers):
            hf, ours = f"transformer.h.{i}.", f"layers.{i}."
            names[ours + "attention_norm.weight"] = [hf + "ln_1.weight"]
            names[ours + "attention.wqkv.weight"] = [hf + "attn.c_attn.weight"]
            names[ours + "attention.wqkv.bias"] = [hf + "attn.c_attn.bias"]
            names[ours + "attention.wo.weight"] = [hf + "attn.c_proj.weight"]
            names[ours + "ffn_norm.weight"] = [hf + "ln_2.weight"]
            names[ours + "feed_forward.w_gate_up.weight"] = [hf + "mlp.w2.weight", hf + "mlp.w1.weight"]
            names[ours + "feed_forward.w_down.weight"] = [hf + "mlp.c_proj.weight"]
        names["norm.weight"] = ["transformer.ln_f.weight"]
        names["output.weight"] = [
            "transformer.wte.weight" if config.tie_word_embeddings else "lm_head.weight"
        ]
        return names
    names["tok_embeddings.weight"] = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        qkv = [hf + f"self_attn.{p}_proj" for p in "qkv"]
        names[ours + "attention_norm.weight"] = [hf + "input_layernorm.weight"]
        names[ours + "attention.wqkv.weight"] = [p + ".weight" for p in qkv]
        names[ours + "attention.wqkv.bias"] = [p + ".bias" for p in qkv]
        names[ours + "attention.wo.weight"] = [hf + "self_attn.o_proj.weight"]
        names[ours + "ffn_norm.weight"] = [hf + "post_attention_layernorm.weight"]
        names[ours + "feed_forward.w_gate_up.weight"] = [
            hf + "mlp.gate_proj.weight",
            hf + "mlp.up_proj.weight",
        ]
        names[ours + "feed_forward.w_down.weight"] = [hf + "mlp.down_proj.weight"]
    names["norm.weight"] = ["model.norm.weight"]
    names["output.weight"] = ["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
    return names


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (or None): bf16 on a GPU that supports it, else fp16 on compute capability >= 7, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype in named:
        return named[dtype]
    if dtype not in (None, "auto"):
        raise ConfigError(f"dtype must be one of auto, bf16, fp16, fp32; got {dtype!r}")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if torch.cuda.get_device_capability(device)[0] >= 7:
            return torch.float16
    return torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None): the current CUDA GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto; got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA GPU is available")
    return resolved


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a Hub id (``Qwen/Qwen-7B-Chat``) downloaded via ``huggingface_hub``.

    Only weights, JSON, vocabulary and chat-template files are fetched: the checkpoint's Python code is never
    needed.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not local.exists()
    if not looks_like_hub_id:
        raise CheckpointError(
            f"{text}: not a model directory (expected a folder holding config.json and weights)"
        )
    how = (
        f"download https://huggingface.co/{text} (config.json, generation_config.json, the *.safetensors "
        f"shards and index, tokenizer files) into a folder and pass that folder's path"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{text}: no such directory, and huggingface_hub is not installed to fetch it as a Hub id; "
            f"pip install 'qwen-react-agent[hub]', or {how}"
        ) from None
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"{text}: could not download from the Hugging Face Hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); {how}"
        ) from None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Transformer:
    """Load a model directory (or Hub id) into a :class:`Transformer` in eval mode on ``device`` in ``dtype``."""
    model_dir = resolve_model_dir(path)
    config = QwenConfig.from_file(model_dir)
    quantization = read_gptq_config(model_dir, _read_json(model_dir / "config.json"))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Transformer(config)
        if quantization is not None:
            _check_packable(config, quantization, model_dir)
            quantize_linears(model, quantization)
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    name_map = weight_name_map(config, quantization)
    wanted = _expected_source_shapes(config, name_map, expected, quantization)

    tensors: dict[str, torch.Tensor] = {}
    for file_name, name, tensor in _read_weights(model_dir, wanted):
        if tensor.dtype not in _FLOAT_DTYPES.values() and not name.endswith(_PACKED_SUFFIXES):
            raise CheckpointError(
                f"{model_dir / file_name}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                f"but it is a float weight (float32, float16, bfloat16 or float64)"
            )
        if tuple(tensor.shape) != wanted[name]:
            raise CheckpointError(
                f"{model_dir / file_name}: tensor {name!r} has shape {list(tensor.shape)}, but config.json "
                f"implies {list(wanted[name])}"
            )
        if name.endswith(_PACKED_SUFFIXES) and tensor.dtype != torch.int32:
            raise CheckpointError(
                f"{model_dir / file_name}: tensor {name!r} is {tensor.dtype}; GPTQ stores it as int32"
            )
        # packed integers and GPTQ's fp16 scales stay as stored; float weights take the model's dtype
        keep = not tensor.is_floating_point() or name.endswith(".scales")
        tensors[name] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype)

    state: dict[str, torch.Tensor] = {}
    for ours, sources in name_map.items():
        parts = [tensors[s] for s in sources]
        state[ours] = parts[0] if len(parts) == 1 else _fuse(ours, sources, parts, model_dir)
        for s in sources if len(parts) > 1 else ():
            del tensors[s]  # the fused copy replaces the parts: keep one copy in memory
    model.load_state_dict(state, strict=True, assign=True)
    for ours, sources in name_map.items():
        if ours.endswith(".g_idx"):
            layer = model.get_submodule(ours.removesuffix(".g_idx"))
            assert isinstance(layer, GPTQLinear)
            layer.sort_groups(f"{model_dir}: {sources[0].removesuffix('.g_idx')}")
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


def _check_packable(config: QwenConfig, quantization: GPTQConfig, model_dir: Path) -> None:
    """Every quantized projection's inputs and outputs fill whole int32 words."""
    sizes = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "key/value width": config.num_kv_heads * config.head_dim,
    }
    for what, size in sizes.items():
        if size % quantization.pack:
            raise CheckpointError(
                f"{model_dir / 'config.json'}: {what} {size} is not a multiple of {quantization.pack}, "
                f"the values per word of {quantization.bits}-bit GPTQ weights"
            )


def _fuse(ours: str, sources: list[str], parts: list[torch.Tensor], model_dir: Path) -> torch.Tensor:
    """The parts of a fused projection joined on their output dimension: dim 0 of a float weight or bias, dim 1
    of GPTQ's packed tensors; the parts share one ``g_idx`` (the same inputs, so the same groups)."""
    if ours.endswith(".g_idx"):
        for source, part in zip(sources[1:], parts[1:], strict=True):
            if not torch.equal(part, parts[0]):
                raise CheckpointError(
                    f"{model_dir}: {source} differs from {sources[0]}; projections of the same input fused into "
                    f"one layer need the same input groups"
                )
        return parts[0]
    packed = ours.endswith((".qweight", ".qzeros", ".scales"))
    return torch.cat(parts, dim=1 if packed else 0)


def _expected_source_shapes(
    config: QwenConfig,
    name_map: dict[str, list[str]],
    ours: dict[str, tuple[int, ...]],
    quantization: GPTQConfig | None = None,
) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> the shape config.json implies for it."""
    wanted: dict[str, tuple[int, ...]] = {}
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for name, sources in name_map.items():
        shape = ours[name]
        if len(sources) == 1:
            wanted[sources[0]] = shape
            continue
        # the parts of a fused projection: q, k, v or gate, up
        parts = (q_rows, kv_rows, kv_rows) if ".wqkv." in name else (config.intermediate_size,) * 2
        kind = name.rsplit(".", 1)[1]
        for source, rows in zip(sources, parts, strict=True):
            if kind == "g_idx":
                wanted[source] = shape
            elif kind in ("qweight", "scales"):  # outputs are columns of GPTQ's tensors
                wanted[source] = (shape[0], rows)
            elif kind == "qzeros":
                assert quantization is not None
                wanted[source] = (shape[0], rows // quantization.pack)
            else:
                wanted[source] = (rows, *shape[1:])
    return wanted


def _read_weights(
    model_dir: Path, wanted: dict[str, tuple[int, ...]]
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield ``(file name, tensor name, tensor)`` for every wanted tensor, after checking they all exist."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = model_dir / index_name
        if index_path.exists():
            by_file = _files_from_index(index_path, wanted)
            break
        if (model_dir / single).exists():
            by_file = {single: sorted(wanted)}
            break
    else:
        raise CheckpointError(
            f"{model_dir}: no weights found (looked for model.safetensors.index.json, model.safetensors, "
            f"pytorch_model.bin.index.json, pytorch_model.bin)"
        )
    for file_name, names in by_file.items():
        reader = _read_safetensors if file_name.endswith(".safetensors") else _read_torch_bin
        for name, tensor in reader(model_dir / file_name, names):
            yield file_name, name, tensor


def _files_from_index(index_path: Path, wanted: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index_path}: not a valid index file (needs a 'weight_map' object): {exc}"
        ) from None
    by_file: dict[str, list[str]] = {}
    for name in sorted(wanted):
        if name not in weight_map:
            raise CheckpointError(f"{index_path}: tensor {name!r} is not listed in weight_map")
        by_file.setdefault(weight_map[name], []).append(name)
    for file_name, names in by_file.items():
        if not (index_path.parent / file_name).is_file():
            raise CheckpointError(
                f"{index_path.parent / file_name}: shard listed in {index_path.name} is missing "
                f"(it should hold {names[0]!r} and {len(names) - 1} more)"
            )
    return by_file


def _read_safetensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Read the named tensors of one safetensors file with plain reads, validating header, offsets and size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (says {header_len} bytes; file has {size})"
            )
        try:
            header: dict[str, Any] = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
        data_start = 8 + header_len
        for name in names:
            info = header.get(name)
            if not isinstance(info, dict):
                raise CheckpointError(f"{path}: tensor {name!r} is listed for this file but absent from it")
            yield name, _read_one(f, path, name, info, data_start, size)


def _read_one(
    f: Any, path: Path, name: str, info: dict[str, Any], data_start: int, size: int
) -> torch.Tensor:
    try:
        dtype_name = info["dtype"]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:  # an 8-bit float, or a dtype this loader does not know
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype_name!r}, but it is a float weight "
            f"({', '.join(_FLOAT_DTYPES)}) or a GPTQ int32"
        )
    tensor = torch.empty(shape, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {end - begin} bytes, but {info['dtype']}{shape} needs {nbytes}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
        )
    f.seek(data_start + begin)
    if nbytes and f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != nbytes:
        raise CheckpointError(f"{path}: short read of tensor {name!r}")
    return tensor


def _read_torch_bin(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Read a ``pytorch_model*.bin`` file with ``weights_only=True`` (memory-mapped when the format allows)."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # a truncated zip, a pickle with code in it, garbage: all are unreadable files
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name in names:
        tensor = state.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: tensor {name!r} is listed for this file but absent from it")
        yield name, tensor


def to_transformers(model: Transformer) -> Any:
    """transformers' ``Qwen2ForCausalLM`` sharing this model's tensors (q/k/v are row views of the fused projection).

    For comparisons against transformers (parity tests, the speed baseline); needs transformers installed.
    Up to ``seq_length`` a Qwen v1 model and its Qwen2 twin compute the same logits.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if model.quantization is not None:
        raise ConfigError("to_transformers needs float weights; this model's layers are GPTQ-quantized")
    c = model.config
    hf_config = Qwen2Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=c.max_context,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    with torch.device("meta"):
        hf = Qwen2ForCausalLM(hf_config)
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    state = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = getattr(block.attention.wqkv, kind)
            for name, (a, b) in zip("qkv", ((0, q), (q, q + kv), (q + kv, q + 2 * kv)), strict=True):
                state[p + f"self_attn.{name}_proj.{kind}"] = fused[a:b]
        state |= {
            p + "self_attn.o_proj.weight": block.attention.wo.weight,
            p + "input_layernorm.weight": block.attention_norm.weight,
            p + "post_attention_layernorm.weight": block.ffn_norm.weight,
            p + "mlp.gate_proj.weight": block.feed_forward.w_gate_up.weight[:inter],
            p + "mlp.up_proj.weight": block.feed_forward.w_gate_up.weight[inter:],
            p + "mlp.down_proj.weight": block.feed_forward.w_down.weight,
        }
    hf.load_state_dict(state, assign=True, strict=False)
    hf.tie_weights()
    # non-persistent rotary buffers were created on the meta device: build them for real
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_config).to(model.tok_embeddings.weight.device)
    return hf.eval().requires_grad_(False)
