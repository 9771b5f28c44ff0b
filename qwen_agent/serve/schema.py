"""Request bodies of the OpenAI API as pydantic models, and errors in OpenAI's JSON shape.

The models mirror OpenAI's schema (plus the vLLM extensions clients send to Qwen servers: ``top_k``,
``repetition_penalty``, ``stop_token_ids``), so a malformed body is refused with the field named. Fields that
this server cannot honour are accepted only at their neutral value; :func:`refuse_unsupported` names the field
otherwise. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import QwenAgentError

__all__ = [
    "APIError",
    "error_body",
    "Message",
    "ToolSpec",
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "refuse_unsupported",
]


class APIError(QwenAgentError):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


StopString = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(BaseModel):
    """A chat message; ``fncall.build_prompt`` checks how messages fit together."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class ToolSpec(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSpec


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Body):
    """What both endpoints take."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionSpec] | None = None
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's: a final assistant message is continued (this server always does so)
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None

    def response_schema(self) -> dict[str, Any] | None:
        """The JSON Schema ``response_format`` holds the reply to: None for text, any object for
        ``json_object``, the given schema for ``json_schema`` (decoded under it, ``strict`` or not)."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        if kind != "json_schema":
            raise APIError(
                400,
                f"'response_format.type': expected 'text', 'json_object' or 'json_schema', got {kind!r}",
                param="response_format.type",
            )
        spec = self.response_format.get("json_schema")  # type: ignore[union-attr]
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "'response_format.json_schema.schema': a JSON Schema object is required",
                param="response_format.json_schema.schema",
            )
        return schema


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Raise a 400 :class:`APIError` naming the first field set to something this server cannot do."""

    def refuse(param: str, why: str) -> None:
        raise APIError(400, f"'{param}': {why}", param=param, code="unsupported_parameter")

    if body.n != 1:
        refuse("n", "only n=1 is supported; send the request several times (they are decoded in one batch)")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            refuse(name, "additive penalties are not supported; use 'repetition_penalty' (multiplicative)")
    if body.logit_bias:
        refuse("logit_bias", "not supported")
    if isinstance(body, CompletionRequest):
        if body.logprobs is not None:
            refuse("logprobs", "not supported")
        if body.echo:
            refuse("echo", "not supported")
        if body.best_of not in (None, 1):
            refuse("best_of", "only best_of=1 is supported")
        if body.suffix:
            refuse("suffix", "not supported")
        return
    if body.logprobs or body.top_logprobs:
        refuse("logprobs", "not supported")
    if (
        body.response_format
        and body.response_format.get("type", "text") != "text"
        and (body.tools or body.functions)
    ):
        refuse("response_format", "a JSON reply cannot be combined with 'tools' or 'functions' here")
    if body.tools and body.functions:
        refuse("functions", "give either 'tools' or 'functions', not both")
    if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
        refuse("tool_choice", "only 'auto' and 'none' are supported: the ReAct model decides whether to call")
    if isinstance(body.function_call, dict):
        refuse(
            "function_call", "only 'auto' and 'none' are supported: the ReAct model decides whether to call"
        )
