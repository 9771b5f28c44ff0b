"""Tool declaration, TOOL_DESC rendering, argument parsing and validation, the registry."""

from __future__ import annotations

import json
from enum import Enum
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from qwen_agent.errors import ToolArgumentError, ToolError, ToolNotFoundError
from qwen_agent.tools import BaseTool, ToolRegistry, default_registry, register_tool, tool

# The reference templates, verbatim (Qwen examples/react_prompt.md for (a); react_demo.py and openai_api.py for
# (b) and (c), which drop the suffix; react_demo.py appends one by args_format).
REF_TOOL_DESC_A = """{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters} Format the arguments as a JSON object."""
REF_TOOL_DESC_BC = """{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"""
REF_JSON_SUFFIX = " Format the arguments as a JSON object."
REF_CODE_SUFFIX = " Enclose the code within triple backticks (`) at the beginning and end of the code."


class ImageGen(BaseTool):
    name = "image_gen"
    name_for_human = "通义万相"
    description = "通义万相是一个AI绘画（图像生成）服务，输入文本描述，返回根据文本作画得到的图片的URL"
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "中文关键词，描述了希望图像具有什么内容"}},
        "required": ["query"],
    }

    def call(self, arguments):
        return json.dumps(
            {"image_url": f"https://example.invalid/{arguments['query']}.png"}, ensure_ascii=False
        )


class Search(BaseTool):
    name = "search"
    name_for_human = "Search"
    description = "Search the web."
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "what to look for"},
            "count": {"type": "integer", "description": "how many results"},
            "safe": {"type": "boolean"},
            "region": {"type": "string", "enum": ["us", "cn"]},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["query"],
    }

    def call(self, arguments):
        return f"results for {arguments['query']}"


# ---- TOOL_DESC ----------------------------------------------------------------------------------------------


def _qwen_list(tool_: BaseTool) -> str:
    """The Qwen examples' list form, built independently of the library's renderer."""
    props, required = tool_.schema["properties"], tool_.schema["required"]
    items = [
        {
            "name": n,
            "description": p.get("description", ""),
            "required": n in required,
            "schema": {k: v for k, v in p.items() if k not in ("description", "default")},
        }
        for n, p in props.items()
    ]
    return json.dumps(items, ensure_ascii=False)


def test_tool_desc_react_prompt_matches_reference_template_byte_for_byte():
    t = ImageGen()
    expected = REF_TOOL_DESC_A.format(
        name_for_model="image_gen",
        name_for_human="通义万相",
        description_for_model=t.description,
        parameters=_qwen_list(t),
    )
    assert t.tool_desc() == expected
    assert t.tool_desc("react_prompt").encode() == expected.encode()
    assert (
        '[{"name": "query", "description": "中文关键词，描述了希望图像具有什么内容", "required": true, '
        '"schema": {"type": "string"}}]' in expected
    )


def test_tool_desc_react_demo_appends_the_suffix_by_args_format():
    json_tool, code_tool = ImageGen(), default_registry.select(["code_interpreter"]).get("code_interpreter")
    for t, suffix in ((json_tool, REF_JSON_SUFFIX), (code_tool, REF_CODE_SUFFIX)):
        expected = (
            REF_TOOL_DESC_BC.format(
                name_for_model=t.name,
                name_for_human=t.name_for_human,
                description_for_model=t.description,
                parameters=_qwen_list(t),
            )
            + suffix
        )
        assert t.tool_desc("react_demo").encode() == expected.encode()
    assert code_tool.tool_desc("react_demo") == (
        "code_interpreter: Call this tool to interact with the 代码解释器 API. What is the 代码解释器 API useful "
        'for? 代码解释器，可用于执行Python代码。 Parameters: [{"name": "code", "description": "待执行的代码", '
        '"required": true, "schema": {"type": "string"}}] Enclose the code within triple backticks (`) at '
        "the beginning and end of the code."
    )


def test_tool_desc_openai_api_uses_the_json_schema_and_no_suffix():
    t = Search()
    expected = REF_TOOL_DESC_BC.format(
        name_for_model="search",
        name_for_human="Search",
        description_for_model="Search the web.",
        parameters=json.dumps(t.parameters, ensure_ascii=False),
    )
    assert t.tool_desc("openai_api") == expected
    with pytest.raises(ToolError, match="unknown TOOL_DESC variant 'nope'"):
        t.tool_desc("nope")


# ---- schemas from functions and pydantic --------------------------------------------------------------------


class Unit(Enum):
    C = "c"
    F = "f"


