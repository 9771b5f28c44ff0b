"""The async side of :class:`~qwen_agent.openai_client.OpenAICompatibleLLM`, over ``httpx.AsyncClient``.

httpx rather than the ``openai`` package's async client: the request body (a ChatML prompt as token ids, vLLM's
``continue_final_message``, ``stop_token_ids``), the SSE decoding, the stop-string cutting and the error mapping
are the sync client's own, shared through :mod:`qwen_agent.openai_stream`, so both clients behave the same; and httpx is already what the
``mcp`` SDK and the server's tests use. The retry rules are the sync client's: 429/5xx answers, refused or broken
connections and streams cut short are retried (``max_retries`` in all, with backoff) until text has been handed
out; a timeout raises at once.

One ``httpx.AsyncClient`` per event loop (a client's connections belong to the loop that opened them), shared
by every call on that loop: many concurrent runs use one connection pool and no thread each.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from .errors import LLMAuthError, LLMConnectionError, LLMError, LLMProtocolError, LLMTimeoutError
from .llm_protocol import ChatPrompt, Completion, Sampling
from .openai_stream import DONE, RETRY_STATUS, SSEDecoder, StreamState, preview

__all__ = ["astream", "aget_json"]


def _client(llm: Any) -> httpx.AsyncClient:
    """The client of the running loop (made on first use, closed with the loop's last reference)."""
    if llm._async_clients is None:
        llm._async_clients = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    client = llm._async_clients.get(loop)
    if client is None:
        connect, read = llm.timeout
        client = httpx.AsyncClient(
            headers=llm._headers,
            timeout=httpx.Timeout(read, connect=connect),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        llm._async_clients[loop] = client
    return client


async def _send(
    llm: Any, method: str, path: str, body: dict[str, Any] | None, *, first_attempt: int = 0
) -> tuple[httpx.Response, int]:
    """The response (headers read, body not yet) and the number of the attempt that got it."""
    url = llm.base_url + path
    client = _client(llm)
    for attempt in range(first_attempt, llm.max_retries + 1):
        last = attempt == llm.max_retries
        try:
            request = client.build_request(method, url, json=body)
            response = await client.send(request, stream=True)
            if response.status_code in RETRY_STATUS and not last:
                retry_after = response.headers.get("Retry-After")
                await response.aclose()
                await asyncio.sleep(llm._delay(attempt, retry_after))
                continue
            if response.status_code >= 400:
                await response.aread()
        except httpx.HTTPError as exc:
            error = _transport_error(url, exc, llm.timeout[1], reading=False)
            if last or not isinstance(error, LLMConnectionError):
                raise error from None
            await asyncio.sleep(llm._delay(attempt, None))
            continue
        if response.status_code >= 400:
            message = _error_message(response)
            await response.aclose()
            if response.status_code in (401, 403):
                raise LLMAuthError(f"{url}: HTTP {response.status_code}, credentials refused: {message}")
            raise LLMError(f"{url}: HTTP {response.status_code}: {message}")
        return response, attempt
    raise AssertionError("unreachable")  # the last attempt always returns or raises


async def aget_json(llm: Any, path: str) -> Any:
    response, _ = await _send(llm, "GET", path, None)
    try:
        await response.aread()
        return response.json()
    except httpx.HTTPError as exc:
        raise _transport_error(llm.base_url + path, exc, llm.timeout[1], reading=True) from None
    except ValueError:
        raise LLMProtocolError(
            f"{llm.base_url}{path}: the answer is not JSON: {response.text[:200]!r}"
        ) from None
    finally:
        await response.aclose()


async def astream(
    llm: Any, prompt: ChatPrompt, stop: Sequence[str], sampling: Sampling | None
) -> AsyncIterator[str | Completion]:
    """Text deltas cut at ``stop``, then the Completion (as the sync ``stream``)."""
    started = time.perf_counter()
    path, body = llm._body(prompt, stop, sampling, stream=True)
    url = llm.base_url + path
    attempt = 0
    while True:
        response, attempt = await _send(llm, "POST", path, body, first_attempt=attempt)
        state = StreamState(stop, llm._delta_text)
        try:
            async for event in _events(response, url, llm.timeout[1]):
                if emitted := state.feed(event):
                    yield emitted
                if state.ended:
                    break
            state.check_finished(url)
        except LLMConnectionError:
            if state.pieces or attempt >= llm.max_retries:
                raise  # text already handed out cannot be taken back
            await asyncio.sleep(llm._delay(attempt, None))
            attempt += 1
            continue
        finally:
            await response.aclose()  # also when the consumer stops: the server sees the client go
        break
    for item in state.finish(started):
        yield item


async def _events(response: httpx.Response, url: str, timeout: float) -> AsyncIterator[Any]:
    decoder = SSEDecoder(url)
    try:
        async for line in response.aiter_lines():
            event = decoder.line(line)
            if event is not None:
                yield event
                if event is DONE:
                    return
    except httpx.HTTPError as exc:
        raise _transport_error(url, exc, timeout, reading=True) from None
    if (event := decoder.end()) is not None:
        yield event


def _transport_error(url: str, exc: httpx.HTTPError, timeout: float, *, reading: bool) -> LLMError:
    """The LLMError for an httpx failure; only LLMConnectionError is worth a retry."""
    if isinstance(exc, httpx.TimeoutException):
        what = "the stream stalled for more than" if reading else "no answer within"
        return LLMTimeoutError(f"{url}: {what} {timeout:g} s")
    if isinstance(exc, httpx.DecodingError):
        return LLMProtocolError(f"{url}: the answer cannot be decoded ({exc})")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return LLMConnectionError(f"{url}: the connection broke while reading the answer ({exc})")
    if isinstance(exc, httpx.ConnectError | httpx.NetworkError):
        return LLMConnectionError(f"{url}: cannot connect ({exc})")
    return LLMError(f"{url}: the request failed ({type(exc).__name__}: {exc})")


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase or ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return preview(error)
