"""Token generation: prefill, decode, sampling, stop handling and streaming text for one or many prompts.

Hot code is :meth:`~qwen_agent.runtime.model.Transformer.prefill`, :func:`next_token` and the fixed-shape decode step of
:mod:`qwen_agent.runtime.decode_runner`; :class:`Generation` drives them for many prompts at once and turns tokens into text.

Stop rules, the same in every path (single, batched, streamed):

- A **stop id** (``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>`` ...) ends the row. The id is kept in
  ``token_ids`` but adds no text.
- A **stop string** is matched on the decoded text, so every tokenization that spells it counts
  (``Observation:`` ending in ``:`` (25) or in the merged ``:\\n`` (510)). The row ends at the first token whose
  text completes a stop string; ``text`` is cut just *before* the earliest stop string (the stop string and
  anything after it are dropped) and ``stop`` names it. ``token_ids`` keeps every generated token.
- Streaming holds back any tail of the text that could still grow into a stop string, so no fragment such as
  ``Observ`` is ever yielded unless it turns out not to start a stop string; the deltas never split a character
  and always join to the final ``text``.
- A **constraint** (:class:`~qwen_agent.runtime.constraint.TokenConstraint`, one per prompt or none) masks the
  ids it does not allow before sampling, in the row's own logits only; the row accepts each token it receives.
- Streaming holds back any tail of the text that could still grow into a stop string, so no fragment such as
  ``Observ`` is ever yielded unless it turns out not to start a stop string; the deltas never split a character
  and always join to the final ``text``.

Sampling follows transformers' order and semantics: repetition penalty over prompt and generated ids (divide
positive logits, multiply negative ones), then greedy argmax, or temperature, top-k (0 = off) and top-p.

Sampling follows transformers' order and semantics: repetition penalty over prompt and generated ids (divide
positive logits, multiply negative ones), then greedy argmax, or temperature, top-k (0 = off) and top-p.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError, GenerationError
from .constraint import TokenConstraint, apply_bitmask, bitmask_words
from .decode_runner import DecodeRunner
from .prefix_cache import PrefixCache, PrefixLease
from .stops import StopScanner
from .tokenizer import QwenTokenizer

# padded prompt tokens one prefill call takes: enough rows of short prompts to keep a GPU's matrix units busy,
# no more activation memory than one 2,048-token prompt
PREFILL_TOKENS = 2048

__all__ = [
    "GenerationResult",
    "SamplingParams",
    "PromptRequest",
    "Generation",
    "next_token",
    "process_logits",
    "sample",
]


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class PromptRequest:
    """One prompt and how to complete it: at most ``max_new_tokens`` (the cache must hold the prompt and
    them), its sampling, its stops and its random generator (None: torch's global one)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    constraint: TokenConstraint | None = None  # masks what it does not allow before sampling


@dataclass
class GenerationResult:
    """One completion. ``text`` stops before any stop string; ``token_ids`` holds every generated id."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", or "cancelled" (Generation.cancel)
    stop: str | int | None  # the stop string or stop id that ended it
    prompt_tokens: int
    completion_tokens: int
    prefill_tokens: int  # prompt tokens run through the model: prompt_tokens less cached_tokens
    prefill_seconds: float
    decode_seconds: float
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


# -- hot path ------------------------------------------------------------------------------------------------


def next_token(
    logits: Tensor, seen_ids: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Tensor:
    """Pick the next id per row [B] from ``logits`` [B, V]; ``seen_ids`` [B, L] are the ids the repetition
    penalty applies to (prompt and generated; repeats allowed). Reads nothing back on the host, so on a GPU the
    host can queue the next step before this one has run."""
    logits = process_logits(logits, seen_ids, params)
    if not params.do_sample:
        return logits.argmax(dim=-1)
    return sample(logits.softmax(dim=-1), generator)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One id per row of ``probs`` [B, V]: the argmax of ``probs / q`` with ``q ~ Exp(1)``, which is how
    ``torch.multinomial`` draws a single sample (the same ids from the same generator state) without its check of
    the probabilities, which reads values on the host and so waits for the GPU at every step. Generation checks
    the logits itself, without waiting (see :class:`Generation`)."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def process_logits(logits: Tensor, seen_ids: Tensor, params: SamplingParams) -> Tensor:
    """Repetition penalty on ``seen_ids`` [B, L], then (when sampling) temperature, top-k and top-p; removed ids
    get -inf."""
    if params.repetition_penalty != 1.0:
        # only the seen ids are touched: a pass over the whole vocabulary per row would cost more than a decode
        # step of a small model once rows are batched
        seen = logits.gather(1, seen_ids)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        logits = logits.scatter(1, seen_ids, seen)
    if not params.do_sample:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - params.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits


def _finite_rows(logits: Tensor) -> Tensor:
    """Per row of ``logits`` [B, V]: no NaN, no +inf, not every id ruled out (-inf alone is a ruled-out id)."""
    return logits.amax(dim=-1).isfinite()  # max propagates NaN


# -- text and stops ------------------------------------------------------------------------------------------


class _RowText:
    """Text of one row as tokens arrive: stop ids, stop strings and the text safe to show."""

    def __init__(
        self, tokenizer: QwenTokenizer, stop_strings: tuple[str, ...], stop_ids: frozenset[int]
    ) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.scanner = StopScanner(stop_strings)
        self.stop_ids = stop_ids
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop: str | int | None = None

    def add(self, token: int, last: bool) -> str:
        """Take one generated id (``last``: the length limit is reached); return the text now safe to show."""
        self.token_ids.append(token)
        if token in self.stop_ids:
            delta = self._release(self.decoder.flush())
            if self.finish_reason is None:
                self.finish_reason, self.stop = "stop", token
        else:
            delta = self.scanner.feed(self.decoder.add([token]))
            if self.scanner.stopped is not None:
                self.finish_reason, self.stop = "stop", self.scanner.stopped
            elif last:
                delta += self._release(self.decoder.flush())
                if self.finish_reason is None:
                    self.finish_reason = "length"
        self.text += delta
        return delta

    def _release(self, tail: str) -> str:
        """The final characters through the scanner, then what it held back (nothing after a stop string)."""
        delta = self.scanner.feed(tail) + self.scanner.finish()
        if self.scanner.stopped is not None:
            self.finish_reason, self.stop = "stop", self.scanner.stopped
        return delta


@dataclass
class _Row:
    """A prompt being generated in a cache row."""

    index: int  # of the prompt
    prompt_len: int
    text: _RowText
    budget: int  # max new tokens
    started: float  # when its prefill began
    first_token_at: float = 0.0
    received: int = 0  # generated tokens read on the host
    fed: int = 0  # generated tokens whose keys and values are in the cache
    constraint: TokenConstraint | None = None
    lease: PrefixLease | None = None  # its blocks in the prefix cache

    @property
    def slot(self) -> int:
        """The cache slot the row's newest token goes to (on the device: ``runner.slots``)."""
        return self.prompt_len + self.fed


class Generation:
    """Generate for many prompts, at most ``cache.batch_size`` at a time; iterate for events.

    Prompts that join at once are prefilled together into free cache rows (right-padded, up to
    ``PREFILL_TOKENS`` padded tokens a call), then the rows decode together, one token per row per step
    (:class:`~qwen_agent.runtime.decode_runner.DecodeRunner`: fixed shapes, CUDA graphs on a GPU). A row that finishes
    frees its cache row for the next waiting prompt, so sequences join and leave the batch as they go; each
    prompt gets what it would get alone. The host reads a step's tokens while the device already runs the
    next step, so the device never waits for Python; a finished row costs that one extra step. Logits that are
    not finite (NaN or infinite: broken weights, or a float16 overflow) raise :class:`GenerationError` naming the
    prompt; the check travels to the host with the tokens, so it does not wait either.

    Iteration yields ``(index, delta)`` for each text delta of prompt ``index`` and, when the prompt is done,
    ``(index, result)`` with its :class:`GenerationResult`. After iteration ends, ``results`` holds them in
    prompt order (breaking out early leaves it empty). The runner brings the model and the cache.
    ``prefix_cache``, when given, is shared with other generations: a prompt starts from its longest cached block
    prefix, and rows give their full blocks back once their prompt is prefilled and when they finish.

    **Open batches** (a server's): :meth:`add` queues a :class:`PromptRequest` with its own sampling, stops and
    budget, before or during iteration, and :meth:`cancel` ends one early; ``on_step``, when set, is called
    once per decode step just before waiting prompts are admitted, which is where a scheduler adds what
    arrived meanwhile. Iteration ends when no prompt is left. ``keep=False`` forgets each prompt once it is done
    (no ``results``), so a batch that never drains does not grow. ``step_rows`` counts decode steps by the number
    of rows they decoded.

    ``constraints`` (or a request's ``constraint``) gives each prompt its own
    :class:`~qwen_agent.runtime.constraint.TokenConstraint` (or None); the mask of a step is filled on the host
    while the device runs that step, and rows without one are not touched.
    """

    def __init__(
        self,
        runner: DecodeRunner,
        tokenizer: QwenTokenizer,
        prompts: Sequence[Sequence[int]] = (),
        *,
        max_new_tokens: Sequence[int] = (),
        params: SamplingParams | None = None,
        stop_strings: tuple[str, ...] = (),
        stop_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        keep: bool = True,
        constraints: Sequence[TokenConstraint | None] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        constraints = list(constraints) if constraints is not None else [None] * len(prompts)
        if len(constraints) != len(prompts):
            raise ConfigError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        self.runner, self.model, self.cache = runner, runner.model, runner.cache
        self.tokenizer, self.keep, self.prefix_cache = tokenizer, keep, prefix_cache
        self.requests: list[PromptRequest | None] = []  # by prompt index; None once done when not kept
        self.results: list[GenerationResult] = []
        self.on_step: Callable[[], None] | None = None
        self.step_rows: Counter[int] = Counter()
        self._waiting: deque[int] = deque()
        self._cancelled: set[int] = set()
        # the allowed-id bitmask of each constrained row, filled on the host
        self._bitmask = torch.empty(
            self.cache.batch_size,
            bitmask_words(self.model.config.vocab_size),
            dtype=torch.int32,
            pin_memory=self.cache.k.device.type == "cuda",
        )
        for prompt, budget, constraint in zip(prompts, max_new_tokens, constraints, strict=True):
            self.add(
                PromptRequest(
                    list(prompt),
                    budget,
                    params or SamplingParams(),
                    stop_strings,
                    stop_ids,
                    generator,
                    constraint,
                )
            )

    @property
    def prompts(self) -> list[list[int] | None]:
        return [r.prompt if r is not None else None for r in self.requests]

    def add(self, request: PromptRequest) -> int:
        """Queue ``request``; returns its prompt index. Call before iterating or between events, from the
        thread that iterates."""
        needed = len(request.prompt) + request.max_new_tokens
        if needed > self.cache.capacity:
            raise ConfigError(
                f"a prompt of {len(request.prompt)} tokens plus {request.max_new_tokens} new ones needs "
                f"{needed} cache slots; this cache has {self.cache.capacity}"
            )
        self.requests.append(request)
        self._waiting.append(len(self.requests) - 1)
        return len(self.requests) - 1

    def cancel(self, index: int) -> None:
        """End prompt ``index`` at the next step: a waiting prompt never starts, a decoding one frees its row;
        its result (``finish_reason="cancelled"``, the text so far) is yielded as usual."""
        self._cancelled.add(index)

    @property
    def decoding(self) -> int:
        """How many prompts hold a cache row now."""
        return len(self._active)

    def __iter__(self) -> Iterator[tuple[int, str | GenerationResult]]:
        cache, runner = self.cache, self.runner
        device = cache.k.device
        # per cache row, the ids the repetition penalty sees: the prompt, the generated ids at their slots, and
        # the prompt's first id in every other column (a repeat changes nothing)
        self._seen = torch.zeros(cache.batch_size, cache.capacity, dtype=torch.long, device=device)
        self._free = list(range(cache.batch_size))  # a heap: the lowest free row first keeps rows packed
        self._active: dict[int, _Row] = {}  # cache row -> its prompt
        # 1 for a row in use: a step advances only those rows' slots; a free row stays at slot 0, so the fused
        # attention, which reads each row's slots up to its own, does next to nothing for it
        self._advancing = torch.zeros(cache.batch_size, dtype=torch.long, device=device)
        runner.slots.zero_()
        # 1 for a row whose last logits were all finite; read on the host with the tokens
        self._finite = torch.ones(cache.batch_size, dtype=torch.long, device=device)
        done: dict[int, GenerationResult] = {}
        # each step's tokens and finite flags, copied while the device runs the next step
        on_host = torch.empty(2, cache.batch_size, dtype=torch.long, pin_memory=device.type == "cuda")
        copied = torch.cuda.Event() if device.type == "cuda" else None

        try:
            yield from self._run(on_host, copied, done)
        finally:  # a generation abandoned part-way gives its rows' blocks back
            for row in self._active.values():
                self._give_back(row)
        if self.keep:
            self.results = [done[i] for i in range(len(self.requests))]

    def _run(
        self, on_host: Tensor, copied: torch.cuda.Event | None, done: dict[int, GenerationResult]
    ) -> Iterator[tuple[int, str | GenerationResult]]:
        runner = self.runner
        yield from self._drop_cancelled(done)
        self._admit()
        self._copy_tokens(on_host, copied)
        while self._active:
            # launch the next step before reading the tokens it consumes; the copy was queued ahead of it
            logits = None
            if any(row.received + 1 < row.budget for row in self._active.values()):  # a token to feed
                logits = runner(max(self._active) + 1, max(row.slot for row in self._active.values()) + 1)
                runner.slots.add_(self._advancing)
                self.step_rows[len(self._active)] += 1
                for row in self._active.values():
                    row.fed += 1
            if copied is not None:
                copied.synchronize()
            tokens, finite = on_host.tolist()
            for r, row in list(self._active.items()):
                if row.index in self._cancelled:
                    yield row.index, self._finish(r, row, done, "cancelled")
                    continue
                if not finite[r]:
                    raise GenerationError(
                        f"prompt {row.index}: the model's logits for generated token {row.received + 1} are not "
                        "finite (NaN or infinite): broken weights, or a dtype that overflows (float16 does "
                        "where bfloat16 does not)"
                    )
                delta = self._receive(row, tokens[r])
                if row.constraint is not None and row.text.finish_reason is None:
                    self._accept(row, tokens[r])
                if delta:
                    yield row.index, delta
                if row.text.finish_reason is not None:
                    yield row.index, self._finish(r, row, done)
            if logits is not None and self._active:
                batch = logits.shape[0]
                self._finite[:batch] = _finite_rows(logits)  # before the mask's -inf
                logits = self._constrain(logits, [r for r in self._active if r < batch])
                picked = self._pick(logits, self._seen[:batch], list(range(batch)))
                runner.tokens[:batch] = picked
                self._seen[:batch].scatter_(1, runner.slots[:batch, None], picked[:, None])
            if self.on_step is not None:
                self.on_step()
            yield from self._drop_cancelled(done)
            self._admit()
            if self._active:
                self._copy_tokens(on_host, copied)

    def _drop_cancelled(self, done: dict[int, GenerationResult]) -> Iterator[tuple[int, GenerationResult]]:
        """Results for waiting prompts that were cancelled before they started."""
        for index in [i for i in self._waiting if i in self._cancelled]:
            self._waiting.remove(index)
            request = self.requests[index]
            result = GenerationResult("", [], "cancelled", None, len(request.prompt), 0, 0, 0.0, 0.0)
            yield index, self._done(index, result, done)

    def _pick(self, logits: Tensor, seen: Tensor, rows: list[int]) -> Tensor:
        """The next id of each cache row in ``rows`` from its ``logits`` [len(rows), V] and ``seen`` ids, by its
        own prompt's sampling; rows that sample alike are picked in one call (a free row in ``rows`` gets 0)."""
        groups: dict[tuple, tuple[PromptRequest, list[int]]] = {}
        for i, r in enumerate(rows):
            if r in self._active:
                request = self.requests[self._active[r].index]
                # greedy rows do not draw from their generator, so they all go together
                key = (request.params, id(request.generator) if request.params.do_sample else None)
                groups.setdefault(key, (request, []))[1].append(i)
        if len(groups) == 1:
            request, members = next(iter(groups.values()))
            if len(members) == len(rows):
                return next_token(logits, seen, request.params, request.generator)
        picked = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        for request, members in groups.values():
            index = torch.tensor(members, device=logits.device)
            picked[index] = next_token(logits[index], seen[index], request.params, request.generator)
        return picked

    def _admit(self) -> None:
        """Prefill waiting prompts into free rows, several per model call; each row's first token goes to
        ``runner.tokens``."""
        wave: list[tuple[int, int, PrefixLease | None]] = []
        while self._free and self._waiting:
            r, index = heapq.heappop(self._free), self._waiting.popleft()
            wave.append((r, index, self._take_prefix(r, self.requests[index].prompt)))
        # they all join now, so their order does not matter: similar lengths side by side pad the least
        wave.sort(key=lambda joining: len(self.requests[joining[1]].prompt) - _cached(joining[2]))
        group: list[tuple[int, int, PrefixLease | None]] = []
        try:
            for joining in wave:
                width = len(self.requests[joining[1]].prompt) - _cached(joining[2])  # the longest so far
                if group and (len(group) + 1) * width > PREFILL_TOKENS:
                    self._prefill(group)
                    group = []
                group.append(joining)
            if group:
                self._prefill(group)
        except BaseException:  # a failed prefill: the blocks of the rows that never started go back
            for r, _, lease in wave:
                if lease is not None and r not in self._active:
                    self.prefix_cache.release(lease)
            raise

    def _prefill(self, group: list[tuple[int, int, PrefixLease | None]]) -> None:
        """One model call for ``group``'s (cache row, prompt index, lease) triples, each prompt after its cached
        prefix, right-padded to the longest."""
        started, device = time.perf_counter(), self.cache.k.device
        requests = [self.requests[index] for _, index, _ in group]
        starts = [_cached(lease) for _, _, lease in group]
        new = [request.prompt[start:] for request, start in zip(requests, starts, strict=True)]
        width = max(map(len, new))
        ids = torch.tensor([part + [0] * (width - len(part)) for part in new], device=device)
        rows = torch.tensor([r for r, _, _ in group], device=device)
        lengths = torch.tensor([len(request.prompt) for request in requests], device=device)
        with torch.no_grad():
            new_lengths = torch.tensor([len(part) for part in new], device=device)
            logits = self.model.prefill(ids, new_lengths, self.cache, rows, starts)
        for (r, index, lease), request in zip(group, requests, strict=True):
            seen = self._seen[r]
            seen.fill_(request.prompt[0])
            seen[: len(request.prompt)] = torch.tensor(request.prompt)
            text = _RowText(self.tokenizer, request.stop_strings, request.stop_ids)
            row = _Row(index, len(request.prompt), text, request.max_new_tokens, started)
            row.constraint, row.lease = request.constraint, lease
            self._active[r] = row
            if lease is not None:  # concurrent prompts with this prefix can take it from now on
                self.prefix_cache.store(lease, request.prompt, self.cache, r)
        self._finite[rows] = _finite_rows(logits).long()  # before the mask's -inf
        joined = [r for r, _, _ in group]
        logits = self._constrain(logits, joined, joined)
        first = self._pick(logits, self._seen[rows], joined)
        self.runner.tokens[rows] = first
        self._seen[rows, lengths] = first
        self.runner.slots[rows] = lengths
        self._advancing[rows] = 1

    def _constrain(self, logits: Tensor, rows: list[int], order: list[int] | None = None) -> Tensor:
        """``logits`` with each constrained row's disallowed ids at -inf. Logits row ``i`` belongs to cache row
        ``order[i]`` (by default cache row ``i``); ``rows`` are the cache rows to consider."""
        constrained = [r for r in rows if self._active[r].constraint is not None]
        if not constrained:
            return logits
        for r in constrained:
            self._active[r].constraint.fill_bitmask(self._bitmask[r])
        positions = [order.index(r) for r in constrained] if order is not None else constrained
        masks = self._bitmask[constrained].to(logits.device, non_blocking=True)
        if positions == list(range(logits.shape[0])):  # every row, in order: no gather and scatter
            return apply_bitmask(logits, masks)
        at = torch.tensor(positions, device=logits.device)
        return logits.index_put((at,), apply_bitmask(logits[at], masks))

    @staticmethod
    def _accept(row: _Row, token: int) -> None:
        if not row.constraint.accept(token):
            raise GenerationError(
                f"prompt {row.index}: generated token {row.received} (id {token}) is not allowed by the "
                "prompt's constraint, which allowed it a step before (a constraint that allows no id at all, "
                "or one that is not deterministic)"
            )

    def _copy_tokens(self, on_host: Tensor, copied: torch.cuda.Event | None) -> None:
        on_host[0].copy_(self.runner.tokens, non_blocking=copied is not None)
        on_host[1].copy_(self._finite, non_blocking=copied is not None)
        if copied is not None:
            copied.record()

    @staticmethod
    def _receive(row: _Row, token: int) -> str:
        if row.received == 0:
            row.first_token_at = time.perf_counter()
        row.received += 1
        return row.text.add(token, last=row.received >= row.budget)

    def _finish(
        self, r: int, row: _Row, done: dict[int, GenerationResult], reason: str | None = None
    ) -> GenerationResult:
        del self._active[r]
        heapq.heappush(self._free, r)
        self._advancing[r] = 0
        self.runner.slots[r] = 0
        prompt = self.requests[row.index].prompt
        cached = _cached(row.lease)
        if row.lease is not None:  # every id whose keys and values are in the row
            self.prefix_cache.store(row.lease, prompt + row.text.token_ids[: row.fed], self.cache, r)
        self._give_back(row)
        first_token_at = row.first_token_at or time.perf_counter()
        result = GenerationResult(
            text=row.text.text,
            token_ids=row.text.token_ids,
            finish_reason=reason or row.text.finish_reason or "length",
            stop=row.text.stop,
            prompt_tokens=len(prompt),
            completion_tokens=len(row.text.token_ids),
            prefill_tokens=len(prompt) - cached,
            prefill_seconds=first_token_at - row.started,
            decode_seconds=time.perf_counter() - first_token_at,
            cached_tokens=cached,
        )
        return self._done(row.index, result, done)

    def _take_prefix(self, r: int, prompt: list[int]) -> PrefixLease | None:
        """Cache row ``r`` starts with ``prompt``'s longest cached block prefix (None: no prefix cache)."""
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.admit(prompt, self.cache, r)

    def _give_back(self, row: _Row) -> None:
        if row.lease is not None:
            self.prefix_cache.release(row.lease)
            row.lease = None

    def _done(
        self, index: int, result: GenerationResult, done: dict[int, GenerationResult]
    ) -> GenerationResult:
        self._cancelled.discard(index)
        if self.keep:
            done[index] = result
        else:
            self.requests[index] = None  # let a long-lived batch forget what it finished
        return result


def _cached(lease: PrefixLease | None) -> int:
    return lease.cached if lease is not None else 0
