"""model.py against transformers' native Qwen2ForCausalLM on the same random weights (CPU, fp32).

Qwen v1 weights are renamed per the reference's Qwen2 mapping (c_attn rows split into q/k/v, w2 -> gate,
w1 -> up), written here independently of checkpoint.py's map. Past seq_length, Qwen2 cannot express Qwen v1's
rules, so the expected values come from the reference formulas: the rotary base becomes theta * alpha^(d/(d-2))
and queries are scaled by log(p+1)/log(seq_length) (patched into transformers' rotary function).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from tiny_models import prefill_row
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2 import modeling_qwen2

from qwen_agent.runtime.checkpoint import weight_name_map
from qwen_agent.runtime.config import CONFIGS, QwenConfig, ntk_alpha
from qwen_agent.runtime.model import KVCache, Transformer

TOL = 1e-4
V1 = replace(CONFIGS["tiny"], vocab_size=512)  # seq_length 32, NTK and logN on
QWEN2 = QwenConfig(
    family="qwen2",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rope_theta=1_000_000.0,
    seq_length=64,
    max_context=64,
)


def random_hf_weights(config: QwenConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the checkpoint names of ``config``'s family, with the shapes HF would have."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    shapes = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    rows = {"q": config.num_heads * config.head_dim, "k": config.num_kv_heads * config.head_dim}
    rows["v"] = rows["k"]
    weights: dict[str, torch.Tensor] = {}
    for ours, sources in weight_name_map(config).items():
        for source in sources:
            shape = list(shapes[ours])
            if len(sources) == 3:
                shape[0] = rows[source.split(".")[-2][0]]
            elif len(sources) == 2:  # gate and up
                shape[0] = config.intermediate_size
            if source.endswith("norm.weight") or ".ln_" in source:
                weights[source] = 1 + 0.1 * torch.randn(shape, generator=g)
            else:
                weights[source] = 0.08 * torch.randn(shape, generator=g)
    return weights


def ours_from_hf(config: QwenConfig, weights: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(config)
    state = {o: torch.cat([weights[s] for s in src]) for o, src in weight_name_map(config).items()}
    model.load_state_dict(state)
    return model.eval()


def v1_to_qwen2_names(weights: dict[str, torch.Tensor], config: QwenConfig) -> dict[str, torch.Tensor]:
    """Reference section 1.6, written out."""
    d = config.num_heads * config.head_dim
    out = {
        "model.embed_tokens.weight": weights["transformer.wte.weight"],
        "model.norm.weight": weights["transformer.ln_f.weight"],
        "lm_head.weight": weights["lm_head.weight"],
    }
    for i in range(config.num_layers):
        h, m = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            fused = weights[h + f"attn.c_attn.{kind}"]
            for j, p in enumerate("qkv"):
                out[m + f"self_attn.{p}_proj.{kind}"] = fused[j * d : (j + 1) * d]
        out[m + "self_attn.o_proj.weight"] = weights[h + "attn.c_proj.weight"]
        out[m + "input_layernorm.weight"] = weights[h + "ln_1.weight"]
        out[m + "post_attention_layernorm.weight"] = weights[h + "ln_2.weight"]
        out[m + "mlp.gate_proj.weight"] = weights[h + "mlp.w2.weight"]
        out[m + "mlp.up_proj.weight"] = weights[h + "mlp.w1.weight"]
        out[m + "mlp.down_proj.weight"] = weights[h + "mlp.c_proj.weight"]
    return out


def hf_model(config: QwenConfig, weights: dict[str, torch.Tensor], rope_theta: float | None = None):
    hf_config = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=rope_theta or config.rope_theta,
        max_position_embeddings=4096,
        tie_word_embeddings=config.tie_word_embeddings,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(hf_config)
    if config.family == "qwen":
        weights = v1_to_qwen2_names(weights, config)
    model.load_state_dict(weights, strict=not config.tie_word_embeddings)
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def logn_in_transformers(monkeypatch):
    """Patch transformers' Qwen2 rotary step to also scale queries by the reference logN formula."""

    def install(seq_length: int) -> None:
        original = modeling_qwen2.apply_rotary_pos_emb

        def with_logn(q, k, cos, sin, *args, **kwargs):
            q, k = original(q, k, cos, sin, *args, **kwargs)
            n = torch.arange(1, q.shape[2] + 1, dtype=torch.float64)  # p + 1 for full-sequence calls
            scale = torch.where(n > seq_length, n.log() / math.log(seq_length), torch.ones_like(n))
            return q * scale.float()[None, None, :, None], k

        monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", with_logn)

    return install


