"""OpenAI-style function calling over Qwen ReAct (reference openai_api.py behaviour)."""

from __future__ import annotations

import json

import pytest

from qwen_agent.errors import ConfigError
from qwen_agent.fncall import build_prompt, chat_completion, chat_completion_stream, response_message
from qwen_agent.llm import ScriptedLLM

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "name": "get_time",
    "description": "Current time.",
    "parameters": {"type": "object", "properties": {}},
}

INSTRUCTION = (
    "Answer the following questions as best you can. You have access to the following APIs:\n\n"
    "get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? "
    "Get the current weather in a city. Parameters: "
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}\n\n'
    "get_time: Call this tool to interact with the get_time API. What is the get_time API useful for? "
    'Current time. Parameters: {"type": "object", "properties": {}}\n\n'
    "Use the following format:\n\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [get_weather, get_time]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n\n"
    "Begin!"
)
CALL_OUTPUT = (
    'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:'
)


def test_first_request_puts_the_instruction_before_the_question():
    request = build_prompt(
        [{"role": "system", "content": "\nBe brief.\n"}, {"role": "user", "content": "Weather in Paris?"}],
        functions=[WEATHER, TIME],
    )
    assert request.prompt.system == "Be brief."
    assert request.prompt.query == INSTRUCTION + "\n\nQuestion: Weather in Paris?"
    assert request.prompt.history == () and request.prompt.assistant_prefix == ""
    assert request.stop == ("Observation:", "Observation:\n")
    assert request.function_names == ("get_weather", "get_time")


def test_function_result_continues_the_unfinished_assistant_turn():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "I need the weather.",
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": '{"temp": 21}'},
    ]
    request = build_prompt(messages, functions=[WEATHER, TIME])
    assert request.prompt.query == INSTRUCTION + "\n\nQuestion: Weather in Paris?"
    assert request.prompt.assistant_prefix == (
        'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        'Observation: {"temp": 21}\nThought:'
    )


def test_with_history_the_instruction_goes_to_the_previous_turn():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    request = build_prompt(messages, functions=[WEATHER, TIME])
    assert request.prompt.history == (
        (INSTRUCTION + "\n\nQuestion: Hi", "Thought: I now know the final answer.\nFinal Answer: Hello!"),
    )
    assert request.prompt.query == "Weather in Paris?"


def test_without_functions_the_conversation_is_plain_chat():
    request = build_prompt([{"role": "user", "content": "Hi"}], stop=["\nUser:"])
    assert request.prompt.query == "Hi" and request.function_names == ()
    assert request.stop == ("\nUser:", "User:")  # the leading-newline-free spelling is added too


def test_tool_calls_with_several_calls_become_consecutive_steps():
    messages = [
        {"role": "user", "content": "Weather and time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                },
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "rain"},
        {"role": "tool", "tool_call_id": "b", "content": "12:00"},
    ]
    request = build_prompt(
        messages, tools=[{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    )
    assert request.use_tools
    assert request.prompt.assistant_prefix == (
        'Thought: \nAction: get_weather\nAction Input: {"city": "Oslo"}\nObservation: rain\n'
        "Thought: \nAction: get_time\nAction Input: {}\nObservation: 12:00\nThought:"
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "system", "content": "x"}], "at least one user message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        (
            [{"role": "function", "content": "x"}, {"role": "user", "content": "a"}],
            r"messages\[0\].*follow an assistant",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "critic", "content": "b"}],
            r"messages\[1\].*unsupported role",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            r"messages\[0\].*text content",
        ),
    ],
)
def test_bad_requests_name_the_message(messages, match):
    with pytest.raises(ConfigError, match=match):
        build_prompt(messages, functions=[WEATHER])


def test_both_functions_and_tools_is_an_error():
    with pytest.raises(ConfigError, match="either"):
        build_prompt(
            [{"role": "user", "content": "a"}],
            functions=[WEATHER],
            tools=[{"type": "function", "function": TIME}],
        )


def test_response_message_for_a_call_an_answer_and_prose():
    request = build_prompt([{"role": "user", "content": "Weather?"}], functions=[WEATHER])
    message, finish = response_message(CALL_OUTPUT, request)
    assert finish == "function_call"
    assert message == {
        "role": "assistant",
        "content": "I need the weather.",
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    message, finish = response_message("Thought: done\nFinal Answer: It is 21 °C.", request)
    assert (message["content"], finish) == ("It is 21 °C.", "stop")
    message, finish = response_message("Just some prose.", request)
    assert (message["content"], finish) == ("Just some prose.", "stop")


def test_chat_completion_end_to_end_with_tools():
    llm = ScriptedLLM([CALL_OUTPUT + " {fake}"])
    tools = [{"type": "function", "function": WEATHER}]
    response = chat_completion(llm, [{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    choice = response["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    prompt, stop = llm.calls[0]
    assert "Observation:" in stop and prompt.query.endswith("Question: Weather in Paris?")


def test_stream_of_a_final_answer_sends_only_the_answer_as_content():
    llm = ScriptedLLM(
        ["Thought: I now know the final answer.\nFinal Answer: It is sunny\nin Paris."], chunk_size=2
    )
    chunks = list(chat_completion_stream(llm, [{"role": "user", "content": "Weather?"}], functions=[WEATHER]))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == "It is sunny\nin Paris."
    assert len(chunks) > 4  # it streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stream_of_a_function_call_ends_with_the_call():
    llm = ScriptedLLM([CALL_OUTPUT])
    chunks = list(chat_completion_stream(llm, [{"role": "user", "content": "Weather?"}], functions=[WEATHER]))
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "function_call"
    assert last["delta"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == ""


STREAMED_REPLIES = [
    "Thought: done\nFinal Answer: ans\nObserv\n",  # a partial stop word at the end
    "Hello! How can I help?",  # no ReAct format: the whole reply is the answer, sent once
    "Thought: done\nFinal Answer: ans\nObservation: made up",  # cut at the stop word by the backend
]


@pytest.mark.parametrize("reply", STREAMED_REPLIES)
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_streamed_content_joins_to_the_content_of_the_same_request(reply, chunk_size):
    messages = [{"role": "user", "content": "Hi"}]
    llm = ScriptedLLM([reply, reply], chunk_size=chunk_size)
    chunks = list(chat_completion_stream(llm, messages, functions=[WEATHER]))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    content = chat_completion(llm, messages, functions=[WEATHER])["choices"][0]["message"]["content"]
    assert streamed == content and "Observ" not in content and "made up" not in content


@pytest.mark.parametrize("streaming", [False, True])
def test_the_backends_cut_at_the_stop_strings_is_the_content(streaming):
    llm = ScriptedLLM(["Hello END more"])
    messages = [{"role": "user", "content": "Hi"}]
    if streaming:
        chunks = chat_completion_stream(llm, messages, stop=["END"])
        content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    else:
        content = chat_completion(llm, messages, stop=["END"])["choices"][0]["message"]["content"]
    assert content == "Hello "
