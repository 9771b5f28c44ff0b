"""Shared fixtures: the real Qwen vocabulary (from dashscope) and tiny checkpoints written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qwen_agent.runtime.tiny import write_tiny_checkpoint
from qwen_agent.runtime.tokenizer import QwenTokenizer, dashscope_vocab_path


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if (
    not _has_cuda()
):  # the Triton kernels' tests run on Triton's CPU interpreter (read when a kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available")
    for item in items:
        if "requires_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    path = dashscope_vocab_path()
    assert path is not None, "the test set-up installs dashscope, which ships qwen.tiktoken"
    return path


@pytest.fixture(scope="session")
def tokenizer(vocab_file: Path) -> QwenTokenizer:
    return QwenTokenizer.from_pretrained(vocab_file)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen-7B-Chat-layout checkpoint (QWenLMHeadModel), fp32, seq_length 256. Treat as read-only."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen"), "qwen", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2ForCausalLM-layout checkpoint with grouped KV heads, fp32. Treat as read-only."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2 checkpoint saved as current transformers saves Qwen2.5 (tokenizer.json, chat_template.jinja with
    the Qwen2.5 tool-call template, <tool_call> added tokens), fp32. Treat as read-only."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-qwen25"),
        "qwen2",
        seed=0,
        tokenizer_files="tokenizer.json",
        chat_template="qwen2.5",
    )
