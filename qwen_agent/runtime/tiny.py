"""Random-weight model directories in exactly the Hugging Face layout of the real Qwen downloads.

Weights cannot be downloaded here, so tests and demos exercise the real loading code on small checkpoints written
by :func:`write_tiny_checkpoint`: ``config.json`` with every key of the real one (sizes shrunk),
``generation_config.json``, ``model-0000K-of-0000N.safetensors`` shards (tensors split unevenly, so a layer
straddles two shards as in the real download), ``model.safetensors.index.json``, the tokenizer files, and
``tokenizer_config.json``.

``family="qwen"`` writes Qwen-7B-Chat's layout (``QWenLMHeadModel``, fused ``c_attn``, ``qwen.tiktoken``);
``family="qwen2"`` writes the Qwen1.5/Qwen2/Qwen2.5 layout (``Qwen2ForCausalLM``, separate q/k/v with bias,
grouped KV heads, optionally tied embeddings, ``vocab.json`` + ``merges.txt``); with ``tokenizer_files="tokenizer.json"``
its tokenizer is written the way ``save_pretrained`` of current transformers writes it (``tokenizer.json``,
``tokenizer_config.json`` without the added tokens, ``chat_template.jinja``). The same seed gives the same bytes.

``quantize="gptq-int4"`` or ``"gptq-int8"`` writes what a GPTQ download (Qwen-7B-Chat-Int4, Qwen2.5-*-GPTQ-Int4)
holds instead: the projections of every layer in auto-gptq's packed tensors (round-to-nearest quantization of the
random float weights; see :mod:`qwen_agent.runtime.gptq`), everything else in fp16, ``quantize_config.json``, and
``quantization_config`` in ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from ..errors import ConfigError, VocabError
from .gptq import GPTQConfig, quantize_rtn
from .tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    PAT_STR,
    dashscope_vocab_path,
    load_tiktoken_ranks,
    unicode_to_byte,
)

__all__ = ["write_tiny_checkpoint", "qwen_7b_chat_config", "qwen_7b_chat_generation_config"]

Family = Literal["qwen", "qwen2"]
TokenizerFiles = Literal["vocab.json", "tokenizer.json"]
QUANTIZE_BITS = {"gptq-int4": 4, "gptq-int8": 8}
# the projections a GPTQ checkpoint quantizes, by the input they read: those sharing an input share its groups
_GPTQ_INPUTS = {
    "attn.c_attn": "attention in", "self_attn.q_proj": "attention in", "self_attn.k_proj": "attention in",
    "self_attn.v_proj": "attention in", "attn.c_proj": "attention out", "self_attn.o_proj": "attention out",
    "mlp.w1": "mlp in", "mlp.w2": "mlp in", "mlp.gate_proj": "mlp in", "mlp.up_proj": "mlp in",
    "mlp.c_proj": "mlp out", "mlp.down_proj": "mlp out",
}  # fmt: skip
PADDED_VOCAB_SIZE = 151936  # embedding rows of every Qwen checkpoint; the tokenizer has 151,851 ids


def qwen_7b_chat_config() -> dict[str, Any]:
    """``config.json`` of Qwen-7B-Chat (the September 2023 release), every key."""
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 22016,
        "kv_channels": 128,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": 32768,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 8192,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": PADDED_VOCAB_SIZE,
    }


def qwen_7b_chat_generation_config() -> dict[str, Any]:
    """``generation_config.json`` of Qwen-7B-Chat (the September 2023 release)."""
    return {
        "chat_format": "chatml",
        "do_sample": True,
        "eos_token_id": 151643,
        "max_new_tokens": 512,
        "max_window_size": 24000,
        "pad_token_id": 151643,
        "repetition_penalty": 1.1,
        "top_k": 0,
        "top_p": 0.8,
        "transformers_version": "4.32.0",
    }


def _qwen2_config(
    hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tied: bool, dtype: str
) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "model_type": "qwen2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": PADDED_VOCAB_SIZE,
    }


QWEN2_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_k": 20,
    "top_p": 0.8,
    "transformers_version": "4.43.1",
}

# The Qwen1.5/Qwen2 chat template: ChatML with a default system message.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The Qwen2.5 chat template, with its tool-call format: tools as JSON in the system turn, calls as JSON in
# <tool_call> tags, results in a user turn of <tool_response> blocks. The format's definition, kept byte for byte.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
# Qwen2.5's added tokens after ChatML's three (ids 151646..151664); <tool_call> and </tool_call> are not special.
QWEN25_EXTRA_TOKENS = (
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
ChatTemplateName = Literal["qwen2", "qwen2.5"]


def _qwen_tensors(hidden: int, layers: int, inter: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen v1 checkpoint, in the module order the real shards follow."""
    yield "transformer.wte.weight", (PADDED_VOCAB_SIZE, hidden)
    width = inter // 2  # Qwen's intermediate_size counts both MLP branches
    for i in range(layers):
        p = f"transformer.h.{i}."
        yield p + "ln_1.weight", (hidden,)
        yield p + "attn.c_attn.weight", (3 * hidden, hidden)
        yield p + "attn.c_attn.bias", (3 * hidden,)
        yield p + "attn.c_proj.weight", (hidden, hidden)
        yield p + "ln_2.weight", (hidden,)
        yield p + "mlp.w1.weight", (width, hidden)
        yield p + "mlp.w2.weight", (width, hidden)
        yield p + "mlp.c_proj.weight", (hidden, width)
    yield "transformer.ln_f.weight", (hidden,)
    yield "lm_head.weight", (PADDED_VOCAB_SIZE, hidden)


