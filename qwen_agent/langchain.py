"""LangChain adapters: ``QwenLLM`` (a text LLM), ``ChatQwen`` (a chat model with ``bind_tools``) and tool converters.

Both adapters run over any backend of :mod:`qwen_agent.llm` (the local engine, an OpenAI-compatible server, or
:class:`~qwen_agent.llm.ScriptedLLM` in tests) and keep no logic of their own beyond translating types:

* ``QwenLLM`` sends a LangChain prompt as one user turn (as Qwen's own LangChain notebook does), cuts the output
  at the stop strings itself in every path (``invoke``, ``stream``, ``batch``, async), whether or not the backend
  does, and completes a batch of prompts in one engine pass when the backend can
  (:meth:`qwen_agent.llm.LocalLLM.complete_batch`).
* ``ChatQwen`` turns messages and bound tools into the model's tool format with
  :func:`qwen_agent.fncall.build_prompt` (ReAct for Qwen-7B-Chat, ToolMessages becoming Observations; the chat
  template's ``<tool_call>`` format for Qwen2/Qwen2.5, with parallel calls) and the reply into
  ``AIMessage.tool_calls`` with our parser, so ``langchain.agents.create_agent`` works with either.
* :func:`to_langchain_tool` / :func:`from_langchain_tool` convert tools both ways; :func:`qwen_react_prompt` is
  Qwen's ReAct prompt for ``langchain_classic.agents.create_react_agent``, with :func:`render_tool_descs` and
  :class:`QwenReActOutputParser` (which hands a JSON Action Input to the tool as its arguments).

Needs the ``[langchain]`` extra; ``import qwen_agent`` never imports LangChain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from typing import Any

from .errors import ConfigError
from .runtime.chat_format import DEFAULT_SYSTEM

try:
    from langchain_core.agents import AgentAction, AgentFinish
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
        CallbackManagerForToolRun,
    )
    from langchain_core.exceptions import OutputParserException
    from langchain_core.language_models import BaseChatModel, BaseLLM
    from langchain_core.language_models.llms import LLM as LangChainLLM
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
    from langchain_core.output_parsers import BaseOutputParser
    from langchain_core.outputs import (
        ChatGeneration,
        ChatGenerationChunk,
        ChatResult,
        Generation,
        GenerationChunk,
        LLMResult,
    )
    from langchain_core.prompts import PromptTemplate
    from langchain_core.tools import BaseTool as LangChainTool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ConfigError(
        f"qwen_agent.langchain needs LangChain ({exc.name or exc} is not installed); "
        "install the extra: pip install 'qwen-react-agent[langchain]'"
    ) from None

from .fncall import build_prompt, chat_completion_stream, response_message
from .llm_protocol import LLM, ChatPrompt, Completion, Sampling
from .react import Action, FinalAnswer, Problem, parse_arguments, parse_output, react_instruction
from .tool_format import choose_format
from .tools.base import BaseTool
from .tools.registry import FunctionTool

__all__ = [
    "QwenLLM",
    "ChatQwen",
    "QwenToolAdapter",
    "to_langchain_tool",
    "from_langchain_tool",
    "render_tool_descs",
    "qwen_react_prompt",
    "QwenReActOutputParser",
]

_SAMPLING_KEYS = frozenset(f.name for f in fields(Sampling))


class _QwenSettings(BaseModel):
    """What both adapters share: the backend, the system text, default stops and decoding settings."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    backend: Any = Field(
        description="a qwen_agent.llm backend: LocalLLM, OpenAICompatibleLLM, ScriptedLLM ..."
    )
    model_name: str = "qwen"
    system: str = DEFAULT_SYSTEM
    stop: list[str] = Field(default_factory=list, description="stop strings added to every call")
    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __init__(self, **data: Any) -> None:
        # checked here rather than in a validator, so that the caller gets our ConfigError, not pydantic's
        if not isinstance(data.get("backend"), LLM):
            raise ConfigError(
                "backend must implement qwen_agent.llm.LLM (complete and stream), "
                f"got {type(data.get('backend')).__name__}"
            )
        super().__init__(**data)

    @classmethod
    def from_model(cls, path: str, *, device: str | None = None, dtype: str | None = None, **settings: Any):
        """An adapter over a local model directory, loaded with :func:`qwen_agent.runtime.engine.load_model`."""
        from .llm import LocalLLM
        from .runtime.engine import load_model

        settings.setdefault("model_name", str(path))
        return cls(backend=LocalLLM(load_model(path, device=device, dtype=dtype)), **settings)

    @classmethod
    def from_endpoint(
        cls, base_url: str, model: str | None = None, *, api_key: str | None = None, **settings: Any
    ):
        """An adapter over an OpenAI-compatible server (``/v1/completions`` with the ChatML prompt)."""
        from .openai_client import OpenAICompatibleLLM

        backend = OpenAICompatibleLLM(base_url, model, api_key=api_key)
        settings.setdefault("model_name", model or base_url)
        return cls(backend=backend, **settings)

    def _sampling(self, overrides: dict[str, Any]) -> Sampling:
        unknown = set(overrides) - _SAMPLING_KEYS
        if unknown:
            raise ConfigError(
                f"{type(self).__name__}: unknown generation argument(s) {', '.join(sorted(unknown))}; "
                f"expected some of {', '.join(sorted(_SAMPLING_KEYS))}"
            )
        defaults = Sampling(**{key: getattr(self, key) for key in _SAMPLING_KEYS})
        return replace(defaults, **overrides)

    def _stops(self, stop: Sequence[str] | None) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.stop, *(stop or ())]))

    def _params(self) -> dict[str, Any]:
        settings = {key: getattr(self, key) for key in sorted(_SAMPLING_KEYS)}
        backend = type(self.backend).__name__
        return {
            "model_name": self.model_name,
            "backend": backend,
            "system": self.system,
            "stop": self.stop,
            **settings,
        }


