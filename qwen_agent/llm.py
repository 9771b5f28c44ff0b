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
* :class:`~qwen_agent.openai_client.OpenAICompatibleLLM` talks to any OpenAI-compatible server (vLLM,
  DashScope, this project's server) over ``/v1/completions`` (a ChatML prompt, sent as token ids when a tokenizer is given) or
  ``/v1/chat/completions``, with stop strings, SSE streaming, timeouts and retries.
* :class:`LocalLLM` runs a model loaded in this process, reusing its KV cache across agent steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import LLMError, QwenAgentError
from .llm_protocol import LLM, ChatPrompt, Completion, Sampling
from .runtime.stops import StopScanner, cut_at_stop

if TYPE_CHECKING:  # the runtime (torch) loads only when a local model is used
    from .runtime.constraint import TokenConstraint
    from .runtime.engine import Engine
    from .runtime.generate import GenerationResult
    from .runtime.request import PromptRequest

__all__ = [
    "ChatPrompt",
    "Sampling",
    "Completion",
    "LLM",
    "StopScanner",
    "ScriptedLLM",
    "LocalLLM",
    "llm_from_spec",
]


@dataclass
class ScriptedLLM:
    """Replays recorded model outputs, one per call, for tests and demos.

    Each output is cut at the stop strings, as the protocol asks of every backend; ``apply_stop=False`` replays
    it whole, a misbehaving backend for tests of what that breaks. Every call's prompt and stop list is kept in
    ``calls``. ``stream`` yields each output in pieces of ``chunk_size`` characters; ``astream`` does the same on an
    event loop, letting other tasks run between pieces. ``context_window`` plays the backend's context size for the
    agent's budget.
    """

    outputs: Sequence[str]
    apply_stop: bool = True
    chunk_size: int = 3
    calls: list[tuple[ChatPrompt, tuple[str, ...]]] = field(default_factory=list)
    context_window: int | None = None

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

    async def astream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> AsyncIterator[str | Completion]:
        for item in self.stream(prompt, stop=stop, sampling=sampling):
            yield item
            await asyncio.sleep(0)

    def _next(self, prompt: ChatPrompt, stop: Sequence[str]) -> str:
        if len(self.calls) >= len(self.outputs):
            raise LLMError(f"ScriptedLLM: the script has only {len(self.outputs)} outputs and all were used")
        self.calls.append((prompt, tuple(stop)))
        return self.outputs[len(self.calls) - 1]


class LocalLLM:
    """A model loaded in this process (:func:`qwen_agent.runtime.engine.load_model`), safe to share between
    threads: every call is one request to the engine's scheduler, decoded alongside whatever else it runs.

    The prompt ids are built piece-wise (:func:`~qwen_agent.runtime.chat_format.chatml_ids`), so neither user
    text nor tool output can become a control token. The engine's prefix cache keeps the KV blocks of earlier
    calls, so when the agent re-sends the same conversation with a longer assistant prefix only the new tokens
    (and at most one block more) are encoded (``Completion.prefill_tokens``, ``cached_tokens``). Stop strings
    are cut by the engine.

    ``constraint`` (see :meth:`with_constraint`) gives each call a token constraint for its prompt: the engine
    then masks every id the constraint does not allow (:mod:`qwen_agent.constrained` builds ReAct ones).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_window_size: int | None = None,
        constraint: Callable[[ChatPrompt], TokenConstraint | None] | None = None,
    ):
        self.engine = engine
        self.constraint = constraint
        self.tokenizer = engine.tokenizer
        self.max_window_size = max_window_size or engine.generation_config.max_window_size

    @property
    def context_window(self) -> int:
        """The longest sequence the model runs, prompt and reply together (the agent budgets to it)."""
        return self.engine.config.max_context

    def prompt_ids(self, prompt: ChatPrompt) -> list[int]:
        from .runtime.chat_format import chatml_ids

        return chatml_ids(self.tokenizer, prompt, self.max_window_size)

    def with_constraint(self, constraint: Callable[[ChatPrompt], TokenConstraint | None] | None) -> LocalLLM:
        """The same model with ``constraint``: called with each prompt, it returns a fresh
        :class:`~qwen_agent.runtime.constraint.TokenConstraint` (or None) for that call."""
        constrained = copy.copy(self)
        constrained.constraint = constraint
        return constrained

    def request(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> PromptRequest:
        """The one request a call makes: the prompt's ids, ``sampling`` (``temperature=0``: greedy; a setting
        left None takes the checkpoint's default), ``stop`` and this backend's constraint."""
        sampling = sampling or Sampling()
        greedy = sampling.temperature == 0
        return self.engine.request(
            self.prompt_ids(prompt),
            stop=tuple(stop),
            constraint=self.constraint(prompt) if self.constraint is not None else None,
            max_new_tokens=sampling.max_tokens,
            do_sample=False if greedy else None,
            temperature=None if greedy else sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
        )

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        started = time.perf_counter()
        with _engine_errors():
            result = self.engine.submit(self.request(prompt, stop=stop, sampling=sampling)).wait()
        return local_completion(result, time.perf_counter() - started)

    def complete_batch(
        self, prompts: Sequence[ChatPrompt], *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> list[Completion]:
        """Complete several prompts decoded together (``seconds`` is the time of the whole batch)."""
        started = time.perf_counter()
        requests = [self.request(p, stop=stop, sampling=sampling) for p in prompts]
        with _engine_errors():
            results = dict(self.engine.as_completed(requests))
        return [local_completion(results[i], time.perf_counter() - started) for i in range(len(requests))]

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        handle = self.engine.submit(self.request(prompt, stop=stop, sampling=sampling))
        with _engine_errors():
            yield from handle  # leaving early aborts the request
        yield local_completion(handle.result, time.perf_counter() - started)

    async def astream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> AsyncIterator[str | Completion]:
        """:meth:`stream` on an event loop: the scheduler's thread hands each event to the loop
        (``call_soon_threadsafe``), so any number of tasks share its batches with no thread each; a cancelled
        task (or a consumer that stops reading) aborts the request, which frees its row at the next step."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        request = self.request(prompt, stop=stop, sampling=sampling)
        handle = self.engine.submit(
            request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        )
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = not isinstance(event, str)
                if isinstance(event, BaseException):
                    with _engine_errors():
                        raise event
                yield local_completion(event, time.perf_counter() - started) if finished else event
        finally:
            if not finished:
                handle.scheduler.abort(handle)


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """What failed on the engine's thread (a model error, no memory) as an :class:`LLMError`; the package's own
    errors (a bad setting) pass as they are."""
    try:
        yield
    except QwenAgentError:
        raise
    except Exception as exc:
        raise LLMError(f"the local model failed: {type(exc).__name__}: {exc}") from exc


def local_completion(result: GenerationResult, seconds: float) -> Completion:
    """A :class:`Completion` from the engine's ``GenerationResult``."""
    finish = "length" if result.finish_reason == "length" else "stop"
    stopped = result.stop if isinstance(result.stop, str) else None  # an end-of-turn id is not a stop string
    return Completion(
        result.text,
        finish,
        stopped,
        result.prompt_tokens,
        result.completion_tokens,
        result.prefill_tokens,
        seconds,
        result.cached_tokens,
    )


def llm_from_spec(
    model: str,
    *,
    api_key: str | None = None,
    served_model: str | None = None,
    device: str | None = None,
    kv_cache_gb: float | None = None,
) -> LLM:
    """An LLM for a command-line ``--model``: an ``http(s)://`` URL is an OpenAI-compatible server (key from
    ``api_key`` or ``$OPENAI_API_KEY``), anything else a local model directory (``kv_cache_gb``: its prefix
    cache's budget, see :func:`~qwen_agent.runtime.engine.load_model`)."""
    if model.startswith(("http://", "https://")):
        from .openai_client import OpenAICompatibleLLM

        return OpenAICompatibleLLM(model, served_model, api_key=api_key or os.environ.get("OPENAI_API_KEY"))
    from .runtime.engine import load_model

    return LocalLLM(load_model(model, device=device, kv_cache_gb=kv_cache_gb))
