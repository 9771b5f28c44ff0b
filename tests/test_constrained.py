"""Constrained ReAct decoding on tiny random-weight checkpoints: the mask alone must keep every step valid."""

from __future__ import annotations

import json
import random
import sys

import jsonschema
import pytest
import torch

from qwen_agent import LocalLLM, load_model
from qwen_agent.agent import Agent
from qwen_agent.bench.tool_use import (
    EngineGenerator,
    PromptConstraints,
    load_catalog,
    load_datasets,
    open_generator,
    plugin_tools,
    shipped_path,
)
from qwen_agent.constrained import ConstraintOptions, ReActConstraints
from qwen_agent.errors import ConfigError, GenerationError, ToolArgumentError
from qwen_agent.llm import ScriptedLLM
from qwen_agent.llm_protocol import ChatPrompt, Sampling
from qwen_agent.openai_client import OpenAICompatibleLLM
from qwen_agent.react import STOP_WORDS, Action, FinalAnswer, parse_output
from qwen_agent.runtime.constraint import apply_bitmask, bitmask_words
from qwen_agent.runtime.grammar import Grammar
from qwen_agent.tools.base import BaseTool

pytest.importorskip("llguidance")

BOUND = ConstraintOptions(max_text_chars=24)
SHORT = ConstraintOptions(max_text_chars=12)


class RunCode(BaseTool):
    name = "run_code"
    description = "Run Python code."
    parameters = {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}
    args_format = "code"

    def call(self, arguments: dict) -> str:
        return "ok"


