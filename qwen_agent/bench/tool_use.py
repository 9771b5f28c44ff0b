"""The tool-use benchmark runner: generate each job's answer with a model, record it, score the run.

A run writes into one directory::

    positive.jsonl   negative.jsonl   the jobs with ``gen`` added, appended one line per job as it finishes
    report.json      report.md        per_tool.png      the scorecard (:func:`qwen_agent.bench.metrics.scorecard`)

Generation is greedy with the checkpoint's repetition penalty (as the official script runs ``model.chat`` with
``do_sample=False``), stops at ``Observation:`` in both tokenizations, and batches jobs of similar prompt length.
Each line is written with one ``write`` and flushed, so a run killed at any moment leaves at most a torn last
line; the next run with the same ``--out`` drops that line, keeps every complete one, and generates only the
jobs that are missing. ``gen`` holds what ``model.chat`` would return with the stop words: the text up to and
including ``Observation:`` when the model stopped there, stripped.

``tool_format="hermes"`` (a Qwen2/Qwen2.5 model's own format; by default the model's own is used) asks each job
in the model's chat template instead and records its reply as ReAct text for the same scorecard
(:mod:`qwen_agent.bench.hermes`), the reply as written in ``raw``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import __version__
from ..errors import BenchmarkError, ConfigError
from ..llm_protocol import ChatPrompt, Sampling
from ..react import STOP_WORDS
from ..tools.base import BaseTool

if TYPE_CHECKING:
    from ..runtime.engine import Engine

__all__ = [
    "DATA_DIR",
    "shipped_path",
    "PluginTool",
    "load_catalog",
    "plugin_tools",
    "catalog_schemas",
    "plugin_schemas",
    "Generator",
    "LLMGenerator",
    "EngineGenerator",
    "PromptConstraints",
    "open_llm",
    "open_generator",
    "RunFile",
    "run_tool_use",
    "load_datasets",
    "run_benchmark",
    "score_files",
    "write_report",
]

# the datasets shipped in the source tree: written there from benchmarks/data/source/ on first use
DATA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
BUILD_SCRIPT = DATA_DIR.parent.parent / "tools" / "build_tool_use_dataset.py"
SHIPPED_FILES = ("tool_use_plugins.json", "tool_use_positive.jsonl", "tool_use_negative.jsonl")


def shipped_path(name: str) -> Path:
    """Path of a shipped tool-use file, built from its source (in well under a second) when missing or stale.

    The built files are generated data and are not tracked; the hand-written source is.
    """
    if name not in SHIPPED_FILES:
        raise ConfigError(f"unknown shipped file {name!r}; expected one of {', '.join(SHIPPED_FILES)}")
    source = sorted((DATA_DIR / "source").glob("*.py"))
    if not source or not BUILD_SCRIPT.is_file():
        raise BenchmarkError(
            f"the shipped tool-use sets are built from {DATA_DIR / 'source'}, which only a source checkout has; "
            "pass --positive/--negative (and --plugins) files instead"
        )
    built = [DATA_DIR / n for n in SHIPPED_FILES]
    newest_source = max(p.stat().st_mtime for p in [*source, BUILD_SCRIPT])
    if not all(p.is_file() and p.stat().st_mtime >= newest_source for p in built):
        done = subprocess.run([sys.executable, str(BUILD_SCRIPT)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchmarkError(f"building the shipped tool-use sets failed: {done.stderr.strip()[-500:]}")
    return DATA_DIR / name


# ----------------------------------------------------------------------------------------------------------------
# The plugin catalog


class PluginTool(BaseTool):
    """A benchmark plugin: declared like any tool (so it renders and validates the same way), never executed."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        # BaseTool reads the declaration from class attributes; set them on the instance before it checks them
        self.name = spec["name_for_model"]
        self.name_for_human = spec.get("name_for_human", self.name)
        self.description = spec.get("description_for_model", "")
        self.parameters = spec.get("parameters")
        super().__init__()

    def call(self, arguments: dict[str, Any]) -> str:
        raise BenchmarkError(f"plugin {self.name!r} is a benchmark declaration and cannot be run")


