"""generate.py: sampling semantics against transformers, stop ids and stop strings, streaming, batching.

Stop handling is driven by a scripted logits source (it emits a fixed token sequence) so that the exact
tokenizations of "Observation:" can be produced; everything else runs the real tiny network.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import ScriptedModel, peaked_tiny_model
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwen_agent.errors import ConfigError, GenerationError
from qwen_agent.runtime.checkpoint import to_transformers
from qwen_agent.runtime.config import GenerationConfig
from qwen_agent.runtime.engine import QwenEngine
from qwen_agent.runtime.generate import (
    GenerationResult,
    PromptRequest,
    SamplingParams,
    next_token,
    process_logits,
    sample,
)
from qwen_agent.runtime.model import Transformer
from qwen_agent.runtime.scheduler import Scheduler
from qwen_agent.runtime.tokenizer import QwenTokenizer

OBSERVATION_COLON = [37763, 367, 25]  # "Observation:"
OBSERVATION_COLON_NEWLINE = [37763, 367, 510]  # "Observation:\n" with the merged ":\n"
IM_END = 151645
STOPS = ["Observation:", "Observation:\n"]


@pytest.fixture(scope="module")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    return peaked_tiny_model()


@pytest.fixture
def engine(tiny_model, tokenizer) -> QwenEngine:
    return QwenEngine(tiny_model, tokenizer, GenerationConfig(max_new_tokens=12))


def scripted(tokenizer, text_before: str, tail: list[int]) -> QwenEngine:
    script = tokenizer.encode(text_before) + tail + tokenizer.encode(" trailing text")
    return QwenEngine(ScriptedModel([script]), tokenizer, GenerationConfig(max_new_tokens=100))


REACT = 'Thought: look it up\nAction: search\nAction Input: {"q": "x"}\n'


@pytest.mark.parametrize(
    "tail", [OBSERVATION_COLON, OBSERVATION_COLON_NEWLINE], ids=["colon", "merged-colon-nl"]
)
@pytest.mark.parametrize("stop", [["Observation:"], STOPS], ids=["one-stop", "both-stops"])
def test_stop_string_matched_for_both_tokenizations(tokenizer, tail, stop):
    engine = scripted(tokenizer, REACT, tail)
    result = engine.generate([1, 2, 3], stop=stop)
    assert result.text == REACT
    assert (result.finish_reason, result.stop) == ("stop", "Observation:")
    assert result.token_ids == tokenizer.encode(REACT) + tail  # generation ended on the completing token
    deltas = list(engine.stream([1, 2, 3], stop=stop))
    assert "".join(deltas) == result.text
    assert not any("Obs" in d for d in deltas)  # no fragment of the stop string ever shown


def test_stop_string_fragment_is_released_when_it_does_not_complete(tokenizer):
    text = "Final: Observed it all"
    engine = scripted(tokenizer, text, [IM_END])
    result = engine.generate([5], stop=STOPS)
    assert (result.text, result.finish_reason, result.stop) == (text, "stop", IM_END)
    assert "".join(engine.stream([5], stop=STOPS)) == text


def test_stop_string_inside_a_token_cuts_the_text_there(tokenizer):
    # " Observation:" is one token (86429) followed by ":" - the match starts inside the first token
    engine = scripted(tokenizer, "Answer: 42.", [86429, 25, 198])
    result = engine.generate([5], stop=["Observation:"])
    assert result.text == "Answer: 42. "
    assert result.stop == "Observation:"


def test_stop_ids_end_generation_without_adding_text(tokenizer):
    engine = scripted(tokenizer, "Hello there", [IM_END])
    result = engine.generate([5])
    assert (result.text, result.finish_reason, result.stop) == ("Hello there", "stop", IM_END)
    assert result.token_ids[-1] == IM_END
    assert result.completion_tokens == len(tokenizer.encode("Hello there")) + 1


def test_length_limit_and_token_sequence_stops(tokenizer):
    engine = scripted(tokenizer, "one two three four five", [IM_END])
    result = engine.generate([5], max_new_tokens=3)
    assert (result.text, result.finish_reason, result.stop) == ("one two three", "length", None)
    # a stop given as token ids is matched as its text, whichever tokens spell it
    assert engine.generate([5], stop=[tokenizer.encode(" three")]).text == "one two"


def test_stream_never_splits_a_character(tokenizer):
    text = "龘🦙é"  # characters spelled by several byte-level tokens
    ids = tokenizer.encode(text)
    assert len(ids) > 3
    engine = scripted(tokenizer, text, [IM_END])
    deltas = list(engine.stream([5]))
    assert "".join(deltas) == text == engine.generate([5]).text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_stream_equals_non_stream(engine, tokenizer, sampling):
    prompt = tokenizer.encode("Question: what is the weather like today?")
    kwargs = dict(do_sample=sampling, top_p=0.9, top_k=0, temperature=1.3, seed=7, stop=["e", "a "])
    for _ in range(3):
        result = engine.generate(prompt, **kwargs)
        stream = engine.stream(prompt, **kwargs)
        assert "".join(stream) == result.text
        assert stream.result.token_ids == result.token_ids
        kwargs["seed"] += 1


def test_seed_makes_sampling_reproducible(engine):
    a = engine.generate([100, 200, 300], do_sample=True, top_k=0, top_p=1.0, seed=3, max_new_tokens=20)
    b = engine.generate([100, 200, 300], do_sample=True, top_k=0, top_p=1.0, seed=3, max_new_tokens=20)
    c = engine.generate([100, 200, 300], do_sample=True, top_k=0, top_p=1.0, seed=4, max_new_tokens=20)
    assert a.token_ids == b.token_ids != c.token_ids


def test_batch_equals_each_prompt_alone(engine, tokenizer):
    prompts = [
        tokenizer.encode(t) for t in ("Hi", "A much longer prompt with many more tokens in it", "Mid size q")
    ]
    batched = engine.generate(prompts, max_new_tokens=15, stop=["e"], do_sample=False)
    assert isinstance(batched, list) and len(batched) == 3
    for prompt, got in zip(prompts, batched, strict=True):
        alone = engine.generate(prompt, max_new_tokens=15, stop=["e"], do_sample=False)
        assert (got.token_ids, got.text, got.finish_reason) == (
            alone.token_ids,
            alone.text,
            alone.finish_reason,
        )
        assert got.prompt_tokens == len(prompt)


@pytest.mark.parametrize("max_batch", [1, 2, 3])
def test_prompts_join_freed_rows_and_each_gets_what_it_gets_alone(engine, tokenizer, max_batch):
    """More prompts than rows: rows finish at different steps (a stop string, the budget) and take the next one."""
    texts = ["Hi", "A much longer prompt with many more tokens in it", "Mid size q", "x " * 30, "Last one"]
    prompts = [tokenizer.encode(t) for t in texts]
    alone = [engine.generate(p, max_new_tokens=15, stop=["e"], do_sample=False) for p in prompts]
    assert len({len(r.token_ids) for r in alone}) > 2  # rows really leave at different steps
    together = engine.generate(prompts, max_new_tokens=15, stop=["e"], do_sample=False, max_batch=max_batch)
    completed = dict(
        engine.generate_as_completed(
            prompts, max_new_tokens=15, stop=["e"], do_sample=False, max_batch=max_batch
        )
    )
    assert sorted(completed) == list(range(len(prompts)))
    for i, want in enumerate(alone):
        for got in (together[i], completed[i]):
            assert (got.token_ids, got.text, got.stop) == (want.token_ids, want.text, want.stop)


@pytest.mark.parametrize("budget", [2048, 30])
def test_prompts_joining_together_share_prefill_calls(tiny_model, tokenizer, monkeypatch, budget):
    """A wave of joining prompts is prefilled in as few calls as the padded-token budget allows (one call when
    it fits, a prompt longer than the budget alone), and each prompt still gets what it gets alone. (No prefix
    cache: the lone runs would leave blocks that shorten the batched prefills.)"""
    import qwen_agent.runtime.generate

    engine = QwenEngine(tiny_model, tokenizer, GenerationConfig(max_new_tokens=12), kv_cache_gb=0)

    texts = ["Hi", "x " * 30, "A much longer prompt with many more tokens in it", "Mid size q", "Last one"]
    prompts = [tokenizer.encode(t) for t in texts]
    alone = [engine.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
    calls = []
    real_prefill = engine.model.prefill

    def recording_prefill(ids, lengths, cache, rows, starts=None):
        calls.append((tuple(ids.shape), sorted(lengths.tolist())))
        return real_prefill(ids, lengths, cache, rows, starts)

    monkeypatch.setattr(engine.model, "prefill", recording_prefill)
    monkeypatch.setattr(qwen_agent.runtime.generate, "PREFILL_TOKENS", budget)
    fresh = QwenEngine(engine.model, tokenizer, engine.generation_config)  # no row keeps these prompts yet
    together = fresh.generate(prompts, max_new_tokens=6, do_sample=False)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert sorted(n for _, lengths in calls for n in lengths) == sorted(map(len, prompts))
    for (rows, width), lengths in calls:
        assert width == max(lengths)  # padded to the longest of its own group only
        assert rows * width <= budget or rows == 1
    assert len(calls) == (1 if budget == 2048 else 3)


def test_as_completed_yields_short_completions_first(tokenizer):
    scripts = [[5] * 20 + [IM_END], [6, 7, IM_END], [8] * 9 + [IM_END]]
    engine = QwenEngine(ScriptedModel(scripts), tokenizer, GenerationConfig(max_new_tokens=100))
    order = list(engine.generate_as_completed([[1], [2], [3]], max_batch=3))
    assert [i for i, _ in order] == [1, 2, 0]
    assert [len(r.token_ids) for _, r in order] == [3, 10, 21]
    graphs = QwenEngine(ScriptedModel(scripts), tokenizer, cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs=True needs a CUDA device; the model is on cpu"):
        graphs.generate([1])
    for bad in (0, "4"):
        with pytest.raises(ConfigError, match="max_batch must be an integer >= 1"):
            engine.generate([[1], [2]], max_batch=bad)


def test_batch_with_repetition_penalty_equals_each_prompt_alone(engine, tokenizer):
    """Rows of different lengths, some past the tiny seq_length of 32 (NTK and logN active): each row is
    penalised for its own ids only."""
    prompts = [
        tokenizer.encode("no " * 40),
        tokenizer.encode("Hi"),
        tokenizer.encode("A longer prompt, with many more tokens in it, said twice. " * 3),
    ]
    assert max(map(len, prompts)) > engine.config.seq_length > min(map(len, prompts))
    batched = engine.generate(prompts, max_new_tokens=15, do_sample=False, repetition_penalty=1.3)
    plain = engine.generate(prompts, max_new_tokens=15, do_sample=False, repetition_penalty=1.0)
    assert [r.token_ids for r in batched] != [r.token_ids for r in plain]  # the penalty changes the output
    for prompt, got in zip(prompts, batched, strict=True):
        alone = engine.generate(prompt, max_new_tokens=15, do_sample=False, repetition_penalty=1.3)
        assert got.token_ids == alone.token_ids


class FixedLogits(ScriptedModel):
    """The same logits at every position: end-of-text just ahead of the id 42."""

    def logits(self, rows):
        logits = torch.zeros(len(rows), self.config.vocab_size)
        logits[:, self.scripts[0]] = torch.tensor([1.0, 0.95])
        return logits


def test_repetition_penalty_sees_only_the_rows_own_ids(tokenizer):
    # end-of-text penalised as seen loses to 42: only in the row whose prompt holds it, and in no row that
    # later takes over its cache row
    engine = QwenEngine(FixedLogits([[tokenizer.eod_id, 42]]), tokenizer, GenerationConfig(max_new_tokens=3))
    prompts = [[100], [tokenizer.eod_id, 100], [100, 200, 300], [7]]
    results = engine.generate(prompts, do_sample=False, repetition_penalty=1.3, max_batch=2)
    assert [r.token_ids[0] for r in results] == [tokenizer.eod_id, 42, tokenizer.eod_id, tokenizer.eod_id]


def test_greedy_with_repetition_penalty_equals_transformers_generate(tiny_model, tokenizer):
    """End to end: our greedy decode == Qwen2ForCausalLM.generate on the same weights (reference greedy + 1.1)."""
    hf = to_transformers(tiny_model)
    engine = QwenEngine(tiny_model, tokenizer, GenerationConfig(eos_token_ids=(), chat_format="raw"))
    prompt = tokenizer.encode("The quick brown fox")
    ours = engine.generate(prompt, max_new_tokens=20, do_sample=False, repetition_penalty=1.1)
    with torch.no_grad():
        theirs = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            repetition_penalty=1.1,
            pad_token_id=0,
            eos_token_id=None,
        )
    assert ours.token_ids == theirs[0, len(prompt) :].tolist()


def test_sampling_filters_equal_transformers_processors():
    torch.manual_seed(1)
    logits = torch.randn(3, 500) * 3
    input_ids = torch.randint(0, 500, (3, 40))
    for top_k, top_p in [(0, 0.8), (20, 1.0), (20, 0.5), (0, 1.0)]:
        params = SamplingParams(
            do_sample=True, temperature=0.7, top_p=top_p, top_k=top_k, repetition_penalty=1.1
        )
        expected = RepetitionPenaltyLogitsProcessor(1.1)(input_ids, logits.clone())
        expected = TemperatureLogitsWarper(0.7)(input_ids, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(input_ids, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(input_ids, expected)
        got = process_logits(logits, input_ids, params)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        finite = ~torch.isinf(got)
        assert torch.allclose(got[finite], expected[finite], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_sampling_draws_what_torch_multinomial_draws(seed):
    """The same ids from the same generator state, which both leave in the same state; ids that top-k or top-p
    ruled out (probability 0) included."""
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(100 + seed)) * 4
    logits[:, ::3] = float("-inf")
    probs = logits.softmax(dim=-1)
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(3):
        assert torch.equal(sample(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.requires_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_a_gpu_never_waits_for_it():
    logits = torch.randn(8, 151936, device="cuda") * 3
    seen = torch.randint(0, 151936, (8, 300), device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        next_token(logits, seen, params, generator)
        with pytest.raises(RuntimeError, match="synchroniz"):  # what the check is for: multinomial waits
            torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_logits_that_are_not_finite_stop_generation_naming_the_prompt(tokenizer, do_sample):
    model = peaked_tiny_model()
    model.output.weight[7, 0] = float("nan")  # NaN in one logit of every position
    engine = QwenEngine(model, tokenizer, GenerationConfig(max_new_tokens=6, chat_format="raw"))
    with pytest.raises(GenerationError, match="prompt 0: .* generated token 1 are not finite"):
        engine.generate(tokenizer.encode("Hello"), do_sample=do_sample, seed=1)


def test_logits_that_turn_not_finite_later_name_the_prompt_and_the_token(tiny_model, tokenizer):
    prompts = [tokenizer.encode("Hello"), tokenizer.encode("Another prompt")]
    engine = QwenEngine(tiny_model, tokenizer, GenerationConfig(max_new_tokens=6, chat_format="raw"))
    clean = engine.generate(prompts, do_sample=False)
    poisoned = clean[1].token_ids[1]  # fed to the model to compute prompt 1's third token
    others = set(prompts[0] + prompts[1] + clean[0].token_ids + clean[1].token_ids[:1])
    assert poisoned not in others, "the test needs a second token that nothing else feeds"
    model = peaked_tiny_model()
    model.tok_embeddings.weight[poisoned] = float("nan")
    engine = QwenEngine(model, tokenizer, GenerationConfig(max_new_tokens=6, chat_format="raw"))
    with pytest.raises(GenerationError, match="prompt 1: .* generated token 3 are not finite"):
        engine.generate(prompts, do_sample=False)


def test_bad_generation_arguments_are_rejected(engine):
    with pytest.raises(ConfigError, match="top_p"):
        engine.generate([1, 2], top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        engine.generate([1, 2], do_sample=True, temperature=0)
    with pytest.raises(ConfigError, match="unknown generation argument"):
        engine.generate([1, 2], max_tokens=5)
    with pytest.raises(ConfigError, match="token ids"):
        engine.generate([1, -3])
    with pytest.raises(ConfigError, match="token ids"):
        engine.generate([])


def test_generation_stops_at_the_models_context(tiny_model, tokenizer):
    model = Transformer(replace(tiny_model.config, max_context=40)).eval()
    model.load_state_dict(tiny_model.state_dict())
    result = QwenEngine(model, tokenizer).generate(list(range(1, 31)), max_new_tokens=50, do_sample=False)
    assert (result.completion_tokens, result.finish_reason) == (10, "length")


def test_a_freed_row_goes_back_to_slot_0_and_stays_there_while_the_others_decode(tiny_model, tokenizer):
    """A finished row's slot does not advance with the rest: it goes back to 0 (what the row held is in the prefix
    cache, where a later prompt finds it), so the steps that span it only ever write slot 0."""
    from qwen_agent.runtime.decode_runner import DecodeRunner
    from qwen_agent.runtime.generate import Generation
    from qwen_agent.runtime.model import KVCache

    runner = DecodeRunner(tiny_model, KVCache(tiny_model.config, 2, 64, dtype=torch.float32, device="cpu"))
    runner.slots.fill_(50)  # left over from an earlier generation on the same runner
    prompts = [tokenizer.encode("Hi"), tokenizer.encode("Hello there")]
    run = Generation(runner, tokenizer)
    for prompt, budget in zip(prompts, [2, 12], strict=True):
        run.add(PromptRequest(prompt, budget, SamplingParams()))
    first_done, slots_after, slot = False, [], None
    while not run.idle:
        events = run.step()
        done = {index for index, event in events if isinstance(event, GenerationResult)}
        if first_done and 1 not in done:  # prompt 1 still runs
            slots_after.append(runner.slots.tolist())
        if 0 in done:
            first_done, slot = True, int(runner.slots[0])
    assert len(slots_after) >= 3, "prompt 1 should go on decoding after prompt 0 finished"
    assert slot == 0 and all(slots[0] == 0 for slots in slots_after)
    assert slots_after[-1][1] > slots_after[0][1]


def test_the_scheduler_takes_requests_mid_run_each_with_its_own_settings_and_aborts(engine, tokenizer):
    """Scheduler.add / step / abort: requests added while others decode, each with its own stops, budget and
    sampling (greedy or seeded), get what they get alone; an aborted one frees its row and ends "cancelled"."""
    settings = [
        ("Hi", {"max_new_tokens": 15, "stop": ["e"], "do_sample": False}),
        ("A longer prompt with more tokens", {"max_new_tokens": 9, "do_sample": False}),
        ("Sampled", {"max_new_tokens": 12, "do_sample": True, "top_k": 0, "top_p": 1.0, "seed": 7}),
        ("Greedy again", {"max_new_tokens": 12, "do_sample": False, "repetition_penalty": 1.3}),
    ]
    requests = [(tokenizer.encode(text), options) for text, options in settings]
    alone = [engine.generate(ids, **options) for ids, options in requests]
    endless = engine.request(tokenizer.encode("cancel me"), max_new_tokens=200, do_sample=False)

    scheduler = Scheduler(engine.model, tokenizer, max_batch=3, thread=False)
    handles = [scheduler.add(engine.request(requests[0][0], **requests[0][1])), scheduler.add(endless)]
    later = iter(requests[1:])
    results, steps = {}, 0
    while not scheduler.idle:
        for handle, event in scheduler.step():
            if isinstance(event, GenerationResult):
                results[handle] = event
        steps += 1
        for (
            ids,
            options,
        ) in later:  # one more request after each of the first steps, then abort the endless one
            handles.append(scheduler.add(engine.request(ids, **options)))
            break
        if steps == 6:
            scheduler.abort(handles[1])
    assert results[handles[1]].finish_reason == "cancelled" and handles[1].result is results[handles[1]]
    assert 0 < results[handles[1]].completion_tokens < 200
    for handle, want in zip(handles[:1] + handles[2:], alone, strict=True):
        got = results[handle]
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert handle.result is got
    stats = scheduler.stats()
    assert stats["max_rows"] == 3 and stats["in_flight"] == 0  # rows were shared; nothing is left
    assert (stats["completed"], stats["cancelled"]) == (5, 1)
    with pytest.raises(GenerationError, match="context holds"):
        scheduler.add(PromptRequest(tokenizer.encode("too long"), engine.config.max_context))


def test_a_prefix_computed_in_another_row_comes_from_the_prefix_cache(engine, tokenizer):
    """Blocks do not belong to rows: a prompt run in row 3 of a batch is reused by a later lone request, which
    takes the lowest free row, with the same greedy result as without the cache."""
    engine = QwenEngine(engine.model, tokenizer, engine.generation_config)
    question = "Question: what is 2+2, and what is 3+3? Think step by step before you answer.\nThought:"
    prompts = [tokenizer.encode(t) for t in ("a b c", "d e f", "g h i", question)]
    engine.generate(prompts, max_new_tokens=4, do_sample=False)  # prompt 3 runs in row 3
    follow = prompts[3] + tokenizer.encode(" Let me think.")
    result = engine.generate(follow, max_new_tokens=6, do_sample=False)
    assert result.cached_tokens == len(prompts[3]) // 16 * 16 > 0  # its full blocks were not run again
    assert result.prefill_tokens == len(follow) - result.cached_tokens
    fresh = QwenEngine(engine.model, tokenizer, engine.generation_config, kv_cache_gb=0)
    assert result.token_ids == fresh.generate(follow, max_new_tokens=6, do_sample=False).token_ids
