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

Sampling follows transformers' order and semantics: repetition penalty over prompt and generated ids (divide
positive logits, multiply negative ones), then greedy argmax, or temperature, top-k (0 = off) and top-p.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, GenerationError
from .constraint import apply_bitmask, bitmask_words
from .decode_runner import DecodeRunner
from .prefix_cache import PrefixCache, PrefixLease
from .request import PromptRequest, SamplingParams
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
    "Event",
    "generate_all",
    "next_token",
    "process_logits",
    "sample",
]


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

    index: int  # of the prompt in its batch
    request: PromptRequest
    text: _RowText
    lease: PrefixLease | None  # its blocks in the prefix cache
    started: float  # when its prefill began
    first_token_at: float = 0.0
    received: int = 0  # generated tokens read on the host
    fed: int = 0  # generated tokens whose keys and values are in the cache

    @property
    def slot(self) -> int:
        """The cache slot the row's newest token goes to (on the device: ``runner.slots``)."""
        return len(self.request.prompt) + self.fed


Event = tuple[int, "str | GenerationResult"]  # (prompt index, a text delta or the prompt's result)


class Generation:
    """An open batch over one cache: :meth:`add` requests at any time, :meth:`step` for their events.

    Prompts that join at once are prefilled together into free cache rows (right-padded, up to
    ``PREFILL_TOKENS`` padded tokens a call), then the rows decode together, one token per row per step
    (:class:`~qwen_agent.runtime.decode_runner.DecodeRunner`: fixed shapes, CUDA graphs on a GPU). A row that finishes
    frees its cache row for the next waiting prompt, so sequences join and leave the batch as they go; each
    prompt gets what it would get alone. The host reads a step's tokens while the device already runs that step's
    decode, so the device never waits for Python; a finished row costs that one extra step. Logits that are
    not finite (NaN or infinite: broken weights, or a float16 overflow) raise :class:`GenerationError` naming the
    prompt; the check travels to the host with the tokens, so it does not wait either.

    Each :meth:`step` admits what waits into free rows, runs one decode step and returns its events:
    ``(index, delta)`` for each text delta of prompt ``index`` and, when the prompt is done, ``(index, result)``
    with its :class:`GenerationResult`, after which the batch forgets it. :meth:`cancel` ends a prompt at the
    next step. One thread drives a batch (the :class:`~qwen_agent.runtime.scheduler.Scheduler`'s); ``last_step_rows``
    is how many rows its last step decoded.

    **Prefix reuse.** With a ``prefix_cache`` (:mod:`qwen_agent.runtime.prefix_cache`, shared by every batch
    of an engine), a prompt starts from its longest cached run of full blocks, copied into its row, and
    prefills only the rest (rows at different offsets in one call); its full blocks go into the cache once it
    is prefilled and, with its generated tokens, when it finishes. Blocks are keyed by Qwen v1's NTK alpha too,
    so a prompt only gets keys a fresh prefill of it would compute. :meth:`close` gives back the blocks of rows
    still live when the batch is dropped.

    A request's :class:`~qwen_agent.runtime.constraint.TokenConstraint` (or None) masks its row's logits; the
    mask of a step is filled on the host while the device runs that step, and rows without one are not touched.
    """

    def __init__(
        self, runner: DecodeRunner, tokenizer: QwenTokenizer, prefix_cache: PrefixCache | None = None
    ) -> None:
        self.tokenizer, self.prefix_cache = tokenizer, prefix_cache
        self.model, self.config = runner.model, runner.model.config
        self._waiting: deque[tuple[int, PromptRequest]] = deque()
        self._cancelled: set[int] = set()
        self._active: dict[int, _Row] = {}  # cache row -> its prompt
        self._added = 0
        self.last_step_rows = 0
        self._use(runner)

    def _use(self, runner: DecodeRunner) -> None:
        """Take ``runner`` and its cache, carrying over every row's state from the ones used so far."""
        cache, device, old = runner.cache, runner.cache.k.device, getattr(self, "runner", None)
        rows, capacity = cache.batch_size, cache.capacity
        # per cache row, the ids the repetition penalty sees: the prompt, the generated ids at their slots, and
        # the prompt's first id in every other column (a repeat changes nothing)
        seen = torch.zeros(rows, capacity, dtype=torch.long, device=device)
        # 1 for a row in use: a step advances only those rows' slots; a free row stays at slot 0, which the next
        # prompt in it writes before it reads
        advancing = torch.zeros(rows, dtype=torch.long, device=device)
        # 1 for a row whose last logits were all finite; read on the host with the tokens
        finite = torch.ones(rows, dtype=torch.long, device=device)
        runner.slots.zero_()
        if old is not None:
            was, slots = old.cache, old.cache.capacity
            for name in ("k", "v"):
                getattr(cache, name)[:, : was.batch_size, :, :slots] = getattr(was, name)
            cache.ntk_alpha[: was.batch_size] = was.ntk_alpha
            for r, row in self._active.items():
                seen[r].fill_(row.request.prompt[0])
            seen[: was.batch_size, :slots] = self._seen
            advancing[: was.batch_size] = self._advancing
            finite[: was.batch_size] = self._finite
            runner.tokens[: was.batch_size] = old.tokens
            runner.slots[: was.batch_size] = old.slots
        self.runner, self.cache = runner, cache
        self._seen, self._advancing, self._finite = seen, advancing, finite
        self._free = [r for r in range(rows) if r not in self._active]  # a heap: the lowest free row first
        heapq.heapify(self._free)
        pinned = device.type == "cuda"
        # the allowed-id bitmask of each constrained row, filled on the host
        self._bitmask = torch.empty(
            rows, bitmask_words(self.config.vocab_size), dtype=torch.int32, pin_memory=pinned
        )
        # each step's tokens and finite flags, copied while the device runs the step
        self._on_host = torch.empty(2, rows, dtype=torch.long, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None

    def resize(self, runner: DecodeRunner) -> None:
        """Move to ``runner``'s cache, at least as many rows of at least as many slots as the current one, between
        steps: live rows keep their place, their keys and values, and what free rows keep."""
        if runner.cache.batch_size < self.cache.batch_size or runner.cache.capacity < self.cache.capacity:
            raise ValueError("a batch's cache only grows")
        self._use(runner)

    # -- the batch's users -------------------------------------------------------------------------------------

    def add(self, request: PromptRequest) -> int:
        """Queue ``request``; returns its prompt index (0, 1, ... in the order added)."""
        if request.slots > self.cache.capacity:
            raise ConfigError(
                f"a prompt of {len(request.prompt)} tokens plus {request.max_new_tokens} new ones needs "
                f"{request.slots} cache slots; this cache has {self.cache.capacity}"
            )
        self._added += 1
        self._waiting.append((self._added - 1, request))
        return self._added - 1

    def cancel(self, index: int) -> None:
        """End prompt ``index`` at the next step: a waiting prompt never starts, a decoding one frees its row;
        its result (``finish_reason="cancelled"``, the text so far) is an event of that step as usual."""
        self._cancelled.add(index)

    @property
    def decoding(self) -> int:
        """How many prompts hold a cache row now."""
        return len(self._active)

    @property
    def queued(self) -> int:
        """How many prompts were added and wait for the next step to start."""
        return len(self._waiting)

    @property
    def free_rows(self) -> int:
        """Rows a prompt added now would start in at the next step."""
        return len(self._free) - len(self._waiting)

    @property
    def rows_in_use(self) -> int:
        """One past the highest row a prompt holds (0 when none does)."""
        return max(self._active, default=-1) + 1

    @property
    def idle(self) -> bool:
        return not self._active and not self._waiting

    def close(self) -> None:
        """Give the prefix-cache blocks of every live row back: the batch is dropped (a failed step, a
        shutdown) and its rows will not finish."""
        for row in self._active.values():
            self._give_back(row)

    def step(self) -> list[Event]:
        """Admit what waits, run one decode step for every live row, and return the events it produced."""
        runner, events = self.runner, self._drop_cancelled()
        self._admit()
        self.last_step_rows = 0
        if not self._active:
            return events
        self._copy_tokens()
        # launch the step before reading the tokens it consumes; the copy was queued ahead of it
        logits = None
        if any(row.received + 1 < row.request.max_new_tokens for row in self._active.values()):  # one to feed
            logits = runner(max(self._active) + 1, max(row.slot for row in self._active.values()) + 1)
            runner.slots.add_(self._advancing)
            self.last_step_rows = len(self._active)
            for row in self._active.values():
                row.fed += 1
        if self._copied is not None:
            self._copied.synchronize()
        tokens, finite = self._on_host.tolist()
        for r, row in list(self._active.items()):
            if row.index in self._cancelled:
                events.append((row.index, self._finish(r, row, "cancelled")))
                continue
            if not finite[r]:
                raise GenerationError(
                    f"prompt {row.index}: the model's logits for generated token {row.received + 1} are not "
                    "finite (NaN or infinite): broken weights, or a dtype that overflows (float16 does "
                    "where bfloat16 does not)"
                )
            delta = self._receive(row, tokens[r])
            if row.request.constraint is not None and row.text.finish_reason is None:
                self._accept(row, tokens[r])
            if delta:
                events.append((row.index, delta))
            if row.text.finish_reason is not None:
                events.append((row.index, self._finish(r, row)))
        if logits is not None and self._active:
            batch = logits.shape[0]
            self._finite[:batch] = _finite_rows(logits)  # before the mask's -inf
            logits = self._constrain(logits, [r for r in self._active if r < batch])
            picked = self._pick(logits, self._seen[:batch], list(range(batch)))
            runner.tokens[:batch] = picked
            self._seen[:batch].scatter_(1, runner.slots[:batch, None], picked[:, None])
        return events

    # -- internals ---------------------------------------------------------------------------------------------

    def _drop_cancelled(self) -> list[Event]:
        """Results for waiting prompts that were cancelled before they started."""
        events: list[Event] = []
        for index, request in [w for w in self._waiting if w[0] in self._cancelled]:
            self._waiting.remove((index, request))
            self._cancelled.discard(index)
            result = GenerationResult("", [], "cancelled", None, len(request.prompt), 0, 0, 0.0, 0.0)
            events.append((index, result))
        return events

    def _pick(self, logits: Tensor, seen: Tensor, rows: list[int]) -> Tensor:
        """The next id of each cache row in ``rows`` from its ``logits`` [len(rows), V] and ``seen`` ids, by its
        own prompt's sampling; rows that sample alike are picked in one call (a free row in ``rows`` gets 0)."""
        groups: dict[tuple, tuple[PromptRequest, list[int]]] = {}
        for i, r in enumerate(rows):
            if r in self._active:
                request = self._active[r].request
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
        """Prefill waiting prompts into free rows, several per model call, each after its longest cached block
        prefix; each row's first token goes to ``runner.tokens``."""
        wave: list[tuple[int, int, PromptRequest, PrefixLease | None]] = []
        while self._free and self._waiting:
            r, (index, request) = heapq.heappop(self._free), self._waiting.popleft()
            wave.append((r, index, request, self._take_prefix(r, request.prompt)))
        # they all join now, so their order does not matter: similar lengths side by side pad the least
        wave.sort(key=lambda joining: len(joining[2].prompt) - _cached(joining[3]))
        group: list[tuple[int, int, PromptRequest, PrefixLease | None]] = []
        try:
            for joining in wave:
                width = len(joining[2].prompt) - _cached(joining[3])  # the longest so far (sorted)
                if group and (len(group) + 1) * width > PREFILL_TOKENS:
                    self._prefill(group)
                    group = []
                group.append(joining)
            if group:
                self._prefill(group)
        except BaseException:  # a failed prefill: the blocks of the rows that never started go back
            for r, _, _, lease in wave:
                if lease is not None and r not in self._active:
                    self.prefix_cache.release(lease)
            raise

    def _take_prefix(self, r: int, prompt: Sequence[int]) -> PrefixLease | None:
        """Cache row ``r`` starts with ``prompt``'s longest cached block prefix (None: no prefix cache)."""
        if self.prefix_cache is None:
            return None
        return self.prefix_cache.admit(prompt, self.cache, r)

    def _give_back(self, row: _Row) -> None:
        if row.lease is not None:
            self.prefix_cache.release(row.lease)
            row.lease = None

    def _prefill(self, group: list[tuple[int, int, PromptRequest, PrefixLease | None]]) -> None:
        """One model call for ``group``'s (cache row, prompt index, request, lease), each prompt after its
        cached prefix, right-padded to the longest."""
        started, device = time.perf_counter(), self.cache.k.device
        starts = [_cached(lease) for *_, lease in group]
        new = [list(request.prompt[start:]) for (_, _, request, _), start in zip(group, starts, strict=True)]
        width = max(map(len, new))
        ids = torch.tensor([part + [0] * (width - len(part)) for part in new], device=device)
        rows = torch.tensor([r for r, *_ in group], device=device)
        lengths = torch.tensor([len(request.prompt) for _, _, request, _ in group], device=device)
        with torch.no_grad():
            new_lengths = torch.tensor([len(part) for part in new], device=device)
            logits = self.model.prefill(ids, new_lengths, self.cache, rows, starts)
        for r, index, request, lease in group:
            seen = self._seen[r]
            seen.fill_(request.prompt[0])
            seen[: len(request.prompt)] = torch.tensor(request.prompt)
            text = _RowText(self.tokenizer, request.stop_strings, request.stop_ids)
            self._active[r] = _Row(index, request, text, lease, started)
            if lease is not None:  # concurrent prompts with this prefix can take it from now on
                self.prefix_cache.store(lease, request.prompt, self.cache, r)
        self._finite[rows] = _finite_rows(logits).long()  # before the mask's -inf
        logits = self._constrain(logits, [r for r, *_ in group], [r for r, *_ in group])
        first = self._pick(logits, self._seen[rows], [r for r, *_ in group])
        self.runner.tokens[rows] = first
        self._seen[rows, lengths] = first
        self.runner.slots[rows] = lengths
        self._advancing[rows] = 1

    def _constrain(self, logits: Tensor, rows: list[int], order: list[int] | None = None) -> Tensor:
        """``logits`` with each constrained row's disallowed ids at -inf. Logits row ``i`` belongs to cache row
        ``order[i]`` (by default cache row ``i``); ``rows`` are the cache rows to consider."""
        constrained = [r for r in rows if self._active[r].request.constraint is not None]
        if not constrained:
            return logits
        for r in constrained:
            self._active[r].request.constraint.fill_bitmask(self._bitmask[r])
        positions = [order.index(r) for r in constrained] if order is not None else constrained
        masks = self._bitmask[constrained].to(logits.device, non_blocking=True)
        if positions == list(range(logits.shape[0])):  # every row, in order: no gather and scatter
            return apply_bitmask(logits, masks)
        at = torch.tensor(positions, device=logits.device)
        return logits.index_put((at,), apply_bitmask(logits[at], masks))

    @staticmethod
    def _accept(row: _Row, token: int) -> None:
        if not row.request.constraint.accept(token):
            raise GenerationError(
                f"prompt {row.index}: generated token {row.received} (id {token}) is not allowed by the "
                "prompt's constraint, which allowed it a step before (a constraint that allows no id at all, "
                "or one that is not deterministic)"
            )

    def _copy_tokens(self) -> None:
        non_blocking = self._copied is not None
        self._on_host[0].copy_(self.runner.tokens, non_blocking=non_blocking)
        self._on_host[1].copy_(self._finite, non_blocking=non_blocking)
        if self._copied is not None:
            self._copied.record()

    @staticmethod
    def _receive(row: _Row, token: int) -> str:
        if row.received == 0:
            row.first_token_at = time.perf_counter()
        row.received += 1
        return row.text.add(token, last=row.received >= row.request.max_new_tokens)

    def _finish(self, r: int, row: _Row, reason: str | None = None) -> GenerationResult:
        del self._active[r]
        heapq.heappush(self._free, r)
        self._cancelled.discard(row.index)
        prompt = row.request.prompt
        cached = _cached(row.lease)
        if row.lease is not None:  # every id whose keys and values are in the row
            self.prefix_cache.store(row.lease, prompt + tuple(row.text.token_ids[: row.fed]), self.cache, r)
        self._give_back(row)
        self._advancing[r] = 0
        self.runner.slots[r] = 0
        first_token_at = row.first_token_at or time.perf_counter()
        return GenerationResult(
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


def generate_all(
    runner: DecodeRunner, tokenizer: QwenTokenizer, requests: Sequence[PromptRequest]
) -> list[GenerationResult]:
    """Every request's result, in order, from one batch over ``runner`` (rows join and leave as it allows)."""
    batch = Generation(runner, tokenizer)
    for request in requests:
        batch.add(request)
    results: dict[int, GenerationResult] = {}
    while not batch.idle:
        for index, event in batch.step():
            if isinstance(event, GenerationResult):
                results[index] = event
    return [results[i] for i in range(len(requests))]


def _cached(lease: PrefixLease | None) -> int:
    return lease.cached if lease is not None else 0