def load_catalog(path: str | Path) -> dict[str, dict[str, Any]]:
    """The plugin catalog (a JSON list of plugin declarations) as name -> declaration."""
    path = Path(path)
    try:
        plugins = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"{path}: cannot read the plugin catalog ({exc})") from None
    if not isinstance(plugins, list):
        raise BenchmarkError(f"{path}: the catalog must be a JSON list of plugins")
    catalog = {}
    for index, spec in enumerate(plugins):
        if not isinstance(spec, dict) or not isinstance(spec.get("name_for_model"), str):
            raise BenchmarkError(f"{path}: plugin #{index} has no 'name_for_model'")
        catalog[spec["name_for_model"]] = spec
    return catalog


def plugin_tools(catalog: Mapping[str, Mapping[str, Any]]) -> dict[str, PluginTool]:
    return {name: PluginTool(spec) for name, spec in catalog.items()}


def catalog_schemas(catalog: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: tool.schema for name, tool in plugin_tools(catalog).items()}


# ----------------------------------------------------------------------------------------------------------------
# Generators: prompts in, model outputs out


class Generator(Protocol):
    """Generates the answer to each user message; yields ``(index, gen)`` as each one finishes, or
    ``(index, gen, fields)`` with more fields for the record. A generator may also have ``describe() -> dict``,
    the settings recorded in a run's ``meta``."""

    def generate(self, prompts: Sequence[str]) -> Iterator[tuple[int, str] | tuple[int, str, dict]]: ...


def _with_stop_word(text: str, stop: Any) -> str:
    """What ``model.chat`` returns with stop words: the stop word kept, the whole stripped."""
    if isinstance(stop, str) and stop.startswith("Observation:"):
        text += "Observation:"
    return text.strip()


class LLMGenerator:
    """Any :class:`~qwen_agent.llm.LLM` backend (an OpenAI-compatible server, a scripted model), with up to
    ``concurrency`` requests in flight so the server can batch them. A backend that is not thread-safe (the
    in-process ``LocalLLM``) needs ``concurrency=1``; for a local model :class:`EngineGenerator` batches instead."""

    def __init__(
        self,
        llm: Any,
        *,
        concurrency: int = 8,
        max_tokens: int = 512,
        repetition_penalty: float | None = None,
    ) -> None:
        self.llm = llm
        self.concurrency = max(1, concurrency)
        self.sampling = Sampling(
            max_tokens=max_tokens, temperature=0.0, repetition_penalty=repetition_penalty
        )

    def describe(self) -> dict[str, Any]:
        """The settings a run's ``meta`` records (the server's own settings are not known here)."""
        return {
            "backend": type(self.llm).__name__,
            "decoding": "greedy",
            "concurrency": self.concurrency,
            "max_new_tokens": self.sampling.max_tokens,
            "repetition_penalty": self.sampling.repetition_penalty,
        }

    def _one(self, prompt: str) -> str:
        completion = self.llm.complete(ChatPrompt(prompt), stop=STOP_WORDS, sampling=self.sampling)
        return _with_stop_word(completion.text, completion.stop)

    def generate(self, prompts: Sequence[str]) -> Iterator[tuple[int, str]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self._one, prompt): index for index, prompt in enumerate(prompts)}
            for future in as_completed(futures):
                yield futures[future], future.result()


class PromptConstraints:
    """Constrained decoding for benchmark prompts: each prompt's grammar (ReAct, or the Hermes format's with
    ``hermes=True``) over the tools it offers (read from its ``should be one of [...]`` line, declared in
    ``catalog``), compiled once per tool set."""

    _OFFERED = re.compile(r"^Action: the action to take, should be one of \[(.*)\]$", re.M)

    def __init__(
        self,
        engine: Engine,
        catalog: Mapping[str, Mapping[str, Any]],
        options: Any = None,
        hermes: bool = False,
    ) -> None:
        from ..constrained import HermesConstraints, ReActConstraints

        kind = HermesConstraints if hermes else ReActConstraints
        self._make = lambda tools: kind(engine.tokenizer, engine.config.vocab_size, tools, options=options)
        self.tools = plugin_tools(catalog)
        self._built: dict[tuple[str, ...], Any] = {}

    def __call__(self, prompt: str) -> Any:
        found = self._OFFERED.search(prompt)
        if found is None:
            raise BenchmarkError(
                f"prompt {prompt[:60]!r}...: no 'should be one of [...]' line naming its tools"
            )
        names = tuple(name.strip() for name in found.group(1).split(",") if name.strip())
        unknown = [name for name in names if name not in self.tools]
        if unknown:
            raise BenchmarkError(
                f"prompt {prompt[:60]!r}...: tool {unknown[0]!r} is not in the plugin catalog"
            )
        if names not in self._built:
            self._built[names] = self._make({name: self.tools[name] for name in names})
        return self._built[names](ChatPrompt(prompt))


