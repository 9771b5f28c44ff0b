"""gptq.py and gptq_kernels.py: auto-gptq's format read without auto-gptq, the packed layer, its kernels, and GPTQ
checkpoints loaded, run and decoded like float ones.

The reference here is written independently of qwen_agent's unpacking: numpy strides over the unsigned words, as
auto-gptq's ``pack`` lays them out (input ``r*P + j`` of word row ``r`` in bits ``bits*j``; zeros packed the same
way along the outputs and stored as ``zero - 1``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import greedy_token_ids, interpreter_runs_kernels

from qwen_agent.errors import CheckpointError, ConfigError
from qwen_agent.runtime.checkpoint import load_checkpoint
from qwen_agent.runtime.decode_runner import DecodeRunner
from qwen_agent.runtime.engine import load_model
from qwen_agent.runtime.gptq import GPTQConfig, GPTQLinear, pack_rows, quantize_rtn, unpack_rows
from qwen_agent.runtime.model import KVCache
from qwen_agent.runtime.tiny import write_tiny_checkpoint

ON_INTERPRETER = pytest.mark.skipif(
    not interpreter_runs_kernels(),
    reason="Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, Triton >= 3.7)",
)
DEVICES = [pytest.param("cpu", marks=ON_INTERPRETER), pytest.param("cuda", marks=pytest.mark.requires_gpu)]


def reference_dequantize(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """The float weight [N, K] (torch's Linear layout) of auto-gptq's tensors."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words, zero_words = qweight.numpy().view(np.uint32), qzeros.numpy().view(np.uint32)
    q = np.empty((words.shape[0] * pack, words.shape[1]), dtype=np.int64)
    zeros = np.empty((zero_words.shape[0], zero_words.shape[1] * pack), dtype=np.int64)
    for j in range(pack):
        q[j::pack] = (words >> (bits * j)) & mask
        zeros[:, j::pack] = ((zero_words >> (bits * j)) & mask) + 1
    groups = g_idx.numpy().astype(np.int64)
    weight = scales.numpy().astype(np.float64)[groups] * (q - zeros[groups])
    return torch.from_numpy(weight.T.copy()).float()


def write_dequantized_twin(quantized: Path, out: Path) -> Path:
    """A float checkpoint of the quantized one's weights: each packed layer dequantized (see
    :func:`reference_dequantize`), every other tensor as stored; the same config without quantization."""
    out.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        tensors |= load_file(shard)
    bits = json.loads((quantized / "quantize_config.json").read_text())["bits"]
    float_tensors = {}
    for name, value in tensors.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            parts = [tensors[f"{base}.{kind}"] for kind in ("qweight", "qzeros", "scales", "g_idx")]
            float_tensors[base + ".weight"] = reference_dequantize(*parts, bits)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            float_tensors[name] = value  # fp16 as stored; the loader casts
    save_file(float_tensors, str(out / "model.safetensors"))
    for path in quantized.iterdir():
        if path.suffix != ".safetensors" and path.name not in (
            "model.safetensors.index.json",
            "quantize_config.json",
        ):
            shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_packing_is_auto_gptqs():
    """A word row holds P consecutive inputs, the first in the lowest bits; zeros stored minus one."""
    values = torch.arange(16, dtype=torch.int32)[:, None].repeat(1, 8) % 16  # input k has value k % 16
    words = pack_rows(values, 4)
    assert words.shape == (2, 8)
    assert words[0, 0].item() == 0x76543210
    assert words[1, 0].item() == np.array(0xFEDCBA98, dtype=np.uint32).view(np.int32)
    assert torch.equal(unpack_rows(words, 4), values)
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() == np.array(0xFF030201, np.uint32).view(
        np.int32
    )

    layer = GPTQLinear(16, 8, False, GPTQConfig(bits=4, group_size=-1))
    layer.qweight = words
    layer.qzeros = pack_rows(
        torch.arange(8, dtype=torch.int32)[:, None], 4
    ).T.contiguous()  # stored z - 1 = n
    layer.scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    layer.g_idx = torch.zeros(16, dtype=torch.int32)
    want = 0.5 * (torch.arange(16)[:, None] - (torch.arange(8)[None, :] + 1)).float()
    assert torch.equal(layer.dequantize(torch.float32), want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_round_to_nearest_stays_within_a_step(bits, sym):
    torch.manual_seed(0)
    weight = torch.randn(24, 64)
    config = GPTQConfig(bits=bits, group_size=32, sym=sym)
    packed = quantize_rtn(weight, config)
    got = reference_dequantize(*(packed[k] for k in ("qweight", "qzeros", "scales", "g_idx")), bits)
    step = packed["scales"].float()[packed["g_idx"].long()].T  # [N, K]
    error = (got - weight).abs()
    assert (error <= step + 1e-6).all()  # a value at the edge of the range may clip to the last level
    assert (error <= step / 2 + 1e-6).float().mean() > 0.95  # the rest round to the nearest


CASES = [
    (family, bits, group_size, desc_act)
    for family in ("qwen", "qwen2")
    for bits in (4, 8)
    for group_size in (32, 64, -1)
    for desc_act in (False, True)
]


@pytest.mark.parametrize(("family", "bits", "group_size", "desc_act"), CASES)
def test_logits_equal_those_of_the_dequantized_float_checkpoint(tmp_path, family, bits, group_size, desc_act):
    quantized = write_tiny_checkpoint(
        tmp_path / "gptq", family, quantize=f"gptq-int{bits}", group_size=group_size, desc_act=desc_act,
        intermediate_size=256 if family == "qwen" else 128, num_shards=2,
    )  # fmt: skip
    twin = write_dequantized_twin(quantized, tmp_path / "float")
    model, reference = (load_checkpoint(d, device="cpu", dtype="fp32") for d in (quantized, twin))
    assert isinstance(model.layers[0].feed_forward.w_down, GPTQLinear)
    assert model.layers[0].feed_forward.w_down.perm is not None if desc_act and group_size != -1 else True
    ids = torch.tensor([[5, 100, 2000, 30000, 151000, 17, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen", "qwen2"])
def test_greedy_generation_equals_the_float_twins(tmp_path, family):
    quantized = write_tiny_checkpoint(
        tmp_path / "gptq", family, quantize="gptq-int4", group_size=32, desc_act=True, init_std=0.3
    )
    twin = write_dequantized_twin(quantized, tmp_path / "float")
    texts = []
    for path in (quantized, twin):
        engine = load_model(path, device="cpu", dtype="fp32")
        result = engine.generate(
            engine.tokenizer.encode("Hello there, how"), max_new_tokens=8, do_sample=False
        )
        texts.append(result.token_ids)
    assert texts[0] == texts[1]
    assert len(set(texts[0])) > 1  # the weights are peaked enough that the tokens depend on the input


def test_packed_weights_stay_packed(tmp_path):
    """The loaded model's tensors take the bytes the files hold: the packed layers exactly, all within 0.1%."""
    path = write_tiny_checkpoint(tmp_path, "qwen", quantize="gptq-int4", group_size=32)
    model = load_checkpoint(path, device="cpu", dtype="fp16")
    file_bytes = {}
    for shard in path.glob("*.safetensors"):
        file_bytes |= {name: t.numel() * t.element_size() for name, t in load_file(shard).items()}
    packed_file = sum(
        n for name, n in file_bytes.items() if name.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))
    )
    packed_loaded = 0
    for layer in model.modules():
        if isinstance(layer, GPTQLinear):
            assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16
            packed_loaded += sum(b.numel() * b.element_size() for b in layer.buffers())
    shared = sum(n for name, n in file_bytes.items() if name.endswith("mlp.w1.g_idx"))  # one g_idx for w1|w2
    assert packed_loaded == packed_file - shared
    loaded = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert abs(loaded - sum(file_bytes.values())) <= 0.001 * sum(file_bytes.values())
    # dequantized, the layers would be 4x (fp16) their packed weights: the float weight is nowhere
    assert not any(name.endswith("wqkv.weight") for name in model.state_dict())


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "quantization_config":
            data[key] |= value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("int4"), "qwen2", quantize="gptq-int4", group_size=32
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", 2, "bits 2 is not supported"),
        ("bits", 3, "bits 3 is not supported"),
        ("checkpoint_format", "gptq_v2", "checkpoint_format 'gptq_v2' is not supported"),
        ("checkpoint_format", "marlin", "checkpoint_format 'marlin' is not supported"),
        ("quant_method", "awq", "quant_method 'awq' is not supported"),
        ("is_marlin_format", True, "is_marlin_format True is not supported"),
        ("lm_head", True, "lm_head True is not supported"),
        ("group_size", 0, "group_size 0 is not supported"),
        ("group_size", 36, "group_size 36 is not supported \\(a multiple of 8"),
        ("desc_act", "yes", "desc_act 'yes' is not supported"),
        ("zero_point_v2", 1, "unknown field 'zero_point_v2' \\(value 1\\)"),
    ],
)
@pytest.mark.parametrize("where", ["config.json", "quantize_config.json"])
def test_every_unsupported_field_is_a_named_error(tmp_path, int4_dir, where, field, value, message):
    path = shutil.copytree(int4_dir, tmp_path / "model")
    if where == "config.json":
        (path / "quantize_config.json").unlink()
        edit_json(path / "config.json", quantization_config={field: value})
        place = "config.json: quantization_config"
    else:
        config = json.loads((path / "config.json").read_text())
        del config["quantization_config"]
        (path / "config.json").write_text(json.dumps(config))
        edit_json(path / "quantize_config.json", **{field: value})
        place = "quantize_config.json"
    with pytest.raises(CheckpointError, match=f"{place}: {message}"):
        load_checkpoint(path, device="cpu")


def test_optimums_quantization_config_is_read(tmp_path, int4_dir):
    """The Qwen2.5 GPTQ releases carry optimum's form of the settings in config.json, and no quantize_config.json."""
    path = shutil.copytree(int4_dir, tmp_path / "model")
    (path / "quantize_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "batch_size": 1, "bits": 4, "block_name_to_quantize": None, "cache_block_outputs": True,
        "damp_percent": 0.01, "dataset": None, "desc_act": False, "exllama_config": {"version": 1},
        "group_size": 32, "max_input_length": None, "model_seqlen": None, "module_name_preceding_first_block": None,
        "modules_in_block_to_quantize": None, "pad_token_id": None, "quant_method": "gptq", "sym": True,
        "tokenizer": None, "true_sequential": True, "use_cuda_fp16": False, "use_exllama": True,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    model = load_checkpoint(path, device="cpu")
    assert model.quantization == GPTQConfig(bits=4, group_size=32, desc_act=False, sym=True)


def test_an_awq_config_is_named_by_its_method(tmp_path, int4_dir):
    path = shutil.copytree(int4_dir, tmp_path / "model")
    (path / "quantize_config.json").unlink()
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"zero_point": True, "version": "gemm", "bits": 4, "quant_method": "awq"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization_config: quant_method 'awq' is not supported"):
        load_checkpoint(path, device="cpu")


def test_the_two_config_files_must_agree(tmp_path, int4_dir):
    path = shutil.copytree(int4_dir, tmp_path / "model")
    edit_json(path / "quantize_config.json", group_size=64)
    with pytest.raises(CheckpointError, match="disagree on group_size: 32 against 64"):
        load_checkpoint(path, device="cpu")


def test_a_packed_tensor_of_the_wrong_type_or_groups_is_named(tmp_path, int4_dir):
    path = shutil.copytree(int4_dir, tmp_path / "model")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.k_proj.g_idx"
    shard = path / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].flip(0).contiguous()  # k's inputs in other groups than q's and v's
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="k_proj.g_idx differs from .*q_proj.g_idx"):
        load_checkpoint(path, device="cpu")
    tensors[name] = tensors[name].long()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="k_proj.g_idx' is torch.int64; GPTQ stores it as int32"):
        load_checkpoint(path, device="cpu")


