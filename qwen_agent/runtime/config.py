"""Model and generation settings read from a checkpoint's ``config.json`` and ``generation_config.json``.

One :class:`QwenConfig` describes both families this package runs:

- Qwen v1 (``QWenLMHeadModel``, ``model_type: qwen``), in either key style: the August-2023 GPT-2 style
  (``n_embd``, ``n_head``, ``ffn_hidden_size`` ...) or the September-2023 HF style (``hidden_size`` ...).
  Qwen v1's ``intermediate_size`` is twice the MLP's per-branch width; :attr:`QwenConfig.intermediate_size`
  here is always the per-branch width.
- the Qwen2 family (``Qwen2ForCausalLM``: Qwen1.5, Qwen2, Qwen2.5), with grouped KV heads and ``rope_theta``.

``CONFIGS`` holds named configs: the real Qwen-7B-Chat shape (``"7b"``) and a tiny one for tests (``"tiny"``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError

__all__ = ["QwenConfig", "GenerationConfig", "CONFIGS", "ntk_alpha"]

# Qwen v1 keeps a logN table for positions 1..32767; longer sequences are outside what the model defines.
QWEN_V1_MAX_CONTEXT = 32767

ARCHITECTURES = {"QWenLMHeadModel": "qwen", "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class QwenConfig:
    """The shape and the position rules of one model.

    ``seq_length`` is the length the model was trained on: dynamic NTK and logN attention (Qwen v1 only) are
    exact no-ops up to it and change the maths past it. ``max_context`` is the longest sequence the runtime
    accepts.
    """

    family: str  # "qwen" (v1) or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per-branch MLP width (Qwen v1: config's intermediate_size // 2)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    seq_length: int = 8192
    max_context: int = QWEN_V1_MAX_CONTEXT
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("qwen", "qwen2"):
            raise ConfigError(f"family must be 'qwen' or 'qwen2', got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def qkv_size(self) -> int:
        """Rows of the fused q|k|v projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> QwenConfig:
        """Read a Hugging Face ``config.json`` dict of either family; ``source`` names the file in errors."""
        archs = hf.get("architectures") or []
        family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if family is None:
            family = {"qwen": "qwen", "qwen2": "qwen2"}.get(hf.get("model_type", ""))
        if family is None:
            raise CheckpointError(
                f"{source}: unknown architecture {archs or hf.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)} (model_type 'qwen' or 'qwen2')"
            )
        get = _KeyReader(hf, source)
        if family == "qwen":
            hidden = int(get("hidden_size", "n_embd"))
            heads = int(get("num_attention_heads", "n_head"))
            rotary_pct = float(hf.get("rotary_pct", 1.0))
            if rotary_pct != 1.0:
                raise CheckpointError(f"{source}: rotary_pct {rotary_pct} is not supported (Qwen uses 1.0)")
            return cls(
                family="qwen",
                vocab_size=int(hf.get("padded_vocab_size") or get("vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size", "ffn_hidden_size")) // 2,
                num_layers=int(get("num_hidden_layers", "n_layer")),
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=int(hf.get("kv_channels") or hidden // heads),
                rms_norm_eps=float(get("layer_norm_epsilon")),
                rope_theta=float(hf.get("rotary_emb_base", 10000.0)),
                seq_length=int(get("seq_length")),
                max_context=QWEN_V1_MAX_CONTEXT,
                use_dynamic_ntk=bool(hf.get("use_dynamic_ntk", False)),
                use_logn_attn=bool(hf.get("use_logn_attn", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            )
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(
                f"{source}: rope_scaling type {rope_type!r} is not supported (only plain RoPE)"
            )
        theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        max_pos = int(get("max_position_embeddings"))
        return cls(
            family="qwen2",
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps")),
            rope_theta=float(theta),
            seq_length=max_pos,
            max_context=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> QwenConfig:
        """Read ``config.json`` (a file, or the model directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_hf(_read_json(path), str(path))


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen v1's dynamic-NTK alpha for a prefill of ``length`` tokens: 1 up to ``seq_length``, then 3, 7, 15 ...

    ``alpha = max(2**ceil(log2(length / seq_length) + 1) - 1, 1)``; the rotary base becomes
    ``base * alpha ** (head_dim / (head_dim - 2))``.
    """
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults, from ``generation_config.json`` where the checkpoint has one.

    Keys the file omits take Hugging Face's defaults (greedy, temperature 1, top-p 1, top-k 50, no repetition
    penalty), except ``max_new_tokens`` (512, Qwen's value) and ``max_window_size`` (6144, ``make_context``'s).
    ``top_k == 0`` disables top-k, as in transformers.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    max_window_size: int = 6144
    chat_format: str = "chatml"
    eos_token_ids: tuple[int, ...] = (151643,)
    stop_words_ids: tuple[tuple[int, ...], ...] = field(default=())

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in hf.items() if k in known and v is not None}
        eos = hf.get("eos_token_id")
        if eos is not None:
            values["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (int(eos),)
        if hf.get("stop_words_ids"):
            values["stop_words_ids"] = tuple(tuple(s) for s in hf["stop_words_ids"])
        return replace(cls(), **values)

    @classmethod
    def from_dir(cls, path: str | Path) -> GenerationConfig:
        """Read ``generation_config.json`` from a model directory; defaults when the file is absent."""
        file = Path(path) / "generation_config.json"
        return cls.from_hf(_read_json(file)) if file.exists() else cls()


class _KeyReader:
    """Reads a required key (under any of its names) and names the file and key when it is missing."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def __call__(self, *names: str) -> Any:
        for name in names:
            if self.hf.get(name) is not None:
                return self.hf[name]
        raise CheckpointError(f"{self.source}: required key {' / '.join(repr(n) for n in names)} is missing")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


CONFIGS: dict[str, QwenConfig] = {
    # Qwen-7B-Chat, the September-2023 release (seq_length 8192)
    "7b": QwenConfig(
        family="qwen",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        seq_length=8192,
        use_dynamic_ntk=True,
        use_logn_attn=True,
    ),
    # Qwen-1.8B-Chat (v1 layout)
    "1.8b": QwenConfig(
        family="qwen",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5504,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        seq_length=8192,
        use_dynamic_ntk=True,
        use_logn_attn=True,
    ),
    # Qwen2.5-0.5B-Instruct (Qwen2 layout: grouped KV heads, tied embeddings)
    "0.5b": QwenConfig(
        family="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rope_theta=1_000_000.0,
        seq_length=32768,
        max_context=32768,
        tie_word_embeddings=True,
    ),
    # the real vocabulary size with a toy body (about 20 MB of fp32 weights): cache, parity and loader tests
    "tiny": QwenConfig(
        family="qwen",
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        seq_length=32,
        use_dynamic_ntk=True,
        use_logn_attn=True,
    ),
}
