"""Generation speed and memory, ours against transformers' Qwen2ForCausalLM on the same weights, in one run.

Reproduces the profile of the Qwen-7B-Chat model card: tokens/s generating N tokens from a 1-token context, and
peak memory while encoding (prefilling) L tokens. The baseline is transformers' native ``Qwen2ForCausalLM``
(``.generate``, greedy) holding the *same* tensors (renamed, not copied); the greedy tokens of both are compared.
For a model directory the load is measured too: seconds and peak host-memory growth against the checkpoint's bytes.

    python benchmarks/speed.py /models/Qwen-7B-Chat --device cuda --new-tokens 2048 --context 2048
    python benchmarks/speed.py --random 7b --device cuda --dtype bf16
    python benchmarks/speed.py --smoke            # tiny random checkpoint on CPU, a few seconds (used in CI)
    python benchmarks/speed.py --random 7b --device cuda --quant int4 --no-baseline --new-tokens 8192

``--quant int4|int8`` adds the same model with its block projections GPTQ-quantized (round-to-nearest, group size
``--group-size``; embeddings, norms and lm_head shared) as another row: decode and encode measured beside the
float model in the same run, and its serving figures too.

Generation speed is also given as achieved memory bandwidth: the bytes a step cannot avoid reading (every weight
but the embedding table, and the keys and values of the positions so far) times steps per second, and its share of
the device's copy bandwidth measured in the same run. A batch-1 decode step is bound by that bandwidth.

It also measures what an agent and the benchmark runner see (``--no-serving`` skips it): seconds from the
weights on the device to the first decoded token (measured first: kernel compilation and CUDA-graph capture
included), time to first token after a 1,000-token
prompt, and aggregate tokens/s of 8 and of 32 sequences decoded together (prefills included).

Prints a table and writes JSON to ``benchmarks/results/``. On CPU, host memory is read from /proc (VmHWM, reset
through /proc/self/clear_refs); on CUDA, from the allocator's peak counter.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_agent.errors import QwenAgentError  # noqa: E402
from qwen_agent.runtime.checkpoint import load_checkpoint, resolve_device, resolve_dtype, to_transformers  # noqa: E402
from qwen_agent.runtime.config import CONFIGS, QwenConfig  # noqa: E402
from qwen_agent.runtime.decode_runner import DecodeRunner  # noqa: E402
from qwen_agent.runtime.generate import GenerationResult, PromptRequest, SamplingParams, generate_all  # noqa: E402
from qwen_agent.runtime.gptq import GPTQConfig, quantize_model  # noqa: E402
from qwen_agent.runtime.model import KVCache, Transformer  # noqa: E402
from qwen_agent.runtime.tokenizer import QwenTokenizer  # noqa: E402

GIB = 1024**3


# -- memory probes ---------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024


class PeakMemory:
    """Peak growth of host RSS (CPU) or of allocated GPU memory (CUDA) inside a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.total = device, 0, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.before = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
            self.peak = self.total - self.before
        else:
            self.total = _proc_status("VmHWM")
            self.peak = self.total - self.before


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second one device-to-device copy of ``nbytes`` moves, read and write counted (fastest of
    ``repeats``): the ceiling for a step that streams its weights once."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(repeats + 1):  # the first copy pays for page faults and lazy set-up
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(seconds[1:])


def parameter_bytes(model: Transformer) -> int:
    """Bytes of the model's weights, GPTQ layers' packed tensors included (a tied table once)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def kv_bytes_per_position(model: Transformer) -> int:
    """Bytes of the keys and values of one cached position, all layers."""
    config, table = model.config, model.tok_embeddings.weight
    return config.num_layers * 2 * config.num_kv_heads * config.head_dim * table.element_size()


def step_bytes(model: Transformer, positions: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (of which it needs one row per token;
    all of it when it is also the output projection), and the keys and values of ``positions`` cached positions
    (over all rows)."""
    table = model.tok_embeddings.weight
    weights = parameter_bytes(model)
    if not model.config.tie_word_embeddings:
        weights -= table.numel() * table.element_size()
    return weights + positions * kv_bytes_per_position(model)


def generation_bytes(model: Transformer, n: int) -> int:
    """Bytes that generating ``n`` tokens from a 1-token prompt must read: ``n`` steps, reading 1, 2, ..., n
    positions."""
    return n * step_bytes(model, 0) + kv_bytes_per_position(model) * n * (n + 1) // 2