def quantized_layer(bits: int, group_size: int, desc_act: bool, k: int = 128, n: int = 48) -> GPTQLinear:
    torch.manual_seed(bits + group_size)
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    layer = GPTQLinear(k, n, False, config)
    packed = quantize_rtn(torch.randn(n, k), config, torch.randperm(k) if desc_act else None)
    for name, value in packed.items():
        setattr(layer, name, value)
    layer.sort_groups("test")
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("bits", "group_size", "desc_act"), [(4, 32, False), (4, -1, False), (8, 64, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_equal_the_pytorch_path(device, bits, group_size, desc_act, dtype):
    from qwen_agent.runtime import gptq_kernels

    layer = quantized_layer(bits, group_size, desc_act).to(device)
    packed = (layer.qweight, layer.qzeros, layer.scales, bits, layer.group_width)
    weight = layer.dequantize(dtype)
    if dtype == torch.float32:  # the same products, exact in fp32
        assert torch.equal(gptq_kernels.dequantize(*packed, dtype), weight)
    else:  # the interpreter rounds fp32 to bf16 towards zero, a GPU to nearest: one bf16 step
        torch.testing.assert_close(gptq_kernels.dequantize(*packed, dtype), weight, rtol=2**-7, atol=0)
    exact = layer.dequantize(torch.float32)  # the kernel sums against the exact weights, in fp32
    for rows in (1, 3, 20):  # one row on the vector units; several through tl.dot
        x = torch.randn(rows, 1, layer.in_features).to(device=device, dtype=dtype)
        want = (x.float() @ exact).to(dtype)
        tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-3}
        torch.testing.assert_close(gptq_kernels.matvec(x, *packed, block_n=16), want, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen", "qwen2"])
def test_the_fused_decode_step_with_gptq_layers_equals_the_plain_one(tmp_path, monkeypatch, device, family):
    """The decode runner at rows 1 and 2: each GPTQ product through the kernels (the one-row kernel, or the
    dequantized layer), the rest through the fused kernels; the same greedy tokens as plain PyTorch ops."""
    path = write_tiny_checkpoint(
        tmp_path, family, quantize="gptq-int4", group_size=32, desc_act=True, init_std=0.3, num_layers=1
    )
    engine = load_model(path, device=device, dtype="fp32")
    prompts = [engine.tokenizer.encode(t) for t in ("Hi", "A longer prompt with more words")]
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(GPTQLinear, "kernels_on_cpu", fused)
        cache = KVCache(engine.model.config, 2, 64, dtype=torch.float32, device=device)
        runner = DecodeRunner(engine.model, cache, fused=fused, graphs=False)
        results[fused] = greedy_token_ids(runner, engine.tokenizer, prompts, 4)
    assert results[True] == results[False]


@pytest.mark.requires_gpu
def test_cuda_graphs_replay_the_gptq_step(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "qwen", quantize="gptq-int4", group_size=32, init_std=0.3)
    engine = load_model(path, device="cuda", dtype="bf16")
    prompts = [engine.tokenizer.encode("Hello there")]
    results = {}
    for graphs in (False, True):
        cache = KVCache(engine.model.config, 1, 64, dtype=torch.bfloat16, device="cuda")
        runner = DecodeRunner(engine.model, cache, graphs=graphs)
        results[graphs] = greedy_token_ids(runner, engine.tokenizer, prompts, 6)
    assert results[True] == results[False]


def test_matvec_is_refused_for_gptq_layers(tmp_path, int4_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = load_checkpoint(int4_dir, device="cpu")
    cache = KVCache(model.config, 1, 8, dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="matvec=True reads float weights; .*GPTQ-quantized"):
        DecodeRunner(model, cache, fused=True, matvec=True)


ROOT = Path(__file__).resolve().parents[1]


def test_the_tool_writes_what_a_gptq_download_holds(tmp_path):
    out = tmp_path / "int4"
    tool = ROOT / "tools" / "make_tiny_checkpoint.py"
    done = subprocess.run(
        [
            sys.executable,
            str(tool),
            str(out),
            "--quantize",
            "gptq-int4",
            "--group-size",
            "32",
            "--num-layers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors.index.json", "quantize_config.json",
        "qwen.tiktoken", "tokenizer_config.json", *(f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)),
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((out / "quantize_config.json").read_text()) | {
        "quant_method": "gptq"
    }
    assert config["quantization_config"]["bits"] == 4 and config["torch_dtype"] == "float16"
    tensors = {}
    for shard in out.glob("*.safetensors"):
        tensors |= load_file(shard)
    for module in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
        base = f"transformer.h.0.{module}"
        assert base + ".weight" not in tensors
        kinds = {kind: tensors[f"{base}.{kind}"].dtype for kind in ("qweight", "qzeros", "scales", "g_idx")}
        assert kinds == {
            "qweight": torch.int32,
            "qzeros": torch.int32,
            "scales": torch.float16,
            "g_idx": torch.int32,
        }
    assert tensors["transformer.h.0.attn.c_attn.qweight"].shape == (64 // 8, 192)
    assert tensors["transformer.h.0.attn.c_attn.qzeros"].shape == (2, 192 // 8)
    assert tensors["transformer.h.0.attn.c_attn.bias"].dtype == torch.float16
    assert tensors["lm_head.weight"].dtype == tensors["transformer.wte.weight"].dtype == torch.float16
    assert load_model(out, device="cpu").model.quantization.bits == 4


def test_the_speed_benchmark_runs_a_quantized_row(tmp_path):
    script = ROOT / "benchmarks" / "speed.py"
    args = ["--smoke", "--quant", "int8", "--group-size", "32", "--no-baseline", "--no-serving", "--out"]
    done = subprocess.run(
        [sys.executable, str(script), *args, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(next(tmp_path.glob("speed-*.json")).read_text())
    runs = {r["impl"]: r for r in report["runs"]}
    assert set(runs) == {"qwen_agent", "qwen_agent int8"}
    assert report["quant"]["bits"] == 8 and report["quant"]["decode_speedup"] > 0
    assert runs["qwen_agent int8"]["weights_gib"] < runs["qwen_agent"]["weights_gib"]
    for run in runs.values():
        assert run["generate_peak_with_weights_gib"] > run["weights_gib"]
    assert len(runs["qwen_agent int8"]["tokens"]) == report["new_tokens"]
