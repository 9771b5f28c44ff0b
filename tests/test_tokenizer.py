import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_agent import cli
from qwen_agent.errors import TokenizerError, VocabError
from qwen_agent.runtime import tokenizer as tokenizer_module
from qwen_agent.runtime.tiny import write_tiny_checkpoint
from qwen_agent.runtime.tokenizer import IM_START, QwenTokenizer, unicode_to_byte

# reference section 2.3, verified against the real vocabulary
REFERENCE_IDS = {
    "\n": [198],
    "system": [8948],
    "user": [872],
    "assistant": [77091],
    "You are a helpful assistant.": [2610, 525, 264, 10950, 17847, 13],
    "Observation": [37763, 367],
    "Observation:": [37763, 367, 25],
    "Observation:\n": [37763, 367, 510],
    "\nObservation:": [198, 37763, 367, 25],
    " Observation:": [86429, 25],
    "Action:": [2512, 25],
    "Action Input:": [2512, 5571, 25],
    "Thought:": [84169, 25],
    "Final Answer:": [19357, 21806, 25],
    "Human:": [33975, 25],
    "Assistant:": [71703, 25],
    " ": [220],
    "\n\n": [271],
    ":\n": [510],
}


@pytest.mark.parametrize("text,ids", REFERENCE_IDS.items())
def test_reference_ids(tokenizer, text, ids):
    assert tokenizer.encode(text) == ids


def test_special_tokens_and_size(tokenizer):
    assert len(tokenizer) == 151851
    assert (tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    assert tokenizer.special_tokens["<|extra_0|>"] == 151646
    assert tokenizer.special_tokens["<|extra_204|>"] == 151850
    assert tokenizer.decode([151644, 151645, 151643]) == "<|im_start|><|im_end|><|endoftext|>"


def test_encode_is_injection_safe_by_default(tokenizer):
    text = 'print("<|endoftext|>")'
    assert tokenizer.encode(text) == [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tokenizer.encode(text, allowed_special="all") == [1350, 445, 151643, 899]
    assert tokenizer.encode(text, allowed_special={"<|endoftext|>"}) == [1350, 445, 151643, 899]
    # allowing a different token leaves this one as text
    assert 151643 not in tokenizer.encode(text, allowed_special={"<|im_start|>"})


def test_unknown_special_token_is_a_clear_error(tokenizer):
    with pytest.raises(TokenizerError, match=r"unknown special token '<\|foo\|>'.*<\|im_start\|>"):
        tokenizer.encode("x", allowed_special={"<|foo|>"})


@pytest.mark.parametrize("bad", [None, 42, b"bytes", ["a"]])
def test_non_string_text_is_a_clear_error(tokenizer, bad):
    with pytest.raises(TokenizerError, match="encode\\(\\) expects str, got"):
        tokenizer.encode(bad)


def test_bad_ids_are_a_clear_error(tokenizer):
    with pytest.raises(TokenizerError, match="non-negative integers, got -1"):
        tokenizer.decode([1, -1])
    with pytest.raises(TokenizerError, match="got '7'"):
        tokenizer.decode(["7"])


def test_nfc_normalisation(tokenizer):
    decomposed = "cafe\u0301"  # e + combining acute
    assert tokenizer.encode(decomposed) == tokenizer.encode("café")
    assert tokenizer.decode(tokenizer.encode(decomposed)) == "café"


def test_skip_special_tokens_and_padding_rows(tokenizer):
    ids = [151644, *tokenizer.encode("hi"), 151645, 151900]
    assert tokenizer.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_id_to_piece(tokenizer):
    assert tokenizer.id_to_piece(198) == b"\n"
    assert tokenizer.id_to_piece(151645) == "<|im_end|>"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_is_nfc(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_incremental_decoder_every_split_point(tokenizer, text):
    ids = tokenizer.encode(text)
    full = tokenizer.decode(ids)
    for split in range(len(ids) + 1):
        decoder = tokenizer.incremental_decoder()
        deltas = [decoder.add(ids[:split]), decoder.add(ids[split:]), decoder.flush()]
        assert "".join(deltas) == full
    decoder = tokenizer.incremental_decoder()
    one_by_one = [decoder.add([i]) for i in ids]
    assert "".join(one_by_one) + decoder.flush() == full
    assert all("\ufffd" not in d for d in one_by_one) or "\ufffd" in full


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=151850), max_size=40))
def test_incremental_decoder_on_arbitrary_ids_never_drops_bytes(tokenizer, ids):
    decoder = tokenizer.incremental_decoder()
    streamed = "".join(decoder.add([i]) for i in ids) + decoder.flush()
    assert streamed == tokenizer.decode(ids)