def random_ids(n: int, vocab: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [1, 2, 17, V1.seq_length])
def test_v1_logits_equal_transformers_qwen2_up_to_seq_length(length):
    weights = random_hf_weights(V1)
    ids = random_ids(length, V1.vocab_size, batch=2)
    with torch.no_grad():
        ours = ours_from_hf(V1, weights)(ids)
    expected = hf_logits(hf_model(V1, weights), ids)
    assert ours.shape == (2, length, V1.vocab_size)
    assert (ours - expected).abs().max().item() <= TOL
    assert expected.abs().max() > 0.5  # the comparison is between non-trivial logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("length", [1, 13, QWEN2.seq_length])
def test_qwen2_family_logits_equal_transformers(length, tied):
    config = replace(QWEN2, tie_word_embeddings=tied)
    weights = random_hf_weights(config, seed=3)
    ids = random_ids(length, config.vocab_size, seed=4)
    with torch.no_grad():
        ours = ours_from_hf(config, weights)(ids)
    assert (ours - hf_logits(hf_model(config, weights), ids)).abs().max().item() <= TOL


def test_swapping_gate_and_up_is_detected():
    """The parity check is sensitive to the w1/w2 roles the reference pins down."""
    weights = random_hf_weights(V1)
    swapped = dict(weights)
    for i in range(V1.num_layers):
        a, b = f"transformer.h.{i}.mlp.w1.weight", f"transformer.h.{i}.mlp.w2.weight"
        swapped[a], swapped[b] = weights[b], weights[a]
    ids = random_ids(9, V1.vocab_size)
    with torch.no_grad():
        ours = ours_from_hf(V1, swapped)(ids)
    assert (ours - hf_logits(hf_model(V1, weights), ids)).abs().max().item() > 100 * TOL


@pytest.mark.parametrize(
    "length, seq_length, alpha",
    [
        (1, 8192, 1),
        (8192, 8192, 1),
        (8193, 8192, 3),
        (16384, 8192, 3),
        (16385, 8192, 7),
        (32767, 8192, 7),
        (2048, 2048, 1),
        (2049, 2048, 3),
        (4097, 2048, 7),
        (8193, 2048, 15),
        (16384, 2048, 15),
    ],
)
def test_ntk_alpha_matches_reference_table(length, seq_length, alpha):
    assert ntk_alpha(length, seq_length) == alpha


def test_ntk_past_seq_length_equals_qwen2_with_the_reference_base():
    config = replace(V1, use_logn_attn=False)
    length = 45  # seq_length 32 -> alpha 3
    weights = random_hf_weights(config)
    ids = random_ids(length, config.vocab_size)
    d = config.head_dim
    theta = config.rope_theta * ntk_alpha(length, config.seq_length) ** (d / (d - 2))
    with torch.no_grad():
        ours = ours_from_hf(config, weights)(ids)
    assert (ours - hf_logits(hf_model(config, weights, rope_theta=theta), ids)).abs().max().item() <= TOL
    # and the NTK rule really changes the result against plain RoPE
    assert (ours - hf_logits(hf_model(config, weights), ids)).abs().max().item() > 100 * TOL


def test_logn_and_ntk_past_seq_length_follow_the_reference_formulas(logn_in_transformers):
    length = 70  # seq_length 32 -> alpha 7
    weights = random_hf_weights(V1)
    ids = random_ids(length, V1.vocab_size)
    d = V1.head_dim
    theta = V1.rope_theta * 7 ** (d / (d - 2))
    with torch.no_grad():
        ours = ours_from_hf(V1, weights)(ids)
    without_logn = hf_logits(hf_model(V1, weights, rope_theta=theta), ids)
    logn_in_transformers(V1.seq_length)
    expected = hf_logits(hf_model(V1, weights, rope_theta=theta), ids)
    assert (ours - expected).abs().max().item() <= TOL
    assert (ours - without_logn).abs().max().item() > 100 * TOL  # logN is really applied past seq_length
    assert (
        ours[:, : V1.seq_length] - without_logn[:, : V1.seq_length]
    ).abs().max().item() <= TOL  # ...only there


