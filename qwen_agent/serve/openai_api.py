"""An OpenAI-compatible HTTP server over a local engine: ``create_app(engine)`` gives the FastAPI app.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (function calling in the model's
tool format, :mod:`qwen_agent.fncall`: the ReAct prompt as Qwen's ``openai_api.py`` for Qwen-7B-Chat, the chat
template's ``<tool_call>`` format, parallel calls included, for Qwen2/Qwen2.5; a ``"strict": true`` function is called
with arguments that match its parameters schema, and ``response_format`` ``json_object``/``json_schema`` holds
the reply to JSON, both by decoding under a grammar), ``POST /v1/completions`` (text or token ids; text may
contain ChatML control tokens, as on vLLM). Both stream as server-sent events ending ``data:
[DONE]``. The handlers only translate: requests become prompt ids and engine arguments, which go to the
:class:`~qwen_agent.runtime.scheduler.Scheduler`, whose one thread decodes concurrent requests in shared batches.
Errors have OpenAI's JSON shape (see :mod:`qwen_agent.serve.schema`); each request logs one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..constrained import strict_function_constraints
from ..errors import ConfigError, GenerationError
from ..fncall import ChatStream, FunctionPrompt, build_prompt, completion_response
from ..llm import LocalLLM, local_completion
from ..runtime.constraint import TokenConstraint
from ..runtime.engine import Engine
from ..runtime.generate import GenerationResult, PromptRequest
from ..runtime.grammar import Grammar
from ..runtime.scheduler import Handle, QueueFullError, Scheduler
from ..tool_format import FORMATS, ToolFormat, choose_format
from .lifecycle import GracefulServer, Lifecycle, RequestAborted
from .limits import BodyLimit, ServerLimits, generation_budget
from .metrics import RequestCounter, RequestTrace, ServerMetrics
from .schema import APIError, ChatCompletionRequest, CompletionRequest, error_body, refuse_unsupported

__all__ = ["create_app", "BackgroundServer"]

log = logging.getLogger("qwen_agent.serve")


def create_app(
    engine: Engine | None = None,
    *,
    load: Callable[[], Any] | None = None,
    model_name: str = "qwen",
    api_key: str | None = None,
    max_batch: int = 32,
    max_queue: int = 256,
    limits: ServerLimits | None = None,
    metrics: bool = True,
    tool_format: str | None = None,
) -> FastAPI:
    """The server's app over ``engine`` (a :class:`~qwen_agent.runtime.engine.QwenEngine`), whose scheduler
    decodes the requests (the app closes it on shutdown), or over what ``load()`` returns: the app then answers
    at once and loads the engine on a thread, with 503 until it is ready (see :mod:`qwen_agent.serve.lifecycle`).
    ``api_key``: the bearer token required on ``/v1`` (None: none). ``max_batch`` rows decode at once;
    ``max_queue`` more may wait, beyond which requests get 503. ``limits``: see
    :class:`~qwen_agent.serve.limits.ServerLimits`. ``metrics``: serve ``/metrics`` (Prometheus text).
    ``tool_format``: ``"react"``, ``"hermes"``, or None for the model's own."""
    if (engine is None) == (load is None):
        raise ConfigError("create_app needs either an engine or a load function")
    life, limits = Lifecycle(model_name), limits or ServerLimits()
    meters = ServerMetrics(lambda: life.stats()) if metrics else None

    if tool_format not in (None, *FORMATS):
        choose_format(tool_format)  # an unknown name: its ConfigError, before any model loads

    def start(engine: Engine) -> tuple[_Handlers, Callable[[], dict[str, Any]]]:
        chosen = choose_format(tool_format, engine)
        scheduler = engine.scheduler
        scheduler.configure(max_batch=max_batch, max_queue=max_queue)

        def stats() -> dict[str, Any]:
            # the scheduler's figures, and the engine's prefix cache (None when it is off)
            return {**scheduler.stats(), "prefix_cache": engine.stats()["prefix_cache"]}

        return _Handlers(engine, scheduler, model_name, life, limits, meters, chosen), stats

    if engine is not None:
        life.ready(*start(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        life.attach(asyncio.get_running_loop())
        if load is not None:
            life.load_in_background(lambda: start(load()))
        yield
        if life.handlers is not None:
            life.handlers.scheduler.close()

    app = FastAPI(title="qwen-agent OpenAI-compatible server", lifespan=lifespan)
    app.state.lifecycle = life
    if life.handlers is not None:
        app.state.scheduler = life.handlers.scheduler
        app.state.tool_format = life.handlers.tool_format.name
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if meters is not None:
        routes = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})
        app.add_middleware(RequestCounter, metrics=meters, endpoints=routes)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = life.health()
        return JSONResponse(body, status_code=status)

    if meters is not None:

        @app.get("/metrics")
        async def metrics_text() -> Response:
            text, content_type = meters.render()
            return Response(text, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        handlers = life.require_handlers()
        card = {"id": model_name, "object": "model", "created": handlers.started, "owned_by": "qwen-agent"}
        card["max_model_len"] = handlers.engine.config.max_context  # vLLM's field, for clients' budgets
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        return await life.require_handlers().chat(body, http)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: Request):
        return await life.require_handlers().complete(body, http)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    return app


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming an invalid field as a path: ``messages[0].role``. A union (``stop``: a string or a list)
    gives one error per member; the deepest names the field best."""
    first = max(exc.errors(), key=lambda error: len(error.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    param = ""
    for part in first.get("loc", ())[1:]:  # after "body"
        if isinstance(part, int):
            param += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", str(part)) and part not in _TYPE_TAGS:
            param += f".{part}" if param else str(part)
        # other parts name the union member pydantic tried ("str", "list[str]"): not a field
    where = f"'{param}'" if param else "the body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid')}", param=param or None)


class _Handlers:
    """Translate requests to prompt ids and engine arguments, and the engine's events to OpenAI objects."""

    def __init__(
        self,
        engine: Engine,
        scheduler: Scheduler,
        model_name: str,
        life: Lifecycle,
        limits: ServerLimits,
        metrics: ServerMetrics | None,
        tool_format: ToolFormat,
    ) -> None:
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.life, self.limits, self.metrics = life, limits, metrics
        self.tool_format = tool_format
        self.chatml = LocalLLM(engine)  # builds prompt ids
        self.started = int(time.time())

    # -- /v1/chat/completions ----------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, http: Request):
        self._check_model(body.model)
        refuse_unsupported(body)
        tools = [t.model_dump() for t in body.tools] if body.tools and body.tool_choice != "none" else None
        functions = None
        if body.functions and body.function_call != "none":
            functions = [f.model_dump() for f in body.functions]
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            request = build_prompt(messages, functions, tools, body.stop_list(), self.tool_format)
        except ConfigError as exc:
            raise APIError(400, str(exc), param=_param_of(str(exc), "messages")) from None
        ids = self.chatml.prompt_ids(request.prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        stop = [*request.stop, *(body.stop_token_ids or [])]
        # compiling a grammar takes milliseconds (the vocabulary's walk, once, half a second): off the event loop
        constraint = await asyncio.to_thread(self._constraint, body, request, tools or functions or [])
        if constraint is not None and request.function_names:  # the strict functions' grammar
            request = dataclasses.replace(request, constrained=True)
        prompt = self._prompt_request(ids, stop, body, max_tokens, constraint)
        started = time.perf_counter()
        calls = self._submit([prompt])
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(self._chat_chunks(request, calls, usage, started))
        results = await calls.collect(http)
        completion = local_completion(results[0], time.perf_counter() - started)
        response = completion_response(request, completion, self.model_name)
        self._log(response["id"], results, started)
        return response

    async def _chat_chunks(
        self, request: FunctionPrompt, calls: _Calls, include_usage: bool, started: float
    ) -> AsyncIterator[dict[str, Any]]:
        stream = ChatStream(request, self.model_name)
        yield stream.first()
        result = None
        try:
            async for _, event in calls:
                if isinstance(event, str):
                    for chunk in stream.feed(event):
                        yield chunk
                else:
                    result = event
        except RequestAborted as exc:
            yield stream.chunk({}, "abort")
            log.info("%s aborted: %s", stream.id, exc.message)
            return
        assert result is not None
        usage = None
        for chunk in stream.finish(local_completion(result, time.perf_counter() - started)):
            usage = chunk.pop("usage", None) or usage
            yield chunk
        if include_usage:  # OpenAI sends usage in a chunk of its own, with no choices
            yield {**stream.chunk({}), "choices": [], "usage": usage}
        self._log(stream.id, [result], started)

    def _constraint(
        self, body: ChatCompletionRequest, request: FunctionPrompt, offered: list[dict[str, Any]]
    ) -> TokenConstraint | None:
        """The reply's constraint: JSON matching ``response_format``'s schema, or the ReAct grammar over the
        offered functions when one is ``strict`` (its arguments then match its parameters schema)."""
        schema = body.response_schema()
        vocab_size = self.engine.config.vocab_size
        if schema is not None:
            what = "'response_format.json_schema.schema'"
            try:
                return Grammar.from_json_schema(self.engine.tokenizer, vocab_size, schema, what).constraint()
            except ConfigError as exc:
                raise APIError(400, str(exc), param="response_format.json_schema.schema") from None
        specs = [spec.get("function", spec) for spec in offered]  # tools hold their function spec
        try:
            constraints = strict_function_constraints(
                self.engine.tokenizer, vocab_size, specs, request.tool_format
            )
        except ConfigError as exc:
            param = "tools" if body.tools else "functions"
            raise APIError(400, f"'{param}': {exc}", param=param) from None
        return constraints(request.prompt) if constraints is not None else None

    # -- /v1/completions ---------------------------------------------------------------------------------

    async def complete(self, body: CompletionRequest, http: Request):
        self._check_model(body.model)
        refuse_unsupported(body)
        prompts = self._prompt_ids(body.prompt)
        requests = [
            self._prompt_request(
                ids, [*body.stop_list(), *(body.stop_token_ids or [])], body, body.max_tokens
            )
            for ids in prompts
        ]
        started, completion_id = time.perf_counter(), f"cmpl-{uuid.uuid4().hex[:24]}"
        calls = self._submit(requests)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _sse(self._completion_chunks(completion_id, calls, usage, started))
        results = await calls.collect(http)
        self._log(completion_id, results, started)
        choices = [
            {"index": i, "text": r.text, "finish_reason": _finish(r), "logprobs": None}
            for i, r in enumerate(results)
        ]
        return self._text_completion(completion_id, choices, _usage(results))

    async def _completion_chunks(
        self, completion_id: str, calls: _Calls, include_usage: bool, started: float
    ) -> AsyncIterator[dict[str, Any]]:
        results: dict[int, GenerationResult] = {}
        try:
            async for index, event in calls:
                choice: dict[str, Any] = {"index": index, "text": "", "finish_reason": None, "logprobs": None}
                if isinstance(event, str):
                    choice["text"] = event
                else:
                    results[index] = event
                    choice["finish_reason"] = _finish(event)
                yield self._text_completion(completion_id, [choice])
        except RequestAborted as exc:
            unfinished = [i for i in range(len(calls.tickets)) if i not in results]
            aborted = [
                {"index": i, "text": "", "finish_reason": "abort", "logprobs": None} for i in unfinished
            ]
            yield self._text_completion(completion_id, aborted)
            log.info("%s aborted: %s", completion_id, exc.message)
            return
        ordered = [results[i] for i in sorted(results)]
        if include_usage:
            yield self._text_completion(completion_id, [], _usage(ordered))
        self._log(completion_id, ordered, started)

    def _text_completion(
        self, completion_id: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
    ) -> dict[str, Any]:
        body = {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def _prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        tokenizer = self.engine.tokenizer
        # text may hold ChatML control tokens: clients send whole ChatML prompts as text (vLLM reads them so)
        return [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p) for p in prompt]

    # -- shared --------------------------------------------------------------------------------------------

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                400,
                f"'model': this server serves {self.model_name!r}, not {name!r}",
                param="model",
                code="model_not_found",
            )

    def _prompt_request(
        self,
        ids: list[int],
        stop: Sequence[str | int],
        body: Any,
        max_tokens: int | None,
        constraint: TokenConstraint | None = None,
    ) -> PromptRequest:
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        chat = isinstance(body, ChatCompletionRequest)
        max_tokens = generation_budget(
            len(ids),
            max_tokens,
            limits=self.limits,
            context=self.engine.config.max_context,
            default=self.engine.generation_config.max_new_tokens,
            where=(param, "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"),
        )
        temperature = body.temperature
        if temperature is not None and temperature < 0.01:
            temperature = 0.0  # greedy, as Qwen's openai_api.py takes such temperatures
        try:
            return self.engine.request(
                ids,
                stop=list(stop),
                constraint=constraint,
                max_new_tokens=max_tokens,
                do_sample=False if temperature == 0 else None,
                temperature=temperature or None,
                top_p=body.top_p,
                top_k=body.top_k,
                repetition_penalty=body.repetition_penalty,
                seed=body.seed,
            )
        except GenerationError as exc:  # the prompt fills the context
            raise APIError(400, f"'{param}': {exc}", param=param, code="context_length_exceeded") from None
        except ConfigError as exc:
            raise APIError(400, str(exc), param=_param_of(str(exc), param)) from None

    def _submit(self, requests: list[PromptRequest]) -> _Calls:
        if self.life.aborted is not None:  # shutting down: nothing new starts
            raise self.life.aborted
        trace = self.metrics.trace(len(requests)) if self.metrics is not None else None
        calls = _Calls(self.scheduler, asyncio.get_running_loop(), self.life, trace)
        try:
            for request in requests:
                calls.submit(request)
        except QueueFullError as exc:
            calls.cancel()
            raise APIError(503, str(exc), code="server_busy", type="server_error") from None
        if self.limits.request_timeout is not None:
            calls.abort_after(self.limits.request_timeout)
        return calls

    def _log(self, request_id: str, results: Sequence[GenerationResult], started: float) -> None:
        log.info(
            "%s prompt_tokens=%d completion_tokens=%d seconds=%.3f finish=%s",
            request_id,
            sum(r.prompt_tokens for r in results),
            sum(r.completion_tokens for r in results),
            time.perf_counter() - started,
            ",".join(_finish(r) for r in results),
        )