def write_report(folder: Path, name: str, report: dict) -> None:
    """``report`` as JSON to ``folder/name-<local time>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


# -- models ----------------------------------------------------------------------------------------------------


def random_model(config: QwenConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    for name, p in model.named_parameters():
        p.data.fill_(1.0) if name.endswith("norm.weight") else p.data.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


# -- measurements ----------------------------------------------------------------------------------------------


# the decode step's variants measured beside the default on a GPU: DecodeRunner options by row name
# (asked for explicitly: a kernel that fails raises rather than falling back to plain ops under the row's name)
OPTIONAL_ROWS = {"qwen_agent unfused": {"fused": False}, "qwen_agent matvec": {"fused": True, "matvec": True}}


def new_runner(model: Transformer, rows: int, slots: int, **options: bool) -> DecodeRunner:
    """A decode runner over a fresh ``rows`` x ``slots`` cache in the model's dtype, on its device (``options``:
    DecodeRunner's ``graphs`` and ``fused``)."""
    weight = model.tok_embeddings.weight
    cache = KVCache(model.config, rows, slots, dtype=weight.dtype, device=weight.device)
    return DecodeRunner(model, cache, **options)


def ours_run(
    runner: DecodeRunner, tokenizer: QwenTokenizer, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[GenerationResult]]:
    """Greedy generation of exactly ``new_tokens`` per prompt (no stop ids); returns (seconds, the results). A
    runner used before keeps its cache (and on a GPU its captured graphs), as the engine keeps them between
    calls."""
    requests = [PromptRequest(p, new_tokens, SamplingParams()) for p in prompts]
    _sync(runner.cache.k.device)
    start = time.perf_counter()
    results = generate_all(runner, tokenizer, requests)
    _sync(runner.cache.k.device)
    return time.perf_counter() - start, results


def ours_generate(runner: DecodeRunner, tokenizer: QwenTokenizer, n: int) -> tuple[float, list[int]]:
    seconds, results = ours_run(runner, tokenizer, [[tokenizer.eod_id]], n)
    return seconds, results[0].token_ids


def random_prompts(count: int, length: int, seed: int, vocab: int) -> list[list[int]]:
    ids = torch.randint(0, min(vocab, 150000), (count, length), generator=torch.Generator().manual_seed(seed))
    return ids.tolist()


def ready_to_decode(model: Transformer, tokenizer: QwenTokenizer) -> dict:
    """Seconds from the weights on the device to the first decoded token of a 16-token prompt, the first thing
    the process runs: kernel compilation (from Triton's on-disk cache when it holds them), graph capture."""
    runner = new_runner(model, 1, 18)
    seconds, _ = ours_run(runner, tokenizer, random_prompts(1, 16, 1, model.config.vocab_size), 2)
    return {
        "ready_s": seconds,
        "ready_capture_s": runner.capture_seconds,
        "graphs": runner.graphs,
    }


def serving(model: Transformer, tokenizer: QwenTokenizer, args: argparse.Namespace, vocab: int) -> dict:
    """What an agent and the benchmark runner see: time to first token, batched throughput."""
    ttft = [
        ours_run(
            new_runner(model, 1, args.ttft_prompt + 1),
            tokenizer,
            random_prompts(1, args.ttft_prompt, 2 + k, vocab),
            1,
        )[1][0].prefill_seconds
        for k in range(args.rounds + 1)
    ][1:]  # the first call sets up the prefill kernels for this length
    batches = []
    for batch in args.batch:
        prompts = random_prompts(batch, args.batch_prompt, 9, vocab)
        runner = new_runner(model, batch, args.batch_prompt + args.batch_new)
        ours_run(runner, tokenizer, prompts, args.batch_new)  # captures every shape this run needs
        seconds = min(ours_run(runner, tokenizer, prompts, args.batch_new)[0] for _ in range(args.rounds))
        batches.append({"batch": batch, "seconds": seconds, "tokens_per_s": batch * args.batch_new / seconds})
        del runner  # its cache: the next batch size allocates its own
    return {
        "ttft_prompt": args.ttft_prompt,
        "ttft_ms": 1000 * statistics.median(ttft),
        "batch_prompt": args.batch_prompt,
        "batch_new": args.batch_new,
        "batches": batches,
    }


def hf_generate(hf, tokenizer: QwenTokenizer, n: int, device: torch.device) -> tuple[float, list[int]]:
    ids = torch.tensor([[tokenizer.eod_id]], device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones_like(ids),
        )
    _sync(device)
    return time.perf_counter() - start, out[0, 1:].tolist()


