"""LangChain adapters with the real langchain-core, langchain-classic and langchain packages.

Three kinds of model drive them: ``ScriptedLLM`` (recorded outputs, for multi-step agent runs), the real
``QwenEngine`` over a scripted logits source (it emits exact token ids, so both tokenizations of "Observation:"
can be produced and every stop path of the engine runs), and a tiny random-weight checkpoint loaded with
``load_model`` (mechanics: streaming, batching, stop strings, agents that run and end).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fake_openai_server import FakeServer, sse_reply
from langchain.agents import create_agent
from langchain_classic.agents import AgentExecutor, create_react_agent
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool as lc_tool
from tiny_models import ScriptedModel

from qwen_agent.errors import ConfigError
from qwen_agent.langchain import (
    ChatQwen,
    QwenLLM,
    QwenReActOutputParser,
    from_langchain_tool,
    qwen_react_prompt,
    render_tool_descs,
    to_langchain_tool,
)
from qwen_agent.llm import LocalLLM, ScriptedLLM
from qwen_agent.react import react_instruction
from qwen_agent.runtime.config import GenerationConfig
from qwen_agent.runtime.engine import QwenEngine, load_model
from qwen_agent.tools import tool

OBSERVATION_COLON = [37763, 367, 25]  # "Observation:"
OBSERVATION_COLON_NEWLINE = [37763, 367, 510]  # "Observation:\n", the tokenizer merges ":\n"
TOKENIZATIONS = pytest.mark.parametrize(
    "observation", [OBSERVATION_COLON, OBSERVATION_COLON_NEWLINE], ids=["colon", "merged-colon-newline"]
)
IM_END = 151645


@tool(register=False)
def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


@tool(register=False, args_format="code")
def echo_code(code: str) -> str:
    """Return the code it was given.

    Args:
        code: Python code
    """
    return f"got: {code}"


@lc_tool
def get_weather(city: str) -> str:
    """Get the current weather of a city."""
    return f"Sunny, 25 C in {city}"


def scripted_engine(tokenizer, *pieces: list[str | list[int]]) -> QwenEngine:
    """An engine whose k-th call writes ``pieces[k]`` (text is encoded, lists are token ids), then <|im_end|>."""
    scripts = []
    for parts in pieces:
        ids: list[int] = []
        for part in parts:
            ids += tokenizer.encode(part) if isinstance(part, str) else part
        scripts.append(ids + [IM_END])
    engine = QwenEngine(ScriptedModel(scripts), tokenizer, GenerationConfig(max_new_tokens=200))
    engine.prompts = []  # the prompt ids of every request, in order
    submit = engine.submit

    def recorded(request, on_event=None):
        engine.prompts.append(list(request.prompt))
        return submit(request, on_event)

    engine.submit = recorded
    return engine


class CountingEngine:
    """Counts the requests LocalLLM hands the real engine: ("generate", n) for a batch of n run together,
    ("stream", 1) for a single one; the calls go through unchanged."""

    def __init__(self, engine: QwenEngine) -> None:
        self.calls: list[tuple[str, int]] = []
        as_completed, submit = engine.as_completed, engine.submit
        batched = threading.local()

        def counted_as_completed(requests, max_batch=None):
            self.calls.append(("generate", len(requests)))
            batched.inside = True
            try:
                yield from as_completed(requests, max_batch)
            finally:
                batched.inside = False

        def counted_submit(request, on_event=None):
            if not getattr(batched, "inside", False):
                self.calls.append(("stream", 1))
            return submit(request, on_event)

        engine.as_completed, engine.submit = counted_as_completed, counted_submit


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def tiny_engine(tiny_qwen_dir) -> QwenEngine:
    return load_model(tiny_qwen_dir, device="cpu")


@pytest.fixture
def tiny_llm(tiny_engine, tiny_qwen_dir) -> QwenLLM:
    return QwenLLM(backend=LocalLLM(tiny_engine), model_name=str(tiny_qwen_dir), temperature=0, max_tokens=24)


# ------------------------------------------------------------------------------------------------ packaging


def test_import_qwen_agent_does_not_import_langchain():
    code = "import sys, qwen_agent; qwen_agent.Agent; qwen_agent.QwenTokenizer; print(any(m.startswith('langchain') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_langchain_names_the_extra():
    code = """
import sys
import threading
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('langchain_core', 'langchain', 'langchain_classic'):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from qwen_agent.errors import ConfigError
try:
    import qwen_agent.langchain
