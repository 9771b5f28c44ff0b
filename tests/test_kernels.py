"""kernels.py: each fused Triton kernel against the PyTorch code it replaces, then the fused decode step and
generation against the plain ones. Without a GPU the kernels run on Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), which rounds fp32 to bf16 towards zero where a GPU rounds to nearest; a GPU fuses
multiply-adds and approximates exp. So bf16 results are compared within two bf16 steps."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import greedy_token_ids, interpreter_runs_kernels, peaked_tiny_model, prefill_row

triton = pytest.importorskip("triton")

from qwen_agent.errors import ConfigError, GenerationError  # noqa: E402
from qwen_agent.runtime import decode_runner, kernels  # noqa: E402
from qwen_agent.runtime.config import CONFIGS, GenerationConfig  # noqa: E402
from qwen_agent.runtime.decode_runner import DecodeRunner  # noqa: E402
from qwen_agent.runtime.engine import QwenEngine  # noqa: E402
from qwen_agent.runtime.model import KVCache, RMSNorm, Transformer, apply_rotary  # noqa: E402
from qwen_agent.runtime.tokenizer import QwenTokenizer  # noqa: E402

ON_INTERPRETER = pytest.mark.skipif(
    not interpreter_runs_kernels(),
    reason="Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, Triton >= 3.7)",
)
DEVICES = [
    pytest.param("cpu", marks=ON_INTERPRETER),
    pytest.param("cuda", marks=pytest.mark.requires_gpu),
]
DTYPES = [torch.float32, torch.bfloat16]
V1 = replace(CONFIGS["tiny"], seq_length=16)  # NTK and logN on, crossed by the test prompts
QWEN2 = replace(CONFIGS["tiny"], family="qwen2", num_kv_heads=2, use_dynamic_ntk=False, use_logn_attn=False)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 step is 2**-8 to 2**-7 of the value: two steps allowed
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-3)


def randn(*shape: int, device: str, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_equals_the_residual_add_and_rmsnorm(device, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6).to(device=device, dtype=dtype)
    norm.weight.data = randn(96, device=device, dtype=dtype) + 1
    x, delta = (
        randn(3, 1, 96, device=device, dtype=dtype, scale=3),
        randn(3, 1, 96, device=device, dtype=dtype),
    )
    out, total = kernels.add_rms_norm(x, norm.weight, norm.eps, delta)
    assert_close(total, x + delta)
    assert_close(out, norm(x + delta))
    alone, same = kernels.add_rms_norm(x, norm.weight, norm.eps)  # the first layer: no residual yet
    assert same is x
    assert_close(alone, norm(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_up_times_silu_of_gate(device, dtype):
    torch.manual_seed(1)
    gate, up = (
        randn(5, 1, 300, device=device, dtype=dtype, scale=4),
        randn(5, 1, 300, device=device, dtype=dtype),
    )
    assert_close(kernels.silu_mul(torch.cat([gate, up], dim=-1)), up * F.silu(gate))


def small_ints(*shape: int, device: str, dtype: torch.dtype, top: int = 2) -> torch.Tensor:
    """Integers in -top..top: the products' sums are then exact in fp32 and bf16, whatever their order."""
    return torch.randint(-top, top + 1, shape).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matvec_equals_the_ops_it_replaces(device, dtype):
    """The product alone, after RMSNorm, with the SiLU gate, with the residual add; K and N not multiples of the
    blocks (the edges are masked)."""
    torch.manual_seed(5)
    K, N = 200, 70
    x, w = small_ints(1, 1, K, device=device, dtype=dtype), small_ints(N, K, device=device, dtype=dtype)
    residual = small_ints(1, 1, N, device=device, dtype=dtype)
    norm = RMSNorm(K, 0.0).to(device=device, dtype=dtype)
    norm.weight.data = small_ints(K, device=device, dtype=dtype)
    level = (torch.randint(0, 2, (1, 1, K)) * 4 - 2).to(device=device, dtype=dtype)  # +-2: an RMS of 2
    blocks = {"block_n": 16, "block_k": 64}

    assert torch.equal(kernels.matvec(x, w, **blocks), F.linear(x, w))  # sums of small integers: exact
    assert torch.equal(kernels.matvec(x, w, residual=residual, **blocks), residual + F.linear(x, w))
    gate, up = F.linear(x, w).chunk(2, dim=-1)
    assert_close(kernels.matvec(x, w, gated=True, **blocks), up * F.silu(gate))
    # +-2 normalised is +-1 (a GPU's rsqrt is approximate: in fp32, within an ulp or so)
    assert_close(kernels.matvec(level, w, norm=(norm.weight, norm.eps), **blocks), F.linear(norm(level), w))
    assert kernels.matvec(x[0, 0], w).shape == (N,)  # any leading dimensions of size 1, default blocks