def _qwen2_tensors(
    hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tied: bool
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen2ForCausalLM checkpoint; tied models carry no ``lm_head.weight``."""
    yield "model.embed_tokens.weight", (PADDED_VOCAB_SIZE, hidden)
    kv = kv_heads * (hidden // heads)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.q_proj.bias", (hidden,)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.k_proj.bias", (kv,)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.bias", (kv,)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    if not tied:
        yield "lm_head.weight", (PADDED_VOCAB_SIZE, hidden)


def _layer_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[1] in ("h", "layers") else name


def _shard_cuts(names: list[str], num_shards: int) -> list[int]:
    """Indices where new shards begin: evenly spread by count, moved so that each cut falls inside a layer."""
    cuts = []
    for k in range(1, num_shards):
        cut = max(1, round(k * len(names) / num_shards))
        while cut < len(names) - 1 and _layer_of(names[cut - 1]) != _layer_of(names[cut]):
            cut += 1
        if cut < len(names) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    return cuts


@cache
def _byte_level_merges(vocab_file: str) -> tuple[dict[str, int], list[str]]:
    """``vocab.json`` entries and ``merges.txt`` lines equivalent to a ``qwen.tiktoken`` vocabulary.

    Each multi-byte token is the merge of the two parts that byte-pair encoding with all lower-ranked tokens
    leaves it in; that pair, in rank order, is its merge rule.
    """
    ranks = load_tiktoken_ranks(Path(vocab_file))
    to_char = {b: ch for ch, b in unicode_to_byte().items()}

    def spell(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            candidates = [
                (r, i)
                for i in range(len(parts) - 1)
                if (r := ranks.get(parts[i] + parts[i + 1], rank)) < rank
            ]
            if not candidates:
                raise VocabError(
                    f"{vocab_file}: token of rank {rank} cannot be built from lower-ranked tokens"
                )
            i = min(candidates)[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return {spell(t): r for t, r in ranks.items()}, merges


def write_tiny_checkpoint(
    path: str | Path,
    family: Family = "qwen",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    seq_length: int = 256,
    tie_word_embeddings: bool = False,
    num_shards: int = 3,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    init_std: float = 0.02,
    vocab_file: str | Path | None = None,
    tokenizer_files: TokenizerFiles = "vocab.json",
    chat_template: ChatTemplateName = "qwen2",
    config_overrides: dict[str, Any] | None = None,
    quantize: Literal["gptq-int4", "gptq-int8"] | None = None,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
) -> Path:
    """Write a random-weight model directory at ``path`` and return it.

    ``intermediate_size`` follows each family's convention (Qwen v1 counts both MLP branches, so its default is
    ``4 * hidden_size`` for a per-branch width of ``2 * hidden_size``). ``seq_length`` is Qwen v1's base length
    for dynamic NTK and logN attention, kept small so tests can cross it. ``tokenizer_files`` picks the form of a
    ``qwen2`` tokenizer: ``vocab.json`` + ``merges.txt``, or ``tokenizer.json`` alone. ``chat_template`` picks a ``qwen2``
    tokenizer's template and added tokens: Qwen1.5/Qwen2's plain ChatML, or ``"qwen2.5"``'s, with its tool-call
    format and the added tokens ``<tool_call>`` and ``</tool_call>``. ``config_overrides`` are merged into
    ``config.json`` last.

    ``quantize`` writes a GPTQ checkpoint (float tensors in fp16, whatever ``dtype``) with ``group_size`` (-1: one
    group), ``desc_act`` (each layer's inputs fill the groups in a random order, the same for the projections
    that read the same input, as GPTQ's activation order gives) and ``sym``.
    """
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_BITS)}, got {quantize!r}")
    gptq = None
    if quantize is not None:
        gptq = GPTQConfig(bits=QUANTIZE_BITS[quantize], group_size=group_size, desc_act=desc_act, sym=sym)
        dtype = "float16"
    if family not in ("qwen", "qwen2"):
        raise ConfigError(f"family must be 'qwen' or 'qwen2', got {family!r}")
    if hidden_size % num_heads:
        raise ConfigError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if tokenizer_files not in ("vocab.json", "tokenizer.json"):
        raise ConfigError(
            f"tokenizer_files must be 'vocab.json' or 'tokenizer.json', got {tokenizer_files!r}"
        )
    if chat_template not in ("qwen2", "qwen2.5"):
        raise ConfigError(f"chat_template must be 'qwen2' or 'qwen2.5', got {chat_template!r}")
    if family == "qwen" and chat_template != "qwen2":
        raise ConfigError("Qwen v1 checkpoints have no chat template; chat_template is for family='qwen2'")
    if family == "qwen" and tokenizer_files != "vocab.json":
        raise ConfigError("Qwen v1 checkpoints ship qwen.tiktoken; tokenizer_files is for family='qwen2'")
    if family == "qwen" and tie_word_embeddings:
        raise ConfigError(
            "Qwen v1 checkpoints have an untied lm_head; tie_word_embeddings is for family='qwen2'"
        )
    vocab_path = Path(vocab_file) if vocab_file else dashscope_vocab_path()
    if vocab_path is None:
        raise VocabError("no vocabulary: pass vocab_file=<qwen.tiktoken> or install the 'dashscope' package")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    if family == "qwen":
        inter = intermediate_size or 4 * hidden_size
        config = qwen_7b_chat_config() | {
            "hidden_size": hidden_size,
            "intermediate_size": inter,
            "kv_channels": hidden_size // num_heads,
            "num_attention_heads": num_heads,
            "num_hidden_layers": num_layers,
            "seq_length": seq_length,
        }
        shapes = list(_qwen_tensors(hidden_size, num_layers, inter))
        generation_config = qwen_7b_chat_generation_config()
        shutil.copyfile(vocab_path, out / "qwen.tiktoken")
        tokenizer_config = {
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            "model_max_length": seq_length,
            "tokenizer_class": "QWenTokenizer",
        }
    else:
        kv_heads = num_kv_heads or max(1, num_heads // 2)
        if num_heads % kv_heads:
            raise ConfigError(f"num_heads {num_heads} is not divisible by num_kv_heads {kv_heads}")
        inter = intermediate_size or 2 * hidden_size
        config = _qwen2_config(
            hidden_size, num_layers, num_heads, kv_heads, inter, tie_word_embeddings, dtype
        )
        shapes = list(
            _qwen2_tensors(hidden_size, num_layers, num_heads, kv_heads, inter, tie_word_embeddings)
        )
        generation_config = dict(QWEN2_GENERATION_CONFIG)
        tokenizer_config = _write_qwen2_tokenizer(out, vocab_path, tokenizer_files, chat_template)
    if gptq is not None:
        config |= {"torch_dtype": "float16", "quantization_config": gptq.to_json() | {"quant_method": "gptq"}}
        _write_json(out / "quantize_config.json", gptq.to_json())
    config |= config_overrides or {}

    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("norm.weight") or ".ln_" in name:  # norms near 1, so their weights matter in tests
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = init_std * torch.randn(shape, generator=generator)
        tensors[name] = value.to(torch_dtype)
    if gptq is not None:
        tensors = _quantized(tensors, gptq, generator)

    names = list(tensors)
    bounds = [0, *_shard_cuts(names, num_shards), len(names)]
    total = len(bounds) - 1
    weight_map: dict[str, str] = {}
    for k in range(total):
        shard = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[bounds[k] : bounds[k + 1]]}
        save_file(chunk, str(out / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, shard)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}

    _write_json(out / "model.safetensors.index.json", index)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation_config)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def _added_token(token: str) -> dict[str, Any]:
    flags = dict.fromkeys(("lstrip", "normalized", "rstrip", "single_word"), False)
    return {"content": token, **flags, "special": token not in ("<tool_call>", "</tool_call>")}


def _write_qwen2_tokenizer(
    out: Path, vocab_path: Path, files: TokenizerFiles, template_name: ChatTemplateName = "qwen2"
) -> dict[str, Any]:
    """Write the Qwen2 tokenizer files in the chosen form; return ``tokenizer_config.json``'s content."""
    vocab, merges = _byte_level_merges(str(vocab_path.resolve()))
    tokens = (ENDOFTEXT, IM_START, IM_END, *(QWEN25_EXTRA_TOKENS if template_name == "qwen2.5" else ()))
    added = [(len(vocab) + i, tok) for i, tok in enumerate(tokens)]
    template = QWEN25_CHAT_TEMPLATE if template_name == "qwen2.5" else QWEN2_CHAT_TEMPLATE
    shared = {
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if files == "vocab.json":
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return dict(
            sorted(
                (
                    shared
                    | {
                        "added_tokens_decoder": {str(idx): _added_token(tok) for idx, tok in added},
                        "additional_special_tokens": [IM_START, IM_END],
                        "chat_template": template,
                    }
                ).items()
            )
        )
    # transformers 5 keeps the added tokens in tokenizer.json only and the chat template in its own file
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": idx, **_added_token(tok)} for idx, tok in added],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [merge.split(" ") for merge in merges],
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    extra = {
        "add_prefix_space": None,
        "backend": "tokenizers",
        "extra_special_tokens": [IM_START, IM_END],
        "is_local": True,
        "local_files_only": False,
    }
    return dict(sorted((shared | extra).items()))


def _quantized(
    tensors: dict[str, torch.Tensor], gptq: GPTQConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The same tensors in the same order, each layer's projections replaced by auto-gptq's packed tensors."""
    out: dict[str, torch.Tensor] = {}
    orders: dict[tuple[str, str], torch.Tensor] = {}  # (layer, input) -> the order its inputs fill the groups
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        layer, _, kind = module.partition(".h.") if ".h." in module else module.partition(".layers.")
        index, _, projection = kind.partition(".")
        if projection not in _GPTQ_INPUTS or not name.endswith(".weight"):
            out[name] = value
            continue
        key = (f"{layer}.{index}", _GPTQ_INPUTS[projection])
        if gptq.desc_act and key not in orders:
            orders[key] = torch.randperm(value.shape[1], generator=generator)
        packed = quantize_rtn(value.float(), gptq, orders.get(key))
        out |= {f"{module}.{part}": tensor for part, tensor in packed.items()}
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
