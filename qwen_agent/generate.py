"""Token generation: prefill, decode, sampling, stop handling and streaming text for one or many prompts.

Hot code is free functions (:func:`prefill`, :func:`decode_one_token`, :func:`next_token`); :class:`Generation`
drives them for a left-padded batch and turns tokens into text.

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

Sampling follows transformers' order and semantics: repetition penalty over prompt and generated ids (divide
positive logits, multiply negative ones), then greedy argmax, or temperature, top-k (0 = off) and top-p.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError
from .model import KVCache, Transformer
from .stops import StopScanner
from .tokenizer import QwenTokenizer

__all__ = [
    "GenerationResult",
    "SamplingParams",
    "Generation",
    "prefill",
    "decode_one_token",
    "next_token",
    "process_logits",
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
class GenerationResult:
    """One completion. ``text`` stops before any stop string; ``token_ids`` holds every generated id."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    stop: str | int | None  # the stop string or stop id that ended it
    prompt_tokens: int
    completion_tokens: int
    prefill_tokens: (
        int  # prompt tokens run through the model (fewer than prompt_tokens when a prefix was reused)
    )
    prefill_seconds: float
    decode_seconds: float


# -- hot path ------------------------------------------------------------------------------------------------


def prefill(model: Transformer, ids: Tensor, cache: KVCache) -> Tensor:
    """Run ``ids`` [B, S] after the cache's filled slots; logits of the last position [B, V] in fp32."""
    return model(ids, cache, last_only=True)[:, -1].float()


def decode_one_token(model: Transformer, tokens: Tensor, cache: KVCache) -> Tensor:
    """One step for ``tokens`` [B]; logits [B, V] in fp32."""
    return model(tokens[:, None], cache)[:, -1].float()


def next_token(
    logits: Tensor, seen_ids: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Tensor:
    """Pick the next id per row [B] from ``logits`` [B, V]; ``seen_ids`` [B, L] are the ids the repetition
    penalty applies to (prompt and generated; repeats allowed)."""
    logits = process_logits(logits, seen_ids, params)
    if not params.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


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


class Generation:
    """Generate for a batch of prompts in one left-padded pass; iterate for ``(row, text delta)`` events.

    After iteration ends, ``results`` holds one :class:`GenerationResult` per prompt. Breaking out early
    leaves ``results`` empty. ``cache`` must be empty or hold ``reused`` slots of a single prompt's prefix.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: QwenTokenizer,
        prompts: Sequence[Sequence[int]],
        cache: KVCache,
        *,
        max_new_tokens: Sequence[int],
        params: SamplingParams,
        stop_strings: tuple[str, ...] = (),
        stop_ids: frozenset[int] = frozenset(),
        generator: torch.Generator | None = None,
        reused: int = 0,
        pad_id: int = 0,
    ) -> None:
        self.model, self.prompts, self.cache = model, [list(p) for p in prompts], cache
        self.max_new_tokens, self.params, self.generator = list(max_new_tokens), params, generator
        self.reused, self.pad_id = reused, pad_id
        self.rows = [_RowText(tokenizer, stop_strings, stop_ids) for _ in self.prompts]
        self.fed: list[list[int]] = []  # per row: the ids whose keys and values are now in the cache
        self.results: list[GenerationResult] = []

    def __iter__(self) -> Iterator[tuple[int, str]]:
        device = self.cache.k.device
        batch, longest = len(self.prompts), max(len(p) for p in self.prompts)
        ids = torch.full((batch, longest - self.reused), self.pad_id, dtype=torch.long)
        # every id each row has seen, left-padded with a repeat of the row's own first id (a repeat changes
        # nothing); the generated ids fill the columns after ``longest``
        seen_ids = torch.empty(batch, longest + max(self.max_new_tokens), dtype=torch.long)
        for b, prompt in enumerate(self.prompts):
            new = prompt[self.reused :]
            ids[b, ids.shape[1] - len(new) :] = torch.tensor(new)
            seen_ids[b, : longest - len(prompt)] = prompt[0]
            seen_ids[b, longest - len(prompt) : longest] = torch.tensor(prompt)
        ids, seen_ids = ids.to(device), seen_ids.to(device)

        started = time.perf_counter()
        logits = prefill(self.model, ids, self.cache)
        prefill_seconds = decode_started = 0.0
        self.fed = [list(p) for p in self.prompts]
        live = list(range(batch))
        for step in range(max(self.max_new_tokens)):
            tokens = next_token(logits, seen_ids[:, : longest + step], self.params, self.generator)
            seen_ids[:, longest + step] = tokens
            host_tokens = tokens.tolist()
            if step == 0:
                decode_started = time.perf_counter()
                prefill_seconds = decode_started - started
            for b in live:
                delta = self.rows[b].add(host_tokens[b], last=step + 1 >= self.max_new_tokens[b])
                if delta:
                    yield b, delta
            live = [b for b in live if self.rows[b].finish_reason is None]
            if not live:
                break
            logits = decode_one_token(self.model, tokens, self.cache)
            for b in range(batch):
                self.fed[b].append(host_tokens[b])
        decode_seconds = time.perf_counter() - decode_started
        self.results = [
            GenerationResult(
                text=row.text,
                token_ids=row.token_ids,
                finish_reason=row.finish_reason or "length",
                stop=row.stop,
                prompt_tokens=len(prompt),
                completion_tokens=len(row.token_ids),
                prefill_tokens=len(prompt) - self.reused,
                prefill_seconds=prefill_seconds,
                decode_seconds=decode_seconds,
            )
            for row, prompt in zip(self.rows, self.prompts, strict=True)
        ]