def test_matvec_names_what_does_not_fit():
    w = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="one row; x has shape \\(2, 4\\)"):
        kernels.matvec(torch.zeros(2, 4), w)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.matvec(torch.zeros(1, 4, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="norm's weight has 3 values for rows of 4"):
        kernels.matvec(torch.zeros(1, 4), w, norm=(torch.ones(3), 1e-6))
    with pytest.raises(ValueError, match="residual has 8 values for 4 outputs"):
        kernels.matvec(torch.zeros(1, 4), w, gated=True, residual=torch.zeros(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_rotary_to_cache_rotates_scales_and_writes_only_the_rows_slots(device, dtype, config):
    torch.manual_seed(2)
    model = Transformer(config).to(device)
    H, Hkv, D = config.num_heads, config.num_kv_heads, config.head_dim
    slots = torch.tensor([3, 40, 17], device=device)  # row 1 is past seq_length: logN scales its query
    alpha = torch.tensor([1.0, 3.0, 1.0], device=device)  # and its NTK alpha is not 1
    cos, sin = model._rotary(slots[:, None], alpha)
    q_scale = model._logn_scale(slots[:, None]) if config.use_logn_attn else None
    # the projection without its bias, and the bias: on grids of 1/32 and 1/4 below 4, so that their sum is exact
    # in bf16 whatever the rounding (the interpreter truncates) and the test sees only the kernel's maths
    qkv = (torch.randn(3, 1, (H + 2 * Hkv) * D) * 2).clamp(-3.9, 3.9).mul(32).round().div(32)
    bias = torch.randn((H + 2 * Hkv) * D).clamp(-3.7, 3.7).mul(4).round().div(4)
    qkv, bias = qkv.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)
    k_cache, v_cache = (
        randn(4, Hkv, 48, D, device=device, dtype=dtype) for _ in range(2)
    )  # one layer, 4 rows
    k_want, v_want = k_cache.clone(), v_cache.clone()

    q = kernels.rotary_to_cache(qkv, bias, cos, sin, q_scale, k_cache, v_cache, slots, H, Hkv)

    q_ref, k_ref, v_ref = (qkv + bias).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q_ref = apply_rotary(q_ref.view(3, 1, H, D).transpose(1, 2), cos, sin)
    if q_scale is not None:
        q_ref = q_ref * q_scale.to(dtype)
    k_ref = apply_rotary(k_ref.view(3, 1, Hkv, D).transpose(1, 2), cos, sin)
    rows = torch.arange(3, device=device)
    k_want[rows, :, slots] = k_ref[:, :, 0]
    v_want[rows, :, slots] = v_ref.view(3, Hkv, D)
    assert q.shape == (3, H, 1, D)
    assert_close(q, q_ref)
    assert_close(k_cache, k_want)
    assert torch.equal(v_cache, v_want)  # values are copied: exact, and no other slot or row is touched
    written = torch.zeros(4, 48, dtype=torch.bool, device=device)
    written[rows, slots] = True
    assert torch.equal(k_cache.transpose(1, 2)[~written], k_want.transpose(1, 2)[~written])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [V1, QWEN2], ids=["qwen", "qwen2"])
def test_fused_decode_step_equals_the_plain_one(device, config):
    torch.manual_seed(3)
    model = Transformer(config).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.3)
    model.to(device)
    lengths = [5, 20, 9]  # the 20-token row is past seq_length 16
    logits = {}
    for fused in (False, True):
        cache = KVCache(config, 3, 64, dtype=torch.float32, device=device)
        with torch.no_grad():
            for row, n in enumerate(lengths):
                prefill_row(model, torch.arange(3, 3 + n, device=device), cache, row)
            slots, steps = torch.tensor(lengths, device=device), []
            for t in range(3):
                tokens = torch.tensor([7, 8, 9], device=device) + t
                steps.append(model.decode_step(tokens, slots, cache, 32, fused=fused))
                slots = slots + 1
        logits[fused] = torch.stack(steps)
    assert_close(logits[True], logits[False])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("config", "dtype"), [(V1, torch.bfloat16), (QWEN2, torch.float32)], ids=["qwen-bf16", "qwen2-fp32"]
)
def test_one_row_step_through_matvec_equals_the_plain_one(device, config, dtype):
    """One row whose steps cross seq_length (NTK and logN); the step ends in matvec's RMSNorm and output product."""
    torch.manual_seed(3)
    model = Transformer(config).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.3)
    model.to(device=device, dtype=dtype)
    logits = {}
    for matvec in (False, True):
        cache = KVCache(config, 1, 64, dtype=dtype, device=device)
        with torch.no_grad():
            prefill_row(model, torch.arange(3, 17, device=device), cache, 0)
            slots, steps = torch.tensor([14], device=device), []
            for t in range(4):
                tokens = torch.tensor([7 + t], device=device)
                steps.append(model.decode_step(tokens, slots, cache, 32, fused=matvec, matvec=matvec))
                slots = slots + 1
        logits[matvec] = torch.stack(steps)
    if dtype == torch.float32:
        assert_close(logits[True], logits[False])
    else:  # two layers of bf16 activations rounded in other places: logits within a few bf16 steps of their size
        torch.testing.assert_close(
            logits[True], logits[False], rtol=0, atol=logits[False].abs().max().item() / 32
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("matvec", [False, True], ids=["cublas", "matvec"])
def test_greedy_generation_with_fused_kernels_equals_without(device, matvec):
    model, tokenizer = peaked_tiny_model(device), QwenTokenizer.from_pretrained()
    prompts = [tokenizer.encode(t) for t in ("Hi", "A longer prompt with more tokens in it", "x " * 20)]
    if matvec:  # one-row steps, which matvec serves; fewer, as the interpreter takes a second a step
        rows, prompts, new_tokens = 1, prompts[1:], 4
    else:
        rows, new_tokens = 2, 6
    results = {}
    for fused in (False, True):
        cache = KVCache(model.config, rows, 128, dtype=torch.float32, device=device)
        runner = DecodeRunner(model, cache, fused=fused, matvec=matvec)
        results[fused] = greedy_token_ids(runner, tokenizer, prompts, new_tokens)
    assert results[True] == results[False]


def test_fused_kernels_need_triton_on_a_gpu_or_its_interpreter(monkeypatch):
    cache = KVCache(CONFIGS["tiny"], 1, 8, dtype=torch.float32, device="cpu")
    model = peaked_tiny_model()
    assert DecodeRunner(model, cache).fused is False  # off by default on a CPU, even with the interpreter on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="fused_kernels=True needs a CUDA device .*the model is on cpu"):
        DecodeRunner(model, cache, fused=True)


def test_fused_kernels_need_a_power_of_two_head_size(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check, on a GPU machine too
    config = replace(CONFIGS["tiny"], hidden_size=48, num_heads=4, num_kv_heads=4, head_dim=12)
    model = Transformer(config)
    cache = KVCache(config, 1, 8, dtype=torch.float32, device="cpu")
    assert not decode_runner.fused_by_default(torch.device("cuda"), config.head_dim)
    with pytest.raises(ConfigError, match="a head size that is a power of two >= 16, not 12"):
        DecodeRunner(model, cache, fused=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "heads", "kv_heads"), [(1, 4, 4), (3, 4, 2), (2, 6, 2)])
@pytest.mark.parametrize("splits", [None, 1])
def test_decode_attention_equals_masked_attention_over_each_rows_slots(
    device, dtype, rows, heads, kv_heads, splits
):
    """Rows of different lengths (one slot, a few, past several position blocks); grouped heads, three per key
    head included; positions split over several programs (by default, with so few rows and heads) or not."""
    torch.manual_seed(4)
    D, capacity = 16, 300
    q = randn(rows, heads, 1, D, device=device, dtype=dtype)
    k_cache, v_cache = (randn(rows + 1, kv_heads, capacity, D, device=device, dtype=dtype) for _ in range(2))
    slots = torch.tensor([0, 150, 37][:rows] if rows > 1 else [263], device=device)

    got = kernels.decode_attention(q, k_cache, v_cache, slots, splits=splits)

    allowed = torch.arange(capacity, device=device)[None, :] <= slots[:, None]
    k = k_cache[:rows].repeat_interleave(heads // kv_heads, dim=1)
    v = v_cache[:rows].repeat_interleave(heads // kv_heads, dim=1)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed[:, None, None])
    assert got.shape == (rows, 1, heads * D)
    assert_close(got, want.to(dtype).reshape(rows, 1, heads * D))


def test_a_fused_runner_needs_one_shape_per_row_count(monkeypatch):
    """The fused step reads each row's own slots, so the slots read are never rounded: any length, one shape."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check, on a GPU machine too
    cache = KVCache(CONFIGS["tiny"], 4, 1280, dtype=torch.float32, device="cpu")
    runner = DecodeRunner(peaked_tiny_model(), cache, fused=True)
    assert runner.buckets(1, 1) == runner.buckets(1, 1000) == (1, 1280)
    assert runner.buckets(3, 257) == (4, 1280)


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_with_fused_kernels_equals_without(device):
    """Batched generation, then two single-prompt calls where the second copies the first's blocks in from the
    prefix cache (and reuses its runner): the same tokens with the kernels as without."""
    model, tokenizer = peaked_tiny_model(device), QwenTokenizer.from_pretrained()
    longer = (
        "Some other words, quite a few of them, enough to fill more than two blocks of the prefix cache. " * 2
    )
    prompts = [tokenizer.encode(t) for t in ("Hello", longer)]
    outputs = {}
    for fused in (False, True):
        engine = QwenEngine(model, tokenizer, GenerationConfig(chat_format="raw"), fused_kernels=fused)
        batch = engine.generate(prompts, max_new_tokens=4, do_sample=False)
        first = engine.generate(prompts[1], max_new_tokens=4, do_sample=False)
        second = engine.generate(prompts[1] + first.token_ids + prompts[0], max_new_tokens=4, do_sample=False)
        # whole 16-token blocks of the first call's prompt and reply come from the cache, the rest is prefilled
        assert second.cached_tokens == (len(prompts[1]) + len(first.token_ids) - 1) // 16 * 16 >= 32
        assert (
            second.prefill_tokens
            == len(prompts[1]) + len(first.token_ids) + len(prompts[0]) - second.cached_tokens
        )
        outputs[fused] = [r.token_ids for r in (*batch, first, second)]
    assert outputs[True] == outputs[False]


@ON_INTERPRETER  # the kernels before the broken one run on CPU tensors
def test_kernels_that_fail_fall_back_to_plain_ops_only_when_not_asked_for(monkeypatch):
    """A Triton that cannot compile for the GPU at hand: the default falls back, with a warning, to the plain
    step (the same logits); an explicit fused=True says what failed and how to turn the kernels off."""
    model = peaked_tiny_model()

    def broken(*args, **kwargs):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_90a")

    monkeypatch.setattr(kernels, "silu_mul", broken)
    monkeypatch.setattr(decode_runner, "fused_by_default", lambda device, head_dim: True)
    logits = {}
    for fused in (None, False):
        cache = KVCache(model.config, 1, 32, dtype=torch.float32, device="cpu")
        runner = DecodeRunner(model, cache, fused=fused)
        runner.tokens[0], runner.slots[0] = 7, 0
        if fused is None:
            with pytest.warns(UserWarning, match="fused decode kernels failed .*sm_90a.*plain PyTorch ops"):
                logits[fused] = runner(1, 1).clone()
            assert runner.fused is False
        else:
            logits[fused] = runner(1, 1).clone()
    assert torch.equal(logits[None], logits[False])
    runner = DecodeRunner(model, KVCache(model.config, 1, 32, dtype=torch.float32, device="cpu"), fused=True)
    with pytest.raises(
        GenerationError, match="sm_90a \\(fused_kernels=False decodes with plain PyTorch ops\\)"
    ):
        runner(1, 1)


def test_every_kernel_compiles_for_an_h100_without_one(tmp_path):
    """Triton's compiler, not its interpreter, on each kernel at the launch configurations used (see
    tests/sm90_compile.py); a cache directory of its own, so that each kernel really is compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TRITON_CACHE_DIR": str(tmp_path)}
    script = Path(__file__).with_name("sm90_compile.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == 32, out.stdout