class _Calls:
    """The prompts of one HTTP request in the scheduler: their events, tagged with the prompt's position, on
    an asyncio queue. Iterating ends when all are done; leaving early (a client that went away) cancels the
    rest, which frees their rows at the next decode step. :meth:`abort` (shutdown, request timeout) cancels
    them and makes the iteration raise :class:`~qwen_agent.serve.lifecycle.RequestAborted`. ``trace`` sees
    every event (the metrics)."""

    def __init__(
        self,
        scheduler: Scheduler,
        loop: asyncio.AbstractEventLoop,
        life: Lifecycle,
        trace: RequestTrace | None = None,
    ) -> None:
        self.scheduler, self.loop, self.life, self.trace = scheduler, loop, life, trace
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.tickets: list[Handle] = []
        self.timer: asyncio.TimerHandle | None = None

    def submit(self, request: PromptRequest) -> None:
        index = len(self.tickets)

        def on_event(event: Any) -> None:  # on the scheduler thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        self.tickets.append(self.scheduler.add(request, on_event))

    def cancel(self) -> None:
        for ticket in self.tickets:
            self.scheduler.abort(ticket)

    def abort(self, error: RequestAborted) -> None:
        """End the request with ``error`` (on the event loop)."""
        self.cancel()
        self.queue.put_nowait((-1, error))

    def abort_after(self, seconds: float) -> None:
        error = RequestAborted(
            504, f"the request ran past --request-timeout ({seconds:g} s)", code="request_timeout"
        )
        self.timer = self.loop.call_later(seconds, self.abort, error)

    async def __aiter__(self) -> AsyncIterator[tuple[int, str | GenerationResult]]:
        pending = len(self.tickets)
        try:
            with self.life.tracking(self):
                while pending:
                    index, event = await self.queue.get()
                    if isinstance(event, RequestAborted):
                        raise event
                    if isinstance(event, BaseException):
                        raise APIError(500, f"generation failed: {event}", type="server_error")
                    if self.trace is not None:
                        self.trace.event(index, event)
                    if isinstance(event, GenerationResult):
                        pending -= 1
                    yield index, event
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if pending:
                self.cancel()

    async def collect(self, http: Request) -> list[GenerationResult]:
        """All results, in prompt order; a client that goes away meanwhile (checked every second) cancels them."""
        results: dict[int, GenerationResult] = {}

        async def gather() -> None:
            async for index, event in self:
                if isinstance(event, GenerationResult):
                    results[index] = event

        gathering = asyncio.ensure_future(gather())
        while not gathering.done():
            await asyncio.wait({gathering}, timeout=1.0)
            if not gathering.done() and await http.is_disconnected():
                gathering.cancel()  # leaving the iteration early cancels the prompts
                raise APIError(400, "the client disconnected", code="client_disconnected")
        gathering.result()  # raises what the generation raised
        return [results[i] for i in range(len(self.tickets))]


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as exc:  # the status line is sent already: the error goes in the stream
            yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _param_of(message: str, default: str) -> str:
    """The field a package error message starts with (``messages[2]: ...``, ``tools[0]: ...``)."""
    found = re.match(r"'?([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*)*)'?:", message)
    return found.group(1) if found else default


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(results: Sequence[GenerationResult]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)},
    }


class BackgroundServer:
    """Serve ``app`` with uvicorn on a thread (for tests, benchmarks and apps that embed the server);
    ``port=0`` picks a free port. Use as a context manager; ``url`` is the base URL once started. Leaving it
    stops the server as a signal would: requests in flight get ``shutdown_timeout`` seconds, then are
    aborted."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        shutdown_timeout: float = 5.0,
    ):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
        life = getattr(app.state, "lifecycle", None)  # an app of create_app's drains on exit; any other stops
        self.server = GracefulServer(config, life, shutdown_timeout) if life else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="qwen-agent-server", daemon=True)
        self.host = host

    @property
    def url(self) -> str:
        (server,) = self.server.servers
        port = server.sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {self.host}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
