"""The OpenAI server's ``tools`` path and LangChain's ``ChatOpenAI.bind_tools`` on a real model: does the reply
call the offered tool with arguments valid for its schema?

Starts ``qwen-agent serve``'s app on 127.0.0.1 over ``--model`` (greedy), asks "What's the weather in Paris?"
with one ``get_weather`` tool through the ``openai`` client and through LangChain's ``ChatOpenAI.bind_tools``, and
prints and writes (``--out``, JSON) what came back, checked with ``jsonschema``.

    python benchmarks/hermes_tools_check.py --model /work/models/qwen2.5-coder-0.5b [--tool-format react]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jsonschema

from qwen_agent.runtime.engine import load_model
from qwen_agent.serve.openai_api import BackgroundServer, create_app

QUESTION = "What's the weather in Paris?"
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": PARAMETERS,
    },
}


def _verdict(name: str | None, arguments: object) -> dict:
    valid = False
    if name == "get_weather" and isinstance(arguments, dict):
        try:
            jsonschema.validate(arguments, PARAMETERS)
            valid = True
        except jsonschema.ValidationError:
            pass
    return {"name": name, "arguments": arguments, "offered_name_and_valid_arguments": valid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tool-format", default=None, choices=["react", "hermes"])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default="hermes_tools_check.json")
    args = parser.parse_args()

    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    engine = load_model(args.model, device="cpu")
    app = create_app(engine, model_name="m", tool_format=args.tool_format)
    results = {}
    with BackgroundServer(app) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        started = time.perf_counter()
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": QUESTION}],
            tools=[TOOL],
            temperature=0,
            max_tokens=args.max_tokens,
        )
        message = reply.choices[0].message
        call = (message.tool_calls or [None])[0]
        arguments = json.loads(call.function.arguments) if call else None
        results["openai_tools"] = {
            **_verdict(call.function.name if call else None, arguments),
            "content": message.content,
            "seconds": round(time.perf_counter() - started, 1),
        }
        started = time.perf_counter()
        chat = ChatOpenAI(
            base_url=server.url + "/v1", api_key="none", model="m", temperature=0, max_tokens=args.max_tokens
        )
        ai = chat.bind_tools([TOOL]).invoke(QUESTION)
        call = (ai.tool_calls or [None])[0]
        results["langchain_bind_tools"] = {
            **_verdict(call["name"] if call else None, call["args"] if call else None),
            "content": ai.content,
            "seconds": round(time.perf_counter() - started, 1),
        }
    meta = {"model": args.model, "tool_format": app.state.tool_format, "machine": platform.machine()}
    meta["date"] = time.strftime("%Y-%m-%d %H:%M")
    out = {"meta": meta, **results}
    print(json.dumps(out, indent=2, ensure_ascii=False))
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