class Lookup(BaseTool):
    name = "lookup"
    description = "Look a word up."
    parameters = {
        "type": "object",
        "properties": {
            "word": {"type": "string"},
            "limit": {"type": "integer"},
            "exact": {"type": "boolean"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        },
        "required": ["word", "exact"],
    }

    def call(self, arguments: dict) -> str:
        return str(arguments)


@pytest.fixture(scope="module")
def engine(tiny_qwen_dir):
    return load_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def catalog_tools():
    return {**plugin_tools(load_catalog(shipped_path("tool_use_plugins.json"))), "run_code": RunCode()}


def accepts(constraints: ReActConstraints, tokenizer, prefix: str, text: str) -> bool:
    constraint = constraints.for_prefix(prefix)
    return all(constraint.accept(token) for token in tokenizer.encode(text))


def check_step(text: str, tools: dict) -> str:
    """Assert ``text`` is a valid step over ``tools``; return its kind."""
    parsed = parse_output(text, {name: tool.args_format for name, tool in tools.items()})
    assert isinstance(parsed, (Action, FinalAnswer)) and not parsed.problems, (text, parsed)
    if isinstance(parsed, Action):
        assert parsed.tool in tools, text
        tools[parsed.tool].parse_arguments(parsed.raw_arguments)  # raises ToolArgumentError if invalid
        return "action"
    return "answer"


def valid_step(text: str, tools: dict) -> bool:
    try:
        check_step(text, tools)
    except (AssertionError, ToolArgumentError):
        return False
    return True


# -- the grammar ----------------------------------------------------------------------------------------------


def test_grammar_accepts_valid_steps_and_rejects_others(engine):
    tok = engine.tokenizer
    tools = {"lookup": Lookup(), "run_code": RunCode()}
    c = ReActConstraints(tok, engine.config.vocab_size, tools, "react_prompt")
    action = (
        'Thought: look it up\nAction: lookup\nAction Input: {"word": "cat", "exact": true, "tags": ["a"]}'
    )
    assert accepts(c, tok, "", action + "\nObservation:")
    assert accepts(c, tok, "", "Thought: done\nFinal Answer: a cat\nis an animal")
    assert accepts(
        c, tok, "", "Thought: code\nAction: run_code\nAction Input: ```py\nprint(1)\n```\nObservation:"
    )
    assert accepts(c, tok, "", "Thought: code\nAction: run_code\nAction Input: print(1)\nObservation:")
    assert not accepts(c, tok, "", "Thought: x\nAction: search\n")  # not an offered tool
    assert not accepts(c, tok, "", 'Thought: x\nAction: lookup\nAction Input: {"word": "cat"}')  # required
    assert not accepts(c, tok, "", 'Thought: x\nAction: lookup\nAction Input: {"word": 1')  # a string
    assert not accepts(c, tok, "", 'Thought: x\nAction: lookup\nAction Input: {"wrd": "cat"')  # unknown name
    assert not accepts(
        c, tok, "", 'Thought: x\nAction: lookup\nAction Input: {"word": "a", "exact": true, "tags": ["c"]'
    )
    assert not accepts(c, tok, "", "Hello")  # no Thought
    assert not accepts(c, tok, "", "Thought: first Observation: made up")  # the stop string in free text
    assert not accepts(
        c, tok, "", "Thought: code\nAction: run_code\nAction Input: x\nAction: y"
    )  # marker line
    # where the turn already ends with a cue, the grammar starts after it
    assert accepts(c, tok, "...\nObservation: 3\nThought:", " got it\nFinal Answer: 3")
    assert not accepts(c, tok, "...\nObservation: 3\nThought:", "\nFinal Answer: 3")  # no thought
    assert accepts(c, tok, "... I now know the final answer.\nFinal Answer:", " 42")
    assert not accepts(c, tok, "... I now know the final answer.\nFinal Answer:", " 42\nObservation:")


def test_variant_wording_for_code_tools(engine):
    tok, tools = engine.tokenizer, {"run_code": RunCode()}
    unfenced = "Thought: code\nAction: run_code\nAction Input: print(1)\nObservation:"
    fenced = "Thought: code\nAction: run_code\nAction Input: ```py\nprint(1)\n```\nObservation:"
    demo = ReActConstraints(tok, engine.config.vocab_size, tools, "react_demo")
    assert accepts(demo, tok, "", fenced) and not accepts(demo, tok, "", unfenced)  # "Enclose the code ..."
    for variant in ("react_prompt", "openai_api"):
        c = ReActConstraints(tok, engine.config.vocab_size, tools, variant)
        assert accepts(c, tok, "", fenced) and accepts(c, tok, "", unfenced)


def test_with_no_tools_only_a_final_answer_is_allowed(engine):
    c = ReActConstraints(engine.tokenizer, engine.config.vocab_size, {}, "react_prompt")
    assert accepts(c, engine.tokenizer, "", "Thought: 我知道\nFinal Answer: 你好")
    assert not accepts(c, engine.tokenizer, "", "Thought: x\nAction: y")


def test_bad_schema_missing_library_and_remote_backends_are_config_errors(engine, monkeypatch):
    class Odd(Lookup):
        name = "odd"
        parameters = {"type": "object", "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}}}

    with pytest.raises(ConfigError, match="tool 'odd'"):
        ReActConstraints(engine.tokenizer, engine.config.vocab_size, {"odd": Odd()}, "react_prompt")
    remote = OpenAICompatibleLLM("http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="needs a LocalLLM; OpenAICompatibleLLM"):
        Agent(remote, [Lookup()], constrained=True)
    with pytest.raises(ConfigError, match="LocalLLM; ScriptedLLM"):
        Agent(ScriptedLLM(["x"]), [Lookup()], constrained=True)
    with pytest.raises(ConfigError, match="local model directory"):
        open_generator("http://127.0.0.1:9/v1", constrained=True)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ConfigError, match="pip install 'qwen-react-agent\\[constrained\\]'"):
        Agent(LocalLLM(engine), [Lookup()], constrained=True)


# -- the runtime's mask ---------------------------------------------------------------------------------------


def test_apply_bitmask_matches_a_boolean_mask():
    logits = torch.randn(3, 70)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask_words(70)), dtype=torch.int32)
    allowed = torch.tensor(
        [[(int(bitmask[r, i // 32]) >> (i % 32)) & 1 for i in range(70)] for r in range(3)]
    )
    assert torch.equal(apply_bitmask(logits, bitmask), logits.masked_fill(allowed == 0, float("-inf")))


class AllowsSet:
    """A TokenConstraint that allows a fixed set of ids at every step and records what it was given."""

    def __init__(self, allowed: list[int], words: int) -> None:
        self.mask = torch.zeros(words * 32, dtype=torch.bool)
        self.mask[allowed] = True
        self.accepted: list[int] = []

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        packed = self.mask.view(-1, 32).long() << torch.arange(32)
        bitmask.copy_(packed.sum(-1).to(torch.int64).to(torch.int32))

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return bool(self.mask[token])


def test_a_mask_that_allows_what_greedy_picks_changes_nothing_batched_or_not(engine):
    vocab, words = engine.config.vocab_size, bitmask_words(engine.config.vocab_size)
    prompts = [engine.tokenizer.encode(t) for t in ("Hello there", "Question: what is 2+2?", "Thought:")]
    free = engine.generate(prompts, max_new_tokens=12, do_sample=False)
    rng = random.Random(0)
    constraints = []
    for result in free[:2]:  # the greedy ids plus a random half of the vocabulary
        allowed = sorted(set(result.token_ids) | set(rng.sample(range(vocab), vocab // 2)))
        constraints.append(AllowsSet(allowed, words))
    constrained = engine.generate(
        prompts, max_new_tokens=12, do_sample=False, constraint=[*constraints, None]
    )
    assert [r.token_ids for r in constrained] == [r.token_ids for r in free]
    assert constraints[0].accepted == free[0].token_ids[:-1]  # every token but the last one is accepted
    # a mask that leaves out the greedy pick changes the output, and only that row's
    banned = AllowsSet(sorted(set(range(vocab)) - {free[1].token_ids[0]}), words)
    changed = engine.generate(prompts, max_new_tokens=12, do_sample=False, constraint=[None, banned, None])
    assert changed[1].token_ids[0] != free[1].token_ids[0]
    assert [changed[0].token_ids, changed[2].token_ids] == [free[0].token_ids, free[2].token_ids]


def test_engine_rejects_bad_constraint_arguments(engine):
    prompts = [[1, 2], [3, 4]]
    one = AllowsSet([5], bitmask_words(engine.config.vocab_size))
    with pytest.raises(ConfigError, match="one per prompt"):
        engine.generate(prompts, max_new_tokens=2, constraint=[one])
    with pytest.raises(ConfigError, match="its own"):
        engine.generate(prompts, max_new_tokens=2, constraint=[one, one])
    with pytest.raises(ConfigError, match="TokenConstraint"):
        engine.generate([1, 2], max_new_tokens=2, constraint="lookup")


def test_a_constraint_that_refuses_its_own_token_is_a_generation_error(engine):
    class Fickle(AllowsSet):
        def accept(self, token: int) -> bool:
            return False

    with pytest.raises(GenerationError, match="prompt 0: generated token 1 .* not allowed"):
        engine.generate(
            [1, 2], max_new_tokens=3, constraint=Fickle([7], bitmask_words(engine.config.vocab_size))
        )


def test_greedy_identity_under_a_grammar_that_allows_the_free_output(engine):
    """A grammar of every text over the characters the model wrote when free: the mask rules out most of the
    vocabulary, but never the greedy pick, so the output is the same. (Where a grammar forces a literal,
    llguidance allows only its canonical tokenization, which is why the grammar here forces nothing.)"""
    prompts = [engine.tokenizer.encode(text) for text in ("Question: name a colour\n", "Thought:")]
    free = engine.generate(prompts, max_new_tokens=24, do_sample=False)
    constraints = []
    for result in free:
        chars = "".join(sorted(set(result.text)))
        grammar = "start: /[" + "".join(f"\\x{{{ord(ch):x}}}" for ch in chars) + "]*/\n"
        constraints.append(Grammar(engine.tokenizer, engine.config.vocab_size, grammar).constraint())
    constrained = engine.generate(prompts, max_new_tokens=24, do_sample=False, constraint=constraints)
    assert [r.token_ids for r in constrained] == [r.token_ids for r in free]
    bitmask = torch.zeros(bitmask_words(engine.config.vocab_size), dtype=torch.int32)
    Grammar(engine.tokenizer, engine.config.vocab_size, grammar).constraint().fill_bitmask(bitmask)
    allowed = sum(bin(word & 0xFFFFFFFF).count("1") for word in bitmask.tolist())
    assert allowed < engine.config.vocab_size // 2  # the mask did rule out most ids


# -- whole steps from random weights --------------------------------------------------------------------------


def sample_tool_sets(tools: dict, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(tools)
    return [{n: tools[n] for n in rng.sample(names, rng.randint(1, 4))} for _ in range(count)]


@pytest.mark.timeout(900)  # about a minute on an idle 2-core machine; far more when it is shared
def test_two_hundred_seeded_steps_are_valid_and_unconstrained_ones_are_not(engine, catalog_tools):
    """Random weights, 200 (question, tool set) pairs drawn from seeds, 40 rows a batch, sampled from the seed
    (plain softmax sampling: greedy decoding of random weights can repeat one digit forever, which JSON allows)."""
    llm = LocalLLM(engine)
    valid_free = steps = 0
    seen = {"action": 0, "answer": 0}
    for seed in range(5):
        rng = random.Random(seed)
        tool_sets = sample_tool_sets({**catalog_tools, "lookup": Lookup()}, 40, seed)
        questions = [
            f"question {rng.randrange(10**6)}: {rng.choice(['weather?', '2+2?', '你好'])}" for _ in tool_sets
        ]
        # short prompts (the ReAct instruction itself would only cost prefill time: the weights are random)
        prompts = [llm.prompt_ids(ChatPrompt(q)) for q in questions]
        constraints = [
            ReActConstraints(
                engine.tokenizer, engine.config.vocab_size, tools, "react_prompt", SHORT
            ).for_prefix("")
            for tools in tool_sets
        ]
        options = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=seed, stop=list(STOP_WORDS))
        constrained = engine.generate(prompts, constraint=constraints, max_new_tokens=200, **options)
        free = engine.generate(prompts, max_new_tokens=24, **options)  # room for a short valid step
        for result, free_result, tools in zip(constrained, free, tool_sets, strict=True):
            assert result.finish_reason == "stop"
            kind = check_step(result.text, tools)
            seen[kind] += 1
            if kind == "action":
                assert result.stop == "Observation:"  # it ends where the stop string begins
            steps += 1
            valid_free += valid_step(free_result.text, tools)
    assert steps == 200
    assert seen["action"] > 20 and seen["answer"] > 20, seen  # both branches are exercised
    assert valid_free <= 10  # unconstrained, random weights write noise


def test_streaming_under_a_constraint_matches_complete(engine):
    tools = {"lookup": Lookup(), "run_code": RunCode()}
    llm = LocalLLM(engine).with_constraint(
        ReActConstraints(engine.tokenizer, engine.config.vocab_size, tools, "react_prompt", BOUND)
    )
    prompt = Agent(ScriptedLLM([]), tools).prompt("what is a cat?")
    sampling = Sampling(max_tokens=200, temperature=1.0, seed=3)
    items = list(llm.stream(prompt, stop=STOP_WORDS, sampling=sampling))
    deltas, completion = items[:-1], items[-1]
    assert len(deltas) > 3 and "".join(deltas) == completion.text
    assert llm.complete(prompt, stop=STOP_WORDS, sampling=sampling).text == completion.text
    check_step(completion.text, tools)


def test_agent_constrained_runs_valid_steps_on_random_weights(engine):
    tools = [Lookup(), RunCode()]
    agent = Agent(
        LocalLLM(engine),
        tools,
        max_iterations=3,
        constrained=BOUND,
        sampling=Sampling(max_tokens=200, temperature=1.0, seed=1),
    )
    result = agent.run("Look up 'cat'.")
    for step in result.steps[: len(result.steps) - (result.stop_reason == "max_iterations")]:
        assert not step.problems, step
        assert step.action in (None, "lookup", "run_code")
    assert result.answer
    assert isinstance(agent.llm, LocalLLM) and agent.llm.constraint is not None


def test_bench_prompt_constraints_on_shipped_prompts(engine):
    datasets = load_datasets()
    jobs = datasets["positive"][:6] + datasets["negative"][:2]
    catalog = load_catalog(shipped_path("tool_use_plugins.json"))
    constraints = PromptConstraints(engine, catalog, BOUND)
    generator = EngineGenerator(engine, batch_size=4, max_new_tokens=200, constraints=constraints)
    gens = dict(generator.generate([job["prompt"] for job in jobs]))
    tools = constraints.tools
    for index, job in enumerate(jobs):
        offered = {name: tools[name] for name in job["tools"]}
        check_step(gens[index], offered)


# -- engine.generate(json_schema=..., grammar=...) ------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}


def parses_as_person(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), PERSON)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_json_schema_output_always_validates_on_random_weights(engine):
    prompts = [engine.tokenizer.encode(f"Person {i} as JSON:") for i in range(6)]
    options = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=120)
    for seed in range(3):
        for result in engine.generate(prompts, json_schema=PERSON, seed=seed, **options):
            assert result.finish_reason == "stop"  # the schema's end allows only the end-of-turn id
            jsonschema.validate(json.loads(result.text), PERSON)
    free = engine.generate(prompts, seed=0, **options)
    assert not any(parses_as_person(r.text) for r in free)  # unconstrained, random weights write noise
    streamed = "".join(engine.stream(prompts[0], json_schema=PERSON, seed=5, **options))
    assert streamed == engine.last_result.text and parses_as_person(streamed)
    done = dict(engine.generate_as_completed(prompts[:2], json_schema=PERSON, seed=6, **options))
    assert all(parses_as_person(done[i].text) for i in (0, 1))


def test_grammar_option_holds_output_to_a_lark_grammar(engine):
    prompt = engine.tokenizer.encode("Answer yes or no:")
    grammar = 'start: ("yes" | "no") "!" | NUMBER\nNUMBER: /[0-9]{3}/\n'
    texts = {
        engine.generate(prompt, grammar=grammar, do_sample=True, top_k=0, seed=seed, max_new_tokens=10).text
        for seed in range(8)
    }
    assert texts and all(t in ("yes!", "no!") or (len(t) == 3 and t.isdigit()) for t in texts), texts


def test_bad_json_schema_or_grammar_is_a_config_error_before_decoding(engine, monkeypatch):
    prompt = engine.tokenizer.encode("x")
    lookbehind = {"type": "string", "pattern": "(?<=a)b"}
    with pytest.raises(ConfigError, match="(?s)json_schema does not compile: .*look-around"):
        engine.generate(prompt, json_schema=lookbehind, max_new_tokens=2)
    with pytest.raises(ConfigError, match="json_schema must be a JSON Schema object"):
        engine.request(prompt, json_schema="person", max_new_tokens=2)
    with pytest.raises(ConfigError, match="json_schema: x-guidance must be an object, got bool"):
        engine.request(prompt, json_schema={**PERSON, "x-guidance": True}, max_new_tokens=2)
    with pytest.raises(ConfigError, match='(?s)grammar does not compile: .*unknown name: "foo"'):
        engine.generate([prompt, prompt], grammar="start: foo\n", max_new_tokens=2)
    with pytest.raises(ConfigError, match="only one of grammar, json_schema"):
        engine.generate(prompt, json_schema=PERSON, grammar='start: "a"\n', max_new_tokens=2)
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ConfigError, match="pip install 'qwen-react-agent\\[constrained\\]'"):
        engine.generate(prompt, json_schema=PERSON, max_new_tokens=2)
