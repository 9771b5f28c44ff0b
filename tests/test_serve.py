"""The OpenAI-compatible server, started for real with uvicorn on 127.0.0.1 and called with the clients people use:
the ``openai`` package (sync and async), LangChain's ``ChatOpenAI``, this package's ``OpenAICompatibleLLM`` and
``qwen-agent run``, and plain HTTP.

Two stand-in models: a tiny random-weight checkpoint (greedy output must equal ``engine.generate`` on a second
copy of it), and, where the test needs the model to write a ReAct tool call, the real engine driving
``ScriptedModel`` (tests/tiny_models.py), whose rows emit set token sequences.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest
from tiny_models import ScriptedModel

from qwen_agent.cli import main as cli_main
from qwen_agent.fncall import build_prompt
from qwen_agent.llm import LocalLLM
from qwen_agent.llm_protocol import ChatPrompt, Sampling
from qwen_agent.openai_client import OpenAICompatibleLLM
from qwen_agent.runtime.config import GenerationConfig
from qwen_agent.runtime.engine import QwenEngine, load_model
from qwen_agent.serve.openai_api import BackgroundServer, create_app

KEY = "sk-test-key"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = (
    'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:'
)
ANSWER_TEXT = "Thought: I now know the final answer.\nFinal Answer: It is sunny in Paris."


@pytest.fixture(scope="module")
def reference(tiny_qwen_dir) -> QwenEngine:
    """A second copy of the served model, for what ``engine.generate`` gives alone."""
    return load_model(tiny_qwen_dir)


@pytest.fixture(scope="module")
def server(tiny_qwen_dir):
    app = create_app(load_model(tiny_qwen_dir), model_name="tiny", api_key=KEY, max_batch=8, max_queue=64)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def scripted_server(tokenizer, texts: list[str], *, endless: bool = False, **options) -> BackgroundServer:
    """A server whose model writes ``texts``, one per request in arrival order (the last one for any further
    request), then ends its turn; with ``endless``, the first request's model writes "a" until its budget ends."""
    scripts = [tokenizer.encode(text) + [tokenizer.im_end_id] for text in texts]
    if endless:
        scripts.insert(0, tokenizer.encode("a"))
    engine = QwenEngine(ScriptedModel(scripts), tokenizer, GenerationConfig(max_new_tokens=100))
    return BackgroundServer(create_app(engine, model_name="scripted", **{"max_batch": 4, **options}))


def alone(reference: QwenEngine, messages: list[dict], max_tokens: int) -> str:
    request = build_prompt(messages)
    ids = LocalLLM(reference).prompt_ids(request.prompt)
    return reference.generate(ids, stop=request.stop, max_new_tokens=max_tokens, do_sample=False).text


def stats(server: BackgroundServer) -> dict:
    return httpx.get(server.url + "/health").json()["scheduler"]


# -- the openai client ------------------------------------------------------------------------------------------


def test_greedy_chat_equals_engine_generate_and_streams_the_same_text(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = alone(reference, messages, 12)
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_completions_take_text_and_token_ids(client, reference):
    ids = reference.tokenizer.encode("The capital of France is")
    expected = reference.generate(ids, max_new_tokens=10, do_sample=False)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    by_text = client.completions.create(
        model="tiny", prompt=["The capital of France is", "Hi"], max_tokens=10, temperature=0
    )
    assert by_ids.choices[0].text == expected.text == by_text.choices[0].text
    assert by_ids.usage.completion_tokens == expected.completion_tokens
    assert [c.index for c in by_text.choices] == [0, 1]
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_async_client_requests_are_decoded_in_shared_batches_with_the_results_they_get_alone(
    server, reference
):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]
    expected = [alone(reference, [{"role": "user", "content": q}], 24) for q in questions]
    before = stats(server)["step_rows"]

    async def ask_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(
            *(
                aclient.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24
                )
                for q in questions
            )
        )
        await aclient.close()
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == expected
    after = stats(server)["step_rows"]
    shared = {rows: n - before.get(rows, 0) for rows, n in after.items() if int(rows) > 1}
    assert sum(shared.values()) > 0, f"no decode step ran more than one row: {after}"


