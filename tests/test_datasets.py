"""The shipped tool-use datasets: rebuilt identically from source, and every golden response is valid."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from qwen_agent.bench.metrics import load_jobs, offered_tools, process_res
from qwen_agent.bench.tool_use import DATA_DIR, load_catalog, plugin_tools, shipped_path
from qwen_agent.errors import ToolArgumentError
from qwen_agent.react import Action, FinalAnswer, parse_output
from qwen_agent.tools.schema import validate_arguments

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catalog():
    return load_catalog(shipped_path("tool_use_plugins.json"))


@pytest.fixture(scope="module")
def positive():
    return load_jobs(shipped_path("tool_use_positive.jsonl"))


@pytest.fixture(scope="module")
def negative():
    return load_jobs(shipped_path("tool_use_negative.jsonl"))


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "build_tool_use_dataset", ROOT / "tools" / "build_tool_use_dataset.py"
    )
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def test_build_is_deterministic_and_the_files_on_disk_are_current():
    build = _build_module()
    first, second = build.build(), build.build()
    assert first == second
    for name, text in first.items():
        assert shipped_path(name).read_text(encoding="utf-8") == text, f"{name} is stale"


def test_missing_or_stale_files_are_rebuilt_on_use():
    path = shipped_path("tool_use_negative.jsonl")
    expected = path.read_bytes()
    path.unlink()
    assert shipped_path("tool_use_negative.jsonl").read_bytes() == expected
    source = DATA_DIR / "source" / "negative.py"
    os.utime(source)  # the source is now newer than what was built from it
    path.write_text("stale\n", encoding="utf-8")
    os.utime(path, (source.stat().st_mtime - 10,) * 2)
    assert shipped_path("tool_use_negative.jsonl").read_bytes() == expected


def test_sizes_languages_and_plugin_coverage(catalog, positive, negative):
    assert len(positive) >= 300 and len(negative) >= 150
    assert len({job["expected_tool"] for job in positive}) >= 40
    assert len(catalog) >= 40
    assert Counter(job["lang"] for job in positive).keys() == {"en", "zh"}
    assert Counter(job["lang"] for job in negative).keys() == {"en", "zh"}
    assert set(Counter(job["category"] for job in negative)) == {
        "chitchat",
        "knowledge",
        "unserved",
        "near_miss",
    }
    types = {prop["type"] for spec in catalog.values() for prop in spec["parameters"]["properties"].values()}
    assert types == {"string", "integer", "number", "boolean", "array"}
    assert any(
        "enum" in prop for spec in catalog.values() for prop in spec["parameters"]["properties"].values()
    )
    ids = [job["id"] for job in positive + negative]
    assert len(ids) == len(set(ids))


def test_every_positive_golden_parses_names_an_offered_tool_and_fits_its_schema(catalog, positive):
    schemas = {name: tool.schema for name, tool in plugin_tools(catalog).items()}
    for job in positive:
        offered = job["tools"]
        assert 3 <= len(offered) <= 5, job["id"]
        assert offered == offered_tools({"prompt": job["prompt"]}), job[
            "id"
        ]  # the prompt lists the same tools
        parsed = parse_output(job["response"], offered)
        assert isinstance(parsed, Action) and not parsed.problems, job["id"]
        assert parsed.tool == job["expected_tool"] and parsed.tool in offered
        try:
            validate_arguments(parsed.arguments, schemas[parsed.tool])
        except ToolArgumentError as exc:
            pytest.fail(f"{job['id']}: golden arguments do not satisfy {parsed.tool}: {exc}")
        # the official normalisation accepts it too
        assert process_res(job["response"])["action_input"] == json.dumps(
            parsed.arguments, ensure_ascii=False, sort_keys=True
        )


def test_only_the_expected_tool_fits(catalog, positive):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("plugins_source", DATA_DIR / "source" / "plugins.py")
    source = module_from_spec(spec)
    spec.loader.exec_module(source)
    domain = {p["name_for_model"]: p["domain"] for p in source.PLUGINS}
    for job in positive:
        domains = [domain[name] for name in job["tools"]]
        assert len(domains) == len(set(domains)), f"{job['id']}: two offered tools share a domain"


def test_every_negative_golden_is_a_final_answer(negative):
    for job in negative:
        assert job["expected_tool"] is None
        assert len(job["tools"]) >= 3
        parsed = parse_output(job["response"], job["tools"])
        assert isinstance(parsed, FinalAnswer) and not parsed.problems, job["id"]
        assert "\nAction: " not in job["response"]


def test_outside_a_source_checkout_the_error_says_what_to_pass(monkeypatch, tmp_path):
    from qwen_agent.bench import tool_use as bench
    from qwen_agent.errors import BenchmarkError

    monkeypatch.setattr(bench, "DATA_DIR", tmp_path)
    with pytest.raises(BenchmarkError, match="only a source checkout has; pass --positive/--negative"):
        bench.shipped_path("tool_use_positive.jsonl")
    assert bench.plugin_schemas(None) == {}  # scoring recorded files still works, without schema checks