class EngineGenerator:
    """A local :class:`~qwen_agent.runtime.engine.QwenEngine`: prompts built by ``chatml_ids`` (system = the model's
    default), decoded ``batch_size`` at a time; a finished prompt's place goes to the next at once.
    ``constraints`` (a :class:`PromptConstraints`) decodes each prompt under its grammar; ``hermes`` (a
    :class:`~qwen_agent.bench.hermes.HermesJobs`) asks in the Hermes tool format instead of ReAct."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        repetition_penalty: float | None = None,
        constraints: PromptConstraints | None = None,
        hermes: Any = None,
    ) -> None:
        self.engine = engine
        self.constraints = constraints
        self.hermes = hermes
        self.batch_size = max(1, batch_size)
        config = engine.generation_config
        self.max_new_tokens = max_new_tokens or config.max_new_tokens
        self.repetition_penalty = (
            config.repetition_penalty if repetition_penalty is None else repetition_penalty
        )
        self.generated_tokens = 0

    def describe(self) -> dict[str, Any]:
        """The settings a run's ``meta`` records: the weights' dtype and device, and the decoding options."""
        weight = next(self.engine.model.parameters())
        return {
            "backend": "local",
            "dtype": str(weight.dtype).removeprefix("torch."),
            "device": str(weight.device),
            "quantization": "none",  # the runtime loads float weights only
            "decoding": "greedy",
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "prefix_cache": self.engine.stats()["prefix_cache"],  # its counters so far; None when off
            "tool_format": "hermes" if self.hermes is not None else "react",
        }

    def _ids(self, prompt: str) -> list[int]:
        from ..runtime.chat_format import chatml_ids

        if self.hermes is not None:
            return self.hermes.prompt(prompt).rendered.ids(self.engine.tokenizer)

        config = self.engine.generation_config
        chat = ChatPrompt(prompt, system=self.engine.default_system)
        return chatml_ids(self.engine.tokenizer, chat, config.max_window_size, config.chat_format)

    def generate(self, prompts: Sequence[str]) -> Iterator[tuple[int, str]]:
        constraint = [self.constraints(p) for p in prompts] if self.constraints is not None else None
        completed = self.engine.generate_as_completed(
            [self._ids(p) for p in prompts],
            max_batch=self.batch_size,
            stop=[] if self.hermes is not None else list(STOP_WORDS),
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            constraint=constraint,
        )
        for index, result in completed:
            self.generated_tokens += result.completion_tokens
            if self.hermes is not None:
                from .hermes import react_gen

                yield index, react_gen(result.text, constrained=constraint is not None), {"raw": result.text}
            else:
                yield index, _with_stop_word(result.text, result.stop)


def open_llm(model: str, *, device: str | None = None) -> Any:
    """The LLM for a ``--model``: a URL is an OpenAI-compatible server, sent prompts as token ids built as
    ``make_context`` builds them (so prompts are exactly the local ones); anything else a local model directory."""
    if model.startswith(("http://", "https://")):
        from ..openai_client import OpenAICompatibleLLM
        from ..runtime.tokenizer import QwenTokenizer

        return OpenAICompatibleLLM(
            model, tokenizer=QwenTokenizer.from_pretrained(), api_key=os.environ.get("OPENAI_API_KEY")
        )
    from ..llm import llm_from_spec

    return llm_from_spec(model, device=device)


def open_generator(
    model: str,
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    repetition_penalty: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    constrained: bool = False,
    plugins: str | Path | None = None,
    kv_cache_gb: float | None = None,
    tool_format: str | None = None,
) -> Generator:
    """A URL gets ``batch_size`` requests in flight; a model directory is loaded and generates in batches.
    ``constrained`` (local models only) decodes each prompt under the grammar of its tools from the ``plugins``
    catalog (the shipped one by default). ``kv_cache_gb``: a local model's prefix cache (0: off).
    ``tool_format``: ``"react"``, ``"hermes"`` or None, the model's own
    (:func:`~qwen_agent.tool_format.choose_format`)."""
    from ..tool_format import HermesFormat, choose_format

    if model.startswith(("http://", "https://")):
        if constrained:
            raise ConfigError(
                "--constrained masks tokens in this process's decoding loop: it needs a local model directory, "
                f"not a server URL ({model})"
            )
        choose_format(tool_format)  # a server has no chat template here: react, or a clear error for hermes
        return LLMGenerator(
            open_llm(model),
            concurrency=batch_size,
            max_tokens=max_new_tokens or 512,
            repetition_penalty=repetition_penalty,
        )
    from ..runtime.engine import load_model

    if constrained:
        from ..constrained import require_llguidance

        require_llguidance()  # before the model loads
    catalog = load_catalog(plugins or shipped_path("tool_use_plugins.json"))
    engine = load_model(model, device=device, dtype=dtype, kv_cache_gb=kv_cache_gb)
    hermes = None
    chosen = choose_format(tool_format, engine)
    if isinstance(chosen, HermesFormat):
        from .hermes import HermesJobs

        hermes = HermesJobs(chosen, plugin_tools(catalog))
    return EngineGenerator(
        engine,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        constraints=PromptConstraints(engine, catalog, hermes=hermes is not None) if constrained else None,
        hermes=hermes,
    )


# ----------------------------------------------------------------------------------------------------------------
# The run file: append-only, resumable


def _job_id(job: Mapping[str, Any], index: int, split: str) -> str:
    return str(job.get("id", f"{split}-{index}"))


class RunFile:
    """An append-only jsonl file of finished records, keyed by ``key``. Opening it drops a torn last line left by
    a killed run; ``done`` maps each recorded key to its record."""

    def __init__(self, path: str | Path, *, key: str = "_id", fields: Sequence[str] = ("gen",)) -> None:
        self.path = Path(path)
        self.key = key
        self.fields = (key, *fields)
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        from .metrics import jsonl_lines

        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as handle:  # a torn line from a killed run: cut it off
                handle.truncate(len(complete))
        for number, line in jsonl_lines(complete, self.path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
            missing = [f for f in self.fields if not isinstance(record, dict) or f not in record]
            if missing:
                raise BenchmarkError(f"{self.path}:{number}: not a run record (no {missing[0]!r} field)")
            self.done[record[self.key]] = record

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per record: a kill leaves whole lines plus at most one torn one
        finally:
            os.close(fd)
        self.done[record[self.key]] = record


def run_tool_use(
    datasets: Mapping[str, Sequence[Mapping[str, Any]]],
    generator: Generator,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Generate every job not yet recorded in ``out_dir`` and return the recorded jobs per split, in dataset
    order. ``limit`` keeps the first N jobs of each split. Jobs are sorted by prompt length and handed to the
    generator ``chunk`` at a time, so batches hold prompts of similar length."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, pending, ordered = {}, [], {}
    for split, jobs in datasets.items():
        jobs = list(jobs)[:limit] if limit else list(jobs)
        files[split] = RunFile(out / f"{split}.jsonl")
        ids = [_job_id(job, index, split) for index, job in enumerate(jobs)]
        if len(set(ids)) != len(ids):
            raise BenchmarkError(f"{split}: job ids are not unique")
        ordered[split] = ids
        done = files[split].done
        for job_id, job in zip(ids, jobs, strict=True):
            if job_id in done and done[job_id].get("prompt") != job["prompt"]:
                raise BenchmarkError(
                    f"{files[split].path}: job {job_id!r} was recorded with a different prompt; this directory "
                    "holds a run of another dataset (use a new --out)"
                )
        pending += [(split, i, job) for i, job in zip(ids, jobs, strict=True) if i not in done]
    pending.sort(key=lambda item: len(item[2]["prompt"]))
    total = sum(len(ids) for ids in ordered.values())
    bar = tqdm(
        total=total, initial=total - len(pending), disable=not progress, unit="job", dynamic_ncols=True
    )
    try:
        for start in range(0, len(pending), chunk):
            batch = pending[start : start + chunk]
            for index, gen, *more in generator.generate([job["prompt"] for _, _, job in batch]):
                split, job_id, job = batch[index]
                files[split].append({**job, "_id": job_id, "gen": [gen], **(more[0] if more else {})})
                bar.update(1)
    finally:
        bar.close()
    return {split: [files[split].done[i] for i in ids] for split, ids in ordered.items()}


# ----------------------------------------------------------------------------------------------------------------
# Reports


def write_report(
    report: Mapping[str, Any], out_dir: str | Path, *, meta: Mapping[str, Any] | None = None
) -> None:
    """report.json, report.md and per_tool.png (recall per expected tool) in ``out_dir``."""
    from .metrics import render_markdown

    out = Path(out_dir)
    full = {**report, "meta": dict(meta or {})}
    (out / "report.json").write_text(json.dumps(full, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    _plot_per_tool(report, out / "per_tool.png")


def _plot_per_tool(report: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import pct

    rows = [(tool, row["recall"]) for tool, row in report["per_tool"].items() if row["support"]]
    rows.sort(key=lambda item: item[1])
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    ax.barh([tool for tool, _ in rows], [100 * recall for _, recall in rows], color="#4c72b0")
    ax.set_xlim(0, 100)
    ax.set_xlabel("tool chosen correctly (% of that tool's positive jobs)")
    ax.set_title(f"Tool selection per tool (overall {pct(report['action_right_rate'])})")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plugin_schemas(plugins: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Schemas of the catalog given, or of the shipped one when it exists; {} when there is none."""
    if plugins is not None:
        return catalog_schemas(load_catalog(plugins))
    try:
        return catalog_schemas(load_catalog(shipped_path("tool_use_plugins.json")))
    except BenchmarkError:  # not a source checkout: schema checks are skipped
        return {}