def test_tools_give_tool_calls_then_the_tool_result_gives_the_answer(tokenizer):
    with scripted_server(tokenizer, [CALL_TEXT, ANSWER_TEXT, CALL_TEXT]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris"
        }

        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
        ]
        second = client.chat.completions.create(model="scripted", messages=messages, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == "It is sunny in Paris."
        assert second.choices[0].finish_reason == "stop"

        stream = client.chat.completions.create(
            model="scripted", messages=messages[:1], tools=[WEATHER_TOOL], stream=True
        )
        chunks = list(stream)
        last = chunks[-1].choices[0]
        assert last.finish_reason == "tool_calls"
        assert last.delta.tool_calls[0].index == 0 and last.delta.tool_calls[0].function.name == "get_weather"

        legacy = client.chat.completions.create(
            model="scripted", messages=messages[:1], functions=[WEATHER_TOOL["function"]]
        )
        assert legacy.choices[0].finish_reason == "function_call"
        assert legacy.choices[0].message.function_call.name == "get_weather"


STRICT_WEATHER = {
    "type": "function",
    "function": {
        **WEATHER_TOOL["function"],
        "parameters": {**WEATHER_TOOL["function"]["parameters"], "additionalProperties": False},
        "strict": True,
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}


def test_response_format_json_schema_gives_json_matching_the_schema(client):
    pytest.importorskip("llguidance")
    messages = [{"role": "user", "content": "Describe a person."}]
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in range(3):  # random weights, sampled: only the mask keeps the reply valid
        reply = client.chat.completions.create(
            model="tiny",
            messages=messages,
            response_format=response_format,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(
        model="tiny",
        messages=messages,
        response_format=response_format,
        temperature=1.0,
        seed=7,
        max_tokens=120,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_a_strict_tool_is_called_with_arguments_that_match_its_schema(tokenizer):
    """The model writes an extra argument; under a strict tool the mask rules it out, so the call validates."""
    pytest.importorskip("llguidance")
    text = CALL_TEXT.replace('{"city": "Paris"}', '{"city": "Paris", "days": 3}')
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    schema = STRICT_WEATHER["function"]["parameters"]
    with scripted_server(tokenizer, [text]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        arguments = {}
        for tool in (WEATHER_TOOL, STRICT_WEATHER):
            reply = client.chat.completions.create(
                model="scripted", messages=messages, tools=[tool], temperature=0
            )
            assert reply.choices[0].finish_reason == "tool_calls"
            (call,) = reply.choices[0].message.tool_calls
            assert call.function.name == "get_weather"
            arguments[tool is STRICT_WEATHER] = json.loads(call.function.arguments)
    assert arguments[False] == {"city": "Paris", "days": 3}  # as written
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(arguments[False], schema)
    jsonschema.validate(arguments[True], schema)


# -- LangChain and this package's clients -------------------------------------------------------------------


def test_langchain_chat_openai(server, reference, tokenizer):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        base_url=server.url + "/v1", api_key=KEY, model="tiny", temperature=0, max_tokens=10
    )
    assert chat.invoke("Tell me a story").content == alone(
        reference, [{"role": "user", "content": "Tell me a story"}], 10
    )
    with scripted_server(tokenizer, [CALL_TEXT]) as scripted:
        chat = langchain_openai.ChatOpenAI(base_url=scripted.url + "/v1", api_key="unused", model="scripted")
        message = chat.bind_tools([WEATHER_TOOL]).invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}


@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_openai_compatible_llm(server, reference, tokenizer, mode):
    llm = OpenAICompatibleLLM(
        server.url, api_key=KEY, mode=mode, tokenizer=tokenizer if mode == "completions" else None
    )
    prompt = ChatPrompt("Name three colours.", assistant_prefix="Thought:")
    sampling = Sampling(max_tokens=12, temperature=0)
    expected = LocalLLM(reference).complete(prompt, stop=["Observation:"], sampling=sampling)
    got = llm.complete(prompt, stop=["Observation:"], sampling=sampling)
    assert llm.model == "tiny"
    assert (got.text, got.completion_tokens) == (expected.text, expected.completion_tokens)
    assert "".join(d for d in llm.stream(prompt, sampling=sampling) if isinstance(d, str)) == expected.text


def test_qwen_agent_run_against_the_server(tokenizer, capsys):
    call = "Thought: I need the time.\nAction: current_time\nAction Input: {}\n"
    with scripted_server(tokenizer, [call, ANSWER_TEXT]) as server:
        code = cli_main(["run", "--model", server.url, "--tools", "current_time", "What time is it?"])
    out = capsys.readouterr().out
    assert code == 0
    assert "current_time" in out and "It is sunny in Paris." in out


def test_qwen_agent_bench_tool_use_against_the_server(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    before = stats(server)["completed"]
    args = ["bench", "tool-use", "--model", server.url, "--limit", "2", "--max-new-tokens", "8"]
    assert cli_main([*args, "--batch-size", "4", "--out", str(tmp_path / "run"), "-q"]) == 0
    records = (tmp_path / "run").glob("*.jsonl")
    assert sum(len(path.read_text().splitlines()) for path in records) == 4  # 2 positive + 2 negative jobs
    assert stats(server)["completed"] - before == 4
    assert "report:" in capsys.readouterr().out


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(server):
    body = {**CHAT, "model": "tiny", "max_tokens": 16, "temperature": 0.9, "top_p": 1.0, "seed": 11}
    first = post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    async def together() -> list[str]:
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}
        ) as client:
            others = [{**body, "seed": seed} for seed in (1, 2, 3)]
            replies = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=b) for b in [body, *others])
            )
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    texts = asyncio.run(together())
    assert texts[0] == first
    assert len(set(texts)) > 1  # the seeds matter