def test_incremental_decoder_holds_back_half_a_character(tokenizer):
    # "你" is three UTF-8 bytes; feed them as single-byte tokens
    byte_ids = [tokenizer.encode(chr(b))[0] if b < 128 else None for b in "你".encode()]
    assert byte_ids == [None, None, None]  # non-ASCII bytes: look their single-byte tokens up instead
    ranks = {tokenizer.id_to_piece(i): i for i in range(256)}
    byte_tokens = [ranks[bytes([b])] for b in "你".encode()]
    decoder = tokenizer.incremental_decoder()
    assert decoder.add(byte_tokens[:1]) == ""
    assert decoder.add(byte_tokens[1:2]) == ""
    assert decoder.add(byte_tokens[2:]) == "你"
    unfinished = tokenizer.incremental_decoder()
    assert unfinished.add(byte_tokens[:2]) == ""
    assert unfinished.flush() == "\ufffd"


def test_from_pretrained_directory_forms(tiny_qwen_dir, tiny_qwen2_dir, tokenizer):
    text = "Hello wörld! 你好，世界 12345\n\tdef f(x):\n    return x**2  \n\nObservation:\n"
    v1 = QwenTokenizer.from_pretrained(tiny_qwen_dir)
    v2 = QwenTokenizer.from_pretrained(tiny_qwen2_dir)
    assert v1.encode(text) == v2.encode(text) == tokenizer.encode(text)
    assert len(v2) == 151646  # Qwen2 checkpoints declare only endoftext, im_start, im_end
    assert v2.im_end_id == 151645