except ConfigError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'qwen-react-agent[langchain]'" in out
    assert "langchain_core" in out


def test_public_names_resolve_lazily():
    import qwen_agent

    assert qwen_agent.QwenLLM is QwenLLM and qwen_agent.ChatQwen is ChatQwen


def test_bad_backend_and_unknown_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="backend must implement qwen_agent.llm.LLM"):
        QwenLLM(backend="not a model")
    llm = QwenLLM(backend=ScriptedLLM(["hi"]))
    with pytest.raises(ConfigError, match="unknown generation argument.*max_new_token"):
        llm.invoke("hello", max_new_token=3)


# ------------------------------------------------------------------------------- QwenLLM over the tiny model


def test_identifying_params_name_the_model_and_settings(tiny_llm, tiny_qwen_dir):
    params = tiny_llm._identifying_params
    assert params["model_name"] == str(tiny_qwen_dir)
    assert (params["backend"], params["temperature"], params["max_tokens"]) == ("LocalLLM", 0, 24)
    assert tiny_llm._llm_type == "qwen"
    other = QwenLLM(backend=tiny_llm.backend, model_name=str(tiny_qwen_dir), temperature=0.7, max_tokens=24)
    assert other._identifying_params != params  # caching keys differ when a setting differs


def test_stream_sends_token_deltas_through_the_run_manager(tiny_llm):
    recorder = TokenRecorder()
    full = tiny_llm.invoke("Tell me a story.")
    chunks = list(tiny_llm.stream("Tell me a story.", config={"callbacks": [recorder]}))
    assert len(recorder.tokens) > 3  # token by token, not one block
    assert "".join(recorder.tokens) == "".join(chunks) == full != ""


def test_stop_string_cuts_every_path_of_the_tiny_model(tiny_llm):
    text = tiny_llm.invoke("Tell me a story.")
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # something the model really writes mid-output
    assert stop.strip() and len(text) > 8
    expected = text[: text.find(stop)]
    assert tiny_llm.invoke("Tell me a story.", stop=[stop]) == expected
    assert "".join(tiny_llm.stream("Tell me a story.", stop=[stop])) == expected
    assert tiny_llm.batch(["Tell me a story.", "Tell me a story."], stop=[stop]) == [expected, expected]
    assert asyncio.run(tiny_llm.ainvoke("Tell me a story.", stop=[stop])) == expected
    # a default stop on the adapter applies to every call
    assert (
        QwenLLM(backend=tiny_llm.backend, stop=[stop], temperature=0, max_tokens=24).invoke(
            "Tell me a story."
        )
        == expected
    )


def test_batch_is_one_engine_call_with_the_same_results(tiny_engine, tiny_llm):
    prompts = ["Tell me a story.", "What is 2+2?", "你好", "Name three colours."]
    singles = [tiny_llm.invoke(p) for p in prompts]
    counter = CountingEngine(tiny_engine)
    try:
        assert tiny_llm.batch(prompts) == singles
        assert counter.calls == [("generate", 4)]
        result = tiny_llm.generate(prompts[:3])
        assert counter.calls[-1] == ("generate", 3) and len(counter.calls) == 2
        assert [g[0].text for g in result.generations] == singles[:3]
        assert result.generations[0][0].generation_info["finish_reason"] in ("stop", "length")
        assert result.llm_output["token_usage"]["completion_tokens"] > 0
        assert asyncio.run(tiny_llm.abatch(prompts)) == singles
        assert counter.calls[-1] == ("generate", 4) and len(counter.calls) == 3
    finally:
        del tiny_engine.as_completed, tiny_engine.submit  # back to the class methods


def test_concurrent_async_calls_are_serialised_on_the_engine(tiny_engine, tiny_llm):
    prompts = ["Tell me a story.", "What is 2+2?", "Name three colours."]
    expected = [tiny_llm.invoke(p) for p in prompts]
    # a second adapter with its own LocalLLM over the same engine: both go to the engine's scheduler
    other = QwenLLM(backend=LocalLLM(tiny_engine), temperature=0, max_tokens=24)

    async def run():
        return await asyncio.gather(*((tiny_llm, other)[i % 2].ainvoke(p) for i, p in enumerate(prompts)))

    assert asyncio.run(run()) == expected


def test_astream_yields_the_same_text(tiny_llm):
    async def run():
        return [chunk async for chunk in tiny_llm.astream("What is 2+2?")]

    chunks = asyncio.run(run())
    assert len(chunks) > 1 and "".join(chunks) == tiny_llm.invoke("What is 2+2?")


