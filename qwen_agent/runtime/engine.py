"""``load_model``: a local Qwen model ready to chat and complete, and the engine object it returns.

>>> engine = load_model("/models/Qwen-7B-Chat")                       # doctest: +SKIP
>>> response, history = engine.chat("你好")                           # doctest: +SKIP
>>> result = engine.generate(engine.tokenizer.encode(prompt, allowed_special="all"),
...                          stop=["Observation:"], do_sample=False)  # doctest: +SKIP

Every call becomes :class:`~qwen_agent.runtime.request.PromptRequest` s handed to the engine's one
:class:`~qwen_agent.runtime.scheduler.Scheduler`, whose thread alone runs the model: calls from many threads
decode together in shared steps, and each result comes back with its own request (a :class:`Handle`), so the
engine is safe to share.

**Prefix reuse.** Every request shares one prefix cache of KV blocks (:mod:`qwen_agent.runtime.prefix_cache`): a
prompt prefills only what follows its longest cached run of 16-token blocks, so the ReAct loop, which re-sends
prompt + previous output + Observation, prefills only the new tokens and at most one block more
(``prefill_tokens`` and ``cached_tokens`` of each result; :meth:`QwenEngine.stats` for the totals). Blocks are
keyed by every token up to them and by Qwen v1's dynamic-NTK alpha, so a prompt gets only keys a fresh prefill
of it would compute; logN touches queries only, which are always computed afresh. (The maths is the same; the
floating-point rounding of a shorter prefill can differ in the last bits, as with any change of batch shape,
which in bf16 can occasionally flip a near-tie in greedy decoding.) ``kv_cache_gb`` bounds the pool (default: a
quarter of the memory free after loading, at most 16 GiB; 0 turns the cache off).
"""

from __future__ import annotations

import json
import os
import queue
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import torch

from ..errors import CheckpointError, ConfigError, GenerationError
from .chat_format import DEFAULT_SYSTEM, History, make_context, stop_ids
from .checkpoint import load_checkpoint, resolve_model_dir
from .config import GenerationConfig, QwenConfig
from .constraint import TokenConstraint
from .generate import GenerationResult
from .grammar import Grammar
from .model import Transformer
from .prefix_cache import PrefixCache, default_budget_bytes
from .request import PromptRequest, SamplingParams
from .scheduler import Event, Handle, Scheduler
from .tokenizer import QwenTokenizer

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["load_model", "QwenEngine", "Engine", "Options", "Handle"]

StopSpec = str | int | Sequence[int]


