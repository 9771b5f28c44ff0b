"""engine.py: load_model on tiny checkpoints, chat as Qwen's model.chat, prefix reuse, the chat CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import interpreter_runs_kernels

import qwen_agent.runtime.config
from qwen_agent.errors import CheckpointError, ConfigError
from qwen_agent.runtime.chat_format import DEFAULT_SYSTEM, make_context
from qwen_agent.runtime.engine import QwenEngine, load_model
from qwen_agent.runtime.tiny import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    # large init so the random model's choices depend on the input; seq_length 48 so NTK can be crossed
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen", seed=4, init_std=0.5, seq_length=48)


@pytest.fixture(scope="module")
def engine(qwen_dir) -> QwenEngine:
    return load_model(qwen_dir, device="cpu")


def fresh(engine: QwenEngine) -> QwenEngine:
    """Another engine over the same weights, without a prefix cache."""
    return QwenEngine(
        engine.model, engine.tokenizer, engine.generation_config, engine.default_system, kv_cache_gb=0
    )


def test_load_model_public_api(engine):
    assert qwen_agent.load_model is load_model
    assert isinstance(engine.model, torch.nn.Module)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert engine.model(ids).shape == (1, 5, engine.config.vocab_size)
    gen = engine.generation_config  # from the checkpoint's generation_config.json
    assert (gen.do_sample, gen.top_p, gen.top_k, gen.repetition_penalty, gen.max_window_size) == (
        True,
        0.8,
        0,
        1.1,
        24000,
    )
    assert engine.default_system == DEFAULT_SYSTEM
    assert len(engine.tokenizer) == 151851


def test_chat_matches_generate_on_the_chatml_context(engine):
    response, history = engine.chat("Hello, who are you?", **GREEDY)
    _, ids = make_context(
        engine.tokenizer, "Hello, who are you?", system=DEFAULT_SYSTEM, max_window_size=24000
    )
    result = fresh(engine).generate(ids, **GREEDY)
    assert response == result.text.strip()
    assert history == [("Hello, who are you?", response)]
    response2, history2 = engine.chat("And then?", history, **GREEDY)
    assert history2 == [*history, ("And then?", response2)] and history == [("Hello, who are you?", response)]
    assert "".join(engine.chat_stream("And then?", history, **GREEDY)) == response2


def test_default_sampling_comes_from_generation_config_and_seed_repeats(engine):
    prompt = engine.tokenizer.encode("Tell me a story")
    a = engine.generate(prompt, seed=11, max_new_tokens=10)
    b = engine.generate(prompt, seed=11, max_new_tokens=10)
    assert a.token_ids == b.token_ids


def test_react_continuation_prefills_only_the_new_tokens(engine):
    """The second ReAct step takes every full 16-token block of what the first one ran from the prefix cache."""
    tok = engine.tokenizer
    prompt = tok.encode("Question: what is 2+2?\nThought:")
    first = engine.generate(prompt, **GREEDY)
    follow = prompt + first.token_ids + tok.encode("\nObservation: 4\nThought:")
    second = engine.generate(follow, **GREEDY)
    fed = len(prompt) + len(first.token_ids) - 1  # the last generated token was never fed to the model
    assert second.cached_tokens == fed // 16 * 16 > 0
    assert second.prefill_tokens == len(follow) - second.cached_tokens
    assert second.prompt_tokens == len(follow)
    assert second.token_ids == fresh(engine).generate(follow, **GREEDY).token_ids
    # a batched call in between shares the cache and evicts nothing
    engine.generate([prompt, prompt[:3]], **GREEDY)
    again = follow + second.token_ids[:-1] + tok.encode(" ok")
    third = engine.generate(again, **GREEDY)
    assert third.cached_tokens == (len(follow) + len(second.token_ids) - 1) // 16 * 16
    assert third.token_ids == fresh(engine).generate(again, **GREEDY).token_ids


def test_blocks_computed_under_another_ntk_alpha_are_not_reused(qwen_dir):
    """seq_length is 48: a 60-token prompt gets alpha 3 on a fresh prefill, so its blocks are cached under alpha
    3; a 22-token prompt with the same first 16 ids (alpha 1) must not take them, and gets the uncached result."""
    engine = load_model(qwen_dir, device="cpu", kv_cache_gb=0.01)
    base = list(range(1000, 1020))
    longer = base + list(range(2000, 2040))
    result = engine.generate(longer, **GREEDY)
    assert (result.prefill_tokens, result.cached_tokens) == (len(longer), 0)
    assert engine.generate(longer + [5], **GREEDY).cached_tokens == 48  # the same alpha 3: reused
    shorter = base + [7, 8]
    alone = fresh(engine).generate(shorter, **GREEDY)
    result = engine.generate(shorter, **GREEDY)
    assert (result.prefill_tokens, result.cached_tokens) == (len(shorter), 0)
    assert result.token_ids == alone.token_ids
    assert engine.generate(shorter + [9], **GREEDY).cached_tokens == 16  # its own alpha-1 block
    stats = engine.stats()["prefix_cache"]
    assert (stats["requests"], stats["hits"], stats["cached_tokens"]) == (4, 2, 64)
    assert stats["prefilled_tokens"] == len(longer) + 13 + len(shorter) + 7


@pytest.mark.parametrize("prompt", [[], [1.5], "Hello", [[1, 2], []], [[1, "x"]], [-1], [10**9]], ids=repr)
def test_bad_prompts_are_config_errors(engine, prompt):
    with pytest.raises(ConfigError, match=r"prompt \d: expected a non-empty list of token ids"):
        engine.generate(prompt, max_new_tokens=1)


def test_qwen2_family_directory_and_its_default_system(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "qwen2", seed=5, init_std=0.5)
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = tokenizer_config["chat_template"].replace(DEFAULT_SYSTEM, system)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    engine = load_model(path, device="cpu", dtype="fp32")
    assert engine.config.family == "qwen2" and engine.default_system == system
    engine.chat("hi", **GREEDY)
    _, ids = make_context(
        engine.tokenizer, "hi", system=system, max_window_size=engine.generation_config.max_window_size
    )
    # the chat ran this prompt: every full block of it is cached
    assert engine.generate(ids, **GREEDY).cached_tokens == (len(ids) - 1) // 16 * 16 > 0


def test_directory_with_tokenizer_json_only_and_its_chat_template_file(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "qwen2", seed=5, tokenizer_files="tokenizer.json")
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    template = path / "chat_template.jinja"
    template.write_text(template.read_text().replace(DEFAULT_SYSTEM, system))
    engine = load_model(path, device="cpu", dtype="fp32")
    assert engine.default_system == system and engine.tokenizer.im_end_id == 151645
    assert engine.tokenizer.encode("Observation:") == [37763, 367, 25]


def test_load_model_bad_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="config.json: unknown architecture"):
        load_model(tmp_path, device="cpu")


def test_chat_cli_reads_lines_until_eof_when_stdin_is_not_a_tty(qwen_dir, engine):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_agent.cli",
            "chat",
            "--model",
            str(qwen_dir),
            "--greedy",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ],
        input="Hello there\nWhat next?\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    first, history = fresh(engine).chat("Hello there", max_new_tokens=8, do_sample=False)
    second, _ = fresh(engine).chat("What next?", history, max_new_tokens=8, do_sample=False)
    assert out.stdout == f"{first}\n{second}\n"


def test_chat_cli_reports_a_bad_model_directory(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "qwen_agent.cli", "chat", "--model", str(tmp_path)],
        input="",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "config.json" in out.stderr and "Traceback" not in out.stderr


def test_speed_benchmark_smoke_runs_on_cpu(tmp_path):
    out = subprocess.run(  # the script puts the repository on its own import path
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    (report_file,) = tmp_path.glob("speed-*.json")
    report = json.loads(report_file.read_text())
    assert [r["impl"] for r in report["runs"]] == ["qwen_agent", "transformers"]
    assert report["same_greedy_tokens"] is True and report["speedup"] > 0
    assert 0 < report["load_peak_over_checkpoint"] < 1.3
    assert report["copy_gb_per_s"] > 0
    for run in report["runs"]:
        assert run["achieved_gb_per_s"] > 0 and run["bandwidth_share"] > 0
        weights_and_growth = report["loaded_model_gib"] + run["encode_peak_gib"]
        assert run["encode_peak_with_weights_gib"] == pytest.approx(weights_and_growth)
    assert [b["batch"] for b in report["serving"]["batches"]] == [3]


def test_decode_profile_runs_on_cpu(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_profile.py"), "--random", "tiny"]
    command += ["--steps", "2", "--batch", "3", "--context", "40", "--out", str(tmp_path)]
    plain = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the plain step, as on a CPU
    out = subprocess.run(command, capture_output=True, text=True, timeout=240, env=plain)
    assert out.returncode == 0, out.stderr
    (report_file,) = tmp_path.glob("decode-profile-*.json")
    report = json.loads(report_file.read_text())
    assert report["step_ms"] > 0 and report["tokens_per_s"] == pytest.approx(3000 / report["step_ms"])
    # tiny: 2 layers, each weight once per layer, the output projection once
    products = {r["weight"]: r["per_step"] for r in report["matmuls"]}
    assert products == {"wqkv": 2, "wo": 2, "w_gate_up": 2, "w_down": 2, "output": 1}
    assert report["matmuls_ms_per_step"] > 0
    assert any(r["kernel"] == "aten::mm" and r["calls_per_step"] >= 1 for r in report["kernels"])


def benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not interpreter_runs_kernels(), reason="runs the kernels on Triton's CPU interpreter")
def test_decode_profile_times_the_matvec_kernel_and_sweeps_its_blocks(tmp_path, monkeypatch):
    """One row with the kernels on (here Triton's CPU interpreter): the step through matvec, each weight through it
    and ``--sweep`` over the configurations of SWEEP are all reported."""
    profile = benchmark_module("decode_profile")
    monkeypatch.setattr(profile, "SWEEP", [(4096, 64, 4)])  # one, of few programs: the interpreter is slow
    args = ["--random", "tiny", "--steps", "1", "--batch", "1", "--context", "40", "--sweep"]
    assert profile.main([*args, "--out", str(tmp_path)]) == 0
    (report_file,) = tmp_path.glob("decode-profile-*.json")
    report = json.loads(report_file.read_text())
    assert report["fused_kernels"] and report["step_matvec_ms"] > 0
    assert all(r["matvec_us_per_step"] > 0 for r in report["matmuls"])
    weights = ("wqkv", "wo", "w_gate_up", "w_down", "output")
    swept = {(r["weight"], r["block_n"], r["block_k"]) for r in report["matvec_sweep"]}
    assert swept == {(w, 4096, 64) for w in weights}
    with pytest.raises(SystemExit):  # the sweep is of the one-row kernel
        profile.main(["--random", "tiny", "--batch", "2", "--sweep", "--out", str(tmp_path)])


def test_speed_benchmark_counts_the_bytes_of_a_7b_step():
    speed = benchmark_module("speed")
    with torch.device("meta"):  # the real shape, no memory
        model = speed.Transformer(qwen_agent.runtime.config.CONFIGS["7b"]).to(torch.bfloat16)
    kv_per_position = 32 * 2 * 4096 * 2  # layers x (k, v) x hidden x bf16 bytes
    # 7.10B parameters besides the 151,936 x 4,096 embedding table, in bf16
    assert speed.generation_bytes(model, 1) == 2 * (7_721_324_544 - 151_936 * 4096) + kv_per_position
    assert speed.generation_bytes(model, 3) == 3 * 2 * (7_721_324_544 - 151_936 * 4096) + 6 * kv_per_position


@pytest.mark.requires_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_dtype_generation(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "qwen", seed=6, seq_length=64)
    gpu, cpu = load_model(path, device="cuda"), load_model(path, device="cpu")
    assert gpu.model.tok_embeddings.weight.dtype in (torch.bfloat16, torch.float16)
    ids = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        expected = cpu.model(ids)
        got = gpu.model(ids.cuda()).float().cpu()
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    prompt = list(range(200, 220))
    result = gpu.generate(prompt, do_sample=False, max_new_tokens=16)
    # a fresh engine: with the kept cache the prompt would run in another shape, rounding differently in bf16
    assert "".join(fresh(gpu).stream(prompt, do_sample=False, max_new_tokens=16)) == result.text
    assert result.completion_tokens == 16 or result.finish_reason == "stop"


def test_16_threads_streaming_on_one_engine_each_get_their_own_results(engine):
    """Each thread's stream carries its own result, read after every thread has finished streaming (a result
    kept on the engine, as ``engine.last_result`` was, would be the same for all: the same test reading
    ``engine.last_result`` in place of ``stream.result`` fails on the code before the scheduler), equal to what
    its prompt gets alone; the streams decode together in shared steps. Then the same through LocalLLM."""
    from qwen_agent.llm import LocalLLM
    from qwen_agent.llm_protocol import ChatPrompt, Completion, Sampling

    llm, sampling = LocalLLM(engine), Sampling(max_tokens=12, temperature=0)
    prompts = [ChatPrompt(f"Question {i}: what is {i} times {i + 3}?") for i in range(16)]
    alone_llm = LocalLLM(fresh(engine))
    alone = [alone_llm.complete(p, sampling=sampling) for p in prompts]
    assert len({c.text for c in alone}) > 8  # the prompts' answers differ
    start, finished = threading.Barrier(16), threading.Barrier(16, timeout=120)
    streamed, listed = [None] * 16, [None] * 16

    def run(i: int) -> None:
        ids = llm.prompt_ids(prompts[i])
        start.wait()
        stream = engine.stream(ids, max_new_tokens=12, do_sample=False)
        text = "".join(stream)
        finished.wait()
        streamed[i] = (text, stream.result)
        items = list(llm.stream(prompts[i], sampling=sampling))
        listed[i] = ("".join(x for x in items if isinstance(x, str)), items[-1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (text, result), (joined, completion), want in zip(streamed, listed, alone, strict=True):
        assert text == result.text == want.text and result.completion_tokens == want.completion_tokens
        assert isinstance(completion, Completion)
        assert joined == completion.text == want.text
        assert (completion.prompt_tokens, completion.completion_tokens) == (
            want.prompt_tokens,
            want.completion_tokens,
        )
    assert engine.scheduler.stats()["max_rows"] > 1  # they shared decode steps