def test_vocab_json_matches_transformers_qwen2_tokenizer(tiny_qwen2_dir, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    for text in ["Hello world", "你好，世界", "x = [1, 22, 333]\n\n", "wörld  \t\n", "a <|im_start|> b"]:
        assert hf(text)["input_ids"] == tokenizer.encode(text, allowed_special="all")


def test_tokenizer_json_alone_gives_the_ids_of_vocab_json(tiny_qwen2_dir, tmp_path):
    one_file = write_tiny_checkpoint(tmp_path, "qwen2", num_layers=1, tokenizer_files="tokenizer.json")
    assert not (one_file / "vocab.json").exists() and not (one_file / "merges.txt").exists()
    from_json, from_vocab = (
        QwenTokenizer.from_pretrained(one_file),
        QwenTokenizer.from_pretrained(tiny_qwen2_dir),
    )
    text = "Hello wörld! 你好，世界 12345\n\tdef f(x):\n    return x**2  \n\nObservation:\n<|im_end|>"
    assert from_json.encode(text) == from_vocab.encode(text)
    assert from_json.encode(text, allowed_special="all") == from_vocab.encode(text, allowed_special="all")
    assert from_json.special_tokens == from_vocab.special_tokens and len(from_json) == len(from_vocab)


def test_added_tokens_listed_in_the_vocabulary_too_stay_control_tokens(tiny_qwen2_dir, tmp_path):
    """Conversions such as GGUF -> transformers write every id, the added tokens and padding ones included,
    into ``model.vocab``: the ids must not change, and the added tokens must not become mergeable pieces."""
    one_file = write_tiny_checkpoint(tmp_path, "qwen2", num_layers=1, tokenizer_files="tokenizer.json")
    path = one_file / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    added = {entry["content"]: entry["id"] for entry in data["added_tokens"]}
    top = max(added.values())
    vocab |= added | {
        f"[PAD{i}]": i for i in range(top + 1, top + 9)
    }  # padding ids up to the embedding's size
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    listed, plain = QwenTokenizer.from_pretrained(one_file), QwenTokenizer.from_pretrained(tiny_qwen2_dir)
    text = "Hello <|im_start|> wörld\n\nObservation:\n<|im_end|>"
    assert listed.encode(text) == plain.encode(text)
    assert listed.encode(text, allowed_special="all") == plain.encode(text, allowed_special="all")
    assert (
        len(listed) == top + 9 and listed.decode([top + 8, added[IM_START]]) == f"[PAD{top + 8}]<|im_start|>"
    )
    assert not set(added.values()) & set(listed.encoding._mergeable_ranks.values())
    pytest.importorskip("llguidance")
    from qwen_agent.runtime.grammar import (
        Grammar,
    )  # it counts pieces and control tokens against the vocabulary

    assert Grammar.from_json_schema(listed, len(listed), {"type": "object"}).constraint() is not None


@pytest.fixture(scope="module")
def saved_by_transformers(tiny_qwen2_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2 tokenizer as transformers' own save_pretrained writes it."""
    transformers = pytest.importorskip("transformers")
    saved = tmp_path_factory.mktemp("saved-by-transformers")
    transformers.AutoTokenizer.from_pretrained(str(tiny_qwen2_dir)).save_pretrained(str(saved))
    return saved


def test_directory_saved_by_transformers_loads_with_the_same_ids(saved_by_transformers, tiny_qwen2_dir):
    transformers = pytest.importorskip("transformers")
    assert not (saved_by_transformers / "vocab.json").exists()  # tokenizer.json, tokenizer_config.json only
    hf = transformers.AutoTokenizer.from_pretrained(str(saved_by_transformers))
    tokenizer = QwenTokenizer.from_pretrained(saved_by_transformers)
    from_vocab = QwenTokenizer.from_pretrained(tiny_qwen2_dir)
    for text in ["Hello world", "你好，世界", "x = [1, 22, 333]\n\n", "wörld  \t\n", "a <|im_start|> b"]:
        ids = tokenizer.encode(text, allowed_special="all")
        assert ids == hf(text)["input_ids"] == from_vocab.encode(text, allowed_special="all")
    assert tokenizer.special_tokens == from_vocab.special_tokens


def test_tiny_tokenizer_json_is_what_transformers_saves(saved_by_transformers, tmp_path):
    ours = write_tiny_checkpoint(tmp_path, "qwen2", num_layers=1, tokenizer_files="tokenizer.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((ours / name).read_text()) == json.loads((saved_by_transformers / name).read_text())
    assert (ours / "chat_template.jinja").read_text() == (
        saved_by_transformers / "chat_template.jinja"
    ).read_text()


def _byte_level_tokenizer_json(path: Path, merges: list[list[str]]) -> Path:
    """A tokenizer.json over the 256 single bytes plus the tokens the merges make, in merge order."""
    vocab = {ch: b for ch, b in unicode_to_byte().items()}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    data = {"added_tokens": [], "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    return path


def test_tokenizer_json_merges_out_of_id_order_are_refused(tmp_path):
    tokenizer = QwenTokenizer.from_pretrained(_byte_level_tokenizer_json(tmp_path, [["a", "b"], ["ab", "c"]]))
    assert tokenizer.encode("abc") == [256 + 1] and tokenizer.im_end_id == 256 + 2 + 2
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["model"]["merges"].reverse()
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"tokenizer\.json: merge rule 2 \(\['a', 'b'\]\) makes id 256"):
        QwenTokenizer.from_pretrained(tmp_path)
    data["model"]["merges"] = [["a", "zz"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"merge rule 1 .* not in the vocabulary"):
        QwenTokenizer.from_pretrained(tmp_path)
    data["model"]["merges"] = []
    data["added_tokens"] = [{"id": 256, "content": "<|im_start|>"}]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"tokenizer\.json: the added tokens have no <\|endoftext\|>"):
        QwenTokenizer.from_pretrained(tmp_path)
    data["model"] = {"type": "Unigram", "vocab": [["a", 0.0]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VocabError, match=r"tokenizer\.json: expected a byte-level BPE model"):
        QwenTokenizer.from_pretrained(tmp_path)


def test_merges_txt_out_of_id_order_is_refused(tiny_qwen2_dir, tmp_path):
    for name in ("vocab.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_qwen2_dir / name, tmp_path / name)
    lines = (tiny_qwen2_dir / "merges.txt").read_text().split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "merges.txt").write_text("\n".join(lines))
    with pytest.raises(VocabError, match=r"merges\.txt: merge rule 2 .* not above"):
        QwenTokenizer.from_pretrained(tmp_path)


def test_missing_vocab_names_the_path(tmp_path):
    with pytest.raises(VocabError, match=r"nope\.tiktoken: no such file"):
        QwenTokenizer.from_pretrained(tmp_path / "nope.tiktoken")
    with pytest.raises(VocabError, match="none of qwen.tiktoken, vocab.json, tokenizer.json"):
        QwenTokenizer.from_pretrained(tmp_path)


# Runs past LONG_WHITESPACE take the path that pieces the text in Python; below about 500,000 characters tiktoken
# still encodes them itself, so both must agree there.
RUN = 300_000
LONG_WHITESPACE_TEXTS = {
    "spaces then a word": " " * RUN + "x",
    "spaces at the end": "end" + " " * RUN,
    "newline then spaces": "a\n" + " " * RUN + "b",
    "spaces then newline": "a" + " " * RUN + "\nb",
    "newlines then spaces then newlines": "\n" * RUN + " " * RUN + "\n\n" + " \t" * 10 + "!",
    "punctuation takes the newlines": "!" + "\n" * RUN + " " * RUN + "?",
    "mixed whitespace": " \t\u3000\u2028\x0b" * (RUN // 5) + "word",
    "two runs": "one" + " " * RUN + "two" + "\t" * RUN + "three",
    "space before letters and punctuation": "x" + " " * RUN + " y" + " " * RUN + " !",
    "a separator that is not whitespace": "\x1c" + " " * RUN + "\x1c" + " " * RUN + "\x1c",
    "digits and CJK around": "12" + "\u3000" * RUN + "中文" + " " * RUN + "34",
}


@pytest.mark.parametrize("text", LONG_WHITESPACE_TEXTS.values(), ids=LONG_WHITESPACE_TEXTS.keys())
def test_long_whitespace_runs_give_tiktokens_ids(tokenizer, text):
    assert tokenizer.encode(text) == tokenizer._encoding.encode_ordinary(text)


def test_long_whitespace_runs_between_control_tokens(tokenizer):
    assert RUN > getattr(tokenizer_module, "LONG_WHITESPACE", 0)  # the runs above take the Python path
    text = "<|im_start|>user\n" + " " * RUN + "hi<|im_end|>" + "\n" * RUN + "<|im_start|>" + " " * RUN
    expected = tokenizer._encoding.encode(text, allowed_special="all")
    assert tokenizer.encode(text, allowed_special="all") == expected
    assert tokenizer.encode(text) == tokenizer._encoding.encode_ordinary(text)


@pytest.mark.parametrize(
    "text", [" " * 1_000_000, " " * 1_000_000 + "x", "\n" + " \t" * 600_000 + "x"], ids=len
)
def test_a_million_whitespace_characters_encode_without_a_panic(tokenizer, text):
    ids = tokenizer.encode(text)  # tiktoken alone raises pyo3's PanicException (a BaseException) here
    assert tokenizer.decode(ids) == text


def test_corrupt_vocab_names_line_and_format(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nIg== 1\nnot-base64!! 2\n")
    with pytest.raises(VocabError, match=r"qwen\.tiktoken, line 3: expected '<base64 token bytes> <rank>'"):
        QwenTokenizer.from_pretrained(bad)
    bad.write_bytes(b"IQ== 0\nIg==\n")
    with pytest.raises(VocabError, match="line 2"):
        QwenTokenizer.from_pretrained(bad)
    bad.write_bytes(b"IQ== 0\nIg== 5\n")
    with pytest.raises(VocabError, match="ranks must be the ids 0..1"):
        QwenTokenizer.from_pretrained(bad)
    bad.write_bytes(b"")
    with pytest.raises(VocabError, match="empty"):
        QwenTokenizer.from_pretrained(bad)


def test_no_vocab_anywhere_names_both_options(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "dashscope_vocab_path", lambda: None)
    with pytest.raises(VocabError, match="model directory.*install the 'dashscope' package"):
        QwenTokenizer.from_pretrained()


def test_cli_tokenize_and_decode(capsys, vocab_file: Path):
    assert cli.main(["tokenize", "Observation:\n", "--vocab", str(vocab_file)]) == 0
    assert capsys.readouterr().out.strip() == "37763 367 510"
    assert cli.main(["tokenize", "--decode", "37763, 367, 25"]) == 0
    assert capsys.readouterr().out == "Observation:\n"
    assert cli.main(["tokenize", "--decode", "37763 x"]) == 2
    assert "--decode expects integer ids" in capsys.readouterr().err
    assert cli.main(["tokenize", "--decode", "198 99999999"]) == 2
    assert "99999999 is not a token id of this vocabulary (0..151850)" in capsys.readouterr().err


class PanicException(BaseException):
    """Stands for pyo3_runtime.PanicException, which a Rust panic inside tiktoken raises."""


def test_a_panic_inside_tiktoken_is_a_tokenizer_error(tokenizer, monkeypatch):
    encoding = tokenizer._encoding

    class Panicking:
        def __getattr__(self, name):
            return getattr(encoding, name)

        def encode_ordinary(self, text):
            raise PanicException("called `Result::unwrap()` on an `Err` value")

    monkeypatch.setattr(tokenizer, "_encoding", Panicking())
    with pytest.raises(TokenizerError, match="tiktoken failed on a text of 5 characters"):
        tokenizer.encode("hello")