class Options(TypedDict, total=False):
    """Generation settings a call may give; each left out comes from the checkpoint's ``generation_config``."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    repetition_penalty: float
    seed: int


class Engine(Protocol):
    """What the layers above (backends, servers, adapters) use of a local engine: its parts, one way to make a
    request, and one way to run it."""

    tokenizer: QwenTokenizer
    config: QwenConfig
    generation_config: GenerationConfig
    default_system: str
    scheduler: Scheduler

    def request(
        self,
        prompt: Sequence[int],
        *,
        stop: Sequence[StopSpec] = (),
        constraint: TokenConstraint | None = None,
        **options: Unpack[Options],
    ) -> PromptRequest: ...

    def submit(self, request: PromptRequest, on_event: Callable[[Event], None] | None = None) -> Handle: ...

    def as_completed(
        self, requests: Sequence[PromptRequest], max_batch: int | None = None
    ) -> Iterator[tuple[int, GenerationResult]]: ...

    def stats(self) -> dict[str, Any]: ...  # {"prefix_cache": its counters, or None when off}


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    kv_cache_gb: float | None = None,
) -> QwenEngine:
    """Load a Qwen-7B-Chat (v1) or Qwen2-family model directory, or a Hub id, without running its code.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/None (a GPU when there is one).
    ``dtype``: ``"bf16"``, ``"fp16"``, ``"fp32"`` or ``"auto"``/None (bf16 on a GPU that has it, fp32 on CPU).
    ``kv_cache_gb``: the prefix cache's budget in GiB (None: a quarter of the memory then free, at most 16; 0: off).
    Raises :class:`~qwen_agent.errors.CheckpointError` naming the file and tensor when the directory is bad.
    """
    model_dir = resolve_model_dir(path)
    model = load_checkpoint(model_dir, device=device, dtype=dtype)
    tokenizer = QwenTokenizer.from_pretrained(model_dir)
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} ids but the model's vocabulary "
            f"has {model.config.vocab_size} rows"
        )
    return QwenEngine(
        model,
        tokenizer,
        GenerationConfig.from_dir(model_dir),
        default_system(model_dir),
        kv_cache_gb=kv_cache_gb,
    )


def default_system(model_dir: Path) -> str:
    """The system prompt a Qwen2-family chat template inserts when none is given; Qwen's default otherwise.

    The template is in ``chat_template.jinja`` where current transformers saved the tokenizer, else in
    ``tokenizer_config.json``.
    """
    jinja = model_dir / "chat_template.jinja"
    path = jinja if jinja.exists() else model_dir / "tokenizer_config.json"
    try:
        if not path.exists():
            template = None
        elif path == jinja:
            template = path.read_text(encoding="utf-8")
        else:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable file ({exc})") from None
    if isinstance(template, str):
        # the literal default turn, e.g. '<|im_start|>system\nYou are a helpful assistant.<|im_end|>'
        found = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>", template)
        if found:
            return found.group(1)
    return DEFAULT_SYSTEM


class QwenEngine:
    """A loaded model with its tokenizer and defaults: ``chat``, ``chat_stream``, ``generate``, ``stream``.

    Generation settings (all optional, defaults from ``generation_config``) are :class:`Options`; besides them
    ``stop`` (strings, ids, or id sequences, which are matched as their decoded text) and ``constraint``: a
    :class:`~qwen_agent.runtime.constraint.TokenConstraint` for a single prompt, or a list with one (or None)
    per prompt, that masks the ids it does not allow (a constraint is stateful: use each one for one call);
    or, instead, ``json_schema`` (a JSON Schema dict: every prompt's output is JSON text matching it) or
    ``grammar`` (a Lark grammar in llguidance's dialect), compiled once per call into a fresh constraint per
    prompt (:mod:`qwen_agent.runtime.grammar`; a schema or grammar that does not compile is a ConfigError).
    Every call also stops on the end-of-text id and, for ChatML models, on ``<|im_end|>`` and
    ``<|im_start|>``. Safe to call from many threads at once: every call goes to ``scheduler``.
    ``kv_cache_gb`` sizes the prefix cache every call shares (see the module docstring; None: the default share,
    0: no prefix cache).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: QwenTokenizer,
        generation_config: GenerationConfig | None = None,
        system: str = DEFAULT_SYSTEM,
        *,
        max_batch: int = 32,
        cuda_graphs: bool | None = None,
        fused_kernels: bool | None = None,
        kv_cache_gb: float | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config: QwenConfig = model.config
        self.generation_config = generation_config or GenerationConfig()
        self.default_system = system
        # cuda_graphs None: replay the decode step as CUDA graphs on a GPU; fused_kernels None: the Triton decode
        # kernels on a GPU when Triton is installed; False: never
        self.prefix_cache = self._new_prefix_cache(kv_cache_gb)
        self.scheduler = Scheduler(
            model,
            tokenizer,
            max_batch=max_batch,
            cuda_graphs=cuda_graphs,
            fused_kernels=fused_kernels,
            prefix_cache=self.prefix_cache,
        )

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def stats(self) -> dict[str, Any]:
        """The prefix cache's counters (:meth:`~qwen_agent.runtime.prefix_cache.PrefixCache.stats`) under
        ``prefix_cache``, or ``{"prefix_cache": None}`` when it is off."""
        return {"prefix_cache": self.prefix_cache.stats() if self.prefix_cache is not None else None}

    def _new_prefix_cache(self, kv_cache_gb: float | None) -> PrefixCache | None:
        if kv_cache_gb is not None and not (isinstance(kv_cache_gb, (int, float)) and kv_cache_gb >= 0):
            raise ConfigError(f"kv_cache_gb must be a number >= 0 (0: no prefix cache), got {kv_cache_gb!r}")
        budget = default_budget_bytes(self.device) if kv_cache_gb is None else int(kv_cache_gb * (1 << 30))
        dtype = self.model.tok_embeddings.weight.dtype
        if budget < PrefixCache.block_bytes(self.config, dtype):
            return None
        return PrefixCache(self.config, budget, dtype=dtype, device=self.device)

    def close(self) -> None:
        """Stop the scheduler; calls still running get an error, later ones raise."""
        self.scheduler.close()

    # -- raw prompts -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Sequence[int] | Sequence[Sequence[int]],
        *,
        stop: Sequence[StopSpec] = (),
        max_batch: int | None = None,
        constraint: TokenConstraint | Sequence[TokenConstraint | None] | None = None,
        json_schema: dict[str, Any] | str | None = None,
        grammar: str | None = None,
        **options: Unpack[Options],
    ) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt of token ids, or a list of prompts (decoded together, at most ``max_batch`` at a
        time; greedy results identical to generating each alone). Returns a
        :class:`~qwen_agent.runtime.generate.GenerationResult` or a list of them in prompt order."""
        batched = bool(prompt) and isinstance(prompt[0], Sequence) and not isinstance(prompt[0], str)
        prompts = list(prompt) if batched else [prompt]
        requests = self._requests(prompts, stop, options, constraint, json_schema, grammar)
        if not batched:
            return self.submit(requests[0]).wait()
        results = dict(self.as_completed(requests, max_batch))
        return [results[i] for i in range(len(requests))]

    def generate_as_completed(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        stop: Sequence[StopSpec] = (),
        max_batch: int | None = None,
        constraint: Sequence[TokenConstraint | None] | None = None,
        json_schema: dict[str, Any] | str | None = None,
        grammar: str | None = None,
        **options: Unpack[Options],
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Like ``generate(prompts)``, but yield ``(index, result)`` as each prompt finishes: with more prompts
        than ``max_batch``, a finished prompt's place goes to the next waiting one at once."""
        requests = self._requests(list(prompts), stop, options, constraint, json_schema, grammar)
        yield from self.as_completed(requests, max_batch)

    def stream(
        self,
        prompt: Sequence[int],
        *,
        stop: Sequence[StopSpec] = (),
        constraint: TokenConstraint | None = None,
        json_schema: dict[str, Any] | str | None = None,
        grammar: str | None = None,
        **options: Unpack[Options],
    ) -> Handle:
        """Start one completion; iterate the returned :class:`~qwen_agent.runtime.scheduler.Handle` for its text
        deltas, which join to ``generate(...).text``. Once they end, its ``result`` holds the full result."""
        [request] = self._requests([prompt], stop, options, constraint, json_schema, grammar)
        return self.submit(request)

    def request(
        self,
        prompt: Sequence[int],
        *,
        stop: Sequence[StopSpec] = (),
        constraint: TokenConstraint | None = None,
        json_schema: dict[str, Any] | str | None = None,
        grammar: str | None = None,
        **options: Unpack[Options],
    ) -> PromptRequest:
        """The request :meth:`stream` would submit, to hand to :meth:`submit`. Raises :class:`ConfigError` or
        :class:`GenerationError` (a prompt that leaves no room in the context) naming the problem."""
        return self._requests([prompt], stop, options, constraint, json_schema, grammar)[0]

    def submit(self, request: PromptRequest, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Hand ``request`` to the scheduler; its :class:`~qwen_agent.runtime.scheduler.Handle` (see
        :meth:`Scheduler.add <qwen_agent.runtime.scheduler.Scheduler.add>` for ``on_event``)."""
        return self.scheduler.add(request, on_event)

    def as_completed(
        self, requests: Sequence[PromptRequest], max_batch: int | None = None
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Run ``requests``, at most ``max_batch`` (default: the scheduler's) in flight, the next submitted as
        each one finishes; yield ``(index, result)`` in the order they finish. Leaving early aborts the rest."""
        max_batch = self.scheduler.max_batch if max_batch is None else max_batch
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        finished: queue.SimpleQueue[tuple[int, Event]] = queue.SimpleQueue()
        handles: dict[int, Handle] = {}

        def submit(index: int) -> None:
            def on_event(event: Event) -> None:
                if not isinstance(event, str):
                    finished.put((index, event))

            handles[index] = self.submit(requests[index], on_event)

        following = min(max_batch, len(requests))
        try:
            for index in range(following):
                submit(index)
            for _ in requests:
                index, event = finished.get()
                del handles[index]
                if isinstance(event, BaseException):
                    raise event
                if following < len(requests):
                    submit(following)
                    following += 1
                yield index, event
        finally:
            for handle in handles.values():  # the caller stopped early: free their rows
                self.scheduler.abort(handle)

    # -- chat --------------------------------------------------------------------------------------------------

    def chat(
        self,
        query: str,
        history: History | None = None,
        system: str | None = None,
        *,
        stop: Sequence[StopSpec] = (),
        max_window_size: int | None = None,
        **options: Unpack[Options],
    ) -> tuple[str, list[tuple[str, str]]]:
        """Answer ``query`` after ``history`` (``(query, response)`` pairs) as Qwen's ``model.chat`` does:
        ChatML context, stop at ``<|im_end|>``, the reply stripped. Returns ``(response, new history)``."""
        deltas = self.chat_stream(
            query, history, system, stop=stop, max_window_size=max_window_size, **options
        )
        response = "".join(deltas)
        return response, [*map(tuple, history or ()), (query, response)]

    def chat_stream(
        self,
        query: str,
        history: History | None = None,
        system: str | None = None,
        *,
        stop: Sequence[StopSpec] = (),
        max_window_size: int | None = None,
        **options: Unpack[Options],
    ) -> Iterator[str]:
        """Yield the reply of :meth:`chat` as text deltas (leading and trailing whitespace left out)."""
        chat_format = self.generation_config.chat_format
        _, ids = make_context(
            self.tokenizer,
            query,
            history,
            self.default_system if system is None else system,
            max_window_size=max_window_size or self.generation_config.max_window_size,
            chat_format=chat_format,
        )
        stop = [*stop, *stop_ids(self.tokenizer, chat_format)]
        pending, started = "", False
        for delta in self.stream(ids, stop=stop, **options):
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            # hold back trailing whitespace until text follows it: the reply is stripped at the end
            body = (pending + delta).rstrip()
            pending = (pending + delta)[len(body) :]
            if body:
                yield body

    # -- internals ---------------------------------------------------------------------------------------------

    def _requests(
        self,
        prompts: list[Sequence[int]],
        stop: Sequence[StopSpec],
        options: Options,
        constraint: TokenConstraint | Sequence[TokenConstraint | None] | None,
        json_schema: dict[str, Any] | str | None,
        grammar: str | None,
    ) -> list[PromptRequest]:
        """Check the prompts and settings of one call and make its requests, one per prompt."""
        if not prompts:
            raise ConfigError("generate() needs at least one prompt")
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
        constraints = self._constraints(len(prompts), constraint, json_schema, grammar)
        unknown = set(options) - set(Options.__annotations__)
        if unknown:
            raise ConfigError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        defaults, chosen = self.generation_config, {k: v for k, v in options.items() if v is not None}
        params = SamplingParams(
            do_sample=chosen.get("do_sample", defaults.do_sample),
            temperature=float(chosen.get("temperature", defaults.temperature)),
            top_p=float(chosen.get("top_p", defaults.top_p)),
            top_k=int(chosen.get("top_k", defaults.top_k)),
            repetition_penalty=float(chosen.get("repetition_penalty", defaults.repetition_penalty)),
        )
        max_new = int(chosen.get("max_new_tokens", defaults.max_new_tokens))
        if max_new < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new}")
        stop_strings, ids = self._stops(stop)
        generator = None
        if "seed" in chosen:
            generator = torch.Generator(self.device).manual_seed(int(chosen["seed"]))
        return [
            PromptRequest(
                tuple(p),
                # never past the context the model defines; a row that hits it ends with finish_reason "length"
                min(max_new, self.config.max_context - len(p)),
                params,
                stop_strings,
                ids,
                constraint=c,
                generator=generator,
            )
            for p, c in zip(prompts, constraints, strict=True)
        ]

    def _constraints(
        self,
        prompts: int,
        given: TokenConstraint | Sequence[TokenConstraint | None] | None,
        json_schema: dict[str, Any] | str | None,
        grammar: str | None,
    ) -> list[TokenConstraint | None]:
        """One constraint (or None) per prompt from the ``constraint``, ``json_schema`` or ``grammar``
        argument."""
        named = {"constraint": given, "json_schema": json_schema, "grammar": grammar}
        named = {k: v for k, v in named.items() if v is not None}
        if len(named) > 1:
            raise ConfigError(f"give only one of {', '.join(sorted(named))}")
        if json_schema is not None:
            compiled = Grammar.from_json_schema(self.tokenizer, self.config.vocab_size, json_schema)
        elif grammar is not None:
            compiled = Grammar(self.tokenizer, self.config.vocab_size, grammar)
        else:
            return _constraints(given, prompts)
        return [compiled.constraint() for _ in range(prompts)]

    def _check_prompt(self, prompt: Sequence[int], index: int) -> None:
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.config.vocab_size for t in prompt):
            raise ConfigError(
                f"prompt {index}: expected a non-empty list of token ids in "
                f"[0, {self.config.vocab_size}); encode text with engine.tokenizer.encode"
            )
        if len(prompt) >= self.config.max_context:
            raise GenerationError(
                f"prompt {index} has {len(prompt)} tokens; the model's context holds "
                f"{self.config.max_context}, leaving no room to generate"
            )

    def _stops(self, stop: Sequence[StopSpec]) -> tuple[tuple[str, ...], frozenset[int]]:
        if isinstance(stop, (str, int)):
            stop = [stop]
        strings: list[str] = []
        ids = {self.tokenizer.eod_id, *self.generation_config.eos_token_ids}
        if self.generation_config.chat_format == "chatml":
            ids |= {self.tokenizer.im_end_id, self.tokenizer.im_start_id}
        for item in [*stop, *self.generation_config.stop_words_ids]:
            if isinstance(item, int):
                ids.add(item)
            elif isinstance(item, str):
                if not item:
                    raise ConfigError("stop strings must not be empty")
                strings.append(item)
            elif len(item) == 1:
                ids.add(int(item[0]))
            else:  # a token sequence: match its text, whatever tokens spell it
                strings.append(self.tokenizer.decode(list(item)))
        return tuple(dict.fromkeys(strings)), frozenset(ids)


def _constraints(given: Any, prompts: int) -> list[TokenConstraint | None]:
    """The ``constraint`` argument as one entry per prompt."""
    if given is None:
        return [None] * prompts
    listed = [given] if isinstance(given, TokenConstraint) else list(given)
    if len(listed) != prompts or not all(c is None or isinstance(c, TokenConstraint) for c in listed):
        raise ConfigError(
            f"constraint must be a TokenConstraint (fill_bitmask and accept) for a single prompt, or a list of "
            f"{prompts} such constraints or None, one per prompt"
        )
    if len({id(c) for c in listed if c is not None}) != sum(c is not None for c in listed):
        raise ConfigError("a constraint is stateful: give each prompt its own")
    return listed
