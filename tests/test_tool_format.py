"""Tool-call formats: the Hermes reader, the choice of format per checkpoint, the agent's Hermes loop (parallel
calls run and answer in order, the next prompt is what apply_chat_template gives), and Hermes constrained
decoding on a tiny Qwen2.5-template checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from qwen_agent import load_model
from qwen_agent.agent import ActionEvent, Agent, ObservationEvent
from qwen_agent.errors import ConfigError
from qwen_agent.llm import LocalLLM, ScriptedLLM
from qwen_agent.react import Action, FinalAnswer, Malformed, Problem
from qwen_agent.runtime.chat_template import ChatTemplate
from qwen_agent.tool_format import HermesFormat, ReActFormat, choose_format, parse_hermes
from qwen_agent.tools.base import BaseTool


class Weather(BaseTool):
    name = "get_weather"
    description = "Current weather in a city."
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

    def call(self, arguments: dict) -> str:
        return f"{arguments['city']}: sunny"


class Add(BaseTool):
    name = "add"
    description = "Add two integers."
    parameters = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }

    def call(self, arguments: dict) -> str:
        return str(arguments["a"] + arguments["b"])


def call(name: str, arguments: dict, tagged: bool = True) -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>" if tagged else body


# -- reading a turn ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (call("add", {"a": 17, "b": 25}), "", [("add", {"a": 17, "b": 25})]),
        (call("add", {"a": 1, "b": 2}, tagged=False), "", [("add", {"a": 1, "b": 2})]),  # Qwen2.5-Coder's
        (
            "Both.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_weather", {"city": "Lyon"}),
            "Both.",
            [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})],
        ),
        (
            'Sure:\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```\nDone.',
            "Sure:\n\nDone.",
            [("add", {"a": 1, "b": 2})],
        ),
        (
            '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>',
            "",
            [("add", {"a": 1, "b": 2})],
        ),
        ('The JSON {"a": 1} is not a call.', 'The JSON {"a": 1} is not a call.', []),
        ("Paris is sunny.", "Paris is sunny.", []),
    ],
)
def test_parse_hermes_reads_tagged_bare_and_fenced_calls(text, content, calls):
    turn = parse_hermes(text)
    assert turn.content == content
    assert [(c.name, c.arguments) for c in turn.calls] == calls


def test_bad_calls_and_names_not_offered_are_not_actions():
    text = "\n".join(
        [
            call("add", {"a": 1, "b": 2}),
            call("nope", {}),
            '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>',
        ]
        + ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa']  # cut by the token limit
    )
    outputs = parse_hermes(text).outputs({"add": "json", "get_weather": "json"})
    assert isinstance(outputs[0], Action) and outputs[0].arguments == {"a": 1, "b": 2}
    assert isinstance(outputs[1], Malformed) and outputs[1].problem is Problem.UNKNOWN_TOOL
    assert isinstance(outputs[2], Malformed) and outputs[2].problem is Problem.INVALID_ARGUMENTS
    assert isinstance(outputs[3], Malformed) and outputs[3].tool == "get_weather"
    assert isinstance(parse_hermes("  ").outputs(None)[0], Malformed)
    assert isinstance(parse_hermes("42.").outputs({})[0], FinalAnswer)


# -- choosing the format -----------------------------------------------------------------------------------------


def test_the_format_follows_the_checkpoint(tiny_qwen_dir, tiny_qwen2_dir, tiny_qwen25_dir):
    assert isinstance(choose_format(None, LocalLLM(load_model(tiny_qwen_dir))), ReActFormat)  # no template
    assert isinstance(
        choose_format(None, LocalLLM(load_model(tiny_qwen2_dir))), ReActFormat
    )  # no tools in it
    qwen25 = LocalLLM(load_model(tiny_qwen25_dir))
    assert isinstance(choose_format(None, qwen25), HermesFormat)
    assert isinstance(choose_format("react", qwen25), ReActFormat)
    with pytest.raises(ConfigError, match="has none here"):
        choose_format("hermes", ScriptedLLM([]))
    with pytest.raises(ConfigError, match="unknown tool format 'json'"):
        choose_format("json", qwen25)
    with pytest.raises(ConfigError, match="does not read 'tools'"):
        HermesFormat(ChatTemplate.from_dir(tiny_qwen2_dir))


# -- the agent's Hermes loop -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hermes(tiny_qwen25_dir):
    from qwen_agent.runtime.tokenizer import QwenTokenizer

    tokenizer = QwenTokenizer.from_pretrained(tiny_qwen25_dir)
    return HermesFormat(ChatTemplate.from_dir(tiny_qwen25_dir, tokenizer.special_tokens))


def test_parallel_calls_run_in_order_and_go_back_as_the_template_writes_them(hermes, tiny_qwen25_dir):
    transformers = pytest.importorskip("transformers")
    first = "Checking.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("add", {"a": 17, "b": 25})
    llm = ScriptedLLM([first, "Paris is sunny; 17 + 25 = 42."])
    agent = Agent(llm, [Weather(), Add()], tool_format=hermes)
    events = list(agent.stream("Weather in Paris, and 17 + 25?"))
    actions = [(e.tool, e.arguments) for e in events if isinstance(e, ActionEvent)]
    assert actions == [("get_weather", {"city": "Paris"}), ("add", {"a": 17, "b": 25})]
    assert [e.observation for e in events if isinstance(e, ObservationEvent)] == ["Paris: sunny", "42"]
    result = events[-1].result
    assert result.answer == "Paris is sunny; 17 + 25 = 42." and result.history[-1][1] == result.answer
    assert [s.action for s in result.steps] == ["get_weather", "add", None]

    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.schema},
        }
        for t in (Weather(), Add())
    ]
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 17, "b": 25}}},
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris, and 17 + 25?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": calls},
        {"role": "tool", "content": "Paris: sunny"},
        {"role": "tool", "content": "42"},
    ]
    hf = transformers.AutoTokenizer.from_pretrained(tiny_qwen25_dir)
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    second_prompt = llm.calls[1][0]
    assert second_prompt.to_chatml() == expected
    assert llm.calls[0][1] == ()  # no stop strings: the turn ends at <|im_end|>


def test_a_call_to_a_tool_not_offered_is_an_error_observation(hermes):
    llm = ScriptedLLM([call("delete_everything", {}), "Sorry."])
    result = Agent(llm, [Add()], tool_format=hermes).run("hi")
    assert result.steps[0].problems[0] is Problem.UNKNOWN_TOOL and not result.steps[0].ok
    assert "no tool named 'delete_everything'" in llm.calls[1][0].to_chatml()
    assert result.answer == "Sorry."


# -- constrained Hermes decoding ----------------------------------------------------------------------------------


def test_hermes_grammar_allows_offered_calls_and_answers_only(tiny_qwen25_dir):
    pytest.importorskip("llguidance")
    from qwen_agent.constrained import HermesConstraints

    engine = load_model(tiny_qwen25_dir)
    tok = engine.tokenizer
    constraints = HermesConstraints(tok, engine.config.vocab_size, {"get_weather": Weather(), "add": Add()})

    def accepts(ids: list[int]) -> bool:  # as a whole turn: the ids, then the end of the turn
        constraint = constraints(None)
        return all(constraint.accept(t) for t in ids) and constraint.accept(tok.im_end_id)

    open_, close = tok.special_tokens["<tool_call>"], tok.special_tokens["</tool_call>"]

    def tagged(body: str) -> list[int]:
        return [open_, *tok.encode("\n" + body + "\n"), close]

    weather = tagged('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert accepts(weather) and accepts(
        weather + tok.encode("\n") + tagged('{"name": "add", "arguments": {"a": 1, "b": 2}}')
    )
    assert accepts(tok.encode("It is sunny in Paris."))
    assert accepts(tok.encode("Here:\n```python\nprint(1)\n```"))  # an answer may hold code
    add = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    assert accepts(tok.encode(add)) and accepts(tok.encode(f"```json\n{add}\n{add}\n```"))  # bare, fenced
    assert not accepts(tok.encode('```json\n{"name": "add", "arguments": {"a": "one", "b": 2}}\n```'))
    assert not accepts(tok.encode('{"name": "nope", "arguments": {}}'))
    assert not accepts(tok.encode(f"{add}\nThat is all."))  # calls end the turn
    # the grammar's engine and Python read some characters differently as whitespace (\x1c) or word characters
    # (²): answers beginning with them are answers to the reader too, never calls
    bad = '{"name": "add", "arguments": {"a": "one", "b": 2}}'
    for answer in ("\x1c" + bad, "```\u00b2" + bad, "```json\x1c" + bad):
        assert accepts(tok.encode(answer)) and parse_hermes(answer, constrained=True).calls == ()
    assert not accepts(tagged('{"name": "nope", "arguments": {}}'))
    assert not accepts(tagged('{"name": "add", "arguments": {"a": "one", "b": 2}}'))
    assert not accepts(tagged('{"name": "get_weather", "arguments": {"town": "Paris"}}'))


def test_constrained_agent_on_random_weights_writes_valid_calls(tiny_qwen25_dir):
    pytest.importorskip("llguidance")
    from qwen_agent.constrained import ConstraintOptions
    from qwen_agent.llm_protocol import Sampling

    llm = LocalLLM(load_model(tiny_qwen25_dir))
    tools = [Weather(), Add()]
    for seed in range(3):
        agent = Agent(
            llm,
            tools,
            max_iterations=2,
            constrained=ConstraintOptions(max_text_chars=16),
            sampling=Sampling(max_tokens=96, temperature=1.0, seed=seed),
        )
        assert isinstance(agent.format, HermesFormat)
        result = agent.run("Weather in Paris?")
        for step in result.steps:
            if step.action is not None:
                assert step.ok or step.problems == (), step
                schema = {t.name: t.schema for t in tools}[step.action]
                jsonschema.validate(step.arguments, schema)


# what Qwen2.5-Coder-0.5B wrote under a grammar that allowed it as an answer: a fenced call whose pollutant is not
# in the schema's enum; after text, the same block is inside an answer
FENCED = '```json\n{"name": "air_quality", "arguments": {"city": "Beijing", "pollutant": "pm2.5"}}\n```'
IN_ANSWER = "The call would be:\n" + FENCED


def test_under_the_grammar_only_its_call_forms_are_calls(hermes):
    from qwen_agent.bench.hermes import react_gen
    from qwen_agent.fncall import build_prompt, response_message

    for constrained in (False, True):  # a turn beginning with a call is one (the grammar checked it)
        assert [c.name for c in parse_hermes(FENCED, constrained=constrained).calls] == ["air_quality"]
    assert [c.name for c in parse_hermes(IN_ANSWER).calls] == ["air_quality"]  # free decoding: any call shape
    turn = parse_hermes(IN_ANSWER, constrained=True)
    assert turn.calls == () and turn.content == IN_ANSWER
    assert "\nAction: air_quality" in react_gen(IN_ANSWER)
    assert "\nFinal Answer: The call would be:" in react_gen(IN_ANSWER, constrained=True)

    tools = [{"type": "function", "function": {"name": "air_quality", "parameters": {"type": "object"}}}]
    request = build_prompt([{"role": "user", "content": "Beijing?"}], tools=tools, tool_format=hermes)
    assert response_message(IN_ANSWER, request)[1] == "tool_calls"
    strict = dataclasses.replace(request, constrained=True)
    assert response_message(IN_ANSWER, strict) == ({"role": "assistant", "content": IN_ANSWER}, "stop")


def test_a_constrained_agent_reads_a_call_inside_its_answer_as_text(tiny_qwen25_dir):
    pytest.importorskip("llguidance")
    agent = Agent(LocalLLM(load_model(tiny_qwen25_dir)), [Add()], constrained=True)
    agent.llm = ScriptedLLM([IN_ANSWER])  # replays an answer in place of decoding
    result = agent.run("Air quality in Beijing?")
    assert result.answer == IN_ANSWER and all(step.action is None for step in result.steps)


# -- OpenAI function calling and LangChain in the Hermes format ---------------------------------------------------


def test_fncall_returns_parallel_calls_and_never_a_name_not_offered(hermes):
    from qwen_agent.fncall import build_prompt, response_message

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": Weather().schema}}]
    messages = [
        {"role": "user", "content": "Paris and Lyon?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
    ]
    request = build_prompt(messages, tools=tools, tool_format=hermes)
    text = request.prompt.to_chatml()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and request.stop == ()

    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_weather", {"city": "Lyon"})
    message, finish = response_message(two, request)
    assert finish == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "Lyon"},
    ]
    message, finish = response_message(
        call("launch_missiles", {}), request
    )  # not offered: content, not a call
    assert finish == "stop" and "tool_calls" not in message and "launch_missiles" in message["content"]


def test_chat_qwen_binds_tools_in_the_hermes_format(hermes):
    pytest.importorskip("langchain_core")
    from qwen_agent.langchain import ChatQwen

    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_weather", {"city": "Lyon"})
    llm = ScriptedLLM([two])
    model = ChatQwen(backend=llm, tool_format=hermes).bind_tools([Weather()])
    reply = model.invoke("Weather in Paris and Lyon?")
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Lyon"}),
    ]
    assert '"name": "get_weather"' in llm.calls[0][0].to_chatml()  # the tool listed in the system turn


def test_the_async_api_runs_the_same_hermes_turns(hermes):
    import asyncio

    first = call("get_weather", {"city": "Paris"}) + "\n" + call("add", {"a": 1, "b": 2})
    script = [first, "Sunny; 3."]
    sync_llm, async_llm = ScriptedLLM(script), ScriptedLLM(script)
    sync_result = Agent(sync_llm, [Weather(), Add()], tool_format=hermes).run("Weather, and 1 + 2?")
    async_result = asyncio.run(
        Agent(async_llm, [Weather(), Add()], tool_format=hermes).arun("Weather, and 1 + 2?")
    )
    assert [p.to_chatml() for p, *_ in async_llm.calls] == [p.to_chatml() for p, *_ in sync_llm.calls]
    assert async_result.answer == sync_result.answer == "Sunny; 3."
    assert [s.observation for s in async_result.steps[:2]] == ["Paris: sunny", "3"]


def test_the_context_budget_drops_the_oldest_turns_of_a_hermes_prompt(hermes):
    history = [(f"question {i} " + "word " * 60, f"answer {i}") for i in range(20)]
    llm = ScriptedLLM(["Done."])
    agent = Agent(llm, [Add()], tool_format=hermes, context_window=1200, sampling=None)
    events = list(agent.stream("last question", history))
    trimmed = [e for e in events if getattr(e, "kind", None) == "history_trimmed"]
    result = events[-1].result
    assert trimmed and 0 < result.dropped_turns < len(history)
    sent = llm.calls[0][0].to_chatml()
    assert "question 19" in sent and "question 0 " not in sent and "last question" in sent
    assert result.answer == "Done."


def test_the_server_speaks_the_checkpoints_format_unless_told(tiny_qwen25_dir):
    pytest.importorskip("fastapi")
    from qwen_agent.serve.openai_api import create_app

    engine = load_model(tiny_qwen25_dir)
    assert create_app(engine).state.tool_format == "hermes"
    assert create_app(engine, tool_format="react").state.tool_format == "react"
    with pytest.raises(ConfigError, match="unknown tool format 'json'"):
        create_app(load=lambda: engine, tool_format="json")