def score_files(
    positive: str | Path, negative: str | Path, *, plugins: str | Path | None = None, bootstrap: int = 1000
) -> dict[str, Any]:
    """Score recorded generations (for example the official ``.cache`` files) without a model."""
    from ..runtime.tokenizer import QwenTokenizer
    from .metrics import load_jobs, scorecard

    jobs = {}
    for split, path in (("positive", positive), ("negative", negative)):
        if not Path(path).is_file():
            raise ConfigError(f"--{split}: no such file: {path}")
        jobs[split] = load_jobs(path, require_gen=True)
        if not jobs[split]:
            raise BenchmarkError(f"--{split} {path}: the file holds no jobs")
    for number, job in enumerate(jobs["positive"], 1):
        if "\nAction:" not in "\n" + job["response"]:
            raise BenchmarkError(
                f"--positive {positive}: job {number} has no 'Action:' in its golden response "
                "(is this the negative set?)"
            )
    return scorecard(
        jobs["positive"],
        jobs["negative"],
        QwenTokenizer.from_pretrained(),
        catalog=plugin_schemas(plugins),
        bootstrap=bootstrap,
    )


def load_datasets(
    positive: str | Path | None = None, negative: str | Path | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The positive and negative jobs (the shipped sets by default); a missing or bad file is a clear error."""
    from .metrics import load_jobs

    paths = {
        "positive": positive or shipped_path("tool_use_positive.jsonl"),
        "negative": negative or shipped_path("tool_use_negative.jsonl"),
    }
    datasets = {}
    for split, path in paths.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{split}: no such dataset file: {path}")
        datasets[split] = load_jobs(path)
    return datasets


def run_benchmark(
    generator: Generator,
    out_dir: str | Path,
    *,
    datasets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    plugins: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate (resuming whatever ``out_dir`` already holds), score, and write the report files.
    ``datasets`` defaults to :func:`load_datasets`'s shipped sets. report.json's ``meta`` holds ``meta``, the
    settings the generator reports (its ``describe()``: dtype, quantization, decoding options; these win over
    ``meta``'s) and the package version, so that ``bench compare`` can say what differed between runs."""
    from ..runtime.tokenizer import QwenTokenizer
    from .metrics import scorecard

    schemas = plugin_schemas(plugins)  # fail on a bad catalog before generating anything
    recorded = run_tool_use(datasets or load_datasets(), generator, out_dir, limit=limit, progress=progress)
    # Rouge-L is always over Qwen-7B-Chat's own tokens, so runs of different models stay comparable
    report = scorecard(
        recorded["positive"], recorded["negative"], QwenTokenizer.from_pretrained(), catalog=schemas
    )
    describe = getattr(generator, "describe", None)
    settings = describe() if callable(describe) else {}
    write_report(report, out_dir, meta={**(meta or {}), **settings, "package_version": __version__})
    return report