def test_schema_from_typed_function_and_docstring():
    @tool(register=False)
    def weather(
        city: str,
        days: int = 1,
        unit: Unit = Unit.C,
        tags: list[str] | None = None,
        mode: Literal["brief", "full"] = "brief",
        detailed: bool = False,
    ) -> str:
        """Forecast the weather for a city.

        Args:
            city: name of the city, in English
            days: how many days ahead,
                counting today
            unit: temperature unit
        """
        return f"{city}:{days}:{unit}:{tags}:{mode}:{detailed}"

    assert weather.name == "weather"
    assert weather.description == "Forecast the weather for a city."
    assert weather.schema == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "name of the city, in English"},
            "days": {"type": "integer", "description": "how many days ahead, counting today", "default": 1},
            "unit": {"type": "string", "enum": ["c", "f"], "description": "temperature unit", "default": "c"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mode": {"type": "string", "enum": ["brief", "full"], "default": "brief"},
            "detailed": {"type": "boolean", "default": False},
        },
        "required": ["city"],
    }
    assert weather.invoke("{'city': 'Paris', days: 3,}").observation == "Paris:3:c:None:brief:False"
    assert weather("Rome") == "Rome:1:Unit.C:None:brief:False"  # still callable as a function


def test_schema_from_rest_docstring_and_bad_declarations():
    @tool(register=False, name="lookup")
    def f(term: str) -> str:
        """Look a term up.

        :param term: the word to look up
        """
        return term

    assert f.name == "lookup" and f.schema["properties"]["term"]["description"] == "the word to look up"
    with pytest.raises(ToolError, match="parameter 'x' needs a type hint"):
        tool(lambda x: x, register=False)
    with pytest.raises(ToolError, match="cannot be described in JSON Schema"):

        @tool(register=False)
        def g(x: complex) -> str:
            return ""


def test_pydantic_model_as_schema_source():
    class Query(BaseModel):
        query: str = Field(description="search terms")
        count: int = 5

    class PydSearch(BaseTool):
        name = "pyd_search"
        description = "Search."
        parameters = Query

        def call(self, arguments):
            return f"{arguments['query']}/{arguments['count']}"

    t = PydSearch()
    assert t.schema["properties"]["query"] == {"type": "string", "description": "search terms"}
    assert t.schema["required"] == ["query"]
    assert t.invoke('{"query": "qwen"}').observation == "qwen/5"
    assert t.invoke("{}").error.endswith("missing required argument 'query'")
    assert t.invoke('{"query": "q", "count": "many"}').error.endswith("'count' must be an integer")


# ---- argument parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"query": "qwen"}',
        "{'query': 'qwen'}",  # JSON5: single quotes
        '{"query": "qwen",}',  # JSON5: trailing comma
        "{query: 'qwen', // a comment\n}",  # JSON5: bare key and comment
        '```json\n{"query": "qwen"}\n```',  # fenced
        '  {"query": "qwen"}\n',
        {"query": "qwen"},
    ],
)
def test_json_arguments_accept_what_qwen_emits(raw):
    assert Search().parse_arguments(raw) == {"query": "qwen"}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("```py\nprint(1)\n```", "print(1)"),
        ("```python\nx = 1\nprint(x)\n```", "x = 1\nprint(x)"),
        ("Here is code:\n```\nprint(2)\n```\nthanks", "print(2)"),
        ("print(3)", "print(3)"),
        ('{"code": "print(4)"}', "print(4)"),
        ("{'code': 'print(5)',}", "print(5)"),
        ("{1: 'a'}", "{1: 'a'}"),  # a dict literal is code, not arguments
        ("`print(6)`", "print(6)"),
        ("```py\nprint(7)", "print(7)"),  # unterminated fence (stop word cut it)
        ({"code": "print(8)"}, "print(8)"),
    ],
)
def test_code_arguments_accept_fenced_raw_and_json(raw, code):
    t = default_registry.select(["code_interpreter"]).get("code_interpreter")
    assert t.parse_arguments(raw) == {"code": code}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{}", "missing required argument 'query'"),
        ('{"query": null}', "missing required argument 'query'"),
        ('{"query": "q", "count": "5"}', "'count' must be an integer"),
        ('{"query": "q", "count": 2.5}', "'count' must be an integer"),
        ('{"query": 7}', "'query' must be a string"),
        ('{"query": "q", "safe": "yes"}', "'safe' must be a boolean (true or false)"),
        ('{"query": "q", "score": "high"}', "'score' must be a number"),
        ('{"query": "q", "region": "eu"}', "'region' must be one of: 'us', 'cn'"),
        ('{"query": "q", "tags": "a"}', "'tags' must be a list"),
        ('{"query": "q", "tags": ["a", 3]}', "'tags[1]' must be a string"),
        (
            '{"query": "q", "limit": 3}',
            "unexpected argument 'limit' (valid arguments: query, count, safe, region, score, tags)",
        ),
        ('["q"]', "arguments must be a JSON object, got a list"),
        ('"q"', "arguments must be a JSON object, got a string"),
        ("", "empty arguments; expected a JSON object with 'query'"),
        ("{query: ", "arguments are not valid JSON"),
    ],
)
def test_every_validation_message(raw, message):
    with pytest.raises(ToolArgumentError) as info:
        Search().parse_arguments(raw)
    assert str(info.value).startswith(message)
    assert len(str(info.value)) < 160  # short enough for an Observation


