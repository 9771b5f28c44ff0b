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

import copy
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import LLMError
from .llm_protocol import LLM, ChatPrompt, Completion, Sampling
from .runtime.stops import StopScanner, cut_at_stop

__all__ = [
    "ChatPrompt",
    "Sampling",
    "Completion",
    "LLM",
    "StopScanner",
    "ScriptedLLM",
    "LocalLLM",
    "llm_from_spec",
    "cut_completion",
    "cut_stream",
]


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
# Stop strings enforced on the caller's side: a backend may not cut (a server that ignores ``stop``), or may cut
# only some of them; callers that promise cut text run every completion and stream through these.


def cut_completion(completion: Completion, stop: Sequence[str]) -> Completion:
    """``completion`` cut before the first of ``stop`` (unchanged when the backend already cut it)."""
    text, stopped = cut_at_stop(completion.text, stop)
    if stopped is None:
        return completion
    return replace(completion, text=text, stop=stopped, finish_reason="stop")


def cut_stream(items: Iterable[str | Completion], stop: Sequence[str]) -> Iterator[str | Completion]:
    """A backend's stream cut before the first of ``stop``: no delta reaches past it or holds a piece of it, and
    the deltas still join to the Completion's text (as the backend's own do). The stream is read to its end."""
    scanner = StopScanner(stop)
    for item in items:
        if isinstance(item, Completion):
            if held := scanner.finish():
                yield held
            yield cut_completion(item, stop)
        elif text := scanner.feed(item):
            yield text


# ----------------------------------------------------------------------------------------------------------------


class LocalLLM:
    """A model loaded in this process (:func:`qwen_agent.runtime.engine.load_model`).

    The prompt ids are built piece-wise with :func:`~qwen_agent.runtime.chat_format.make_context` and the assistant
    prefix is appended as plain text, so neither user text nor tool output can become a control token. The
    engine keeps the KV cache of its previous call, so when the agent re-sends the same conversation with a
    longer assistant prefix only the new tokens are encoded (``Completion.prefill_tokens``).

    ``constraint`` (see :meth:`with_constraint`) gives each call a token constraint for its prompt: the engine
    then masks every id the constraint does not allow (:mod:`qwen_agent.constrained` builds ReAct ones).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_window_size: int | None = None,
        constraint: Callable[[ChatPrompt], Any] | None = None,
    ):
        from .runtime.chat_format import DEFAULT_MAX_WINDOW_SIZE

        self.engine = engine
        self.constraint = constraint
        self.tokenizer = engine.tokenizer
        configured = getattr(getattr(engine, "generation_config", None), "max_window_size", None)
        self.max_window_size = max_window_size or configured or DEFAULT_MAX_WINDOW_SIZE

    def prompt_ids(self, prompt: ChatPrompt) -> list[int]:
        from .runtime.chat_format import make_context

        if prompt.rendered is not None:  # a chat template's prompt (only its own control tokens are controls)
            return prompt.rendered.ids(self.tokenizer) + self.tokenizer.encode(prompt.assistant_prefix)
        _, ids = make_context(
            self.tokenizer,
            prompt.query,
            list(prompt.history),
            prompt.system,
            max_window_size=self.max_window_size,
        )
        return ids + self.tokenizer.encode(prompt.assistant_prefix)

    def with_constraint(self, constraint: Callable[[ChatPrompt], Any] | None) -> LocalLLM:
        """The same model (and KV cache) with ``constraint``: called with each prompt, it returns a fresh
        :class:`~qwen_agent.runtime.constraint.TokenConstraint` (or None) for that call."""
        constrained = copy.copy(self)
        constrained.constraint = constraint
        return constrained

    def _options(self, prompts: Sequence[ChatPrompt], sampling: Sampling | None) -> dict[str, Any]:
        options = engine_options(sampling)
        if self.constraint is not None:
            made = [self.constraint(p) for p in prompts]
            options["constraint"] = made if len(prompts) > 1 else made[0]
        return options

    def complete(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Completion:
        started = time.perf_counter()
        result = self.engine.generate(
            self.prompt_ids(prompt), stop=tuple(stop), **self._options([prompt], sampling)
        )
        return local_completion(result, time.perf_counter() - started)

    def complete_batch(
        self, prompts: Sequence[ChatPrompt], *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> list[Completion]:
        """Complete several prompts in one batched engine pass (``seconds`` is the time of the whole pass)."""
        if not prompts:
            return []
        started = time.perf_counter()
        ids = [self.prompt_ids(p) for p in prompts]
        results = self.engine.generate(ids, stop=tuple(stop), **self._options(prompts, sampling))
        return [local_completion(r, time.perf_counter() - started) for r in results]

    def stream(
        self, prompt: ChatPrompt, *, stop: Sequence[str] = (), sampling: Sampling | None = None
    ) -> Iterator[str | Completion]:
        started = time.perf_counter()
        yield from self.engine.stream(
            self.prompt_ids(prompt), stop=tuple(stop), **self._options([prompt], sampling)
        )
        # the engine keeps the full result of the stream it just finished
        yield local_completion(self.engine.last_result, time.perf_counter() - started)


def engine_options(sampling: Sampling | None) -> dict[str, Any]:
    """The engine's generation arguments for ``sampling`` (``temperature=0``: greedy)."""
    sampling = sampling or Sampling()
    options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens}
    if sampling.temperature == 0:
        options["do_sample"] = False
    elif sampling.temperature is not None:
        options["temperature"] = sampling.temperature
    for key in ("top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(sampling, key) is not None:
            options[key] = getattr(sampling, key)
    return options


def local_completion(result: Any, seconds: float) -> Completion:
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
    )


def llm_from_spec(
    model: str, *, api_key: str | None = None, served_model: str | None = None, device: str | None = None
) -> LLM:
    """An LLM for a command-line ``--model``: an ``http(s)://`` URL is an OpenAI-compatible server (key from
    ``api_key`` or ``$OPENAI_API_KEY``), anything else a local model directory."""
    if model.startswith(("http://", "https://")):
        from .openai_client import OpenAICompatibleLLM

        return OpenAICompatibleLLM(model, served_model, api_key=api_key or os.environ.get("OPENAI_API_KEY"))
    from .runtime.engine import load_model

    return LocalLLM(load_model(model, device=device))