def test_classic_agent_runs_and_stops_over_the_tiny_model(tiny_engine, tiny_llm):
    tools = [to_langchain_tool(add)]
    agent = create_react_agent(tiny_llm, tools, qwen_react_prompt(), tools_renderer=render_tool_descs)
    executor = AgentExecutor(agent=agent, tools=tools, max_iterations=2, handle_parsing_errors=True)
    counter = CountingEngine(tiny_engine)
    try:
        result = executor.invoke({"input": "What is 2+40?"})
    finally:
        del tiny_engine.as_completed, tiny_engine.submit
    assert result["output"] == "Agent stopped due to iteration limit or time limit."
    assert counter.calls == [("stream", 1), ("stream", 1)]  # AgentExecutor drives the model through _stream


IGNORED_STOP = (
    'Thought: add\nAction: add\nAction Input: {"a": 2, "b": 40}\nObservation: 7 (invented)\nThought: ok'
)


@pytest.mark.parametrize("path", ["invoke", "stream", "batch", "generate", "ainvoke", "astream"])
def test_qwen_llm_returns_the_text_its_backend_cut_at_the_stop_strings(path):
    llm = QwenLLM(backend=ScriptedLLM([IGNORED_STOP] * 2, chunk_size=2), stop=["Observation:"])
    if path == "invoke":
        texts = [llm.invoke("x")]
    elif path == "stream":
        chunks = list(llm.stream("x"))
        assert not any("Obs" in c for c in chunks)
        texts = ["".join(chunks)]
    elif path == "batch":
        texts = llm.batch(["x", "y"])
    elif path == "generate":
        result = llm.generate(["x"], stop=["\nObservation"])
        assert result.generations[0][0].generation_info["stop"] == "\nObservation"
        texts = [result.generations[0][0].text + "\n"]
    elif path == "ainvoke":
        texts = [asyncio.run(llm.ainvoke("x"))]
    else:

        async def run():
            return "".join([c async for c in llm.astream("x")])

        texts = [asyncio.run(run())]
    assert texts == [IGNORED_STOP[: IGNORED_STOP.index("Observation:")]] * len(texts)


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_qwen_returns_the_text_its_backend_cut_at_the_stop_strings(streaming):
    chat = ChatQwen(backend=ScriptedLLM(["Hello END more"]), stop=["END"])
    if streaming:
        content = "".join(c.content for c in chat.stream("hi"))
    else:
        content = chat.invoke("hi").content
    assert content == "Hello "


# ------------------------------------------------------------------ stop words in both tokenizations, real engine

STEP = 'Thought: I should add them\nAction: add\nAction Input: {"a": 2, "b": 40}\n'
INVENTED = [" 7 (invented)\nThought: I now know the final answer\nFinal Answer: 7"]


@TOKENIZATIONS
@pytest.mark.parametrize("path", ["invoke", "stream", "batch", "ainvoke", "astream"])
def test_observation_never_leaks_in_any_path(tokenizer, observation, path):
    llm = QwenLLM(
        backend=LocalLLM(scripted_engine(tokenizer, [STEP, observation, *INVENTED])), stop=["Observation:"]
    )
    prompt = "What is 2+40?"
    if path == "invoke":
        texts = [llm.invoke(prompt)]
    elif path == "stream":
        recorder = TokenRecorder()
        chunks = list(llm.stream(prompt, config={"callbacks": [recorder]}))
        assert recorder.tokens == [c for c in chunks if c]
        assert not any("Obs" in c for c in chunks)  # no fragment is ever shown, even for a moment
        texts = ["".join(chunks)]
    elif path == "batch":
        texts = llm.batch([prompt, prompt])
    elif path == "ainvoke":
        texts = [asyncio.run(llm.ainvoke(prompt))]
    else:

        async def run():
            return "".join([c async for c in llm.astream(prompt)])

        texts = [asyncio.run(run())]
    assert texts == [STEP] * len(texts)


