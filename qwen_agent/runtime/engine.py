"""``load_model``: a local Qwen model ready to chat and complete, and the engine object it returns.

>>> engine = load_model("/models/Qwen-7B-Chat")                       # doctest: +SKIP
>>> response, history = engine.chat("你好")                           # doctest: +SKIP
>>> result = engine.generate(engine.tokenizer.encode(prompt, allowed_special="all"),
...                          stop=["Observation:"], do_sample=False)  # doctest: +SKIP

**Prefix reuse.** Every call (single, batched, streamed, and the server's open batches) shares one prefix cache of
KV blocks (:mod:`qwen_agent.runtime.prefix_cache`): a prompt prefills only what follows its longest cached run of
16-token blocks, so the ReAct loop, which re-sends prompt + previous output + Observation, prefills only the new
tokens and at most one block more (``prefill_tokens`` and ``cached_tokens`` of each result; ``stats()`` for the
totals). Blocks are keyed by every token up to them and by Qwen v1's dynamic-NTK alpha, so a prompt gets only keys
a fresh prefill of it would compute; logN touches queries only, which are always computed afresh. (The maths is
the same; the floating-point rounding of a shorter prefill can differ in the last bits, as with any change of
batch shape, which in bf16 can occasionally flip a near-tie in greedy decoding.) ``kv_cache_gb`` bounds the pool
(default: a quarter of the memory free after loading, at most 16 GiB; 0 turns the cache off). Single-prompt
calls keep their cache row and its :class:`~qwen_agent.runtime.decode_runner.DecodeRunner`, so on a GPU the decode
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
from .checkpoint import load_checkpoint, resolve_model_dir
from .config import GenerationConfig, QwenConfig
from .constraint import TokenConstraint
from .decode_runner import DecodeRunner
from .generate import Generation, GenerationResult, PromptRequest, SamplingParams
from .grammar import Grammar
from .model import KVCache, Transformer
from .prefix_cache import PrefixCache, default_budget_bytes
from .tokenizer import QwenTokenizer

__all__ = ["load_model", "QwenEngine"]

StopSpec = str | int | Sequence[int]
_CACHE_STEP = 256  # cache capacity grows in steps of this many slots


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

    Generation keyword arguments (all optional, defaults from ``generation_config``): ``stop`` (strings, ids, or
    id sequences, which are matched as their decoded text), ``max_new_tokens``, ``do_sample``, ``temperature``,
    ``top_p``, ``top_k`` (0 = off), ``repetition_penalty``, ``seed``, and ``constraint``: a
    :class:`~qwen_agent.runtime.constraint.TokenConstraint` for a single prompt, or a list with one (or None)
    per prompt, that masks the ids it does not allow (a constraint is stateful: use each one for one call);
    or, instead, ``json_schema`` (a JSON Schema dict: every prompt's output is JSON text matching it) or
    ``grammar`` (a Lark grammar in llguidance's dialect), compiled once per call into a fresh constraint per
    prompt (:mod:`qwen_agent.runtime.grammar`; a schema or grammar that does not compile is a ConfigError).
    Every call also stops on the end-of-text id and, for ChatML models, on ``<|im_end|>`` and
    ``<|im_start|>``. Not thread-safe: one call at a time. ``kv_cache_gb`` sizes the prefix cache every call
    shares (see the module docstring; None: the default share, 0: no prefix cache).
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
        self.max_batch = max_batch  # prompts decoded at once by a batched generate()
        self.cuda_graphs = cuda_graphs  # None: replay the decode step as CUDA graphs on a GPU; False: never
        # None: the Triton decode kernels on a GPU when Triton is installed; False: never
        self.fused_kernels = fused_kernels
        self.config: QwenConfig = model.config
        self.generation_config = generation_config or GenerationConfig()
        self.default_system = system
        # the kept cache's decode step (its CUDA graphs stay captured)
        self._runner: DecodeRunner | None = None
        self.prefix_cache = self._new_prefix_cache(kv_cache_gb)
        self.last_result: GenerationResult | None = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def stats(self) -> dict[str, Any]:
        """The prefix cache's counters (:meth:`~qwen_agent.runtime.prefix_cache.PrefixCache.stats`) under
        ``prefix_cache``, or ``{"prefix_cache": None}`` when it is off."""
        return {"prefix_cache": self.prefix_cache.stats() if self.prefix_cache is not None else None}

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
        return Generation(runner, self.tokenizer, keep=False, prefix_cache=self.prefix_cache)

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
            runner = self._kept_runner(needed)
        else:
            runner = self._new_runner(self._new_cache(min(len(prompts), max_batch), needed))
        return Generation(
            runner,
            self.tokenizer,
            prompts,
            max_new_tokens=budgets,
            params=params,
            stop_strings=stop_strings,
            stop_ids=ids,
            generator=generator,
            constraints=constraints,
            prefix_cache=self.prefix_cache,
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

    def _kept_runner(self, needed: int) -> DecodeRunner:
        """The single-prompt calls' runner, kept while its cache holds ``needed`` slots (its decode graphs stay
        captured), else a new one."""
        runner, self._runner = self._runner, None  # released before a new cache is allocated
        if runner is None or runner.cache.capacity < needed:
            runner = self._new_runner(self._new_cache(1, needed))
        return runner

    def _keep_cache(self, run: Generation) -> None:
        if len(run.prompts) == 1:
            self._runner = run.runner

    def _new_prefix_cache(self, kv_cache_gb: float | None) -> PrefixCache | None:
        if kv_cache_gb is not None and not (isinstance(kv_cache_gb, (int, float)) and kv_cache_gb >= 0):
            raise ConfigError(f"kv_cache_gb must be a number >= 0 (0: no prefix cache), got {kv_cache_gb!r}")
        budget = default_budget_bytes(self.device) if kv_cache_gb is None else int(kv_cache_gb * (1 << 30))
        dtype = self.model.tok_embeddings.weight.dtype
        if budget < PrefixCache.block_bytes(self.config, dtype):
            return None
        return PrefixCache(self.config, budget, dtype=dtype, device=self.device)


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
