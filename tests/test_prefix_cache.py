"""prefix_cache.py: the pool of KV blocks (chain keys, NTK alpha, LRU eviction, references), and greedy outputs that
are the same with the cache on and off on tiny v1 (past seq_length too), Qwen2 and GPTQ checkpoints."""

from __future__ import annotations

import pytest
import torch

from qwen_agent.errors import ConfigError
from qwen_agent.runtime.config import CONFIGS
from qwen_agent.runtime.engine import QwenEngine, load_model
from qwen_agent.runtime.model import KVCache
from qwen_agent.runtime.prefix_cache import BLOCK_TOKENS, PrefixCache
from qwen_agent.runtime.tiny import write_tiny_checkpoint

CONFIG = CONFIGS["tiny"]  # Qwen v1 rules: dynamic NTK past seq_length 32
B = BLOCK_TOKENS
BLOCK = PrefixCache.block_bytes(CONFIG, torch.float32)


def pool(blocks: int) -> PrefixCache:
    return PrefixCache(CONFIG, blocks * BLOCK, dtype=torch.float32, device="cpu")


def row_cache(rows: int = 2, slots: int = 96) -> KVCache:
    """A cache whose slots hold random numbers, as if a prefill had written them."""
    cache = KVCache(CONFIG, rows, slots, dtype=torch.float32, device="cpu")
    cache.k.normal_()
    cache.v.normal_()
    return cache


def ids(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_a_stored_prefix_is_copied_into_another_row_and_the_last_prompt_token_always_runs():
    cache, prefix = row_cache(), pool(8)
    sequence = ids(100, 3 * B + 5)
    lease = prefix.admit(sequence, cache, 0)
    assert lease.cached == 0
    prefix.store(lease, sequence, cache, 0)
    assert len(lease.blocks) == 3
    prefix.release(lease)

    other = KVCache(CONFIG, 3, 96, dtype=torch.float32, device="cpu")
    got = prefix.admit(sequence[: 2 * B + 1] + [7], other, 2)
    assert got.cached == 2 * B
    for mine, theirs in ((other.k, cache.k), (other.v, cache.v)):
        assert torch.equal(mine[:, 2, :, : 2 * B], theirs[:, 0, :, : 2 * B])
        assert not mine[:, 2, :, 2 * B :].any() and not mine[:, :2].any()  # nothing else written
    # a prompt of exactly three blocks takes two: its last token must run for the logits
    assert prefix.admit(sequence[: 3 * B], other, 1).cached == 2 * B
    assert prefix.admit(sequence[: 3 * B + 1], other, 0).cached == 3 * B
    stats = prefix.stats()
    assert (stats["requests"], stats["hits"], stats["cached_tokens"]) == (4, 3, 7 * B)
    assert (stats["blocks_used"], stats["blocks_free"], stats["blocks_referenced"]) == (3, 5, 3)


def test_the_same_block_after_a_different_prefix_is_a_miss():
    cache, prefix = row_cache(), pool(8)
    first, second, tail = ids(100, B), ids(200, B), ids(300, 4)
    lease = prefix.admit(first + second + tail, cache, 0)
    prefix.store(lease, first + second + tail, cache, 0)
    prefix.release(lease)
    assert prefix.admit(ids(500, B) + second + tail, cache, 1).cached == 0  # block 2's ids, another chain
    assert prefix.admit(first + ids(200, B - 1) + [9] + tail, cache, 1).cached == B  # the first block only


def test_blocks_of_another_ntk_alpha_are_kept_apart():
    """Past seq_length (32) the prompt's alpha is 3: the same ids at the same positions are other keys."""
    cache, prefix = row_cache(slots=160), pool(16)
    long_prompt = ids(100, 3 * B + 1)  # 49 tokens: alpha 3
    assert prefix.alpha(len(long_prompt)) == 3.0 and prefix.alpha(2 * B) == 1.0
    lease = prefix.admit(long_prompt, cache, 0)
    prefix.store(lease, long_prompt, cache, 0)
    prefix.release(lease)
    assert prefix.admit(long_prompt[: B + 1], cache, 1).cached == 0  # alpha 1: none of them
    assert prefix.admit(long_prompt + [1, 2], cache, 1).cached == 3 * B  # alpha 3 again


def test_unreferenced_blocks_are_evicted_least_recently_used_first():
    cache, prefix = row_cache(rows=3, slots=64), pool(4)
    a, b, c = ids(100, 2 * B + 1), ids(300, 2 * B + 1), ids(500, 2 * B + 1)
    for r, prompt in enumerate((a, b)):
        lease = prefix.admit(prompt, cache, r)
        prefix.store(lease, prompt, cache, r)
        prefix.release(lease)
    assert prefix.stats()["blocks_free"] == 0
    # a is used again, so b is now the least recently used chain
    prefix.release(prefix.admit(a, cache, 0))
    lease = prefix.admit(c, cache, 2)
    prefix.store(lease, c, cache, 2)
    assert prefix.stats()["evictions"] == 2
    assert prefix.admit(a, cache, 0).cached == 2 * B
    assert prefix.admit(b, cache, 1).cached == 0


def test_a_chain_is_evicted_from_its_tail():
    cache, prefix = row_cache(rows=2, slots=64), pool(3)
    a = ids(100, 3 * B + 1)
    lease = prefix.admit(a, cache, 0)
    prefix.store(lease, a, cache, 0)
    prefix.release(lease)
    lease = prefix.admit(ids(900, B + 1), cache, 1)
    prefix.store(lease, ids(900, B + 1), cache, 1)  # needs one block: a's last one goes
    assert prefix.admit(a, cache, 0).cached == 2 * B


def test_referenced_blocks_are_never_evicted():
    cache, prefix = row_cache(), pool(2)
    held = ids(100, 2 * B + 1)
    lease = prefix.admit(held, cache, 0)
    prefix.store(lease, held, cache, 0)  # both blocks, referenced until released
    other = prefix.admit(ids(500, 2 * B + 1), cache, 1)
    prefix.store(other, ids(500, 2 * B + 1), cache, 1)  # no room: not stored, nothing fails
    assert other.blocks == [] and prefix.stats()["evictions"] == 0
    assert prefix.admit(held, cache, 1).cached == 2 * B
    assert prefix.stats()["blocks_referenced"] == 2


def test_kv_cache_gb_zero_turns_the_cache_off_and_bad_values_are_config_errors(tiny_qwen_dir):
    engine = load_model(tiny_qwen_dir, device="cpu", kv_cache_gb=0)
    assert engine.prefix_cache is None and engine.stats() == {"prefix_cache": None}
    block = PrefixCache.block_bytes(engine.config, torch.float32)
    sized = QwenEngine(engine.model, engine.tokenizer, kv_cache_gb=10 * block / 2**30)
    assert sized.prefix_cache.num_blocks == 10
    with pytest.raises(ConfigError, match="kv_cache_gb must be a number >= 0"):
        QwenEngine(engine.model, engine.tokenizer, kv_cache_gb=-1)


def test_rows_that_end_early_or_never_start_give_their_blocks_back(tiny_qwen_dir, monkeypatch):
    engine = load_model(tiny_qwen_dir, device="cpu", kv_cache_gb=0.01)
    prompt = list(range(100, 150))
    engine.generate(prompt, max_new_tokens=2)
    handle = engine.stream(prompt + [1], max_new_tokens=200, do_sample=False)
    deltas = iter(handle)
    next(deltas)
    deltas.close()  # abandoned part-way: the request is aborted
    assert handle.wait().cached_tokens == 48
    assert engine.stats()["prefix_cache"]["blocks_referenced"] == 0

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "prefill", failing_prefill)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([prompt + [2], prompt + [3]], max_new_tokens=2)
    stats = engine.stats()["prefix_cache"]
    # the failing row took cached blocks (a hit; the other prompt too when both joined the step before the failure)
    assert stats["hits"] >= 2 and stats["blocks_referenced"] == 0


