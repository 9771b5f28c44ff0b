"""The one interface the agent talks to a language model through, and its backends.

The protocol
------------
A backend is any object with these two methods (see :class:`LLM`)::

    complete(prompt: ChatPrompt, *, stop=(), sampling=None) -> Completion
    stream(prompt: ChatPrompt, *, stop=(), sampling=None) -> Iterator[str | Completion]

:class:`ChatPrompt` is Qwen's chat as ``make_context`` sees it: a system text, earlier ``(query, response)``
turns, the current query, and an optional ``assistant_prefix``, the unfinished assistant turn the model must
continue (text-completion mode, as ``react_demo.py`` and ``openai_api.py`` do it). The returned text is the
continuation only, cut before the first stop string; ``Completion.stop`` says which one ended it. ``stream``
yields text deltas and, as its last item, the :class:`Completion`.

Backends here
-------------
* :class:`ScriptedLLM` replays recorded outputs: it drives the agent loop in tests.
* :class:`OpenAICompatibleLLM` talks to any OpenAI-compatible server (vLLM, DashScope, this project's server)
  over ``/v1/completions`` (a ChatML prompt, sent as token ids when a tokenizer is given) or
  ``/v1/chat/completions``, with stop strings, SSE streaming, timeouts and retries.
* ``LocalLLM`` (in :mod:`qwen_agent.local_llm`) runs a model loaded in this process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import requests
import urllib3

from .errors import ConfigError, LLMAuthError, LLMConnectionError, LLMError, LLMProtocolError, LLMTimeoutError

__all__ = [
    "ChatPrompt",
    "Sampling",
    "Completion",
    "LLM",
    "StopScanner",
    "ScriptedLLM",
    "OpenAICompatibleLLM",
]

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ids of <|im_end|> and <|im_start|> in every Qwen vocabulary; servers that drop special tokens from the text
# can only stop on them by id
QWEN_STOP_TOKEN_IDS = (151645, 151644)


@dataclass(frozen=True)
class ChatPrompt:
    """A ChatML conversation: ``system``, ``history`` as ``(query, response)`` pairs, the current ``query``,
    and ``assistant_prefix``, text the assistant has already written in this turn and is to continue."""

    query: str
    history: tuple[tuple[str, str], ...] = ()
    system: str = DEFAULT_SYSTEM
    assistant_prefix: str = ""

    def to_chatml(self) -> str:
        """The prompt as one ChatML string, exactly as ``make_context`` writes it, plus the prefix."""
        parts = [f"{IM_START}system\n{self.system}{IM_END}"]
        for query, response in self.history:
            parts.append(f"\n{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n{response}{IM_END}")
        parts.append(f"\n{IM_START}user\n{self.query}{IM_END}\n{IM_START}assistant\n{self.assistant_prefix}")
        return "".join(parts)

    def to_messages(self) -> list[dict[str, str]]:
        """OpenAI chat messages; a non-empty prefix becomes a final assistant message."""
        messages = [{"role": "system", "content": self.system}]
        for query, response in self.history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        messages.append({"role": "user", "content": self.query})
        if self.assistant_prefix:
            messages.append({"role": "assistant", "content": self.assistant_prefix})
        return messages


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; ``None`` leaves a setting to the backend's default. ``temperature=0`` is greedy."""

    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``finish_reason`` is ``"stop"`` (a stop string or end of turn) or ``"length"``; ``stop`` is the stop string
    that ended it, if one did. Token counts are ``None`` when the backend does not report them;
    ``prefill_tokens`` is how many prompt tokens had to be encoded (fewer than ``prompt_tokens`` when a KV cache
    was reused).
    """

    text: str
    finish_reason: str = "stop"
    stop: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prefill_tokens: int | None = None
    seconds: float = 0.0


@runtime_checkable
class LLM(Protocol):
    """What the agent needs from a model. Implement both methods to plug in any backend."""

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        """The continuation of ``prompt``, cut before the first of ``stop``."""
        ...

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        """Text deltas as they are generated, then the :class:`Completion` as the last item."""
        ...


class StopScanner:
    """Cuts streamed text at the first stop string, holding back text that may be the start of one.

    ``feed`` returns the text that is safe to emit; once a stop string is seen, ``stopped`` names it and
    everything after it is ignored. ``finish`` releases what was held back.
    """

    def __init__(self, stop: Sequence[str]):
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped: str | None = None

    def feed(self, delta: str) -> str:
        if self.stopped is not None:
            return ""
        text = self._held + delta
        hits = [(text.find(s), s) for s in self._stop if s in text]
        if hits:
            index, self.stopped = min(hits)
            self._held = ""
            return text[:index]
        keep = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return held


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """``text`` before the earliest stop string, and that stop string (or None)."""
    scanner = StopScanner(stop)
    kept = scanner.feed(text) + scanner.finish()
    return kept, scanner.stopped


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ScriptedLLM:
    """Replays recorded model outputs, one per call, for tests and demos.

    Each output is cut at the stop strings as a real backend would; ``apply_stop=False`` replays it whole, like
    a server that ignores ``stop``. Every call's prompt and stop list is kept in ``calls``. ``stream`` yields
    each output in pieces of ``chunk_size`` characters.
    """

    outputs: Sequence[str]
    apply_stop: bool = True
    chunk_size: int = 3
    calls: list[tuple[ChatPrompt, tuple[str, ...]]] = field(default_factory=list)

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        text = self._next(prompt, stop)
        stopped = None
        if self.apply_stop:
            text, stopped = cut_at_stop(text, stop)
        return Completion(text, "stop", stopped, completion_tokens=len(text))

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        completion = self.complete(prompt, stop=stop, sampling=sampling)
        text = completion.text
        for i in range(0, len(text), self.chunk_size):
            yield text[i : i + self.chunk_size]
        yield completion

    def _next(self, prompt: ChatPrompt, stop: Sequence[str]) -> str:
        if len(self.calls) >= len(self.outputs):
            raise LLMError(f"ScriptedLLM: the script has only {len(self.outputs)} outputs and all were used")
        self.calls.append((prompt, tuple(stop)))
        return self.outputs[len(self.calls) - 1]


# ----------------------------------------------------------------------------------------------------------------


_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class OpenAICompatibleLLM:
    """A client for an OpenAI-compatible server.

    ``mode="completions"`` (default) sends the ChatML prompt to ``/v1/completions``, so the assistant turn can
    be continued exactly (what vLLM serving Qwen-7B-Chat needs). With a ``tokenizer`` the prompt is sent as token
    ids built piece-wise, so no user text or tool output can become a control token on the server; without one
    it is sent as a string, and the server parses ``<|im_start|>`` written inside messages as a control token.
    ``mode="chat"`` sends ``messages`` to ``/v1/chat/completions``; an assistant prefix is sent as a final
    assistant message with vLLM's ``continue_final_message``.

    Requests time out after ``timeout`` seconds without data (``connect_timeout`` to connect). HTTP 429 and 5xx
    answers and refused connections are retried ``max_retries`` times with exponential backoff (``Retry-After``
    is honoured, capped at ``max_backoff``); a stream is never retried once data has arrived. Failures raise
    :class:`LLMConnectionError`, :class:`LLMAuthError`, :class:`LLMTimeoutError`, :class:`LLMProtocolError` or
    :class:`LLMError` (other HTTP errors, with the server's message).
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
    ):
        if mode not in ("completions", "chat"):
            raise ConfigError(f"mode must be 'completions' or 'chat', got {mode!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {base_url!r}")
        base_url = base_url.rstrip("/")
        self.base_url = base_url if "/v1" in base_url else base_url + "/v1"
        self._model = model
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
            body = self._json(self._request("GET", "/models", None, stream=False), "/models")
            try:
                self._model = str(body["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise LLMProtocolError(
                    f"{self.base_url}/models: no model listed in {_preview(body)}"
                ) from None
        return self._model

    def close(self) -> None:
        self._session.close()

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
            raise LLMProtocolError(f"{self.base_url}{path}: the first choice has no text: {_preview(data)}")
        # servers that ignore `stop` (or ignore part of it) are cut here too
        text, stopped = cut_at_stop(text, stop)
        usage = data.get("usage") or {}
        finish = "length" if choice.get("finish_reason") == "length" and stopped is None else "stop"
        return Completion(
            text,
            finish,
            stopped or _stop_reason(choice, stop),
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            seconds=time.perf_counter() - started,
        )

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        path, body = self._body(prompt, stop, sampling, stream=True)
        response = self._request("POST", path, body, stream=True)
        scanner = StopScanner(stop)
        pieces: list[str] = []
        finish, usage, last_choice = "stop", {}, {}
        try:
            for event in self._events(response, path):
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                if not choices:
                    continue
                last_choice = choices[0] if isinstance(choices[0], dict) else {}
                if last_choice.get("finish_reason") == "length":
                    finish = "length"
                delta = self._delta_text(last_choice)
                emitted = scanner.feed(delta)
                if emitted:
                    pieces.append(emitted)
                    yield emitted
                if scanner.stopped is not None:
                    break
        finally:
            response.close()
        tail = scanner.finish()
        if tail:
            pieces.append(tail)
            yield tail
        stopped = scanner.stopped or _stop_reason(last_choice, stop)
        yield Completion(
            "".join(pieces),
            "stop" if scanner.stopped else finish,
            stopped,
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
            seconds=time.perf_counter() - started,
        )

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
        body["prompt"] = self._prompt_ids(prompt) if self.tokenizer is not None else prompt.to_chatml()
        return "/completions", body

    def _prompt_ids(self, prompt: ChatPrompt) -> list[int]:
        from .chat_format import make_context

        _, ids = make_context(
            self.tokenizer, prompt.query, list(prompt.history), prompt.system, max_window_size=1 << 30
        )
        return ids + self.tokenizer.encode(prompt.assistant_prefix)

    def _delta_text(self, choice: dict[str, Any]) -> str:
        text = (
            choice.get("text") if self.mode == "completions" else (choice.get("delta") or {}).get("content")
        )
        return text if isinstance(text, str) else ""

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> requests.Response:
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._session.request(
                    method, url, json=body, headers=self._headers, timeout=self.timeout, stream=stream
                )
            except requests.Timeout as exc:
                raise LLMTimeoutError(f"{url}: no answer within {self.timeout[1]:g} s ({exc})") from None
            except requests.ConnectionError as exc:
                if last:
                    raise LLMConnectionError(f"{url}: cannot connect ({_reason(exc)})") from None
                self._sleep(attempt, None)
                continue
            if response.status_code in _RETRY_STATUS and not last:
                retry_after = response.headers.get("Retry-After")
                response.close()
                self._sleep(attempt, retry_after)
                continue
            if response.status_code >= 400:
                message = _error_message(response)
                response.close()
                if response.status_code in (401, 403):
                    raise LLMAuthError(f"{url}: HTTP {response.status_code}, credentials refused: {message}")
                raise LLMError(f"{url}: HTTP {response.status_code}: {message}")
            return response
        raise AssertionError("unreachable")  # the last attempt always returns or raises

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.backoff * (2**attempt)
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                pass
        time.sleep(min(max(delay, 0.0), self.max_backoff))

    def _json(self, response: requests.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise LLMProtocolError(
                f"{self.base_url}{path}: the answer is not JSON: {response.text[:200]!r}"
            ) from None
        except requests.RequestException as exc:
            raise _stream_error(self.base_url + path, exc, self.timeout[1]) from None

    def _events(self, response: requests.Response, path: str) -> Iterator[dict[str, Any]]:
        """The JSON payloads of a server-sent-event stream, up to ``data: [DONE]``."""
        url = self.base_url + path
        data_lines: list[str] = []
        try:
            for raw in _lines(response):
                line = raw.decode("utf-8", errors="replace")
                if line.startswith("data:"):
                    data_lines.append(line[5:].lstrip(" "))
                    continue
                if line or not data_lines:
                    continue  # comments, other fields, keep-alives
                payload, data_lines = "\n".join(data_lines), []
                if payload.strip() == "[DONE]":
                    return
                yield _decode_event(payload, url)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise _stream_error(url, exc, self.timeout[1]) from None
        if data_lines and "\n".join(data_lines).strip() != "[DONE]":
            yield _decode_event("\n".join(data_lines), url)


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


def _decode_event(payload: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise LLMProtocolError(f"{url}: a stream event is not JSON: {payload[:200]!r}") from None
    if not isinstance(event, dict):
        raise LLMProtocolError(f"{url}: a stream event is not a JSON object: {payload[:200]!r}")
    if "error" in event:
        raise LLMError(f"{url}: the server reported an error mid-stream: {_preview(event['error'])}")
    return event


def _first_choice(data: Any, path: str) -> dict[str, Any]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise LLMProtocolError(f"{path}: the answer has no choices: {_preview(data)}")
    return choices[0]


def _stop_reason(choice: dict[str, Any], stop: Sequence[str]) -> str | None:
    # vLLM reports the matched stop string in `stop_reason`
    reason = choice.get("stop_reason")
    return reason if isinstance(reason, str) and reason in stop else None


def _error_message(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason or ""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message", error)
    return _preview(error)


def _stream_error(url: str, exc: Exception, timeout: float) -> LLMError:
    if "timed out" in str(exc).lower():
        return LLMTimeoutError(f"{url}: the stream stalled for more than {timeout:g} s")
    return LLMConnectionError(f"{url}: the connection broke while reading the answer ({_reason(exc)})")


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


def _preview(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 200 else text[:200] + "..."