def test_code_tool_without_code_and_integral_float():
    with pytest.raises(ToolArgumentError, match="no code given"):
        default_registry.select(["code_interpreter"]).get("code_interpreter").parse_arguments("```py\n```")
    assert Search().parse_arguments('{"query": "q", "count": 3.0}')["count"] == 3


# ---- invoke never raises ------------------------------------------------------------------------------------


def test_invoke_turns_failures_into_observations():
    class Broken(BaseTool):
        name = "broken"
        description = "Always fails."

        def call(self, arguments):
            raise RuntimeError("backend unavailable")

    res = Broken().invoke("{}")
    assert not res.ok and res.error_kind == "tool_error"
    assert res.observation.startswith("Error: tool 'broken' failed:\nTraceback (most recent call last):")
    assert res.observation.endswith("RuntimeError: backend unavailable")

    res = Search().invoke('{"count": 1}')
    assert (res.ok, res.error_kind) == (False, "invalid_arguments")
    assert res.observation == "Error: invalid arguments for tool 'search': missing required argument 'query'"

    res = Search().invoke('{"query": "qwen"}')
    assert (res.ok, res.observation, res.error) == (True, "results for qwen", None)


# ---- registry -----------------------------------------------------------------------------------------------


def test_registry_lookup_listing_and_errors():
    reg = ToolRegistry([Search, ImageGen])
    assert reg.names() == ["search", "image_gen"] and "search" in reg and len(reg) == 2
    assert reg.get("search") is reg.get("search")  # one instance per registry
    with pytest.raises(ToolNotFoundError) as info:
        reg.get("serch")
    assert str(info.value) == "no tool named 'serch'; available tools: image_gen, search"
    with pytest.raises(ToolError, match="already registered"):

        @register_tool(registry=reg)
        class Other(Search):
            pass

    reg.register(Search, overwrite=True)
    reg.unregister("image_gen")
    assert reg.names() == ["search"]


def test_select_gives_fresh_instances_and_default_registry_holds_builtins():
    assert {"code_interpreter", "web_fetch", "current_time"} <= set(default_registry.names())
    one, two = default_registry.select(["current_time"]), default_registry.select(["current_time"])
    assert one.get("current_time") is not two.get("current_time")

    reg = ToolRegistry()

    @register_tool(registry=reg)
    class Echo(BaseTool):
        name = "echo"
        description = "Echo."
        parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}

        def call(self, arguments):
            return arguments["text"]

    assert reg.get("echo").invoke("{'text': 'hi'}").observation == "hi"
    assert "echo" not in default_registry


def test_bad_tool_declarations_are_rejected():
    class NoName(BaseTool):
        description = "x"

    with pytest.raises(ToolError, match="name must be"):
        NoName()

    class BadSchema(BaseTool):
        name = "bad"
        parameters = {"type": "string"}

    with pytest.raises(ToolError, match="tool 'bad': parameters must be a JSON Schema"):
        BadSchema()

    class CodeWithoutCode(BaseTool):
        name = "runner"
        args_format = "code"

    with pytest.raises(ToolError, match="needs a 'code' string parameter"):
        CodeWithoutCode()


def test_current_time_tool():
    import datetime as dt

    fixed = dt.datetime(2024, 2, 29, 16, 30, tzinfo=dt.timezone.utc)
    t = default_registry.get("current_time").__class__(clock=lambda: fixed)
    assert t.invoke("{}").observation == "2024-02-29 16:30:00 UTC (Thursday), time zone UTC"
    assert t.invoke("{'timezone': 'Asia/Shanghai'}").observation == (
        "2024-03-01 00:30:00 CST (Friday), time zone Asia/Shanghai"
    )
    res = t.invoke('{"timezone": "Mars/Olympus"}')
    assert res.error_kind == "invalid_arguments" and "unknown time zone 'Mars/Olympus'" in res.observation


def test_any_of_schemas_and_openai_function_entry():
    class Lookup(BaseTool):
        name = "lookup"
        description = "Look up an id."
        parameters = {
            "type": "object",
            "properties": {"id": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "required": ["id"],
        }

        def call(self, arguments):
            return repr(arguments["id"])

    t = Lookup()
    assert t.invoke('{"id": 7}').observation == "7" and t.invoke('{"id": "x7"}').observation == "'x7'"
    assert t.invoke('{"id": [7]}').error.endswith("'id' must be a string or an integer")
    assert t.openai_function() == {
        "name": "lookup",
        "name_for_human": "lookup",
        "description": "Look up an id.",
        "parameters": t.schema,
    }
    assert set(default_registry.select().names()) >= {"code_interpreter", "web_fetch", "current_time"}
