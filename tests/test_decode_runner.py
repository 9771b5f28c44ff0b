"""decode_runner.py: bucketed shapes, the eager path on CPU, and (on a CUDA GPU) graph replay against eager."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import greedy_token_ids, peaked_tiny_model, prefill_row

from qwen_agent.runtime.config import CONFIGS, GenerationConfig
from qwen_agent.runtime.decode_runner import MIN_SLOT_BUCKET, DecodeRunner
from qwen_agent.runtime.engine import QwenEngine
from qwen_agent.runtime.model import KVCache, Transformer
from qwen_agent.runtime.tokenizer import QwenTokenizer

CONFIG = CONFIGS["tiny"]
QWEN2 = replace(  # grouped KV heads, no NTK or logN
    CONFIG, family="qwen2", num_kv_heads=2, use_dynamic_ntk=False, use_logn_attn=False, max_context=512
)


def test_shapes_round_up_to_buckets():
    cache = KVCache(CONFIG, 6, 1280, dtype=torch.float32, device="cpu")
    runner = DecodeRunner(peaked_tiny_model(), cache)
    assert runner.graphs is False  # CPU: eager at the same shapes
    assert runner.buckets(1, 1) == (1, MIN_SLOT_BUCKET)
    assert runner.buckets(3, 257) == (4, 512)
    assert runner.buckets(5, 1000) == (6, 1024)  # never more rows than the cache has
    assert runner.buckets(6, 1100) == (6, 1280)  # nor more slots
    big = DecodeRunner(peaked_tiny_model(), KVCache(CONFIG, 1, 8192, dtype=torch.float32, device="meta"))
    assert [big.buckets(1, n)[1] for n in (2048, 2049, 3000, 4097, 8000)] == [2048, 2560, 3072, 5120, 8192]
    with pytest.raises(ValueError, match="kv_len 1281"):
        runner(1, 1281)


def test_runner_steps_equal_decode_step_at_the_exact_shape():
    model = peaked_tiny_model()
    lengths = [5, 9, 2]
    big = KVCache(CONFIG, 4, 300, dtype=torch.float32, device="cpu")
    exact = KVCache(CONFIG, 3, 300, dtype=torch.float32, device="cpu")
    runner = DecodeRunner(model, big)
    with torch.no_grad():
        for row, n in enumerate(lengths):
            prompt = torch.arange(100 + row, 100 + row + n)
            prefill_row(model, prompt, big, row)
            prefill_row(model, prompt, exact, row)
        slots = torch.tensor(lengths)
        for step in range(3):
            tokens = torch.tensor([7 + step, 8, 9])
            runner.tokens[:3], runner.slots[:3] = tokens, slots
            got = runner(rows=3, kv_len=int(slots.max()) + 1)  # runs 4 rows over 256 slots
            want = model.decode_step(tokens, slots, exact, kv_len=int(slots.max()) + 1)
            assert got.shape == (4, CONFIG.vocab_size)
            assert (got[:3] - want).abs().max().item() <= 1e-4
            slots = slots + 1


@pytest.mark.parametrize("config", [CONFIG, QWEN2], ids=["qwen", "qwen2"])
def test_decode_step_traces_as_one_graph_without_host_reads(config):
    """What CUDA-graph capture needs, checked on CPU: torch.compile(fullgraph=True) fails on any read of a tensor's
    value on the host (.item(), .tolist(), a branch on a tensor) or a shape made from one."""
    model = Transformer(config).eval().requires_grad_(False)
    cache = KVCache(config, 2, 300, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        prefill_row(model, torch.tensor([1, 2, 3]), cache, 0)
        tokens, slots = torch.tensor([7, 8]), torch.tensor([3, 0])
        want = model.decode_step(tokens, slots, cache, 256)
        torch._dynamo.reset()
        traced = torch.compile(model.decode_step, fullgraph=True, backend="eager", dynamic=False)
        assert torch.equal(traced(tokens, slots, cache, 256), want)


@pytest.mark.requires_gpu  # skipped without CUDA (conftest)
def test_cuda_graph_replay_equals_eager_steps():
    """The default GPU path (graphs of the fused Triton step) against plain eager steps."""
    model = peaked_tiny_model("cuda", torch.bfloat16)
    logits = {}
    for graphs in (True, False):
        cache = KVCache(CONFIG, 4, 600, dtype=torch.bfloat16, device="cuda")
        runner = DecodeRunner(model, cache, graphs=graphs, fused=graphs)
        with torch.no_grad():
            for row in range(3):
                prefill_row(model, torch.arange(100, 110 + 90 * row, device="cuda"), cache, row)
        runner.slots[:3] = torch.tensor([10, 100, 190])
        steps = []
        for step in range(80):  # the plain step crosses its 256-slot bucket; many replays
            runner.tokens[:3] = torch.tensor([step, 2 * step, 3 * step])
            steps.append(runner(3, int(runner.slots[:3].max()) + 1)[:3].clone())
            runner.slots.add_(1)
        logits[graphs] = torch.stack(steps)
        assert (runner.capture_seconds > 0) is graphs
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-2 * logits[False].abs().max().item()


@pytest.mark.requires_gpu  # skipped without CUDA (conftest)
def test_greedy_generation_on_cuda_graphs_equals_eager():
    model, tokenizer = peaked_tiny_model("cuda", torch.bfloat16), QwenTokenizer.from_pretrained()
    prompts = [tokenizer.encode(t) for t in ("Hi", "A longer prompt with more tokens", "x " * 40)]
    results = {}
    for graphs in (True, False):
        cache = KVCache(CONFIG, 2, 512, dtype=torch.bfloat16, device="cuda")
        # the fused kernels (the GPU default) either way: the same arithmetic, replayed or launched
        results[graphs] = greedy_token_ids(DecodeRunner(model, cache, graphs=graphs), tokenizer, prompts, 40)
    assert results[True] == results[False]
    # the engine's path (its own cache, end-of-text as a stop id) agrees up to where it stops, graphs or not
    for graphs in (None, False):
        engine = QwenEngine(
            model, tokenizer, GenerationConfig(max_new_tokens=40, chat_format="raw"), cuda_graphs=graphs
        )
        for got, want in zip(engine.generate(prompts, max_batch=2), results[True], strict=True):
            assert got.token_ids == want[: len(got.token_ids)]
