"""``BaseTool``: one declaration gives the model-facing TOOL_DESC line and the argument validation.

A tool has a ``name`` (what the model writes after ``Action:``), a ``name_for_human``, a ``description``, a
``parameters`` JSON Schema (or a pydantic model) and an ``args_format``: ``"json"`` (the Action Input is a JSON
object) or ``"code"`` (the Action Input is code, usually in a fenced block). Subclasses implement :meth:`call`.

The agent uses :meth:`BaseTool.invoke`, which never raises: bad arguments and failing tools become a
:class:`ToolResult` whose ``observation`` is the text the model sees next.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import json5

from ..errors import ToolArgumentError, ToolError
from ..react import VARIANTS, Variant, tool_desc_line
from .schema import normalize_schema, qwen_parameter_list, validate_arguments

__all__ = ["BaseTool", "ToolResult", "extract_code"]

ErrorKind = Literal["invalid_arguments", "tool_error"]

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_MAX_TRACEBACK_CHARS = 1500
_FRAMEWORK_DIRS = (os.path.dirname(__file__), os.path.dirname(asyncio.__file__))


@dataclass
class ToolResult:
    """The outcome of one tool call, as the agent sees it.

    ``ok`` is False when the arguments were invalid (``error_kind="invalid_arguments"``) or the tool itself
    failed or reports a failure, such as code that raised in the interpreter (``error_kind="tool_error"``);
    ``observation`` always holds the text to show the model. ``data`` carries
    the tool's structured result where it has one (the code interpreter's ExecutionResult).
    """

    observation: str
    ok: bool = True
    error: str | None = None
    error_kind: ErrorKind | None = None
    data: Any = None
    duration: float = 0.0


def extract_code(text: str) -> str:
    """The code in an Action Input: the first fenced block if there is one, otherwise the text itself."""
    match = _FENCE.search(text)
    if match:
        return match.group(1).strip("\n")
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] == "`":  # a `single backtick` span
        return text.strip("`")
    return text


class BaseTool:
    """Base class of every tool. Set the class attributes and implement :meth:`call`.

    >>> class Echo(BaseTool):
    ...     name = "echo"
    ...     description = "Repeat the text."
    ...     parameters = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    ...     def call(self, arguments): return arguments["text"]
    """

    name: ClassVar[str] = ""
    name_for_human: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[Any] = None  # JSON Schema dict or pydantic model class
    args_format: ClassVar[Literal["json", "code"]] = "json"

    def __init__(self) -> None:
        where = f"tool {self.name or type(self).__name__!r}"
        if not self.name or not re.fullmatch(r"[A-Za-z_][\w.-]*", self.name):
            raise ToolError(f"{where}: name must be a non-empty identifier-like string, got {self.name!r}")
        if self.args_format not in ("json", "code"):
            raise ToolError(f"{where}: args_format must be 'json' or 'code', got {self.args_format!r}")
        self._pydantic_model = self.parameters if hasattr(self.parameters, "model_validate") else None
        self.schema: dict[str, Any] = normalize_schema(self.parameters, where)
        if self.args_format == "code" and "code" not in self.schema["properties"]:
            raise ToolError(f"{where}: a code tool needs a 'code' string parameter")

    # ---- model-facing text -------------------------------------------------------------------------------
    def tool_desc(self, variant: Variant = "react_prompt") -> str:
        """The TOOL_DESC line for this tool, byte for byte as the chosen reference variant renders it.

        ``react_prompt``: Qwen examples/react_prompt.md (always ends "Format the arguments as a JSON object.");
        ``react_demo``: examples/react_demo.py (suffix by ``args_format``); ``openai_api``: openai_api.py (no
        suffix, the JSON Schema itself as parameters).
        """
        if variant not in VARIANTS:
            raise ToolError(
                f"tool {self.name!r}: unknown TOOL_DESC variant {variant!r} (valid: {', '.join(VARIANTS)})"
            )
        parameters = self.schema if variant == "openai_api" else qwen_parameter_list(self.schema)
        return tool_desc_line(
            self.name,
            self.name_for_human or self.name,
            self.description,
            parameters,
            variant=variant,
            args_format=self.args_format,
        )

    def openai_function(self) -> dict[str, Any]:
        """This tool as an OpenAI ``functions`` entry (name, description, parameters)."""
        return {
            "name": self.name,
            "name_for_human": self.name_for_human or self.name,
            "description": self.description,
            "parameters": self.schema,
        }

    # ---- arguments --------------------------------------------------------------------------------------
    def parse_arguments(self, raw: str | dict[str, Any]) -> dict[str, Any]:
        """Turn an Action Input (text or dict) into validated arguments, or raise ToolArgumentError.

        Accepts JSON and JSON5 (single quotes, trailing commas, comments). A code tool also accepts a fenced
        code block, raw code, or ``{"code": "..."}``.
        """
        if isinstance(raw, dict):
            args = raw
        elif not isinstance(raw, str):
            raise ToolArgumentError(f"arguments must be a JSON object, got {type(raw).__name__}")
        elif self.args_format == "code":
            args = self._code_arguments(raw)
        else:
            args = self._json_arguments(raw)
        if self._pydantic_model is not None:
            return self._validate_pydantic(args)
        return validate_arguments(args, self.schema)

    def _code_arguments(self, raw: str) -> dict[str, Any]:
        text = raw.strip()
        if text.startswith("{"):
            try:
                loaded = json5.loads(text)
            except ValueError:
                loaded = None  # a dict literal as raw Python code
            if isinstance(loaded, dict) and "code" in loaded:
                return loaded
        code = extract_code(raw)
        if not code.strip():
            raise ToolArgumentError("no code given; put the Python code in a ``` fenced block")
        return {"code": code}

    def _json_arguments(self, raw: str) -> dict[str, Any]:
        text = extract_code(raw) if raw.lstrip().startswith("```") else raw.strip()
        if not text:
            required = self.schema.get("required", [])
            if required:
                names = ", ".join(f"'{n}'" for n in required)
                raise ToolArgumentError(f"empty arguments; expected a JSON object with {names}")
            return {}
        try:
            loaded = json5.loads(text)
        except ValueError as exc:
            reason = str(exc).split("\n")[0][:120]
            raise ToolArgumentError(f"arguments are not valid JSON ({reason}); give a JSON object") from None
        if not isinstance(loaded, dict):
            kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
                type(loaded), "a number"
            )
            raise ToolArgumentError(f"arguments must be a JSON object, got {kind}")
        return loaded

    def _validate_pydantic(self, args: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        try:
            return self._pydantic_model.model_validate(args).model_dump()
        except ValidationError as exc:
            err = exc.errors()[0]
            label = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                raise ToolArgumentError(f"missing required argument '{label}'") from None
            if err["type"] in ("int_type", "int_parsing", "int_from_float"):
                raise ToolArgumentError(f"'{label}' must be an integer") from None
            if err["type"] == "extra_forbidden":
                raise ToolArgumentError(f"unexpected argument '{label}'") from None
            raise ToolArgumentError(f"'{label}': {err['msg']}") from None

    # ---- running ----------------------------------------------------------------------------------------
    def call(self, arguments: dict[str, Any]) -> str:
        """Run the tool on validated arguments and return the Observation text."""
        raise NotImplementedError(f"tool {self.name!r} does not implement call()")

    def invoke(self, raw_arguments: str | dict[str, Any]) -> ToolResult:
        """Parse, validate and run; never raises. Failures become an Observation the model can act on."""
        start = time.perf_counter()
        try:
            arguments = self.parse_arguments(raw_arguments)
        except ToolArgumentError as exc:
            return self._invalid(exc, start)
        try:
            outcome: tuple[str, Any] | Exception = self._run(arguments)
        except Exception as exc:  # any failure of the tool becomes an Observation, by design
            outcome = exc
        return self._result(outcome, start)

    async def ainvoke(self, raw_arguments: str | dict[str, Any]) -> ToolResult:
        """:meth:`invoke` on an event loop: :meth:`_arun` is awaited (by default :meth:`_run` on a worker
        thread). Cancelling it cancels the call: :meth:`_arun` decides how (the code interpreter interrupts the
        cell)."""
        start = time.perf_counter()
        try:
            arguments = self.parse_arguments(raw_arguments)
        except ToolArgumentError as exc:
            return self._invalid(exc, start)
        try:
            outcome: tuple[str, Any] | Exception = await self._arun(arguments)
        except Exception as exc:
            outcome = exc
        return self._result(outcome, start)

    def _invalid(self, exc: ToolArgumentError, start: float) -> ToolResult:
        message = f"invalid arguments for tool '{self.name}': {exc}"
        return ToolResult(
            f"Error: {message}",
            ok=False,
            error=message,
            error_kind="invalid_arguments",
            duration=time.perf_counter() - start,
        )

    def _result(self, outcome: tuple[str, Any] | Exception, start: float) -> ToolResult:
        duration = time.perf_counter() - start
        if isinstance(outcome, Exception):
            short = _short_traceback(outcome)
            return ToolResult(
                f"Error: tool '{self.name}' failed:\n{short}",
                ok=False,
                error=short,
                error_kind="tool_error",
                duration=duration,
            )
        observation, data = outcome
        if (
            getattr(data, "ok", True) is False
        ):  # the tool ran, but reports a failure (code that raised, a timeout)
            return ToolResult(
                observation,
                ok=False,
                error=observation,
                error_kind="tool_error",
                data=data,
                duration=duration,
            )
        return ToolResult(observation, data=data, duration=duration)

    async def _arun(self, arguments: dict[str, Any]) -> tuple[str, Any]:
        """:meth:`_run` for :meth:`ainvoke`; async tools override this. By default a worker thread runs it."""
        return await asyncio.to_thread(self._run, arguments)

    def _run(self, arguments: dict[str, Any]) -> tuple[str, Any]:
        """Run and return ``(observation, structured data)``; tools with structured results override this."""
        return str(self.call(arguments)), None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def _short_traceback(exc: BaseException) -> str:
    """The exception line plus the innermost frames, capped so it fits an Observation."""
    # the tool's own frames: those of this package and of asyncio say nothing to the model, and differ between
    # invoke and ainvoke
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_FRAMEWORK_DIRS)
    ][-3:]
    lines = [f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames]
    text = "\n".join(["Traceback (most recent call last):", *lines, f"{type(exc).__name__}: {exc}"])
    return text if len(text) <= _MAX_TRACEBACK_CHARS else "..." + text[-_MAX_TRACEBACK_CHARS:]