@TOKENIZATIONS
def test_classic_agent_multi_step_over_the_engine(tokenizer, observation):
    engine = scripted_engine(
        tokenizer,
        [STEP, observation, *INVENTED],
        [" I now know the final answer\nFinal Answer: 42"],
    )
    llm = QwenLLM(backend=LocalLLM(engine), temperature=0)
    tools = [to_langchain_tool(add)]
    agent = create_react_agent(llm, tools, qwen_react_prompt(), tools_renderer=render_tool_descs)
    executor = AgentExecutor(agent=agent, tools=tools, return_intermediate_steps=True)
    recorder = TokenRecorder()
    result = executor.invoke({"input": "What is 2+40?"}, config={"callbacks": [recorder]})

    assert result["output"] == "42"
    [(action, observation_text)] = result["intermediate_steps"]
    assert (action.tool, action.tool_input, observation_text) == ("add", '{"a": 2, "b": 40}', "42")
    assert "Observ" not in action.log and "invented" not in "".join(recorder.tokens)
    # the second prompt carries the real observation; the model's invented one never reached it
    second_prompt = tokenizer.decode(engine.prompts[-1])
    assert '\nAction Input: {"a": 2, "b": 40}\nObservation: 42\nThought: ' in second_prompt
    assert "invented" not in second_prompt


@lc_tool
def shout(text: str) -> str:
    """Repeat a text in capitals."""
    return text.upper()


@lc_tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_classic_agent_sends_qwens_react_prompt_byte_for_byte():
    tools = [to_langchain_tool(add), get_weather]
    backend = ScriptedLLM(["Thought: I know it\nFinal Answer: Hi!"])
    agent = create_react_agent(
        QwenLLM(backend=backend), tools, qwen_react_prompt(), tools_renderer=render_tool_descs
    )
    assert AgentExecutor(agent=agent, tools=tools).invoke({"input": "Hi"})["output"] == "Hi!"
    descs = [add.tool_desc("react_prompt"), from_langchain_tool(get_weather).tool_desc("react_prompt")]
    # react_instruction is checked against the react_prompt.md template in test_react.py
    assert (
        backend.calls[0][0].query
        == react_instruction(descs, ["add", "get_weather"]) + "\n\nQuestion: Hi\nThought:"
    )
    assert "should be one of [add,get_weather]" in backend.calls[0][0].query
    assert descs[0].startswith(
        "add: Call this tool to interact with the add API. What is the add API useful for? Add two integers. "
        'Parameters: [{"name": "a", "description": "the first number", "required": true, "schema": {"type": "integer"}}'
    )
    assert descs[1].endswith("Format the arguments as a JSON object.")


def test_classic_prompt_with_names_filled_by_hand():
    tools = [to_langchain_tool(add), get_weather]
    for names in ("add,get_weather", "add, get_weather"):
        text = qwen_react_prompt().format(
            tools=render_tool_descs(tools), tool_names=names, input="Hi", agent_scratchpad=""
        )
        assert "should be one of [add,get_weather]" in text and text.endswith(
            "Begin!\n\nQuestion: Hi\nThought:"
        )


def test_plain_langchain_tools_get_their_json_arguments_under_agent_executor():
    tools = [shout, multiply, to_langchain_tool(add), to_langchain_tool(echo_code)]
    backend = ScriptedLLM(
        [
            'Thought: shout it\nAction: shout\nAction Input: {"text": "hi"}',
            "Thought: multiply\nAction: multiply\nAction Input: {a: 6, 'b': 7}",  # JSON5, as our agent reads it
            'Thought: ours\nAction: add\nAction Input: ```json\n{"a": 41}\n```',
            "Thought: code\nAction: echo_code\nAction Input: ```py\nprint(1)\n```",
            "Thought: plain text\nAction: shout\nAction Input: done",
            " I now know the final answer\nFinal Answer: HI 42",
        ]
    )
    agent = create_react_agent(
        QwenLLM(backend=backend),
        tools,
        qwen_react_prompt(),
        tools_renderer=render_tool_descs,
        output_parser=QwenReActOutputParser(),
    )
    result = AgentExecutor(agent=agent, tools=tools, return_intermediate_steps=True).invoke({"input": "x"})
    steps = result["intermediate_steps"]
    assert [(a.tool, a.tool_input) for a, _ in steps] == [
        ("shout", {"text": "hi"}),
        ("multiply", {"a": 6, "b": 7}),
        ("add", {"a": 41}),
        ("echo_code", "```py\nprint(1)\n```"),
        ("shout", "done"),
    ]
    assert [observation for _, observation in steps] == ["HI", 42, "42", "got: print(1)", "DONE"]
    assert result["output"] == "HI 42"


