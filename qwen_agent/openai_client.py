"""A client for OpenAI-compatible servers (vLLM, DashScope, this project's own server), as an :class:`~qwen_agent.llm.LLM`."""

from __future__ import annotations

import asyncio
import http.client
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

import requests
import urllib3

from .errors import ConfigError, LLMAuthError, LLMConnectionError, LLMError, LLMProtocolError, LLMTimeoutError
from .llm_protocol import ChatPrompt, Completion, Sampling
from .openai_stream import DONE, RETRY_STATUS, SSEDecoder, StreamState, cache_counts, preview, stop_reason
from .runtime.stops import cut_at_stop

__all__ = ["OpenAICompatibleLLM"]

# ids of <|im_end|> and <|im_start|> in every Qwen vocabulary; servers that drop special tokens from the text
# can only stop on them by id
QWEN_STOP_TOKEN_IDS = (151645, 151644)

# what reading from the network can raise, whichever layer (requests, urllib3, http.client, the socket) raises it
_TRANSPORT_ERRORS = (
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class OpenAICompatibleLLM:
    """A client for an OpenAI-compatible server.

    ``mode="completions"`` (default) sends the ChatML prompt to ``/v1/completions``, so the assistant turn can
    be continued exactly (what vLLM serving Qwen-7B-Chat needs). With a ``tokenizer`` the prompt is sent as token
    ids built piece-wise, so no user text or tool output can become a control token on the server; without one
    it is sent as a string, and the server parses ``<|im_start|>`` written inside messages as a control token.
    ``mode="chat"`` sends ``messages`` to ``/v1/chat/completions``; an assistant prefix is sent as a final
    assistant message with vLLM's ``continue_final_message``.

    Requests time out after ``timeout`` seconds without data (``connect_timeout`` to connect), while waiting for
    the headers or anywhere in the body; a timeout is reported at once, not retried. HTTP 429 and 5xx answers,
    refused or broken connections, and bodies cut short (a missing part of ``Content-Length``, a stream that ends
    with neither ``[DONE]`` nor a ``finish_reason``) are retried ``max_retries`` times in all with exponential
    backoff (``Retry-After`` is honoured, capped at ``max_backoff``); a stream is never retried once text has been
    yielded. Every failure raises an :class:`LLMError`: :class:`LLMConnectionError`, :class:`LLMAuthError`,
    :class:`LLMTimeoutError`, :class:`LLMProtocolError`, or :class:`LLMError` itself (other HTTP errors, with
    the server's message).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        mode: Literal["completions", "chat"] = "completions",
        tokenizer: Any = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        extra_body: dict[str, Any] | None = None,
        context_window: int | None = None,
    ):
        if mode not in ("completions", "chat"):
            raise ConfigError(f"mode must be 'completions' or 'chat', got {mode!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if "/v1" in base_url else base_url + "/v1"
        self._model = model
        self._context_window = context_window
        self._models_read = False
        self._async_clients: Any = None  # httpx.AsyncClient by event loop (openai_async)
        self.mode = mode
        self.tokenizer = tokenizer
        self.timeout = (connect_timeout, timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        if extra_body is None:
            extra_body = {"stop_token_ids": list(QWEN_STOP_TOKEN_IDS)} if mode == "completions" else {}
        self.extra_body = extra_body
        self._session = requests.Session()
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    @property
    def model(self) -> str:
        """The model name; when none was given, the first one the server lists under ``/v1/models``."""
        if self._model is None:
            self._read_models(self._json(self._request("GET", "/models", None, stream=False), "/models"))
        return self._model

    @property
    def context_window(self) -> int | None:
        """The server's context in tokens: the ``context_window`` option, else the ``max_model_len`` that vLLM
        (and this project's server) list under ``/v1/models``, else None (unknown)."""
        if self._context_window is None and not self._models_read:
            try:
                self._read_models(self._json(self._request("GET", "/models", None, stream=False), "/models"))
            except LLMError:
                self._models_read = True  # a server without /v1/models: the window stays unknown
        return self._context_window

    def _read_models(self, body: Any) -> None:
        try:
            card = body["data"][0]
            name = str(card["id"])
        except (KeyError, IndexError, TypeError):
            raise LLMProtocolError(f"{self.base_url}/models: no model listed in {preview(body)}") from None
        self._models_read = True
        self._model = self._model or name
        if self._context_window is None and isinstance(card.get("max_model_len"), int):
            self._context_window = card["max_model_len"]

    async def aprepare(self) -> None:
        """Read ``/v1/models`` on the event loop, once, if the model name or the context is still unknown."""
        if not self._models_read and (self._model is None or self._context_window is None):
            from .openai_async import aget_json

            try:
                self._read_models(await aget_json(self, "/models"))
            except LLMError:
                if self._model is None:
                    raise
                self._models_read = True

    async def astream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> AsyncIterator[str | Completion]:
        """:meth:`stream` on an event loop, over httpx (:mod:`qwen_agent.openai_async`): no thread per call;
        closing the iterator (a cancelled task) closes the connection, and the server stops generating."""
        from .openai_async import astream

        await self.aprepare()
        async for item in astream(self, prompt, stop, sampling):
            yield item

    async def acomplete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        async for item in self.astream(prompt, stop=stop, sampling=sampling):
            if isinstance(item, Completion):
                return item
        raise AssertionError("astream() always ends with its Completion")  # pragma: no cover

    def close(self) -> None:
        self._session.close()

    async def aclose(self) -> None:
        """Close the async connection pool of the running event loop (``astream`` opens one per loop)."""
        client = self._async_clients.pop(asyncio.get_running_loop(), None) if self._async_clients else None
        if client is not None:
            await client.aclose()

    # -- the protocol --------------------------------------------------------------------------------------

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        started = time.perf_counter()
        path, body = self._body(prompt, stop, sampling, stream=False)
        data = self._json(self._request("POST", path, body, stream=False), path)
        choice = _first_choice(data, path)
        text = (
            choice.get("text") if self.mode == "completions" else (choice.get("message") or {}).get("content")
        )
        if not isinstance(text, str):
            raise LLMProtocolError(f"{self.base_url}{path}: the first choice has no text: {preview(data)}")
        # the one cut for remote backends: servers that ignore `stop` (or part of it) are cut here
        text, stopped = cut_at_stop(text, stop)
        usage = data.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" and stopped is None else "stop"
        return Completion(
            text,
            finish,
            stopped or stop_reason(choice, stop),
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            seconds=time.perf_counter() - started,
            **cache_counts(usage),
        )

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        path, body = self._body(prompt, stop, sampling, stream=True)
        attempt = 0
        while True:
            response, attempt = self._send("POST", path, body, stream=True, first_attempt=attempt)
            state = StreamState(stop, self._delta_text)
            try:
                for event in self._events(response, path):
                    if emitted := state.feed(event):
                        yield emitted
                    if state.ended:
                        break
                state.check_finished(self.base_url + path)
            except LLMConnectionError:
                if state.pieces or attempt >= self.max_retries:
                    raise  # text already handed out cannot be taken back
                self._sleep(attempt, None)
                attempt += 1
                continue
            finally:
                response.close()
            break
        yield from state.finish(started)

    # -- request building ------------------------------------------------------------------------------------

    def _body(
        self, prompt: ChatPrompt, stop: Sequence[str], sampling: Sampling | None, stream: bool
    ) -> tuple[str, dict[str, Any]]:
        sampling = sampling or Sampling()
        body: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_tokens, "stream": stream}
        if stop:
            body["stop"] = list(stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(sampling, key)
            if value is not None:
                body[key] = value
        body.update(self.extra_body)
        if self.mode == "chat":
            body["messages"] = prompt.to_messages()
            if prompt.assistant_prefix:
                body.update(continue_final_message=True, add_generation_prompt=False)
            return "/chat/completions", body
        if self.tokenizer is None:
            body["prompt"] = prompt.to_chatml()
        else:
            from .runtime.chat_format import chatml_ids

            body["prompt"] = chatml_ids(self.tokenizer, prompt, max_window_size=1 << 30)  # the server windows
        return "/completions", body

    def _delta_text(self, choice: dict[str, Any]) -> str:
        text = (
            choice.get("text") if self.mode == "completions" else (choice.get("delta") or {}).get("content")
        )
        return text if isinstance(text, str) else ""

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> requests.Response:
        return self._send(method, path, body, stream=stream)[0]

    def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool, first_attempt: int = 0
    ) -> tuple[requests.Response, int]:
        """The response and the number of the attempt that got it (from ``first_attempt`` on).

        Unless ``stream``, the body is read here too, so that a failure while reading it is handled as any other
        transport failure: a timeout raised at once, a broken or short body retried.
        """
        url = self.base_url + path
        for attempt in range(first_attempt, self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._session.request(
                    method, url, json=body, headers=self._headers, timeout=self.timeout, stream=True
                )
                if response.status_code in RETRY_STATUS and not last:
                    retry_after = response.headers.get("Retry-After")
                    response.close()
                    self._sleep(attempt, retry_after)
                    continue
                if not stream or response.status_code >= 400:
                    response.content  # noqa: B018 -- read the whole body now, under the read timeout
            except _TRANSPORT_ERRORS as exc:
                error = _transport_error(url, exc, self.timeout[1], reading=False)
                if last or not isinstance(error, LLMConnectionError):
                    raise error from None
                self._sleep(attempt, None)
                continue
            if response.status_code >= 400:
                message = _error_message(response)
                response.close()
                if response.status_code in (401, 403):
                    raise LLMAuthError(f"{url}: HTTP {response.status_code}, credentials refused: {message}")
                raise LLMError(f"{url}: HTTP {response.status_code}: {message}")
            return response, attempt
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        time.sleep(self._delay(attempt, retry_after))

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                pass
        return min(max(delay, 0.0), self.max_backoff)

    def _json(self, response: requests.Response, path: str) -> Any:
        """The JSON of a body that :meth:`_send` has read already."""
        try:
            return response.json()
        except ValueError:
            raise LLMProtocolError(
                f"{self.base_url}{path}: the answer is not JSON: {response.text[:200]!r}"
            ) from None

    def _events(self, response: requests.Response, path: str) -> Iterator[Any]:
        """The JSON payloads of a server-sent-event stream, then ``DONE`` if ``data: [DONE]`` came."""
        url = self.base_url + path
        decoder = SSEDecoder(url)
        try:
            for raw in _lines(response):
                event = decoder.line(raw.decode("utf-8", errors="replace"))
                if event is not None:
                    yield event
                    if event is DONE:
                        return
        except _TRANSPORT_ERRORS as exc:
            raise _transport_error(url, exc, self.timeout[1], reading=True) from None
        if (event := decoder.end()) is not None:
            yield event


def _lines(response: requests.Response) -> Iterator[bytes]:
    """Lines of a streamed body as soon as each arrives (``iter_lines`` waits to fill whole chunks)."""
    pending = b""
    while True:
        chunk = response.raw.read1(8192, decode_content=True)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


def _first_choice(data: Any, path: str) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise LLMProtocolError(f"{path}: the answer has no choices: {preview(data)}")
    return choices[0]


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason or ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return preview(error)


def _transport_error(url: str, exc: BaseException, timeout: float, *, reading: bool) -> LLMError:
    """The LLMError for an exception raised by the HTTP stack; only LLMConnectionError is worth a retry."""
    if _is_timeout(exc):
        what = "the stream stalled for more than" if reading else "no answer within"
        return LLMTimeoutError(f"{url}: {what} {timeout:g} s")
    if isinstance(exc, requests.exceptions.ContentDecodingError | urllib3.exceptions.DecodeError):
        return LLMProtocolError(f"{url}: the answer cannot be decoded ({_reason(exc)})")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError):
        return LLMConnectionError(f"{url}: the connection broke while reading the answer ({_reason(exc)})")
    if isinstance(exc, requests.ConnectionError | OSError):
        return LLMConnectionError(f"{url}: cannot connect ({_reason(exc)})")
    return LLMError(f"{url}: the request failed ({type(exc).__name__}: {_reason(exc)})")


def _is_timeout(exc: BaseException) -> bool:
    """Whether a socket timeout is at the root of ``exc``: requests reports a timeout while reading a body as a
    ConnectionError that wraps urllib3's ReadTimeoutError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        # not urllib3's TimeoutError: its NewConnectionError (a refused connection) derives from it
        if isinstance(current, requests.Timeout | urllib3.exceptions.ReadTimeoutError | TimeoutError):
            return True
        wrapped = [a for a in current.args if isinstance(a, BaseException)]
        current = wrapped[0] if wrapped else current.__cause__ or current.__context__
    return False


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."
