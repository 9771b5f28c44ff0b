"""Models for generation tests: the real tiny network with peaked weights, and a scripted logits source.

:func:`peaked_tiny_model` has large random weights, so its next-token choices are sharp and depend on the input.

:class:`ScriptedModel` stands in for the network inside the real engine, to drive exact token sequences. Each prefill (a prompt joining a cache row) takes the next script, the last one repeating; the k-th token a row
generates is ``script[k]`` (its last id repeating), whatever the input. The row remembers its script and prompt
length in its own cache slots, so rows of one batch follow their scripts independently, as the real model does.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from qwen_agent.runtime.config import CONFIGS
from qwen_agent.runtime.decode_runner import DecodeRunner
from qwen_agent.runtime.generate import PromptRequest, SamplingParams, generate_all
from qwen_agent.runtime.model import KVCache, Transformer
from qwen_agent.runtime.tokenizer import QwenTokenizer


def interpreter_runs_kernels() -> bool:
    """Whether Triton's CPU interpreter is on (conftest turns it on without CUDA) and can run qwen_agent's kernels:
    before Triton 3.7 it cannot loop to a bound that is a kernel argument or loaded from memory, as they do
    (compiled for a GPU, that Triton runs them; PyTorch 2.11's CUDA build pins Triton 3.6)."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return False
    import triton

    return tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 7)


def peaked_tiny_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CONFIGS["tiny"]).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.5 if p.dim() > 1 else 0.1)
    return model.to(device=device, dtype=dtype)


def prefill_row(model: Transformer, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
    """Prefill the prompt ``ids`` [S] alone into cache row ``row``; logits [V] of its last id."""
    lengths, rows = torch.tensor([len(ids)], device=ids.device), torch.tensor([row], device=ids.device)
    return model.prefill(ids[None], lengths, cache, rows)[0]


def greedy_token_ids(
    runner: DecodeRunner, tokenizer: QwenTokenizer, prompts: list[list[int]], new_tokens: int
) -> list[list[int]]:
    """Each prompt's greedy ids through ``runner``, rows joining and leaving as its cache allows."""
    requests = [PromptRequest(p, new_tokens, SamplingParams()) for p in prompts]
    return [r.token_ids for r in generate_all(runner, tokenizer, requests)]


class ScriptedModel(nn.Module):
    def __init__(self, scripts: list[list[int]]) -> None:
        super().__init__()
        self.config = CONFIGS["tiny"]
        self.tok_embeddings = nn.Embedding(1, 1)  # the engine reads device and dtype from here
        self.scripts, self.prefills = scripts, 0

    def prefill(self, ids, lengths, cache, rows, starts=None):
        scripted = []
        starts = starts or [0] * len(rows)
        for row, length, start in zip(rows.tolist(), lengths.tolist(), starts, strict=True):
            number = min(self.prefills, len(self.scripts) - 1)
            self.prefills += 1
            cache.k[0, row, 0, 0, :2] = torch.tensor(
                [number, start + length]
            )  # where its generated tokens begin
            scripted.append((number, 0))
        return self.logits(scripted)

    def decode_step(self, tokens, slots, cache, kv_len, fused=False):
        rows = []
        for b, slot in enumerate(slots.tolist()):
            script, prompt_len = cache.k[0, b, 0, 0, :2].tolist()
            rows.append((int(script), slot - int(prompt_len) + 1))
        return self.logits(rows)

    def logits(self, rows: list[tuple[int, int]]) -> torch.Tensor:
        """Logits [B, V] for rows at (script number, generated position)."""
        logits = torch.zeros(len(rows), self.config.vocab_size)
        for b, (number, step) in enumerate(rows):
            script = self.scripts[number]
            logits[b, script[min(max(step, 0), len(script) - 1)]] = 10.0
        return logits