def _usage(completion: Completion) -> dict[str, int]:
    counts = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens}
    return {key: value for key, value in counts.items() if value is not None}


def _info(completion: Completion) -> dict[str, Any]:
    return {"finish_reason": completion.finish_reason, "stop": completion.stop, **_usage(completion)}


# -- QwenLLM ----------------------------------------------------------------------------------------------------


class QwenLLM(_QwenSettings, LangChainLLM):
    """A LangChain ``LLM`` over a qwen_agent backend.

    >>> llm = QwenLLM.from_model("/models/Qwen-7B-Chat", temperature=0)   # doctest: +SKIP
    >>> llm.invoke("What is 2+2?", stop=["\\n"])                            # doctest: +SKIP
    """

    @property
    def _llm_type(self) -> str:
        return "qwen"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def _chat_prompt(self, prompt: str) -> ChatPrompt:
        return ChatPrompt(prompt, system=self.system)

    def _complete(
        self, prompts: list[str], stop: list[str] | None, overrides: dict[str, Any]
    ) -> list[Completion]:
        chat_prompts = [self._chat_prompt(p) for p in prompts]
        stops, sampling = self._stops(stop), self._sampling(overrides)
        batch = getattr(self.backend, "complete_batch", None)
        if batch is not None and chat_prompts:
            return batch(chat_prompts, stop=stops, sampling=sampling)
        return [self.backend.complete(p, stop=stops, sampling=sampling) for p in chat_prompts]

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._complete([prompt], stop, kwargs)[0].text

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        completions = self._complete(prompts, stop, kwargs)
        totals: dict[str, int] = {}
        for completion in completions:
            for key, value in _usage(completion).items():
                totals[key] = totals.get(key, 0) + value
        return LLMResult(
            generations=[[Generation(text=c.text, generation_info=_info(c))] for c in completions],
            llm_output={"model_name": self.model_name, "token_usage": totals},
        )

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # LLM's default awaits one _acall per prompt; BaseLLM's runs _generate (one batch) in a worker thread
        return await BaseLLM._agenerate(self, prompts, stop, run_manager, **kwargs)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        chat_prompt, stops, sampling = self._chat_prompt(prompt), self._stops(stop), self._sampling(kwargs)
        for item in self.backend.stream(chat_prompt, stop=stops, sampling=sampling):
            if isinstance(item, Completion):
                yield GenerationChunk(text="", generation_info=_info(item))
                continue
            chunk = GenerationChunk(text=item)
            if run_manager is not None:
                run_manager.on_llm_new_token(item, chunk=chunk)
            yield chunk


# -- ChatQwen ---------------------------------------------------------------------------------------------------


def _openai_tool(tool: Any) -> dict[str, Any]:
    if isinstance(tool, BaseTool):
        return {"type": "function", "function": tool.openai_function()}
    return convert_to_openai_tool(tool)


def _ai_fields(message: dict[str, Any]) -> dict[str, Any]:
    """``content`` and ``tool_calls``/``invalid_tool_calls`` of an AIMessage for an assistant message of fncall."""
    content = message.get("content") or ""
    tool_calls, invalid = [], []
    for call in message.get("tool_calls") or []:
        name, raw = call["function"]["name"], call["function"]["arguments"]
        args, error = parse_arguments(raw)
        if error is None and not isinstance(args, dict):
            error = "the Action Input is not a JSON object"
        if error is None:
            tool_calls.append({"name": name, "args": args, "id": call["id"], "type": "tool_call"})
        else:
            invalid.append(
                {"name": name, "args": raw, "id": call["id"], "error": error, "type": "invalid_tool_call"}
            )
    return {"content": content, "tool_calls": tool_calls, "invalid_tool_calls": invalid}