# -- greedy outputs with the cache on and off ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("prefix")
    return {
        # seq_length 48: the longer prompts cross it (dynamic NTK alpha 3, logN)
        "qwen": write_tiny_checkpoint(root / "qwen", "qwen", seed=4, init_std=0.5, seq_length=48),
        "qwen2": write_tiny_checkpoint(root / "qwen2", "qwen2", seed=5, init_std=0.5),
        "gptq": write_tiny_checkpoint(
            root / "gptq", "qwen", quantize="gptq-int4", group_size=32, init_std=0.3, seq_length=48
        ),
    }


GREEDY = {"do_sample": False, "max_new_tokens": 10}


@pytest.mark.parametrize("name", ["qwen", "qwen2", "gptq"])
def test_greedy_ids_are_the_same_with_the_cache_on_and_off(checkpoints, name):
    """An agent-like run: a step, the next step re-sending it with an observation (past seq_length for v1), a
    batch of prompts that share its prefix, and a stream; each greedy result equals the cache-off engine's."""
    on = load_model(checkpoints[name], device="cpu", dtype="fp32", kv_cache_gb=0.05)
    off = QwenEngine(on.model, on.tokenizer, on.generation_config, kv_cache_gb=0)
    tok = on.tokenizer
    first_prompt = tok.encode(
        "Answer the question with the tools you have.\n" * 3 + "Question: weather in Paris?\nThought:"
    )
    first = on.generate(first_prompt, **GREEDY)
    assert first.token_ids == off.generate(first_prompt, **GREEDY).token_ids
    second_prompt = first_prompt + first.token_ids + tok.encode("\nObservation: sunny, 25 C\nThought:")
    second = on.generate(second_prompt, **GREEDY)
    assert second.token_ids == off.generate(second_prompt, **GREEDY).token_ids
    if name == "qwen2":
        assert second.cached_tokens > 0
    batch = [second_prompt + tok.encode(f" option {i}" * (i + 1)) for i in range(4)] + [first_prompt[:9]]
    together = on.generate(batch, **GREEDY)
    assert [r.token_ids for r in together] == [r.token_ids for r in off.generate(batch, **GREEDY)]
    assert [r.cached_tokens for r in together[:4]] == [len(second_prompt) // 16 * 16] * 4
    third_prompt = batch[2] + together[2].token_ids + tok.encode("\nObservation: rain\nThought:")
    handle = on.stream(third_prompt, **GREEDY)
    streamed = "".join(handle)
    alone = off.generate(third_prompt, **GREEDY)
    assert handle.result.cached_tokens > 0
    assert (streamed, handle.result.token_ids) == (alone.text, alone.token_ids)
    if name != "qwen2":  # seq_length 48: the later prompts have alpha 3, the first alpha 1
        assert len(first_prompt) < 48 < len(second_prompt) and len(third_prompt) <= 96
