"""Greedy token ids of the tiny checkpoints, pinned: the request path may change, the tokens may not.

``data/greedy_golden.json`` was written by running this file as a script (``python tests/test_greedy_golden.py``)
on main at commit 1187604, before the engine moved onto its step-driven scheduler; the recorder then used
``engine.last_result`` to read a stream's tokens, the one line that differs from :func:`run_cases` below. Each
case runs greedy decoding on a random-weight checkpoint that ``write_tiny_checkpoint`` writes from a fixed seed:
Qwen v1 with ``seq_length`` 48, so the long prompt is prefilled with a dynamic-NTK alpha above 1 and every prompt
decodes past ``seq_length`` under logN scaling; Qwen2 with grouped KV heads; and a GPTQ int4 Qwen v1. Every
prompt runs alone on a fresh engine, streamed on a fresh engine, all four batched two rows at a time (rows
join and leave), and as a ReAct continuation that reuses the first call's cached prefix.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

from qwen_agent.runtime.chat_format import DEFAULT_SYSTEM, make_context
from qwen_agent.runtime.engine import load_model
from qwen_agent.runtime.tiny import write_tiny_checkpoint

GOLDEN = Path(__file__).parent / "data" / "greedy_golden.json"
GREEDY = {"do_sample": False, "max_new_tokens": 16}
CHECKPOINTS = {
    "qwen-ntk-logn": {"family": "qwen", "seed": 4, "init_std": 0.5, "seq_length": 48},
    "qwen2": {"family": "qwen2", "seed": 5, "init_std": 0.5},
    "qwen-gptq-int4": {
        "family": "qwen",
        "seed": 6,
        "init_std": 0.3,
        "seq_length": 48,
        "quantize": "gptq-int4",
        "group_size": 32,
        "desc_act": True,
    },
}


def prompts(tokenizer) -> list[list[int]]:
    _, chat = make_context(tokenizer, "Hello, who are you?", system=DEFAULT_SYSTEM, max_window_size=24000)
    return [
        tokenizer.encode("Question: what is 2+2?\nThought:"),
        list(range(1000, 1060)),  # 60 tokens: past seq_length at prefill
        tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4),  # crosses 48 while decoding
        chat,
    ]


def run_cases(path: Path) -> dict[str, list]:
    """The greedy outputs of one checkpoint directory, every mode."""
    out: dict[str, list] = {"alone": [], "stream": [], "batched": [], "continued": []}
    tokenizer = load_model(path, device="cpu").tokenizer
    cases = prompts(tokenizer)
    for prompt in cases:
        result = load_model(path, device="cpu").generate(prompt, **GREEDY)
        out["alone"].append({"token_ids": result.token_ids, "text": result.text})
        stream = load_model(path, device="cpu").stream(prompt, **GREEDY)
        text = "".join(stream)
        out["stream"].append({"token_ids": stream.result.token_ids, "text": text})
    results = load_model(path, device="cpu").generate(cases, max_batch=2, **GREEDY)
    out["batched"] = [{"token_ids": r.token_ids, "text": r.text} for r in results]
    engine = load_model(path, device="cpu")
    first = engine.generate(cases[0], **GREEDY)
    follow = cases[0] + first.token_ids + tokenizer.encode("\nObservation: 4\nThought:")
    second = engine.generate(follow, **GREEDY)
    out["continued"] = [
        {"token_ids": second.token_ids, "text": second.text, "prefill_tokens": second.prefill_tokens}
    ]
    return out


def record_all() -> dict[str, dict[str, list]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {
            name: run_cases(write_tiny_checkpoint(Path(tmp) / name, **options))
            for name, options in CHECKPOINTS.items()
        }


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_outputs_equal_the_recorded_ones(tmp_path, name):
    expected = json.loads(GOLDEN.read_text())[name]
    got = run_cases(write_tiny_checkpoint(tmp_path / name, **CHECKPOINTS[name]))
    # recorded when a cache row's whole kept prefix was reused; the prefix cache reuses whole 16-token blocks,
    # so the continuation prefills its new tokens and at most one block more
    recorded_prefill = expected["continued"][0].pop("prefill_tokens")
    assert recorded_prefill <= got["continued"][0].pop("prefill_tokens") < recorded_prefill + 16
    assert got == expected
    # the recording is not degenerate: outputs depend on the prompt, and batching changed nothing
    assert len({tuple(case["token_ids"]) for case in expected["alone"]}) == len(expected["alone"])
    assert expected["batched"] == expected["alone"] == expected["stream"]
    assert recorded_prefill < len(expected["alone"][0]["token_ids"]) + 30


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record_all(), indent=1) + "\n")
    sys.exit(0)
