"""The tool-use runner: scripted and HTTP-served models end to end, resuming after a torn line or a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import qwen_agent
from qwen_agent.bench.metrics import load_jobs
from qwen_agent.bench.tool_use import LLMGenerator, RunFile, run_benchmark, run_tool_use, shipped_path
from qwen_agent.errors import BenchmarkError
from qwen_agent.llm import Completion, cut_at_stop
from qwen_agent.runtime.tokenizer import QwenTokenizer

ROOT = Path(__file__).resolve().parent.parent
POSITIVE = load_jobs(shipped_path("tool_use_positive.jsonl"))
NEGATIVE = load_jobs(shipped_path("tool_use_negative.jsonl"))
GOLDEN = {job["prompt"].rsplit("\nQuestion: ", 1)[1]: job["response"] for job in POSITIVE + NEGATIVE}


def recorded_output(question: str) -> str:
    """What a well-behaved Qwen writes: the golden step, then it would go on to an Observation."""
    return GOLDEN[question] + "\nObservation:"


class ReplayLLM:
    """Replays a recorded output per question (thread-safe, order-free); counts calls per question."""

    def __init__(self, outputs=recorded_output):
        self.outputs = outputs
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()

    def complete(self, prompt, *, stop=(), sampling=None):
        question = prompt.query.rsplit("\nQuestion: ", 1)[1]
        with self.lock:
            self.calls[question] += 1
        text, stopped = cut_at_stop(self.outputs(question), stop)
        return Completion(text, "stop", stopped)


def test_scripted_run_scores_golden_outputs_perfectly(tmp_path):
    llm = ReplayLLM()
    report = run_benchmark(LLMGenerator(llm, concurrency=4), tmp_path, limit=25, progress=False)
    assert (
        report["action_right_rate"] == 1.0
        and report["action_input_rouge"] == 1.0
        and report["bad_rate"] == 0.0
    )
    assert report["exact_argument_match"] == 1.0 and report["format_violation_rate"] == 0.0
    assert report["counts"] == {"positive": 25, "negative": 25}
    assert sum(llm.calls.values()) == 50 and max(llm.calls.values()) == 1
    for split in ("positive", "negative"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == 25
        # gen is what model.chat returns with the stop word: kept, then stripped
        assert all(row["gen"][0] == row["response"] + "\nObservation:" for row in rows if split == "positive")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["action_right_rate"] == 1.0
    assert (tmp_path / "per_tool.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Tool selection (action_right_rate) | 100.0% |" in (tmp_path / "report.md").read_text()


def test_wrong_and_trigger_happy_outputs_are_scored(tmp_path):
    def outputs(question):
        if GOLDEN[question].count("\nAction: "):  # positives: answer directly instead of calling
            return "Thought: I know this.\nFinal Answer: sorry"
        return (
            'Thought: let me check\nAction: weather_forecast\nAction Input: {"city": "Paris"}\nObservation:'
        )

    report = run_benchmark(LLMGenerator(ReplayLLM(outputs)), tmp_path, limit=10, progress=False)
    assert (
        report["action_right_rate"] == 0.0 and report["bad_rate"] == 1.0 and report["missed_tool_rate"] == 1.0
    )


def test_torn_last_line_is_dropped_and_only_missing_jobs_run(tmp_path):
    llm = ReplayLLM()
    datasets = {"positive": POSITIVE[:6], "negative": NEGATIVE[:4]}
    run_tool_use({"positive": POSITIVE[:3]}, LLMGenerator(llm), tmp_path, progress=False)
    path = tmp_path / "positive.jsonl"
    with open(path, "ab") as handle:
        handle.write(b'{"_id": "pos-0004", "gen": ["Thought: half a li')  # a kill in the middle of a write
    assert len(RunFile(path).done) == 3
    llm.calls.clear()
    recorded = run_tool_use(datasets, LLMGenerator(llm), tmp_path, progress=False)
    assert sum(llm.calls.values()) == 7  # 3 positives + 4 negatives were missing
    assert [job["_id"] for job in recorded["positive"]] == [job["id"] for job in POSITIVE[:6]]
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(line)["_id"] for line in lines}) == 6


# Unicode line and paragraph separators and NEL: JSON leaves them raw with ensure_ascii=False, jsonl keeps them
# inside a line; str.splitlines() would end the line there.
SEPARATORS = "\u2028\u2029\x85"


def test_a_run_whose_outputs_hold_line_separators_resumes_and_scores(tmp_path):
    def outputs(question):
        return recorded_output(question).replace("Thought:", f"Thought:{SEPARATORS}", 1)

    first = ReplayLLM(outputs)
    run_benchmark(LLMGenerator(first), tmp_path, limit=5, progress=False)
    assert SEPARATORS in (tmp_path / "positive.jsonl").read_text(encoding="utf-8")
    again = ReplayLLM(outputs)
    report = run_benchmark(LLMGenerator(again), tmp_path, limit=5, progress=False)
    assert sum(again.calls.values()) == 0  # everything was recovered from the run files
    assert report["counts"] == {"positive": 5, "negative": 5} and report["action_right_rate"] == 1.0


def test_a_job_file_with_line_separators_in_strings_is_read_whole(tmp_path):
    jobs = [dict(job, gen=[f"Thought:{SEPARATORS} x" + job["response"]]) for job in POSITIVE[:3]]
    path = tmp_path / "positive.cache"
    path.write_text("".join(json.dumps(job, ensure_ascii=False) + "\n" for job in jobs), encoding="utf-8")
    assert load_jobs(path, require_gen=True) == jobs


def test_a_run_file_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "positive.jsonl"
    path.write_bytes(b'{"_id": "a", "gen": ["x"]}\n{"_id": "b", "gen": ["\xff"]}\n')
    with pytest.raises(BenchmarkError, match=r"positive.jsonl:2: not UTF-8"):
        RunFile(path)
    with pytest.raises(BenchmarkError, match=r"positive.jsonl:2: not UTF-8"):
        load_jobs(path)


def test_a_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "positive.jsonl"
    path.write_text('{"_id": "a", "gen": ["x"]}\nnot json\n{"_id": "b", "gen": ["y"]}\n')
    with pytest.raises(BenchmarkError, match=r"positive.jsonl:2: not valid JSON"):
        RunFile(path)


# ------------------------------------------------------------------------------------------------------------
# A real OpenAI-compatible server on 127.0.0.1 that answers from the recordings, and the CLI against it


class RecordedServer:
    def __init__(self, delay: float):
        tokenizer = QwenTokenizer.from_pretrained()
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "qwen-recorded"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                text = tokenizer.decode(body["prompt"])
                question = text.rsplit("\nQuestion: ", 1)[1].removesuffix(
                    "<|im_end|>\n<|im_start|>assistant\n"
                )
                server.requests[question] += 1
                time.sleep(delay)
                out, _ = cut_at_stop(recorded_output(question), body.get("stop", []))
                self._send({"choices": [{"index": 0, "text": out, "finish_reason": "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qwen_agent.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_killed_run_resumes_with_no_duplicate_or_lost_job(tmp_path):
    server = RecordedServer(delay=0.05)
    out = tmp_path / "run"
    args = cli(
        "bench",
        "tool-use",
        "--model",
        server.url,
        "--limit",
        "60",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "-q",
    )
    try:
        proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = [out / "positive.jsonl", out / "negative.jsonl"]
            written = sum(f.read_bytes().count(b"\n") for f in files if f.exists())
            if written >= 30 or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        before = sum(len(RunFile(out / f"{s}.jsonl").done) for s in ("positive", "negative"))
        assert 30 <= before < 120
        first_requests = sum(server.requests.values())

        done = subprocess.run(args + ["--json"], env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["action_right_rate"] == 1.0 and report["bad_rate"] == 0.0
        assert report["counts"] == {"positive": 60, "negative": 60}
        # the second run asked only for what the first had not recorded (plus jobs in flight at the kill)
        assert sum(server.requests.values()) - first_requests <= 120 - before + 2
        for split, jobs in (("positive", POSITIVE[:60]), ("negative", NEGATIVE[:60])):
            ids = [json.loads(line)["_id"] for line in (out / f"{split}.jsonl").read_text().splitlines()]
            assert len(ids) == len(set(ids)) == 60
            assert set(ids) == {job["id"] for job in jobs}
    finally:
        server.close()


def test_bench_score_json_has_the_official_keys_as_fractions(tmp_path):
    run_tool_use(
        {"positive": POSITIVE[:8], "negative": NEGATIVE[:8]},
        LLMGenerator(ReplayLLM()),
        tmp_path,
        progress=False,
    )
    # official cache files have no ids or metadata: strip ours
    for split in ("positive", "negative"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        (tmp_path / f"{split}.cache").write_text(
            "".join(json.dumps({k: r[k] for k in ("prompt", "response", "gen")}) + "\n" for r in rows)
        )
    done = subprocess.run(
        cli(
            "bench",
            "score",
            "--positive",
            str(tmp_path / "positive.cache"),
            "--negative",
            str(tmp_path / "negative.cache"),
            "--json",
        ),
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["action_right_rate"], report["action_input_rouge"], report["bad_rate"]) == (1.0, 1.0, 0.0)
    assert (
        report["schema_valid_rate"] == 1.0 and report["not_offered_call_rate"] == 0.0
    )  # tools read from prompts


def test_bench_score_reports_a_missing_file_clearly(tmp_path):
    done = subprocess.run(
        cli("bench", "score", "--positive", str(tmp_path / "nope.jsonl"), "--negative", "x"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--positive: no such file" in done.stderr and "Traceback" not in done.stderr


def test_bench_score_refuses_empty_or_swapped_sets(tmp_path):
    from qwen_agent.bench.tool_use import score_files
    from qwen_agent.errors import BenchmarkError

    empty, negative = tmp_path / "empty.jsonl", tmp_path / "negative.jsonl"
    empty.write_text("")
    negative.write_text("".join(json.dumps({**job, "gen": job["response"]}) + "\n" for job in NEGATIVE[:3]))
    with pytest.raises(BenchmarkError, match="empty.jsonl: the file holds no jobs"):
        score_files(empty, negative)
    with pytest.raises(BenchmarkError, match="job 1 has no 'Action:' in its golden response"):
        score_files(negative, negative)


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_limit_must_be_a_positive_number(limit, capsys):
    from qwen_agent import cli as cli_module

    with pytest.raises(SystemExit) as exc:
        cli_module.main(["bench", "tool-use", "--model", "m", "--limit", limit])
    assert exc.value.code == 2 and "--limit" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# The local engine on a tiny random-weight checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from qwen_agent.runtime.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from qwen_agent.runtime.engine import load_model

    return load_model(tiny_dir, device="cpu")


def test_tiny_checkpoint_end_to_end_batched_equals_one_by_one(tiny_engine, tmp_path):
    from qwen_agent.bench.tool_use import EngineGenerator

    assert EngineGenerator(tiny_engine).repetition_penalty == 1.1  # the checkpoint's, as the official script
    datasets = {"positive": POSITIVE[::80], "negative": NEGATIVE[::60]}  # 5 + 3 jobs of different lengths
    batched = run_tool_use(
        datasets,
        EngineGenerator(tiny_engine, batch_size=4, max_new_tokens=6),
        tmp_path / "b4",
        progress=False,
    )
    single = run_tool_use(
        datasets,
        EngineGenerator(tiny_engine, batch_size=1, max_new_tokens=6),
        tmp_path / "b1",
        progress=False,
    )
    gens = {split: [job["gen"] for job in jobs] for split, jobs in batched.items()}
    assert gens == {split: [job["gen"] for job in jobs] for split, jobs in single.items()}
    assert all(g[0] for jobs in gens.values() for g in jobs)  # random weights still write something
    report = run_benchmark(
        EngineGenerator(tiny_engine, batch_size=2, max_new_tokens=6),
        tmp_path / "full",
        limit=2,
        progress=False,
    )
    assert report["counts"] == {"positive": 2, "negative": 2}
    assert (tmp_path / "full" / "per_tool.png").exists() and (tmp_path / "full" / "report.md").exists()


def test_tiny_checkpoint_through_the_cli(tiny_dir, tmp_path):
    done = subprocess.run(
        cli(
            "bench",
            "tool-use",
            "--model",
            str(tiny_dir),
            "--limit",
            "2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path / "run"),
            "-q",
            "--json",
        ),
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    *_, rate, rouge, bad, last = done.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["counts"] == {"positive": 2, "negative": 2}
    # the official numbers close the output, one line each with its interval, as in report.json
    ci = report["confidence_intervals"]
    assert rate.split() == [
        "action_right_rate",
        f"{100 * report['action_right_rate']:.1f}%",
        "95%",
        "CI",
        f"[{100 * ci['action_right_rate'][0]:.1f},",
        f"{100 * ci['action_right_rate'][1]:.1f}]",
    ]
    assert rouge.startswith("action_input_rouge") and f"{report['action_input_rouge']:.3f}" in rouge
    assert bad.startswith("bad_rate") and f"{100 * report['bad_rate']:.1f}%" in bad
    meta = json.loads((tmp_path / "run" / "report.json").read_text())["meta"]
    assert meta["model"] == str(tiny_dir) and meta["batch_size"] == 2
    # what the run used, resolved (the checkpoint's defaults), so that runs can be compared
    assert (meta["backend"], meta["dtype"], meta["device"], meta["quantization"]) == (
        "local",
        "float32",
        "cpu",
        "none",
    )
    assert (meta["decoding"], meta["max_new_tokens"], meta["repetition_penalty"]) == ("greedy", 4, 1.1)
    assert meta["package_version"] == qwen_agent.__version__
    # the prefix cache's counters: the prompts share the ReAct instructions, so the later ones reuse blocks
    cache = meta["prefix_cache"]
    assert cache["requests"] == 4 and cache["hits"] >= 1 and cache["cached_tokens"] >= 16


def test_resuming_with_another_dataset_is_refused(tmp_path):
    run_tool_use({"positive": POSITIVE[:2]}, LLMGenerator(ReplayLLM()), tmp_path, progress=False)
    other = [{**POSITIVE[1], "id": POSITIVE[0]["id"]}]
    with pytest.raises(BenchmarkError, match="recorded with a different prompt"):
        run_tool_use({"positive": other}, LLMGenerator(ReplayLLM()), tmp_path, progress=False)
