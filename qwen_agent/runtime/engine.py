"""``load_model``: a local Qwen model ready to chat and complete, and the engine object it returns.

>>> engine = load_model("/models/Qwen-7B-Chat")                       # doctest: +SKIP
>>> response, history = engine.chat("你好")                           # doctest: +SKIP
>>> result = engine.generate(engine.tokenizer.encode(prompt, allowed_special="all"),
...                          stop=["Observation:"], do_sample=False)  # doctest: +SKIP

**Prefix reuse.** For single-prompt calls the engine keeps the keys and values of the last sequence it ran
(prompt plus generated tokens) and, on the next call, reuses the longest common token prefix: the ReAct loop,
which re-sends prompt + previous output + Observation, prefills only the new tokens (``prefill_tokens`` shows
how many ran). Reuse happens only when it gives the same result as prefilling the whole prompt afresh: with
Qwen v1's dynamic NTK the cached keys were rotated with the alpha frozen at their prefill, so the cache is
reused only if the new prompt's own alpha (:func:`qwen_agent.runtime.config.ntk_alpha` of its length) is the same;
below ``seq_length`` it always is. LogN scaling touches queries only, which are always computed afresh. (The
maths is the same; the floating-point rounding of a shorter prefill can differ in the last bits, as with any
change of batch shape, which in bf16 can occasionally flip a near-tie in greedy decoding.)
Batched calls use a cache of their own (``max_batch`` rows; prompts take turns in them) and leave the kept
one alone. The kept cache also keeps its :class:`~qwen_agent.runtime.decode_runner.DecodeRunner`, so on a GPU the decode
graphs captured for one ReAct step are replayed by the next.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, GenerationError
from .chat_format import DEFAULT_SYSTEM, History, make_context, stop_ids
from .chat_template import ChatTemplate
from .checkpoint import load_checkpoint, resolve_model_dir
from .config import GenerationConfig, QwenConfig, ntk_alpha
from .constraint import TokenConstraint
from .decode_runner import DecodeRunner
from .generate import Generation, GenerationResult, PromptRequest, SamplingParams
from .grammar import Grammar
from .model import KVCache, Transformer
from .tokenizer import QwenTokenizer

__all__ = ["load_model", "QwenEngine"]

StopSpec = str | int | Sequence[int]
_CACHE_STEP = 256  # cache capacity grows in steps of this many slots


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> QwenEngine:
    """Load a Qwen-7B-Chat (v1) or Qwen2-family model directory, or a Hub id, without running its code.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``/None (a GPU when there is one).
    ``dtype``: ``"bf16"``, ``"fp16"``, ``"fp32"`` or ``"auto"``/None (bf16 on a GPU that has it, fp32 on CPU).
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
    engine = QwenEngine(model, tokenizer, GenerationConfig.from_dir(model_dir), default_system(model_dir))
    engine.chat_template = ChatTemplate.from_dir(model_dir, tokenizer.special_tokens)
    return engine


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

    Generation keyword arguments (all optional, defaults from ``generation_config``): ``stop`` (strings, ids, or
    id sequences, which are matched as their decoded text), ``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_p``, ``top_k`` (0 = off), ``repetition_penalty``, ``seed``, and ``constraint``: a
    :class:`~qwen_agent.runtime.constraint.TokenConstraint` for a single prompt, or a list with one (or None)
    per prompt, that masks the ids it does not allow (a constraint is stateful: use each one for one call);
    or, instead, ``json_schema`` (a JSON Schema dict: every prompt's output is JSON text matching it) or
    ``grammar`` (a Lark grammar in llguidance's dialect), compiled once per call into a fresh constraint per
    prompt (:mod:`qwen_agent.runtime.grammar`; a schema or grammar that does not compile is a ConfigError).
    Every call also stops on the end-of-text id and, for ChatML models, on ``<|im_end|>`` and
    ``<|im_start|>``. Not thread-safe: one call at a time. ``chat_template`` is the checkpoint's
    (:func:`load_model` sets it; None for Qwen-7B-Chat, which has none).
    """

    chat_template: ChatTemplate | None = None

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
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch  # prompts decoded at once by a batched generate()
        self.cuda_graphs = cuda_graphs  # None: replay the decode step as CUDA graphs on a GPU; False: never
        # None: the Triton decode kernels on a GPU when Triton is installed; False: never
        self.fused_kernels = fused_kernels
        self.config: QwenConfig = model.config
        self.generation_config = generation_config or GenerationConfig()
        self.default_system = system
        self._cache: KVCache | None = None
        # the kept cache's decode step (its CUDA graphs stay captured)
        self._runner: DecodeRunner | None = None
        self._cached_ids: list[int] = []  # the ids whose keys and values fill the kept cache's slots
        self.last_result: GenerationResult | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # -- raw prompts -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: Sequence[int] | Sequence[Sequence[int]],
        *,
        stop: Sequence[StopSpec] = (),
        max_batch: int | None = None,
        **generation: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt of token ids, or a list of prompts (decoded together, at most ``max_batch`` at a
        time; greedy results identical to generating each alone). Returns a
        :class:`~qwen_agent.runtime.generate.GenerationResult` or a list of them in prompt order."""
        batched = bool(prompt) and isinstance(prompt[0], Sequence) and not isinstance(prompt[0], str)
        run = self._start(list(prompt) if batched else [prompt], stop, generation, max_batch)
        for _ in run:
            pass
        self._keep_cache(run)
        self.last_result = run.results[-1]
        return run.results if batched else run.results[0]

    def generate_as_completed(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        stop: Sequence[StopSpec] = (),
        max_batch: int | None = None,
        **generation: Any,
    ) -> Iterator[tuple[int, GenerationResult]]:
        """Like ``generate(prompts)``, but yield ``(index, result)`` as each prompt finishes: with more prompts
        than ``max_batch``, a finished prompt's place goes to the next waiting one at once."""
        run = self._start(list(prompts), stop, generation, max_batch)
        for index, event in run:
            if isinstance(event, GenerationResult):
                self.last_result = event
                yield index, event

    def stream(
        self, prompt: Sequence[int], *, stop: Sequence[StopSpec] = (), **generation: Any
    ) -> Iterator[str]:
        """Yield text deltas of one completion; they join to ``generate(...).text``. When the stream is
        exhausted, ``last_result`` holds the full result."""
        run = self._start([prompt], stop, generation)
        for _, event in run:
            if isinstance(event, str):
                yield event
        self._keep_cache(run)
        self.last_result = run.results[0]

    # -- chat --------------------------------------------------------------------------------------------------

    def chat(
        self, query: str, history: History | None = None, system: str | None = None, **generation: Any
    ) -> tuple[str, list[tuple[str, str]]]:
        """Answer ``query`` after ``history`` (``(query, response)`` pairs) as Qwen's ``model.chat`` does:
        ChatML context, stop at ``<|im_end|>``, the reply stripped. Returns ``(response, new history)``."""
        response = "".join(self.chat_stream(query, history, system, **generation))
        return response, [*map(tuple, history or ()), (query, response)]

    def chat_stream(
        self, query: str, history: History | None = None, system: str | None = None, **generation: Any
    ) -> Iterator[str]:
        """Yield the reply of :meth:`chat` as text deltas (leading and trailing whitespace left out)."""
        chat_format = self.generation_config.chat_format
        _, ids = make_context(
            self.tokenizer,
            query,
            history,
            self.default_system if system is None else system,
            max_window_size=generation.pop("max_window_size", self.generation_config.max_window_size),
            chat_format=chat_format,
        )
        stop = [*generation.pop("stop", ()), *stop_ids(self.tokenizer, chat_format)]
        pending, started = "", False
        for delta in self.stream(ids, stop=stop, **generation):
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            # hold back trailing whitespace until text follows it: the reply is stripped at the end
            body = (pending + delta).rstrip()
            pending = (pending + delta)[len(body) :]
            if body:
                yield body

    # -- internals ---------------------------------------------------------------------------------------------

    def request(
        self, prompt: Sequence[int], *, stop: Sequence[StopSpec] = (), **generation: Any
    ) -> PromptRequest:
        """Check ``prompt`` and the generation arguments (as :meth:`generate` takes them) and bundle them for
        :meth:`open_batch`'s ``add``. Raises :class:`ConfigError` or :class:`GenerationError` (a prompt that
        leaves no room in the context) naming the problem."""
        self._check_prompt(prompt, 0)
        [constraint] = self._constraints_from(generation, 1) or [None]
        params, max_new, stop_strings, ids, generator = self._settings(stop, generation)
        budget = min(max_new, self.config.max_context - len(prompt))
        return PromptRequest(list(prompt), budget, params, stop_strings, ids, generator, constraint)

    def open_batch(self, rows: int, capacity: int, runner: DecodeRunner | None = None) -> Generation:
        """An empty, open :class:`~qwen_agent.runtime.generate.Generation` over a cache of ``rows`` rows of
        ``capacity`` slots (rounded up as the engine's own caches are), for a caller that adds prompts as they
        arrive (``add(engine.request(...))``) and iterates it from one thread. ``runner``, the ``runner`` of an
        earlier open batch whose cache is big enough, is reused with its CUDA graphs. The batch forgets each
        prompt once it is done, and leaves the engine's kept cache alone."""
        if runner is None or runner.cache.batch_size < rows or runner.cache.capacity < capacity:
            runner = self._new_runner(self._new_cache(rows, capacity))
        return Generation(runner, self.tokenizer, keep=False)

    def _settings(
        self, stop: Sequence[StopSpec], generation: dict[str, Any]
    ) -> tuple[SamplingParams, int, tuple[str, ...], frozenset[int], torch.Generator | None]:
        unknown = set(generation) - {
            "max_new_tokens",
            "do_sample",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "seed",
        }
        if unknown:
            raise ConfigError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        defaults = self.generation_config
        chosen = {k: v for k, v in generation.items() if v is not None}
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
        return params, max_new, stop_strings, ids, generator

    def _start(
        self,
        prompts: list[Sequence[int]],
        stop: Sequence[StopSpec],
        generation: dict[str, Any],
        max_batch: int | None = None,
    ) -> Generation:
        constraints = self._constraints_from(generation, len(prompts))
        params, max_new, stop_strings, ids, generator = self._settings(stop, generation)
        if not prompts:
            raise ConfigError("generate() needs at least one prompt")
        for i, p in enumerate(prompts):
            self._check_prompt(p, i)
        # never past the context the model defines; a row that hits it ends with finish_reason "length"
        budgets = [min(max_new, self.config.max_context - len(p)) for p in prompts]

        max_batch = self.max_batch if max_batch is None else max_batch
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        needed = max(len(p) + budget for p, budget in zip(prompts, budgets, strict=True))
        if len(prompts) == 1:
            cache, reused, runner = self._cache_for(list(prompts[0]), needed)
        else:
            cache, reused, runner = self._new_cache(min(len(prompts), max_batch), needed), 0, None
        return Generation(
            runner or self._new_runner(cache),
            self.tokenizer,
            prompts,
            max_new_tokens=budgets,
            params=params,
            stop_strings=stop_strings,
            stop_ids=ids,
            generator=generator,
            reused=reused,
            constraints=constraints,
        )

    def _constraints_from(
        self, generation: dict[str, Any], prompts: int
    ) -> list[TokenConstraint | None] | None:
        """One constraint (or None) per prompt from the ``constraint``, ``json_schema`` or ``grammar``
        argument, taken out of ``generation``."""
        given = {k: generation.pop(k) for k in ("constraint", "json_schema", "grammar") if k in generation}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise ConfigError(f"give only one of {', '.join(sorted(given))}")
        if "constraint" in given or not given:
            return _constraints(given.get("constraint"), prompts)
        if "json_schema" in given:
            compiled = Grammar.from_json_schema(self.tokenizer, self.config.vocab_size, given["json_schema"])
        else:
            compiled = Grammar(self.tokenizer, self.config.vocab_size, given["grammar"])
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

    def _new_cache(self, batch: int, needed: int) -> KVCache:
        capacity = min(-(-needed // _CACHE_STEP) * _CACHE_STEP, self.config.max_context)
        dtype = self.model.tok_embeddings.weight.dtype
        return KVCache(self.config, batch, capacity, dtype=dtype, device=self.device)

    def _new_runner(self, cache: KVCache) -> DecodeRunner:
        return DecodeRunner(self.model, cache, graphs=self.cuda_graphs, fused=self.fused_kernels)

    def _cache_for(self, prompt: list[int], needed: int) -> tuple[KVCache, int, DecodeRunner | None]:
        """The kept cache (with its decode runner) and its reusable prefix, or a fresh cache; returns
        ``(cache, reused slots, runner or None)``."""
        old, runner, reused = self._cache, self._runner, 0
        if old is not None:
            limit = min(len(self._cached_ids), len(prompt) - 1)  # the last prompt token must run for logits
            while reused < limit and self._cached_ids[reused] == prompt[reused]:
                reused += 1
            if (
                self.config.use_dynamic_ntk
                and ntk_alpha(len(prompt), self.config.seq_length) != old.ntk_alpha.item()
            ):
                reused = 0  # the cached keys were rotated with another alpha
        self._cache = self._runner = None  # released before a new one is allocated
        if old is not None and old.capacity >= needed:
            return old, reused, runner  # big enough: its captured decode graphs stay valid too
        cache = self._new_cache(1, needed)
        if reused:
            cache.k[..., :reused, :] = old.k[..., :reused, :]
            cache.v[..., :reused, :] = old.v[..., :reused, :]
            cache.ntk_alpha.copy_(old.ntk_alpha)
        return cache, reused, None

    def _keep_cache(self, run: Generation) -> None:
        if len(run.prompts) == 1:
            self._cache, self._runner, self._cached_ids = run.cache, run.runner, run.fed[0]


def _constraints(given: Any, prompts: int) -> list[TokenConstraint | None] | None:
    """The ``constraint`` argument as one entry per prompt."""
    if given is None:
        return None
    listed = [given] if isinstance(given, TokenConstraint) else list(given)
    if len(listed) != prompts or not all(c is None or isinstance(c, TokenConstraint) for c in listed):
        raise ConfigError(
            f"constraint must be a TokenConstraint (fill_bitmask and accept) for a single prompt, or a list of "
            f"{prompts} such constraints or None, one per prompt"
        )
    if len({id(c) for c in listed if c is not None}) != sum(c is not None for c in listed):
        raise ConfigError("a constraint is stateful: give each prompt its own")
    return listed
