#!/usr/bin/env python3
"""Encode throughput of QwenTokenizer against raw tiktoken over the same vocabulary.

The corpus mixes English prose, Chinese prose and Python source (this package's own), as an agent's prompts do.
QwenTokenizer adds an NFC check, a type check and injection-safe special-token handling on top of tiktoken; the
target is to stay within 10% of raw tiktoken.

    python benchmarks/tokenizer.py [--repeat 7] [--out benchmarks/results/tokenizer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tiktoken  # noqa: E402

from qwen_agent.runtime.tokenizer import PAT_STR, QwenTokenizer, dashscope_vocab_path, load_tiktoken_ranks  # noqa: E402

ENGLISH = (
    "Answer the following questions as best you can. The weather in Hangzhou tomorrow will be cloudy with a "
    "high of 23 degrees. Thought: I need to call the search tool to find the population of Tokyo in 2023. "
)
CHINESE = (
    "请帮我查询一下明天杭州的天气情况，并告诉我是否需要带伞。通义千问是阿里云研发的大语言模型，"
    "可以调用工具完成复杂任务，例如搜索、画图和执行代码。"
)


def build_corpus() -> list[str]:
    """About 1.5 MB of documents: each package source file, and prose paragraphs in both languages."""
    code = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "qwen_agent").rglob("*.py"))]
    docs = [ENGLISH * 8, CHINESE * 8, "\n".join(code)]
    corpus: list[str] = []
    while sum(len(d.encode()) for d in corpus) < 1_500_000:
        corpus.extend(docs)
    return corpus


def time_encode(encode, corpus: list[str]) -> float:
    """Seconds to encode the whole corpus once."""
    start = time.perf_counter()
    for doc in corpus:
        encode(doc)
    return time.perf_counter() - start


def time_pairs(first, second, corpus: list[str], repeat: int) -> tuple[float, float]:
    """Median seconds of each encoder, the two run alternately so background load hits both alike."""
    a, b = [], []
    for _ in range(repeat):
        a.append(time_encode(first, corpus))
        b.append(time_encode(second, corpus))
    return statistics.median(a), statistics.median(b)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tokenizer.json")
    args = parser.parse_args()

    vocab = dashscope_vocab_path()
    if vocab is None:
        print("error: install dashscope (it ships qwen.tiktoken)", file=sys.stderr)
        return 2
    ours = QwenTokenizer.from_pretrained(vocab)
    raw = tiktoken.Encoding(
        "raw", pat_str=PAT_STR, mergeable_ranks=load_tiktoken_ranks(vocab), special_tokens={}
    )
    corpus = build_corpus()
    megabytes = sum(len(d.encode()) for d in corpus) / 1e6
    assert [ours.encode(d) for d in corpus[:3]] == [raw.encode_ordinary(d) for d in corpus[:3]]

    time_encode(ours.encode, corpus)  # warm caches
    raw_s, ours_s = time_pairs(raw.encode_ordinary, ours.encode, corpus, args.repeat)
    result = {
        "benchmark": "tokenizer_encode",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "tiktoken": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "unknown",
        "corpus_mb": round(megabytes, 3),
        "repeat": args.repeat,
        "raw_tiktoken_mb_per_s": round(megabytes / raw_s, 2),
        "qwen_tokenizer_mb_per_s": round(megabytes / ours_s, 2),
        "overhead_pct": round(100 * (ours_s / raw_s - 1), 2),
    }
    print(f"{'encoder':<16} {'MB/s':>8}")
    print(f"{'raw tiktoken':<16} {result['raw_tiktoken_mb_per_s']:>8.2f}")
    print(f"{'QwenTokenizer':<16} {result['qwen_tokenizer_mb_per_s']:>8.2f}")
    print(f"overhead: {result['overhead_pct']:+.2f}% (target: within 10%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