def test_alpha_is_frozen_at_prefill_for_cached_decoding(logn_in_transformers):
    """Prefill 20 tokens (alpha 1), decode to 45: every step matches the alpha-1 reference, not a recompute."""
    weights = random_hf_weights(V1)
    model = ours_from_hf(V1, weights)
    ids = random_ids(45, V1.vocab_size)
    logn_in_transformers(V1.seq_length)
    expected = hf_logits(hf_model(V1, weights), ids)  # theta unchanged: alpha 1 throughout, logN applied
    cache = KVCache(V1, 1, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        steps = [model(ids[:, :20], cache)]
        steps += [model(ids[:, t : t + 1], cache) for t in range(20, 45)]
        recomputed = model(ids)  # a fresh 45-token prefill uses alpha 3
    cached = torch.cat(steps, dim=1)
    assert cache.ntk_alpha.item() == 1.0
    assert (cached - expected).abs().max().item() <= TOL
    assert (cached[:, -1] - recomputed[:, -1]).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_kv_cached_decoding_equals_full_forward(config):
    model = ours_from_hf(config, random_hf_weights(config, seed=5))
    ids = random_ids(30, config.vocab_size, seed=6)
    cache = KVCache(config, 1, 40, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        full = model(ids)
        pieces = [
            model(ids[:, :10], cache),
            model(ids[:, 10:17], cache),
        ]  # prefill, then a chunk after a prefix
        pieces += [model(ids[:, t : t + 1], cache) for t in range(17, 30)]
    assert cache.length == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


def test_cache_length_rewind_reuses_a_prefix():
    model = ours_from_hf(V1, random_hf_weights(V1))
    a, b = random_ids(20, V1.vocab_size, seed=7), random_ids(20, V1.vocab_size, seed=8)
    prompt_b = torch.cat([a[:, :12], b[:, :8]], dim=1)
    cache = KVCache(V1, 1, 32, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(a, cache)
        cache.length = 12  # keep the common prefix, forget the rest
        continued = model(prompt_b[:, 12:], cache, last_only=True)
        fresh = model(prompt_b)[:, -1:]
    assert (continued - fresh).abs().max().item() <= TOL


@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_decode_step_with_rows_of_different_lengths_equals_each_row_alone(config):
    """decode_step: each cache row at its own slot, attention over a fixed number of slots (a bucket)."""
    model = ours_from_hf(config, random_hf_weights(config, seed=11))
    lengths = [7, 3, 12]
    rows = [random_ids(n, config.vocab_size, seed=40 + n)[0] for n in lengths]
    extra = random_ids(4, config.vocab_size, seed=50, batch=len(rows))
    cache = KVCache(config, len(rows), 32, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for i, row in enumerate(rows):  # rows join one at a time, each prefilled alone into its own row
            prefill_row(model, row, cache, i)
        slots = torch.tensor(lengths)
        steps = []
        for t in range(extra.shape[1]):
            steps.append(model.decode_step(extra[:, t], slots, cache, kv_len=16 if t < 2 else 32))
            slots = slots + 1
        for i, row in enumerate(rows):
            alone = model(torch.cat([row, extra[i]])[None])[0, len(row) :]
            got = torch.stack([step[i] for step in steps])
            assert (got - alone).abs().max().item() <= TOL


@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_padded_prompts_prefilled_together_equal_each_prompt_alone(config):
    """prefill: right-padded prompts of different lengths into scattered rows, one of them past seq_length (its
    own NTK alpha and logN); the logits, the rows' cached keys and the decode step after them are each alone's."""
    model = ours_from_hf(config, random_hf_weights(config, seed=14))
    lengths = [5, config.seq_length + 8, 12]
    rows = [3, 0, 2]
    prompts = [random_ids(n, config.vocab_size, seed=60 + n)[0] for n in lengths]
    width = max(lengths)
    padded = torch.stack([torch.cat([p, torch.full((width - len(p),), 7)]) for p in prompts])
    cache = KVCache(config, 4, width + 4, dtype=torch.float32, device="cpu")
    cache.k.fill_(1e4)  # a slot the prefill should have written and did not would show
    with torch.no_grad():
        logits = model.prefill(padded, torch.tensor(lengths), cache, torch.tensor(rows))
        nxt = random_ids(1, config.vocab_size, seed=70, batch=4)[:, 0]
        slots = torch.zeros(4, dtype=torch.long)
        slots[rows] = torch.tensor(lengths)
        stepped = model.decode_step(nxt, slots, cache, kv_len=width + 1)
        for b, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
            alone_cache = KVCache(config, 1, width + 4, dtype=torch.float32, device="cpu")
            alone = model(prompt[None], alone_cache, last_only=True)[0, -1]
            assert (logits[b] - alone).abs().max().item() <= TOL
            n = len(prompt)
            assert torch.equal(cache.ntk_alpha[row], alone_cache.ntk_alpha[0])
            assert (cache.k[:, row, :, :n] - alone_cache.k[:, 0, :, :n]).abs().max().item() <= TOL
            after = model(torch.cat([prompt, nxt[row : row + 1]])[None])[0, -1]
            assert (stepped[row] - after).abs().max().item() <= TOL
    if config.use_dynamic_ntk:
        assert cache.ntk_alpha[rows].tolist() == [1.0, 3.0, 1.0]


@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_prompts_prefilled_after_cached_prefixes_equal_each_prompt_alone(config):
    """prefill with a start per row: each row already holds its prompt's first ``start`` keys and values (as the
    prefix cache copies them in); the rest of every prompt is prefilled in one call, one of them past seq_length
    (its alpha, logN) and one whose padding runs past the cache's end. Logits and keys are each alone's."""
    model = ours_from_hf(config, random_hf_weights(config, seed=16))
    lengths, starts, rows = [config.seq_length + 8, 36, 20], [0, 32, 16], [1, 2, 0]
    prompts = [random_ids(n, config.vocab_size, seed=90 + n)[0] for n in lengths]
    capacity = max(lengths) + 4  # row 2 starts at 32: its padding would reach slot 32 + width
    cache = KVCache(config, 3, capacity, dtype=torch.float32, device="cpu")
    alone = []
    with torch.no_grad():
        for prompt, start, row in zip(prompts, starts, rows, strict=True):
            alone_cache = KVCache(config, 1, capacity, dtype=torch.float32, device="cpu")
            alone.append((model(prompt[None], alone_cache, last_only=True)[0, -1], alone_cache))
            cache.k[:, row, :, :start] = alone_cache.k[:, 0, :, :start]
            cache.v[:, row, :, :start] = alone_cache.v[:, 0, :, :start]
        new = [prompt[start:] for prompt, start in zip(prompts, starts, strict=True)]
        width = max(map(len, new))
        padded = torch.stack([torch.cat([part, torch.full((width - len(part),), 7)]) for part in new])
        news = torch.tensor([len(part) for part in new])
        logits = model.prefill(padded, news, cache, torch.tensor(rows), starts)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        want, alone_cache = alone[b]
        assert (logits[b] - want).abs().max().item() <= TOL
        assert (cache.k[:, row, :, :n] - alone_cache.k[:, 0, :, :n]).abs().max().item() <= TOL
        assert torch.equal(cache.ntk_alpha[row], alone_cache.ntk_alpha[0])


def test_decode_step_past_seq_length_keeps_the_prefill_alpha_and_logn(logn_in_transformers):
    """Past seq_length, decode_step decodes as cached forward() steps do: alpha frozen at prefill, logN scaled."""
    model = ours_from_hf(V1, random_hf_weights(V1, seed=12))
    prompt = random_ids(V1.seq_length + 5, V1.vocab_size, seed=13)
    extra = random_ids(3, V1.vocab_size, seed=14)
    eager = KVCache(V1, 1, 64, dtype=torch.float32, device="cpu")
    static = KVCache(V1, 1, 64, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(prompt, eager, last_only=True)
        model(prompt, static, last_only=True)
        for t in range(3):
            want = model(extra[:, t : t + 1], eager)[:, -1]
            got = model.decode_step(extra[:, t], torch.tensor([prompt.shape[1] + t]), static, kv_len=64)
            assert (got - want).abs().max().item() <= TOL
