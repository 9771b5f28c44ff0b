"""Build the tool-use benchmark files in benchmarks/data/ from the hand-written source in benchmarks/data/source/.

The built files are generated (and git-ignored); ``qwen_agent.bench.tool_use.shipped_path`` runs this script when they are
missing or older than their source.

    python tools/build_tool_use_dataset.py            # write the files
    python tools/build_tool_use_dataset.py --check    # exit 1 if the files on disk differ from a fresh build

Output, in the official job format plus metadata (``id``, ``tools`` offered, ``expected_tool``, ``category``,
``lang``): ``tool_use_positive.jsonl``, ``tool_use_negative.jsonl``, and ``tool_use_plugins.json`` (the catalog).
Each prompt is the full user message the official data holds: the ReAct instruction of ``react_prompt.md``
rendered by :mod:`qwen_agent.react` from the plugins' own TOOL_DESC lines, then ``Question: ...``.
The build is deterministic: distractor plugins are drawn with a generator seeded by the case id.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_agent.bench.tool_use import plugin_tools  # noqa: E402
from qwen_agent.react import react_instruction, react_question, render_action, render_final_answer  # noqa: E402

DATA = ROOT / "benchmarks" / "data"
THOUGHT = {
    "positive": {
        "en": "I should call the {human} API to {purpose}.",
        "zh": "我需要调用{human} API来{purpose}。",
    },
    "direct": {
        "en": "I can answer this directly; no tool is needed.",
        "zh": "这个问题不需要调用工具，我可以直接回答。",
    },
    "unserved": {"en": "None of the available tools can do this.", "zh": "现有的工具都无法完成这个请求。"},
}
CATALOG_FIELDS = ("name_for_model", "name_for_human", "description_for_model", "parameters")


def _source(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_use_{name}", DATA / "source" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _offer(case_id: str, required: list[str], plugins: list[dict]) -> list[str]:
    """The required plugins plus 2-4 distractors from other domains, in a shuffled order."""
    rng = random.Random(case_id)
    domain = {p["name_for_model"]: p["domain"] for p in plugins}
    taken = {domain[name] for name in required}
    offered = list(required)
    pool = [p["name_for_model"] for p in plugins]
    rng.shuffle(pool)
    wanted = len(required) + rng.randint(2, 4) if len(required) == 1 else max(4, len(required) + 2)
    for name in pool:
        if len(offered) >= wanted:
            break
        if domain[name] not in taken:
            offered.append(name)
            taken.add(domain[name])
    rng.shuffle(offered)
    return offered


def _prompt(query: str, offered: list[str], tools: dict) -> str:
    instruction = react_instruction([tools[name].tool_desc("react_prompt") for name in offered], offered)
    return react_question(instruction, query)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build() -> dict[str, str]:
    """File name -> content of every built file."""
    plugins = _source("plugins").PLUGINS
    by_name = {p["name_for_model"]: p for p in plugins}
    catalog = [{key: p[key] for key in CATALOG_FIELDS} for p in plugins]
    tools = plugin_tools({p["name_for_model"]: p for p in catalog})

    positive = []
    for number, (name, lang, query, args) in enumerate(_source("positive").POSITIVE, 1):
        case_id = f"pos-{number:04d}"
        plugin = by_name[name]
        offered = _offer(case_id, [name], plugins)
        thought = THOUGHT["positive"][lang].format(
            human=plugin["name_for_human"], purpose=plugin["purpose"][lang]
        )
        positive.append(
            {
                "id": case_id,
                "prompt": _prompt(query, offered, tools),
                "response": render_action(thought, name, json.dumps(args, ensure_ascii=False)),
                "tools": offered,
                "expected_tool": name,
                "category": plugin["domain"],
                "lang": lang,
            }
        )

    negative = []
    for number, (category, lang, query, answer, near) in enumerate(_source("negative").NEGATIVE, 1):
        case_id = f"neg-{number:04d}"
        offered = _offer(case_id, list(near), plugins) if near else _offer(case_id, [], plugins)
        thought = THOUGHT["unserved" if category == "unserved" else "direct"][lang]
        negative.append(
            {
                "id": case_id,
                "prompt": _prompt(query, offered, tools),
                "response": render_final_answer(thought, answer),
                "tools": offered,
                "expected_tool": None,
                "category": category,
                "lang": lang,
            }
        )
    return {
        "tool_use_plugins.json": json.dumps(catalog, ensure_ascii=False, indent=1) + "\n",
        "tool_use_positive.jsonl": _jsonl(positive),
        "tool_use_negative.jsonl": _jsonl(negative),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the files on disk instead of writing"
    )
    args = parser.parse_args()
    stale = []
    for name, text in build().items():
        path = DATA / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # readers never see half a file
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            print(f"wrote {path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run tools/build_tool_use_dataset.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
