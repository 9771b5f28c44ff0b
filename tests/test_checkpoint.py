"""checkpoint.py on real files in the Hugging Face layout (written by qwen_agent.runtime.tiny): every format, every bad case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_model import TOL, hf_model  # a sibling test module: the same HF reference builder
from transformers import Qwen2ForCausalLM

from qwen_agent.errors import CheckpointError
from qwen_agent.runtime.checkpoint import load_checkpoint
from qwen_agent.runtime.config import QwenConfig
from qwen_agent.runtime.tiny import write_tiny_checkpoint

IDS = torch.tensor([[151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 77091]])
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen"), "qwen", seed=1, seq_length=16)


@pytest.fixture
def broken(qwen_dir, tmp_path) -> Path:
    """A private copy of the tiny Qwen v1 directory to damage."""
    for f in qwen_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards(path):
        tensors |= load_file(shard)
    return tensors


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits  # ours, or a transformers model


def test_sharded_qwen_v1_matches_transformers_on_the_same_files(qwen_dir):
    config = QwenConfig.from_file(qwen_dir)
    assert (config.family, config.seq_length, config.intermediate_size) == ("qwen", 16, 128)
    assert len(shards(qwen_dir)) == 3
    model = load_checkpoint(qwen_dir, device="cpu", dtype="fp32")
    expected = logits(hf_model(config, all_tensors(qwen_dir)))
    assert (logits(model) - expected).abs().max().item() <= TOL
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_family_matches_transformers_from_pretrained(tmp_path, tied):
    path = write_tiny_checkpoint(
        tmp_path, "qwen2", seed=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=tied
    )
    ours = load_checkpoint(path, device="cpu", dtype="fp32")
    theirs = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.config.num_kv_heads == 2 and ours.config.tie_word_embeddings is tied
    assert (logits(ours) - logits(theirs)).abs().max().item() <= TOL
    if tied:
        assert ours.output.weight is ours.tok_embeddings.weight


def test_single_safetensors_file(broken, qwen_dir):
    tensors = all_tensors(broken)
    for shard in shards(broken):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    save_file(tensors, str(broken / "model.safetensors"))
    expected = logits(load_checkpoint(qwen_dir, device="cpu"))
    assert torch.equal(logits(load_checkpoint(broken, device="cpu")), expected)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_files(broken, qwen_dir, sharded):
    tensors = all_tensors(broken)
    for shard in shards(broken):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    if sharded:
        names = sorted(tensors)
        halves = {
            "pytorch_model-00001-of-00002.bin": names[::2],
            "pytorch_model-00002-of-00002.bin": names[1::2],
        }
        for file, part in halves.items():
            torch.save({n: tensors[n] for n in part}, broken / file)
        weight_map = {n: f for f, part in halves.items() for n in part}
        (broken / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, broken / "pytorch_model.bin")
    expected = logits(load_checkpoint(qwen_dir, device="cpu"))
    assert torch.equal(logits(load_checkpoint(broken, device="cpu")), expected)


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(_RunsCode.marker),))


def test_pytorch_bin_with_pickled_code_is_refused_without_running_it(broken, tmp_path):
    for shard in shards(broken):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    _RunsCode.marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _RunsCode()}, broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_checkpoint(broken, device="cpu")
    assert not _RunsCode.marker.exists()


@pytest.mark.parametrize(
    "dtype, expected",
    [("bf16", torch.bfloat16), ("fp16", torch.float16), ("auto", torch.float32), (None, torch.float32)],
)
def test_dtype_choice(qwen_dir, dtype, expected):
    model = load_checkpoint(qwen_dir, device="cpu", dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert torch.isfinite(logits(model)).all()


# -- bad checkpoints: every case names the file and, where there is one, the tensor ---------------------------


def test_missing_shard(broken):
    shards(broken)[1].unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors.*missing.*'transformer\."):
        load_checkpoint(broken, device="cpu")


def test_tensor_listed_but_absent(broken):
    shard = shards(broken)[2]
    tensors = load_file(shard)
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError, match=r"model-00003-of-00003\.safetensors: tensor 'lm_head\.weight' is listed"
    ):
        load_checkpoint(broken, device="cpu")


def test_tensor_missing_from_index(broken):
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["transformer.h.1.mlp.w2.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"index\.json: tensor 'transformer\.h\.1\.mlp\.w2\.weight' is not listed"
    ):
        load_checkpoint(broken, device="cpu")


def test_shape_mismatch_against_config(broken):
    shard = shards(broken)[0]
    tensors = load_file(shard)
    name = "transformer.h.0.attn.c_attn.weight"
    tensors[name] = tensors[name][:-3].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError, match=rf"model-00001-of-00003\.safetensors: tensor '{name}' has shape \[189, 64\]"
    ):
        load_checkpoint(broken, device="cpu")


NOT_FLOAT = {
    "I32 where F32 belongs": lambda t: t.view(torch.int32),  # same width: only the dtype tells them apart
    "I64": lambda t: t.to(torch.int64),
    "I16": lambda t: t.to(torch.int16),
    "I8": lambda t: t.to(torch.int8),
    "U8": lambda t: t.to(torch.uint8),
    "BOOL": lambda t: t > 0,
    "F8_E4M3": lambda t: t.to(torch.float8_e4m3fn),
}


@pytest.mark.parametrize("convert", NOT_FLOAT.values(), ids=NOT_FLOAT.keys())
@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_a_weight_that_is_not_float_is_refused(broken, convert, form):
    name = "transformer.h.0.attn.c_attn.weight"
    shard = shards(broken)[0]
    tensors = load_file(shard)
    tensors[name] = convert(tensors[name]).contiguous()
    if form == "safetensors":
        save_file(tensors, str(shard))
        where = shard.name
    else:
        tensors = all_tensors(broken) | {name: tensors[name]}
        for path in shards(broken):
            path.unlink()
        (broken / "model.safetensors.index.json").unlink()
        torch.save(tensors, broken / "pytorch_model.bin")
        where = "pytorch_model.bin"
    with pytest.raises(
        CheckpointError, match=rf"{where}: tensor '{name}' has dtype .*, but it is a float weight"
    ):
        load_checkpoint(broken, device="cpu")


def test_unknown_architecture(broken):
    config = json.loads((broken / "config.json").read_text())
    config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture.*LlamaForCausalLM"):
        load_checkpoint(broken, device="cpu")


@pytest.mark.parametrize("key", ["num_hidden_layers", "seq_length", "layer_norm_epsilon", "hidden_size"])
def test_config_key_missing(broken, key):
    config = json.loads((broken / "config.json").read_text())
    del config[key]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: required key .*'{key}'.* is missing"):
        load_checkpoint(broken, device="cpu")


@pytest.mark.parametrize("damage", ["missing", "not json"])
def test_config_file_missing_or_unreadable(broken, damage):
    if damage == "missing":
        (broken / "config.json").unlink()
    else:
        (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(broken, device="cpu")


def test_truncated_shard(broken):
    shard = shards(broken)[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors: truncated file: tensor '"):
        load_checkpoint(broken, device="cpu")


@pytest.mark.parametrize("garbage", [b"\xff" * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json!}"])
def test_corrupt_shard_header(broken, garbage):
    shard = shards(broken)[0]
    shard.write_bytes(garbage + shard.read_bytes()[len(garbage) :])
    with pytest.raises(
        CheckpointError, match=r"model-00001-of-00003\.safetensors: corrupt safetensors header"
    ):
        load_checkpoint(broken, device="cpu")


def test_truncated_pytorch_bin(broken):
    tensors = all_tensors(broken)
    for shard in shards(broken):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    torch.save(tensors, broken / "pytorch_model.bin")
    data = (broken / "pytorch_model.bin").read_bytes()
    (broken / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read"):
        load_checkpoint(broken, device="cpu")


def test_no_weights_at_all(broken):
    for shard in shards(broken):
        shard.unlink()
    (broken / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_checkpoint(broken, device="cpu")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_checkpoint(tmp_path / "nowhere" / "at" / "all", device="cpu")


@pytest.mark.parametrize("tokenizer_files", ["vocab.json", "tokenizer.json"])
def test_a_hub_download_fetches_every_file_a_model_directory_needs(tmp_path, tokenizer_files):
    from fnmatch import fnmatch

    from qwen_agent.runtime.checkpoint import _HUB_PATTERNS

    directory = write_tiny_checkpoint(
        tmp_path, "qwen2", num_layers=1, num_shards=1, tokenizer_files=tokenizer_files
    )
    skipped = [f.name for f in directory.iterdir() if not any(fnmatch(f.name, p) for p in _HUB_PATTERNS)]
    assert skipped == []


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(
        CheckpointError, match=r"Qwen/Qwen-7B-Chat.*huggingface_hub is not installed.*download"
    ):
        load_checkpoint("Qwen/Qwen-7B-Chat", device="cpu")


def test_hub_id_offline_gives_a_clear_message(tmp_path):
    code = textwrap.dedent("""
        from qwen_agent.runtime.checkpoint import load_checkpoint
        from qwen_agent.errors import CheckpointError
        try:
            load_checkpoint("Qwen/Qwen-7B-Chat", device="cpu")
        except CheckpointError as exc:
            print("ERROR:", exc)
    """)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR: Qwen/Qwen-7B-Chat: could not download from the Hugging Face Hub" in out.stdout, out.stderr
    assert "huggingface.co/Qwen/Qwen-7B-Chat" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_host_memory_of_a_load(tmp_path, dtype):
    """Peak RSS growth while loading stays within 1.3x the checkpoint's bytes (measured in a fresh process).

    The baseline is taken after building a model on the meta device once, which imports about 70 MB of torch
    modules whatever the checkpoint's size; benchmarks/speed.py reports the load peak including it.
    """
    path = write_tiny_checkpoint(
        tmp_path, "qwen", hidden_size=256, num_layers=4, num_heads=4, dtype=dtype, num_shards=2
    )
    checkpoint_bytes = sum(f.stat().st_size for f in shards(path))
    code = textwrap.dedent(f"""
        import torch, qwen_agent.runtime.checkpoint as ck
        def status(key):  # VmHWM is this process's own peak (ru_maxrss would carry the parent's across exec)
            return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        with torch.device("meta"):  # one-time imports (~70 MB of modules) that do not scale with the weights
            ck.Transformer(ck.QwenConfig.from_file({str(path)!r}))
        before = status("VmRSS")
        model = ck.load_checkpoint({str(path)!r}, device="cpu", dtype={dtype!r})
        print(before, status("VmHWM"))
    """)
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    before, peak = map(int, out.stdout.split())
    assert peak - before <= 1.3 * checkpoint_bytes, (peak - before) / checkpoint_bytes