def test_the_serve_command_starts_a_server(tiny_qwen_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "qwen_agent.cli", "serve", "--model", str(tiny_qwen_dir)]
    command += ["--port", str(port), "--served-model-name", "cli-tiny", "--max-batch", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # it listens at once, and answers 503 until its model is loaded
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert response.json()["data"][0]["id"] == "cli-tiny"
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", json={"model": "cli-tiny", "prompt": "Hi"}, timeout=120
        )
        assert reply.status_code == 200
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    # one log line per request: its id, tokens in and out, time
    assert re.search(r"cmpl-\w+ prompt_tokens=\d+ completion_tokens=16 seconds=[\d.]+ finish=length", output)


# -- errors and load ----------------------------------------------------------------------------------------


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = {
    "type": "object",
    "properties": {"x": {"type": "string", "pattern": "(?<=a)b"}},
}  # llguidance: no look-behind


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({**CHAT, "messages": []}, 400, "messages"),
        ({**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
        ({**CHAT, "temperature": 5}, 400, "temperature"),
        ({**CHAT, "stop": 5}, 400, "stop"),
        ({**CHAT, "stop": ["Observation:", ""]}, 400, "stop[1]"),
        (
            {**CHAT, "tools": [{"type": "function", "function": {"description": "x"}}]},
            400,
            "tools[0].function.name",
        ),
        ({**CHAT, "model": "gpt-4"}, 400, "model"),
        ({**CHAT, "n": 2}, 400, "n"),
        ({**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({**CHAT, "tool_choice": "required", "tools": [WEATHER_TOOL]}, 400, "tool_choice"),
        ({**CHAT, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 40000}]}, 400, "messages"),
        ('{"model": "tiny", "messages": [', 400, None),
        ({"model": "tiny", "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
        ({"model": "tiny", "prompt": [151936 + 5]}, 400, "prompt"),
        ({"model": "tiny", "prompt": []}, 400, "prompt"),
        ({**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type"),
        (
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format.json_schema.schema",
        ),
        (
            {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD}}},
            400,
            "response_format.json_schema.schema",
        ),
        (
            {**CHAT, "response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
            400,
            "response_format",
        ),
        (
            {
                **CHAT,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": BAD, "strict": True}}],
            },
            400,
            "tools",
        ),
    ],
)
def test_bad_requests_get_openai_shaped_errors_naming_the_field(server, body, status, param):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert "Traceback" not in response.text


def test_a_wrong_key_gets_401_and_health_needs_none(server):
    for key in (None, "sk-wrong"):
        response = post(server, "/v1/chat/completions", CHAT, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_a_full_queue_gets_503(tokenizer):
    with scripted_server(tokenizer, ["hi"], endless=True, max_batch=1, max_queue=0) as server:
        long = {**CHAT, "model": "scripted", "max_tokens": 30000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as busy:
            lines = busy.iter_lines()
            while '"content": "a' not in next(lines):  # past the role chunk: decoding now
                pass
            response = post(server, "/v1/chat/completions", {**CHAT, "model": "scripted"}, key=None)
        assert response.status_code == 503 and response.json()["error"]["code"] == "server_busy"


def test_a_client_that_leaves_mid_stream_frees_its_row_and_others_are_served(tokenizer):
    with scripted_server(tokenizer, ["still here"], endless=True) as server:
        long = {**CHAT, "model": "scripted", "max_tokens": 30000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=60) as stream:
            lines = stream.iter_lines()
            while '"content": "a' not in next(lines):  # past the role chunk: decoding now
                pass
        deadline = time.monotonic() + 60
        while stats(server)["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = stats(server)
        assert (after["in_flight"], after["cancelled"], after["max_rows"]) == (0, 1, 1)
        reply = post(server, "/v1/chat/completions", {**CHAT, "model": "scripted", "max_tokens": 8}, key=None)
        assert reply.json()["choices"][0]["message"]["content"] == "still here"


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_64_concurrent_clients_all_get_their_whole_answer(server):
    """More clients than rows (8) and streaming: every request is queued, decoded and answered in full."""
    before = stats(server)["completed"]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str | None, int]:
        body = {**CHAT, "messages": [{"role": "user", "content": f"client {i}"}], "max_tokens": 4}
        body |= {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        text, finish, usage = "", None, None
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content") or ""
                        finish = choice["finish_reason"] or finish
        return text, finish, usage["completion_tokens"]

    async def all_clients():
        headers = {"Authorization": f"Bearer {KEY}"}
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=300, limits=limits
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    answers = asyncio.run(all_clients())
    assert all(finish in ("stop", "length") and 0 < tokens <= 4 for _, finish, tokens in answers)
    after = stats(server)
    assert after["completed"] - before == 64 and after["in_flight"] == 0
    assert after["max_rows"] == 8


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(tokenizer):
    with scripted_server(tokenizer, ["hi"], endless=True) as server:
        long = {**CHAT, "model": "scripted", "max_tokens": 30000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=long, timeout=2)
        deadline = time.monotonic() + 60
        while stats(server)["cancelled"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (stats(server)["cancelled"], stats(server)["in_flight"]) == (1, 0)


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_request_too_big_for_the_open_cache_joins_it_at_the_next_step_by_growing_it(tokenizer):
    """A request whose prompt and budget do not fit the running batch's cache joins at once: the cache grows,
    the running row keeps its place. Past the cache budget it waits at the head of the queue, nothing behind it
    overtakes it, and it runs once the batch drains. Only the scheduler's thread calls the model."""
    engine = QwenEngine(ScriptedModel([tokenizer.encode("a")]), tokenizer, GenerationConfig(), max_batch=2)
    scheduler = engine.scheduler
    callers = set()
    real_prefill = engine.model.prefill

    def recording_prefill(*args, **kwargs):
        callers.add(threading.current_thread().name)
        return real_prefill(*args, **kwargs)

    engine.model.prefill = recording_prefill
    small = engine.stream([100] * 10, max_new_tokens=40, stop=["zzz"])
    _wait(lambda: scheduler.stats()["running"] == 1)  # decoding in a cache of 256 slots
    big = engine.stream([100] * 10, max_new_tokens=400)
    assert (small.wait().completion_tokens, small.wait().finish_reason) == (40, "length")
    assert (big.wait().completion_tokens, big.wait().text) == (400, "a" * 400)
    stats = scheduler.stats()
    assert stats["batches"] == 2 and stats["step_rows"][2] > 0  # grown, and both decoded in shared steps
    assert callers == {"qwen-agent-scheduler"}

    scheduler.configure(cache_tokens=512)  # two rows of 256 slots, or one up to the whole context
    order = []

    def submit(name, max_new_tokens):
        def on_event(event):
            if not isinstance(event, str):
                order.append(name)

        return engine.submit(engine.request([100] * 10, max_new_tokens=max_new_tokens), on_event)

    first = submit("first", 200)
    _wait(lambda: scheduler.stats()["running"] == 1)
    huge = submit("huge", 1000)  # needs 1,024 slots: more than the budget while `first` runs
    behind = submit("behind", 5)  # would fit beside `first`, but may not overtake `huge`
    assert (
        huge.wait().completion_tokens,
        behind.wait().completion_tokens,
        first.wait().completion_tokens,
    ) == (
        1000,
        5,
        200,
    )
    assert order == ["first", "huge", "behind"] and scheduler.stats()["in_flight"] == 0
    engine.close()


# -- the prefix cache over HTTP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["completions", "chat"])
def test_a_continued_conversation_reuses_the_cached_prefix_and_the_usage_says_so(server, client, mode):
    """An agent's next step re-sends the conversation: the server prefills only what its prefix cache lacks, and
    ``usage.prompt_tokens_details.cached_tokens`` (OpenAI's field) carries the count back to the client."""
    llm = OpenAICompatibleLLM(server.url + "/v1", "tiny", api_key=KEY, mode=mode)
    greedy = Sampling(max_tokens=8, temperature=0)
    prompt = ChatPrompt(f"Describe the {mode} prefix cache in one line. " * 3, system="Be brief and exact.")
    before = httpx.get(server.url + "/health").json()["prefix_cache"]
    first = llm.complete(prompt, sampling=greedy)
    assert first.cached_tokens == 0 and first.prefill_tokens == first.prompt_tokens
    step = ChatPrompt(prompt.query, system=prompt.system, assistant_prefix="Thought: x\nObservation: y\n")
    second = llm.complete(step, sampling=greedy)
    assert second.cached_tokens >= (first.prompt_tokens - 4) // 16 * 16 > 0
    assert second.prefill_tokens == second.prompt_tokens - second.cached_tokens
    *_, streamed = llm.stream(step, sampling=greedy)  # the whole prompt is cached now, but its last block
    assert streamed.cached_tokens == (second.prompt_tokens - 1) // 16 * 16
    after = httpx.get(server.url + "/health").json()["prefix_cache"]
    assert after["requests"] - before["requests"] == 3 and after["hits"] - before["hits"] == 2
    assert after["cached_tokens"] - before["cached_tokens"] == second.cached_tokens + streamed.cached_tokens
    assert after["blocks_used"] + after["blocks_free"] > after["blocks_used"] > 0
    if mode == "chat":  # the openai package reads the field too
        reply = client.chat.completions.create(
            model="tiny", messages=step.to_messages(), temperature=0, max_tokens=8
        )
        assert reply.usage.prompt_tokens_details.cached_tokens == streamed.cached_tokens