def _usage_metadata(usage: dict[str, int] | None) -> dict[str, int] | None:
    if not usage or "prompt_tokens" not in usage or "completion_tokens" not in usage:
        return None
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}


class ChatQwen(_QwenSettings, BaseChatModel):
    """A LangChain chat model over a qwen_agent backend; tools are offered in ``tool_format`` (``"react"``,
    ``"hermes"``, or None: the model's own, :func:`qwen_agent.tool_format.choose_format`).

    ``bind_tools`` accepts LangChain tools, OpenAI tool dicts, functions, pydantic models and qwen_agent
    tools. ``tool_choice``, ``strict`` and ``parallel_tool_calls`` are accepted for compatibility, but the model
    decides for itself whether to call a tool (a ReAct model writes at most one Action per turn; a Hermes model
    may make several calls). A system message given in the conversation replaces ``system``.
    """

    tool_format: Any = Field(
        default=None, description='"react", "hermes", a ToolFormat, or None: the model\'s own'
    )

    @property
    def _llm_type(self) -> str:
        return "qwen-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._params()

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | LangChainTool | BaseTool],
        *,
        tool_choice: str | None = None,
        strict: bool | None = None,
        parallel_tool_calls: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        # tool_choice, strict and parallel_tool_calls have no ReAct counterpart: one Action per turn, the model's choice
        return self.bind(tools=[_openai_tool(t) for t in tools], **kwargs)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        tools = kwargs.pop("tools", None)
        openai_messages = convert_to_openai_messages(messages)
        if not openai_messages or openai_messages[0]["role"] != "system":
            openai_messages = [{"role": "system", "content": self.system}, *openai_messages]
        return openai_messages, tools, self._stops(stop), self._sampling(kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        openai_messages, tools, stops, sampling = self._request(messages, stop, kwargs)
        request = build_prompt(
            openai_messages,
            tools=tools,
            stop=stops,
            tool_format=choose_format(self.tool_format, self.backend),
        )
        completion = self.backend.complete(request.prompt, stop=request.stop, sampling=sampling)
        reply, finish = response_message(completion.text, request)
        if finish == "stop" and completion.finish_reason == "length":
            finish = "length"
        message = AIMessage(
            **_ai_fields(reply),
            usage_metadata=_usage_metadata(_usage(completion)),
            response_metadata={
                "finish_reason": finish,
                "stop": completion.stop,
                "model_name": self.model_name,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        openai_messages, tools, stops, sampling = self._request(messages, stop, kwargs)
        chunks = chat_completion_stream(
            self.backend,
            openai_messages,
            tools=tools,
            stop=stops,
            sampling=sampling,
            model=self.model_name,
            tool_format=choose_format(self.tool_format, self.backend),
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            delta, finish = choice["delta"], choice["finish_reason"]
            if finish is None:
                if delta.get("content"):
                    message = AIMessageChunk(content=delta["content"])
                    if run_manager is not None:
                        run_manager.on_llm_new_token(
                            delta["content"], chunk=ChatGenerationChunk(message=message)
                        )
                    yield ChatGenerationChunk(message=message)
                continue
            # the last chunk: any rest of the answer, or the tool call, complete and parsed
            fields_ = _ai_fields(delta)
            calls = [
                {
                    "name": c["name"],
                    "args": json.dumps(c["args"], ensure_ascii=False),
                    "id": c["id"],
                    "index": i,
                }
                for i, c in enumerate(fields_["tool_calls"])
            ]
            message = AIMessageChunk(
                content=fields_["content"],
                tool_call_chunks=calls,
                invalid_tool_calls=fields_["invalid_tool_calls"],
                usage_metadata=_usage_metadata(chunk.get("usage")),
                response_metadata={"finish_reason": finish, "model_name": self.model_name},
                chunk_position="last",
            )
            yield ChatGenerationChunk(message=message)


# -- tools both ways --------------------------------------------------------------------------------------------


class QwenToolAdapter(LangChainTool):
    """A LangChain tool that runs a qwen_agent tool (made by :func:`to_langchain_tool`).

    Structured callers (``create_agent``) pass arguments as a dict; the classic ReAct agent passes the raw
    Action Input text, which the qwen_agent tool parses itself (JSON5, fenced blocks, raw code for code tools).
    Bad arguments and failures come back as the observation text, as in our own agent.
    """

    qwen_tool: Any

    def _parse_input(
        self, tool_input: str | dict[str, Any], tool_call_id: str | None
    ) -> str | dict[str, Any]:
        # LangChain refuses text input for a JSON-schema tool; ours parses and validates it
        if isinstance(tool_input, str):
            return tool_input
        return super()._parse_input(tool_input, tool_call_id)

    def _run(self, *args: Any, run_manager: CallbackManagerForToolRun | None = None, **arguments: Any) -> str:
        return self.qwen_tool.invoke(args[0] if args else arguments).observation


def to_langchain_tool(tool: BaseTool) -> LangChainTool:
    """A LangChain tool over a qwen_agent tool, with the same name, description and JSON Schema."""
    return QwenToolAdapter(
        name=tool.name, description=tool.description, args_schema=tool.schema, qwen_tool=tool
    )


def from_langchain_tool(lc_tool: LangChainTool, *, name_for_human: str | None = None) -> BaseTool:
    """A qwen_agent tool that runs a LangChain tool; the parameters are the tool's call schema."""
    parameters = convert_to_openai_tool(lc_tool)["function"].get("parameters") or {
        "type": "object",
        "properties": {},
    }
    return FunctionTool(
        lambda **arguments: lc_tool.invoke(arguments),
        name=lc_tool.name,
        name_for_human=name_for_human or lc_tool.name,
        description=lc_tool.description,
        parameters=parameters,
        args_format="json",
    )


def render_tool_descs(tools: Sequence[LangChainTool]) -> str:
    """Qwen's TOOL_DESC lines (react_prompt wording) for LangChain tools: a ``tools_renderer`` for
    ``create_react_agent``. Every line asks for a JSON object; :class:`QwenReActOutputParser` passes it on as the
    tool's arguments."""
    qwen_tools = [t.qwen_tool if isinstance(t, QwenToolAdapter) else from_langchain_tool(t) for t in tools]
    return "\n\n".join(t.tool_desc("react_prompt") for t in qwen_tools)


class _QwenReActPrompt(PromptTemplate):
    """Qwen's template joins the tool names with ``","``; ``create_react_agent`` fills them joined with ``", "``.
    Tool names are identifier-like (every qwen_agent tool checks its name), so the names split back exactly."""

    def format(self, **kwargs: Any) -> str:
        kwargs = self._merge_partial_and_user_variables(**kwargs)
        kwargs["tool_names"] = ",".join(str(kwargs["tool_names"]).split(", "))
        return super().format(**kwargs)


def qwen_react_prompt() -> PromptTemplate:
    """Qwen's ReAct prompt (the react_prompt.md wording, byte for byte) with the variables ``create_react_agent``
    fills in: ``tools`` (use :func:`render_tool_descs` as the renderer), ``tool_names``, ``input``,
    ``agent_scratchpad``. Pass ``output_parser=QwenReActOutputParser()`` too, so tools get their arguments."""
    instruction = react_instruction(["{tools}"], ["{tool_names}"])
    return _QwenReActPrompt.from_template(instruction + "\n\nQuestion: {input}\nThought:{agent_scratchpad}")


class QwenReActOutputParser(BaseOutputParser[AgentAction | AgentFinish]):
    """The ``output_parser`` for ``create_react_agent`` with :func:`qwen_react_prompt`: reads the model's step with
    our parser (:func:`qwen_agent.react.parse_output`), as the agent does.

    An Action Input that is a JSON (or JSON5) object becomes the tool's arguments, so a plain LangChain tool with
    one or several arguments gets them by name; any other input (code, plain text) goes to the tool as text. The
    action's log is the step as kept for the transcript (an invented ``Observation`` dropped). An unusable reply
    raises ``OutputParserException`` that says what is wrong in words for the model
    (``handle_parsing_errors=True`` sends it back as the Observation).
    """

    def parse(self, text: str) -> AgentAction | AgentFinish:
        parsed = parse_output(text)
        if isinstance(parsed, FinalAnswer):
            return AgentFinish({"output": parsed.answer}, text)
        if isinstance(parsed, Action) or (parsed.tool and parsed.problem is Problem.INVALID_ARGUMENTS):
            arguments = parsed.arguments if isinstance(parsed, Action) else None
            tool_input = arguments if isinstance(arguments, dict) else parsed.raw_arguments
            return AgentAction(parsed.tool, tool_input, parsed.text)
        raise OutputParserException(
            f"Could not parse LLM output: {parsed.detail}",
            observation=f"Error: {parsed.detail}",
            llm_output=text,
            send_to_llm=True,
        )

    @property
    def _type(self) -> str:
        return "qwen-react"