def ours_encode(model: Transformer, ids: torch.Tensor) -> None:
    """The prompt through :meth:`Transformer.prefill`, the call generation makes, into a one-row cache."""
    cache = KVCache(model.config, 1, ids.shape[1], dtype=model.tok_embeddings.weight.dtype, device=ids.device)
    lengths, rows = (
        torch.tensor([ids.shape[1]], device=ids.device),
        torch.zeros(1, dtype=torch.long, device=ids.device),
    )
    with torch.inference_mode():
        model.prefill(ids, lengths, cache, rows)


def hf_encode(hf, ids: torch.Tensor) -> None:
    with torch.inference_mode():
        hf(input_ids=ids, use_cache=True, logits_to_keep=1)


def measure(
    name: str, generate, encode, n: int, context: int, device: torch.device, vocab: int, nbytes: int
) -> dict:
    """One round: generate ``n`` tokens from one (``nbytes`` to read), then encode ``context`` tokens, each under
    a memory probe."""
    with PeakMemory(device) as generate_mem:
        seconds, tokens = generate(n)
    ids = torch.randint(0, min(vocab, 150000), (1, context), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        encode(ids)
        _sync(device)
        encode_seconds = time.perf_counter() - start
    return {
        "impl": name,
        "tokens_per_s": n / seconds,
        "generate_s": seconds,
        "achieved_gb_per_s": nbytes / seconds / 1e9,
        "encode_peak_gib": mem.peak / GIB,
        "encode_peak_total_gib": mem.total / GIB,  # everything allocated at the peak, weights included
        "encode_s": encode_seconds,
        # growth only: our runner's cache exists before, transformers' is allocated during generation
        "generate_peak_gib": generate_mem.peak / GIB,
        "tokens": tokens,
    }


def best_of(rounds: list[dict]) -> dict:
    """Fastest round of each measure (other processes share the machine); memory of the first round."""
    best = dict(rounds[0])
    best["generate_s"] = min(r["generate_s"] for r in rounds)
    best["encode_s"] = min(r["encode_s"] for r in rounds)
    best["tokens_per_s"] = max(r["tokens_per_s"] for r in rounds)
    best["achieved_gb_per_s"] = max(r["achieved_gb_per_s"] for r in rounds)
    best["rounds"] = len(rounds)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="model directory (or use --random / --smoke)")
    parser.add_argument("--random", choices=sorted(CONFIGS), help="random weights of a named shape")
    parser.add_argument("--smoke", action="store_true", help="tiny random checkpoint on CPU, 16 tokens (CI)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens to generate (default 2048; 256 on CPU)"
    )
    parser.add_argument(
        "--context", type=int, default=None, help="tokens to encode (default 2048; 512 on CPU)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers")
    parser.add_argument(
        "--quant", choices=["int4", "int8"], default=None, help="also the GPTQ-quantized model (see above)"
    )
    parser.add_argument("--group-size", type=int, default=128, help="GPTQ group size for --quant (-1: one)")
    parser.add_argument("--no-serving", action="store_true", help="skip ready / first-token / batch figures")
    parser.add_argument("--ttft-prompt", type=int, default=None, help="prompt tokens for time to first token")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="concurrent sequences (default 8 32; 4 on CPU)"
    )
    parser.add_argument("--batch-prompt", type=int, default=128, help="prompt tokens per batched sequence")
    parser.add_argument(
        "--batch-new", type=int, default=None, help="tokens per batched sequence (default 256; 32 on CPU)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is reported")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.new_tokens, args.context = "cpu", args.new_tokens or 16, args.context or 24
        args.rounds, args.ttft_prompt, args.batch, args.batch_prompt, args.batch_new = 1, 20, [3], 8, 8
    if bool(args.model) + bool(args.random) + bool(args.smoke) != 1:
        parser.error("give exactly one of MODEL, --random NAME, --smoke")
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except QwenAgentError as exc:
        parser.error(str(exc))
    n = args.new_tokens or (2048 if device.type == "cuda" else 256)
    context = args.context or (2048 if device.type == "cuda" else 512)
    args.ttft_prompt = args.ttft_prompt or 1000
    args.batch = args.batch or ([8, 32] if device.type == "cuda" else [4])
    args.batch_new = args.batch_new or (256 if device.type == "cuda" else 32)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "new_tokens": n,
        "context": context,
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton") if importlib.util.find_spec("triton") else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.smoke:
            from qwen_agent.runtime.tiny import write_tiny_checkpoint

            model_dir = write_tiny_checkpoint(tmp, "qwen", seq_length=64)
        if model_dir:
            checkpoint_bytes = sum(
                f.stat().st_size for f in Path(model_dir).glob("*") if f.suffix in (".safetensors", ".bin")
            )
            with torch.device(
                "meta"
            ):  # one-time torch imports (~70 MB) that do not scale with the checkpoint
                Transformer(CONFIGS["tiny"])
            with PeakMemory(torch.device("cpu")) as mem:
                start = time.perf_counter()
                model = load_checkpoint(model_dir, device=device, dtype=dtype)
                report["load_s"] = time.perf_counter() - start
            model_bytes = parameter_bytes(model)
            report |= {
                "model": str(args.model or "tiny (smoke)"),
                "checkpoint_gib": checkpoint_bytes / GIB,
                "loaded_model_gib": model_bytes / GIB,
                "load_host_peak_gib": mem.peak / GIB,
                "load_peak_over_checkpoint": mem.peak / checkpoint_bytes,
                "load_peak_over_model": mem.peak / model_bytes,
            }
            tokenizer = QwenTokenizer.from_pretrained(model_dir)
        else:
            model = random_model(CONFIGS[args.random], device, dtype)
            report["model"] = f"random {args.random}"
            tokenizer = QwenTokenizer.from_pretrained()
        vocab = model.config.vocab_size
        ready = None if args.no_serving else ready_to_decode(model, tokenizer)
        nbytes = generation_bytes(model, n)
        quant_name = f"qwen_agent {args.quant}"
        if args.quant:
            gptq = GPTQConfig(bits=int(args.quant[3:]), group_size=args.group_size)
            quantized = quantize_model(model, gptq)
            report["quant"] = {"name": args.quant, "bits": gptq.bits, "group_size": gptq.group_size}
            report["quant"]["ready"] = None if args.no_serving else ready_to_decode(quantized, tokenizer)
        # 1 GiB on a GPU, far past its caches; 256 MiB on a CPU, past its last-level cache
        report["copy_gb_per_s"] = copy_bandwidth(device, GIB if device.type == "cuda" else GIB // 4) / 1e9
        kept = new_runner(model, 1, n + 1)  # one cache for every round, as the engine keeps its own
        impls = {
            "qwen_agent": (
                lambda k: ours_generate(kept, tokenizer, k),
                lambda ids: ours_encode(model, ids),
            )
        }
        read_bytes = dict.fromkeys(OPTIONAL_ROWS.keys() | {"qwen_agent", "transformers"}, nbytes)
        # with the kernels: what they add (the same step in plain PyTorch ops), and the one-row step with its
        # products through Triton's matrix-vector kernel instead of cuBLAS
        if kept.fused:
            for name, options in OPTIONAL_ROWS.items():
                runner = new_runner(model, 1, n + 1, **options)
                impls[name] = (
                    lambda k, runner=runner: ours_generate(runner, tokenizer, k),
                    lambda ids: ours_encode(model, ids),
                )
        if args.quant:
            kept_quantized = new_runner(quantized, 1, n + 1)
            impls[quant_name] = (
                lambda k: ours_generate(kept_quantized, tokenizer, k),
                lambda ids: ours_encode(quantized, ids),
            )
            read_bytes[quant_name] = generation_bytes(quantized, n)
        if not args.no_baseline:
            hf = to_transformers(model)
            impls["transformers"] = (
                lambda k: hf_generate(hf, tokenizer, k, device),
                lambda ids: hf_encode(hf, ids),
            )
        for name, (generate, encode) in list(impls.items()):  # warm-up: first allocations, kernel selection
            try:
                generate(min(4, n))
                encode(torch.zeros(1, 8, dtype=torch.long, device=device))
            except Exception as exc:
                if name not in OPTIONAL_ROWS:
                    raise
                print(f"{name}: failed ({exc}); left out of the table")  # a variant must not cost the run
                report.setdefault("failed_rows", {})[name] = str(exc)
                del impls[name]
        report["fused_kernels"] = (
            kept.fused
        )  # after its first steps: kernels that fail fall back to plain ops
        rounds: dict[str, list[dict]] = {name: [] for name in impls}
        for _ in range(args.rounds):  # interleaved, so that load from other processes hits both alike
            for name, (generate, encode) in impls.items():
                rounds[name].append(
                    measure(name, generate, encode, n, context, device, vocab, read_bytes[name])
                )
        if not args.no_serving:
            report["serving"] = ready | serving(model, tokenizer, args, vocab)
            if args.quant:
                report["quant"]["serving"] = report["quant"].pop("ready") | serving(
                    quantized, tokenizer, args, vocab
                )
    runs = [best_of(r) for r in rounds.values()]
    # the model card's figure: a process holding the weights and nothing else (this one also holds the decode
    # runners' caches, which encode_peak_total_gib counts)
    weights_gib = {name: parameter_bytes(model) / GIB for name in rounds}
    if args.quant:
        weights_gib[quant_name] = parameter_bytes(quantized) / GIB
    for r in runs:
        r["weights_gib"] = weights_gib[r["impl"]]
        r["encode_peak_with_weights_gib"] = weights_gib[r["impl"]] + r["encode_peak_gib"]
        # generating alone: the weights, the kept cache of n + 1 positions (ours allocates it before), the growth
        kept_cache = 0 if r["impl"] == "transformers" else kv_bytes_per_position(model) * (n + 1) / GIB
        r["generate_peak_with_weights_gib"] = weights_gib[r["impl"]] + kept_cache + r["generate_peak_gib"]
    report["runs"] = runs
    print(
        f"{report['model']} on {report['device_name']} ({device}, {dtype}, {report['cpu_threads']} threads); "
        f"generate {n} tokens from 1, encode {context}"
    )
    if "load_s" in report:
        print(
            f"load: {report['load_s']:.2f} s, host peak {report['load_host_peak_gib']:.3f} GiB = "
            f"{report['load_peak_over_checkpoint']:.2f}x the checkpoint's {report['checkpoint_gib']:.3f} GiB, "
            f"{report['load_peak_over_model']:.2f}x the loaded model's {report['loaded_model_gib']:.3f} GiB"
        )
    print(
        f"{'impl':<20}{'tokens/s':>10}{'GB/s':>9}{'of copy':>9}{'encode s':>10}{'encode peak GiB':>17}"
        f"{'+ weights GiB / GB':>20}{'generate peak + weights GiB':>29}"
    )
    for r in runs:
        r["bandwidth_share"] = r["achieved_gb_per_s"] / report["copy_gb_per_s"]
        total = (
            f"{r['encode_peak_with_weights_gib']:.2f} / {r['encode_peak_with_weights_gib'] * GIB / 1e9:.2f}"
        )
        print(
            f"{r['impl']:<20}{r['tokens_per_s']:>10.2f}{r['achieved_gb_per_s']:>9.1f}{r['bandwidth_share']:>9.0%}"
            f"{r['encode_s']:>10.3f}{r['encode_peak_gib']:>17.3f}{total:>20}"
            f"{r['generate_peak_with_weights_gib']:>29.2f}"
        )
    print(
        f"GB/s: bytes a step must read ({nbytes / n / 1e9:.3f} GB per token on average) x steps/s; "
        f"copy bandwidth measured now: {report['copy_gb_per_s']:.1f} GB/s"
    )
    if "serving" in report:
        sv = report["serving"]
        print(
            f"qwen_agent serving (CUDA graphs: {sv['graphs']}, fused kernels: {report['fused_kernels']}): ready to decode in {sv['ready_s']:.2f} s "
            f"(capture {sv['ready_capture_s']:.2f} s); first token after a {sv['ttft_prompt']}-token prompt "
            f"{sv['ttft_ms']:.1f} ms"
        )
        for b in sv["batches"]:
            print(
                f"  {b['batch']} sequences x {sv['batch_new']} tokens ({sv['batch_prompt']}-token prompts): "
                f"{b['tokens_per_s']:.1f} tokens/s in all"
            )
    if args.quant and "serving" in report["quant"]:
        sv = report["quant"]["serving"]
        print(
            f"{quant_name} serving: ready to decode in {sv['ready_s']:.2f} s; first token after a "
            f"{sv['ttft_prompt']}-token prompt {sv['ttft_ms']:.1f} ms"
        )
        for b in sv["batches"]:
            print(
                f"  {b['batch']} sequences x {sv['batch_new']} tokens: {b['tokens_per_s']:.1f} tokens/s in all"
            )
    if args.quant:
        by_name = {r["impl"]: r for r in runs}
        report["quant"]["decode_speedup"] = (
            by_name[quant_name]["tokens_per_s"] / by_name["qwen_agent"]["tokens_per_s"]
        )
        print(f"{quant_name} decode at batch 1: {report['quant']['decode_speedup']:.2f}x the float model's")
    if "transformers" in rounds:
        ours, base = runs[0], runs[-1]
        report["speedup"] = ours["tokens_per_s"] / base["tokens_per_s"]
        report["same_greedy_tokens"] = ours["tokens"] == base["tokens"]
        ratio = (
            f"{ours['encode_peak_gib'] / base['encode_peak_gib']:.2f}"
            if base["encode_peak_gib"] > 0
            else "n/a"
        )
        print(
            f"speed-up {report['speedup']:.2f}x; encode peak memory ours/transformers {ratio}; "
            f"same greedy tokens: {report['same_greedy_tokens']}"
        )
    write_report(args.out, "speed", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
