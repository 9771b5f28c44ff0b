import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from qwen_agent.errors import ConfigError
from qwen_agent.runtime.tiny import qwen_7b_chat_config, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _read_index(directory: Path) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())


def _shard_contents(directory: Path) -> dict[str, dict[str, int]]:
    """shard file -> {tensor name: bytes}"""
    out = {}
    for shard in sorted(directory.glob("model-*-of-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out[shard.name] = {}
            for name in f.keys():
                t = f.get_tensor(name)
                out[shard.name][name] = t.numel() * t.element_size()
    return out


@pytest.mark.parametrize("fixture", ["tiny_qwen_dir", "tiny_qwen2_dir"])
def test_index_agrees_with_shards(request, fixture):
    directory = request.getfixturevalue(fixture)
    index = _read_index(directory)
    shards = _shard_contents(directory)
    located = {name: shard for shard, names in shards.items() for name in names}
    assert located == index["weight_map"]  # every tensor is in the shard the index names, and nothing else
    assert sum(sum(s.values()) for s in shards.values()) == index["metadata"]["total_size"]
    assert len(shards) == 3 and all(n.endswith("-of-00003.safetensors") for n in shards)


def test_a_layer_straddles_two_shards(tiny_qwen_dir):
    weight_map = _read_index(tiny_qwen_dir)["weight_map"]
    shards_per_layer = {}
    for name, shard in weight_map.items():
        if name.startswith("transformer.h."):
            shards_per_layer.setdefault(name.split(".")[2], set()).add(shard)
    assert any(len(s) > 1 for s in shards_per_layer.values())


def test_qwen_layout_matches_the_real_download(tiny_qwen_dir):
    config = json.loads((tiny_qwen_dir / "config.json").read_text())
    assert set(config) == set(qwen_7b_chat_config())
    assert config["architectures"] == ["QWenLMHeadModel"] and config["seq_length"] == 256
    weight_map = _read_index(tiny_qwen_dir)["weight_map"]
    assert (
        len(weight_map) == 2 * 8 + 3
    )  # 8 tensors a layer + wte, ln_f, lm_head, as the real 259 = 32 * 8 + 3

    def shape(name):
        with safe_open(str(tiny_qwen_dir / weight_map[name]), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            return tuple(f.get_slice(name).get_shape())

    assert shape("transformer.h.0.attn.c_attn.weight") == (192, 64)
    assert shape("transformer.h.0.mlp.w1.weight") == (
        128,
        64,
    )  # Qwen's intermediate_size counts both branches
    assert shape("transformer.wte.weight") == (151936, 64)
    generation = json.loads((tiny_qwen_dir / "generation_config.json").read_text())
    assert generation["repetition_penalty"] == 1.1 and generation["top_k"] == 0
    assert (tiny_qwen_dir / "qwen.tiktoken").stat().st_size == 2561218


def test_qwen2_layout_grouped_kv_and_tied_embeddings(tmp_path):
    directory = write_tiny_checkpoint(
        tmp_path, "qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=True
    )
    config = json.loads((directory / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    weight_map = _read_index(directory)["weight_map"]
    assert "lm_head.weight" not in weight_map
    assert "model.layers.0.self_attn.k_proj.bias" in weight_map
    shard = directory / weight_map["model.layers.0.self_attn.k_proj.weight"]
    with safe_open(str(shard), framework="pt") as f:
        assert tuple(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == (32, 64)


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed(tmp_path):
    a = write_tiny_checkpoint(tmp_path / "a", seed=7, num_layers=1)
    b = write_tiny_checkpoint(tmp_path / "b", seed=7, num_layers=1)
    c = write_tiny_checkpoint(tmp_path / "c", seed=8, num_layers=1)
    assert _digest(a) == _digest(b) != _digest(c)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="family must be"):
        write_tiny_checkpoint(tmp_path, "llama")
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        write_tiny_checkpoint(tmp_path, hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="untied lm_head"):
        write_tiny_checkpoint(tmp_path, "qwen", tie_word_embeddings=True)


def test_script_writes_a_checkpoint(tmp_path):
    out = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_tiny_checkpoint.py"), str(out), "--num-layers", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == str(out)
    assert (out / "model.safetensors.index.json").is_file()
