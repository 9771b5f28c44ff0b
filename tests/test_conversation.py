"""Conversations as data: a conversation saved after turn 2 and resumed in a new process sends the model the same
prompts for turn 3, byte for byte, as one that never stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from qwen_agent.agent import Agent
from qwen_agent.conversation import Conversation, event_to_dict, result_from_json, result_to_json
from qwen_agent.errors import ConfigError
from qwen_agent.llm import ScriptedLLM

# Three turns, each a tool call then an answer; non-ASCII, a leading newline and trailing spaces test the strings'
# exact round trip.
SETUP = textwrap.dedent(
    '''
    from qwen_agent.agent import Agent
    from qwen_agent.llm import ScriptedLLM
    from qwen_agent.tools import tool

    @tool(register=False)
    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: the key
        """
        return {"a": "阿尔法  ", "b": "\\nbeta\\t"}.get(key, "none")

    def call(key):
        return f'Thought: 查一下 {key}\\nAction: lookup\\nAction Input: {{"key": "{key}"}}\\nObservation:'

    def final(text):
        return f" I now know the final answer.\\nFinal Answer: {text}  "

    TURNS = [("What is a?  ", call("a"), final("阿尔法")), ("\\nAnd b?", call("b"), final("beta")),
             ("Both, please.", call("c"), final("阿尔法 and beta"))]

    def agent(outputs):
        llm = ScriptedLLM(outputs)
        return Agent(llm, [lookup], system="You are a careful assistant. "), llm
    '''
)

SAVE = """
import sys
from qwen_agent.conversation import Conversation
agent, _ = agent([o for _, c, f in TURNS[:2] for o in (c, f)])
conversation = Conversation()
for query, _, _ in TURNS[:2]:
    conversation.add(agent.run(query, history=conversation.history))
open(sys.argv[1], "w", encoding="utf-8").write(conversation.to_json())
"""

RESUME = """
import json, sys
from qwen_agent.conversation import Conversation
conversation = Conversation.from_json(open(sys.argv[1], encoding="utf-8").read())
query, call, final = TURNS[2]
agent, llm = agent([call, final])
agent.run(query, history=conversation.history)
print(json.dumps([prompt.to_chatml() for prompt, _ in llm.calls]))
"""


def run_script(body: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SETUP + body, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_conversation_resumed_in_a_new_process_sends_byte_identical_prompts(tmp_path):
    namespace: dict = {}
    exec(SETUP, namespace)
    agent, llm = namespace["agent"]([o for _, c, f in namespace["TURNS"] for o in (c, f)])
    history = None
    for query, _, _ in namespace["TURNS"]:
        history = agent.run(query, history=history).history
    uninterrupted = [prompt.to_chatml() for prompt, _ in llm.calls[4:]]

    saved = tmp_path / "conversation.json"
    run_script(SAVE, str(saved))
    resumed = json.loads(run_script(RESUME, str(saved)))
    assert [p.encode() for p in resumed] == [p.encode() for p in uninterrupted]
    assert "Observation: 阿尔法" in resumed[0]  # the earlier turns are in the prompt
    stored = Conversation.from_json(saved.read_text(encoding="utf-8"))
    assert len(stored.runs) == 2 and stored.runs[1].history == stored.history


def test_results_and_events_round_trip_as_json():
    llm = ScriptedLLM(["Thought: x\nAction: nope\nAction Input: {}\nObservation:", " ok\nFinal Answer: 42"])
    events = list(Agent(llm, {"t": _Echo()}).stream("Q?"))
    result = events[-1].result
    assert result_from_json(result_to_json(result)) == result
    data = [event_to_dict(e) for e in events]
    assert data[0] == {"type": "step_started", "index": 0, "forced": False, "prompt_tokens": None,
                       "context_window": None}  # fmt: skip
    assert data[-1]["type"] == "final_answer" and data[-1]["result"]["answer"] == "42"
    assert json.loads(json.dumps(data)) == data


def test_bad_conversation_json_names_the_field():
    with pytest.raises(ConfigError, match=r"conversation JSON: history\.0\.1: Field required"):
        Conversation.from_json('{"history": [["only one"]]}')
    with pytest.raises(ConfigError, match="conversation JSON"):
        Conversation.from_json("not json")
    with pytest.raises(ConfigError, match=r"run result JSON: stop_reason: "):
        result_from_json(result_to_json(_result()).replace('"final_answer"', '"whatever"'))


class _Echo:
    name = "t"

    def tool_desc(self, variant: str) -> str:
        return "t: echo"

    def invoke(self, raw: str):
        from qwen_agent.tools import ToolResult

        return ToolResult(raw)


def _result():
    return Agent(ScriptedLLM([" ok\nFinal Answer: 1"]), {"t": _Echo()}).run("Q")