def test_the_output_parser_reports_what_it_cannot_read():
    from langchain_core.exceptions import OutputParserException

    parser = QwenReActOutputParser()
    with pytest.raises(OutputParserException, match="is not followed by an 'Action Input:' line") as caught:
        parser.parse("Thought: hmm\nAction: shout")
    assert caught.value.send_to_llm and caught.value.observation.startswith("Error: 'Action: shout' is not")
    assert parser.parse("Just a reply.").return_values == {"output": "Just a reply."}
    invented = parser.parse('Thought: t\nAction: shout\nAction Input: {"text": "a"}\nObservation: made up')
    assert invented.log == 'Thought: t\nAction: shout\nAction Input: {"text": "a"}'


def test_openai_endpoint_backend_cuts_a_server_that_ignores_stop():
    server = FakeServer()
    try:
        pieces = ["Thought: add\nAction: add\nAction Input: {}\nObs", "ervation:\n made up", " more"]
        events = [{"choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
        server.replies.append(sse_reply(events))
        llm = QwenLLM.from_endpoint(server.url, "qwen-7b-chat", stop=["Observation:"])
        chunks = list(llm.stream("What is 2+2?"))
        assert "".join(chunks) == "Thought: add\nAction: add\nAction Input: {}\n"
        assert not any("Obs" in c for c in chunks)
        body = server.requests[0][2]
        assert (
            body["stop"] == ["Observation:"] and "<|im_start|>user\nWhat is 2+2?<|im_end|>" in body["prompt"]
        )
        assert llm._identifying_params["model_name"] == "qwen-7b-chat"
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------- ChatQwen


def weather_script() -> ScriptedLLM:
    return ScriptedLLM(
        [
            'Thought: I need the weather\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation: rain',
            " I now know the final answer\nFinal Answer: It is sunny in Paris.",
        ]
    )


def test_create_agent_multi_step_with_a_scripted_backend():
    script = weather_script()
    agent = create_agent(ChatQwen(backend=script), [get_weather], system_prompt="You are a weather bot.")
    result = agent.invoke({"messages": [{"role": "user", "content": "Weather in Paris?"}]})

    human, call, observation, answer = result["messages"]
    assert isinstance(call, AIMessage) and call.content == "I need the weather"
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert isinstance(observation, ToolMessage) and observation.content == "Sunny, 25 C in Paris"
    assert observation.tool_call_id == call.tool_calls[0]["id"]
    assert answer.content == "It is sunny in Paris." and answer.tool_calls == []

    (first, stops), (second, _) = script.calls
    assert set(stops) >= {"Observation:", "Observation:\n"}
    assert first.system == "You are a weather bot."
    assert "get_weather: Call this tool to interact with the get_weather API." in first.query
    assert first.query.endswith("Question: Weather in Paris?") and first.assistant_prefix == ""
    # the ToolMessage is folded back as the Observation of the unfinished assistant turn
    assert second.query == first.query
    assert second.assistant_prefix == (
        'Thought: I need the weather\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: Sunny, 25 C in Paris\nThought:"
    )


def test_create_agent_streams_answer_tokens_and_a_whole_tool_call():
    agent = create_agent(ChatQwen(backend=weather_script()), [get_weather])
    chunks = [
        message
        for message, _ in agent.stream(
            {"messages": [{"role": "user", "content": "Weather in Paris?"}]}, stream_mode="messages"
        )
    ]
    calls = [c for c in chunks if getattr(c, "tool_call_chunks", None)]
    assert [json.loads(c.tool_call_chunks[0]["args"]) for c in calls] == [{"city": "Paris"}]
    answer = [c.content for c in chunks if c.type == "AIMessageChunk" and not c.tool_call_chunks]
    assert len(answer) > 2 and "".join(answer) == "It is sunny in Paris."


@TOKENIZATIONS
def test_create_agent_over_the_engine_stops_before_an_invented_observation(tokenizer, observation):
    engine = scripted_engine(
        tokenizer,
        [
            'Thought: I need the weather\nAction: get_weather\nAction Input: {"city": "Paris"}\n',
            observation,
            " rain (invented)\nFinal Answer: rain",
        ],
        [" I now know the final answer\nFinal Answer: Sunny."],
    )
    agent = create_agent(ChatQwen(backend=LocalLLM(engine), temperature=0), [get_weather])
    result = agent.invoke({"messages": [HumanMessage("Weather in Paris?")]})
    _, call, tool_message, answer = result["messages"]
    assert call.tool_calls[0]["args"] == {"city": "Paris"}
    assert tool_message.content == "Sunny, 25 C in Paris"
    assert answer.content == "Sunny."
    assert "invented" not in tokenizer.decode(engine.prompts[-1])


def test_create_agent_runs_and_ends_over_the_tiny_model(tiny_engine):
    counter = CountingEngine(tiny_engine)
    try:
        model = ChatQwen(backend=LocalLLM(tiny_engine), temperature=0, max_tokens=16)
        result = create_agent(model, [get_weather]).invoke({"messages": [HumanMessage("Weather in Paris?")]})
    finally:
        del tiny_engine.as_completed, tiny_engine.submit
    # random weights write no Action: the reply is a final answer and the run ends after one model call
    assert len(counter.calls) == 1
    last = result["messages"][-1]
    assert isinstance(last, AIMessage) and last.tool_calls == [] and last.content
    assert last.usage_metadata["output_tokens"] > 0


def test_chat_model_reports_unparseable_arguments_as_invalid_tool_calls():
    script = ScriptedLLM(["Thought: t\nAction: get_weather\nAction Input: {city: Paris"])
    reply = ChatQwen(backend=script).bind_tools([get_weather]).invoke("Weather?")
    assert reply.tool_calls == []
    [invalid] = reply.invalid_tool_calls
    assert (invalid["name"], invalid["args"]) == ("get_weather", "{city: Paris")
    assert "not valid JSON" in invalid["error"]


def test_chat_model_accepts_qwen_tools_and_json5_arguments():
    script = ScriptedLLM(["Thought: add\nAction: add\nAction Input: {'a': 2, b: 40,}"])
    reply = ChatQwen(backend=script).bind_tools([add]).invoke("2+40?")
    assert reply.tool_calls[0]["args"] == {"a": 2, "b": 40}
    assert "add: Call this tool to interact with the add API." in script.calls[0][0].query


def test_chat_model_without_tools_is_a_plain_chat():
    script = ScriptedLLM(["Hello! How can I help?"])
    reply = ChatQwen(backend=script, system="Be brief.").invoke([HumanMessage("Hi")])
    assert reply.content == "Hello! How can I help?"
    prompt, stops = script.calls[0]
    assert (prompt.system, prompt.query, stops) == ("Be brief.", "Hi", ())
    assert asyncio.run(ChatQwen(backend=ScriptedLLM(["Hi there"])).ainvoke("Hi")).content == "Hi there"


# ---------------------------------------------------------------------------------------------- tool converters


def test_qwen_tool_as_langchain_tool():
    lc_add = to_langchain_tool(add)
    assert (lc_add.name, lc_add.description) == ("add", add.description)
    assert lc_add.args == add.schema["properties"]
    assert lc_add.invoke({"a": 2, "b": 40}) == "42"
    assert lc_add.invoke("{'a': 41}") == "42"  # raw Action Input text, as the classic agent passes it
    assert lc_add.invoke('{"a": "two"}').startswith("Error: invalid arguments for tool 'add'")
    code_tool = to_langchain_tool(echo_code)
    assert code_tool.invoke("```py\nprint(1)\n```") == "got: print(1)"
    assert code_tool.invoke({"code": "x = 1"}) == "got: x = 1"


def test_langchain_tool_as_qwen_tool():
    weather = from_langchain_tool(get_weather, name_for_human="Weather")
    assert weather.tool_desc().startswith(
        "get_weather: Call this tool to interact with the Weather API. What is the Weather API useful for? "
        "Get the current weather of a city. Parameters: "
        '[{"name": "city", "description": "", "required": true, "schema": {"type": "string"}}]'
    )
    assert weather.invoke('{"city": "Oslo"}').observation == "Sunny, 25 C in Oslo"
    assert (
        weather.invoke("{}").observation
        == "Error: invalid arguments for tool 'get_weather': missing required argument 'city'"
    )
    # round trip: ours -> LangChain -> ours keeps the schema
    assert from_langchain_tool(to_langchain_tool(add)).schema["properties"] == add.schema["properties"]


# -------------------------------------------------------------------------------------------------- docs example


def test_docs_langchain_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "docs" / "langchain.md").read_text()
    start = readme.index("<!-- langchain-example:start -->")
    code = re.search(r"```python\n(.*?)^```", readme[start:], re.S | re.M).group(1)
    exec(compile(code, "docs/langchain.md", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "42 {'a': 6, 'b': 7} 42"
    assert lines[1] == "{'city': 'Paris'} -> Sunny, 25 C in Paris -> Sunny, 25 C."
    assert lines[2].startswith("[") and len(eval(lines[2])) == 3
