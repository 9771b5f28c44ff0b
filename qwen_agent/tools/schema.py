"""Parameter schemas for tools: derive a JSON Schema, render it for the prompt, validate arguments against it.

A tool's parameters are one JSON Schema object (``{"type": "object", "properties": ..., "required": [...]}``).
It can be written by hand, taken from a pydantic model, or derived from a function's type hints and docstring.
Validation covers the subset a tool declaration needs (types, required, enum, unknown names, array items) and
produces messages short enough to hand back to the model as an Observation.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from ..errors import ToolArgumentError, ToolError

__all__ = [
    "schema_from_function",
    "schema_from_pydantic",
    "normalize_schema",
    "qwen_parameter_list",
    "validate_arguments",
]

_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true or false)",
    "object": "a JSON object",
    "array": "a list",
    "null": "null",
}


def _type_schema(hint: Any, where: str) -> dict[str, Any]:
    """The JSON Schema fragment for one type hint."""
    if hint in _PY_TO_JSON:
        return {"type": _PY_TO_JSON[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {
            "type": _PY_TO_JSON.get(type(next(iter(hint)).value), "string"),
            "enum": [m.value for m in hint],
        }
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return {"type": _PY_TO_JSON.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (list, tuple, set, frozenset) or hint in (typing.List, typing.Tuple):  # noqa: UP006
        schema: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = _type_schema(args[0], where)
        return schema
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _type_schema(members[0], where)
    raise ToolError(
        f"{where}: type {hint!r} cannot be described in JSON Schema; use str, int, float, bool, "
        "list[...], dict, Literal[...] or an Enum"
    )


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Split a docstring into its description and per-argument descriptions (Google or reST style)."""
    doc = inspect.cleandoc(doc or "")
    arg_docs: dict[str, str] = {}
    for name, text in re.findall(r"^:param\s+(?:\w+\s+)?(\w+):\s*(.+(?:\n(?!:)\s+.+)*)", doc, re.M):
        arg_docs[name] = " ".join(text.split())
    section = re.search(r"^(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)+)", doc, re.M)
    if section:
        for name, text in re.findall(
            r"^[ \t]+(\w+)(?:\s*\([^)]*\))?:\s*(.+(?:\n[ \t]{2,}(?![ \t]*\w+(?:\s*\([^)]*\))?:).+)*)",
            section.group(1),
            re.M,
        ):
            arg_docs[name] = " ".join(text.split())
    first_section = re.search(r"^(?:Args|Arguments|Parameters|Returns|Raises|Examples?):|^:param", doc, re.M)
    description = doc[: first_section.start()] if first_section else doc
    return " ".join(description.split()), arg_docs


def schema_from_function(func: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """Return ``(description, parameters schema)`` from a function's docstring and type hints.

    Every parameter needs a type hint; parameters without a default are required.
    """
    where = f"tool function {func.__name__!r}"
    description, arg_docs = _docstring_parts(func.__doc__ or "")
    hints = typing.get_type_hints(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"{where}: *args and **kwargs cannot be tool parameters")
        if name not in hints:
            raise ToolError(f"{where}: parameter {name!r} needs a type hint")
        prop = _type_schema(hints[name], f"{where}, parameter {name!r}")
        if name in arg_docs:
            prop["description"] = arg_docs[name]
        if param.default is param.empty:
            required.append(name)
        elif param.default is not None:
            prop["default"] = param.default.value if isinstance(param.default, enum.Enum) else param.default
        properties[name] = prop
    return description, {"type": "object", "properties": properties, "required": required}


def schema_from_pydantic(model: type) -> dict[str, Any]:
    """A pydantic model's JSON Schema, with ``$ref`` to nested models inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    schema = inline(schema)
    schema.setdefault("required", [])
    return schema


def normalize_schema(parameters: Any, where: str) -> dict[str, Any]:
    """Accept a JSON Schema object, a pydantic model class, or ``None`` (no parameters)."""
    if parameters is None:
        return {"type": "object", "properties": {}, "required": []}
    if isinstance(parameters, type) and hasattr(parameters, "model_json_schema"):
        return schema_from_pydantic(parameters)
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ToolError(
            f'{where}: parameters must be a JSON Schema with "type": "object", or a pydantic model'
        )
    props = parameters.get("properties", {})
    unknown = [r for r in parameters.get("required", []) if r not in props]
    if unknown:
        raise ToolError(f"{where}: required names {unknown} are not in properties")
    schema = dict(parameters)  # key order kept: openai_api renders the schema as written
    schema["properties"] = props
    schema.setdefault("required", [])
    return schema


def qwen_parameter_list(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The list form the Qwen ReAct examples put in TOOL_DESC: ``[{name, description, required, schema}]``."""
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        type_schema = {k: v for k, v in prop.items() if k not in ("description", "default", "title")}
        out.append(
            {
                "name": name,
                "description": prop.get("description", ""),
                "required": name in required,
                "schema": type_schema,
            }
        )
    return out


def _type_ok(value: Any, expected: str) -> bool:
    if expected == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            or (isinstance(value, float) and value.is_integer())
        )
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}
    return isinstance(value, checks[expected]) if expected in checks else True


def _check_value(value: Any, schema: dict[str, Any], label: str) -> Any:
    """Check one value against a schema fragment; returns it (integral floats become ints)."""
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        for option in options:
            try:
                return _check_value(value, option, label)
            except ToolArgumentError:
                continue
        kinds = " or ".join(_TYPE_WORDS.get(o.get("type", ""), "a valid value") for o in options)
        raise ToolArgumentError(f"'{label}' must be {kinds}")
    expected = schema.get("type")
    expected_list = expected if isinstance(expected, list) else [expected] if expected else []
    if expected_list and not any(_type_ok(value, t) for t in expected_list):
        raise ToolArgumentError(
            f"'{label}' must be {' or '.join(_TYPE_WORDS.get(t, t) for t in expected_list)}"
        )
    if expected_list == ["integer"] and isinstance(value, float):
        value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(repr(c) for c in schema["enum"])
        raise ToolArgumentError(f"'{label}' must be one of: {choices}")
    if isinstance(value, list) and "items" in schema:
        value = [_check_value(v, schema["items"], f"{label}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and "properties" in schema:
        value = validate_arguments(value, schema, prefix=f"{label}.")
    return value


def validate_arguments(args: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check ``args`` against an object schema and return them (with defaults filled in).

    Raises ToolArgumentError with one short message naming the first problem.
    """
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in args or args[name] is None:
            raise ToolArgumentError(f"missing required argument '{prefix}{name}'")
    # Top level: unknown names are rejected unless the schema allows them (a typo should not pass silently).
    if schema.get("additionalProperties", bool(prefix)) is False:
        unknown = [k for k in args if k not in properties]
        if unknown:
            valid = ", ".join(properties) or "none"
            raise ToolArgumentError(f"unexpected argument '{prefix}{unknown[0]}' (valid arguments: {valid})")
    out: dict[str, Any] = {}
    for name, value in args.items():
        prop = properties.get(name)
        if prop is None:
            out[name] = value
        elif value is None and name not in schema.get("required", []):
            continue
        else:
            out[name] = _check_value(value, prop, prefix + name)
    for name, prop in properties.items():
        if name not in out and "default" in prop:
            out[name] = prop["default"]
    return out
