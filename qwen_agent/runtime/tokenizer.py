"""The Qwen tokenizer: byte-level BPE through tiktoken, exactly as Qwen-7B-Chat's ``tokenization_qwen.py``.

Two vocabulary forms load into the same tokenizer:

* ``qwen.tiktoken`` (Qwen v1): one ``<base64 token bytes> <rank>`` line per token; the rank is the id.
* ``vocab.json`` (+ ``merges.txt``) with the added tokens in ``tokenizer_config.json`` (Qwen1.5 / Qwen2 /
  Qwen2.5): the same byte-level BPE, written with GPT-2's byte-to-unicode alphabet; ids serve as ranks.

Encoding is injection-safe by default: the surface form of a control token (``<|im_start|>``) inside text
becomes ordinary tokens unless the caller opts in with ``allowed_special``.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import importlib.util
import json
import os
import unicodedata
from collections.abc import Collection, Iterable
from functools import cache
from pathlib import Path
from typing import Literal

import tiktoken

from ..errors import TokenizerError, VocabError

__all__ = ["QwenTokenizer", "IncrementalDecoder", "PAT_STR", "ENDOFTEXT", "IM_START", "IM_END"]

# The pre-tokenizer of every Qwen generation: cl100k-like, but digits are split one by one.
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen v1's special tokens follow the 151,643 ranks: endoftext, im_start, im_end, then 205 reserved extras.
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))

VOCAB_FILE = "qwen.tiktoken"
HF_VOCAB_FILE = "vocab.json"

AllowedSpecial = Literal["all"] | Collection[str]


def dashscope_vocab_path() -> Path | None:
    """The ``qwen.tiktoken`` shipped inside the installed ``dashscope`` package, if any (dashscope is not imported)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "resources" / VOCAB_FILE
        if candidate.is_file():
            return candidate
    return None


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Read a ``qwen.tiktoken`` file, naming the line of the first malformed entry."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabError(f"cannot read vocabulary file {path}: {exc.strerror or exc}") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            shown = line[:60].decode("utf-8", "replace")
            raise VocabError(
                f"{path}, line {number}: expected '<base64 token bytes> <rank>', got {shown!r}"
            ) from None
        ranks[token] = rank
    if not ranks:
        raise VocabError(
            f"{path}: the vocabulary file is empty (expected '<base64 token bytes> <rank>' lines)"
        )
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise VocabError(
            f"{path}: ranks must be the ids 0..{len(ranks) - 1}, each once (duplicate or missing ranks)"
        )
    return ranks


@cache
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode alphabet, which ``vocab.json`` uses to spell token bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def load_hf_vocab(directory: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read ``vocab.json`` and the added tokens of ``tokenizer_config.json`` (the Qwen2-family form)."""
    vocab_path = directory / HF_VOCAB_FILE
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VocabError(f"cannot read {vocab_path}: {exc}") from None
    if not isinstance(vocab, dict):
        raise VocabError(f"{vocab_path}: expected a JSON object mapping token to id")
    alphabet = unicode_to_byte()
    ranks: dict[bytes, int] = {}
    for piece, rank in vocab.items():
        try:
            ranks[bytes(alphabet[ch] for ch in piece)] = int(rank)
        except (KeyError, TypeError, ValueError):
            raise VocabError(
                f"{vocab_path}: entry {piece!r}: {rank!r} is not a byte-level BPE token"
            ) from None
    config_path = directory / "tokenizer_config.json"
    specials: dict[str, int] = {}
    if config_path.is_file():
        try:
            added = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
            specials = {entry["content"]: int(idx) for idx, entry in added.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VocabError(f"{config_path}: malformed added_tokens_decoder ({exc})") from None
    if not specials:
        specials = {tok: len(ranks) + i for i, tok in enumerate((ENDOFTEXT, IM_START, IM_END))}
    return ranks, specials


class QwenTokenizer:
    """Qwen's tokenizer. ``encode`` never turns user text into control tokens unless asked to.

    >>> tok = QwenTokenizer.from_pretrained()            # the vocabulary shipped with dashscope
    >>> tok.encode("Observation:")
    [37763, 367, 25]
    """

    def __init__(
        self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], *, name: str = "Qwen"
    ):
        self._encoding = tiktoken.Encoding(
            name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
        )
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._special_by_id = {i: s for s, i in special_tokens.items()}
        self._size = max(len(mergeable_ranks), max(special_tokens.values(), default=-1) + 1)
        self.eod_id = special_tokens[ENDOFTEXT]
        self.im_start_id = special_tokens[IM_START]
        self.im_end_id = special_tokens[IM_END]

    # -- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None) -> QwenTokenizer:
        """Load from a model directory, a ``qwen.tiktoken`` file, or (no argument) dashscope's bundled copy."""
        if path is None:
            found = dashscope_vocab_path()
            if found is None:
                raise VocabError(
                    "no vocabulary given and none found: pass a model directory (with qwen.tiktoken or vocab.json) "
                    "or a qwen.tiktoken file, or install the 'dashscope' package, which ships qwen.tiktoken"
                )
            return cls._from_tiktoken_file(found)
        path = Path(path)
        if path.is_dir():
            if (path / VOCAB_FILE).is_file():
                return cls._from_tiktoken_file(path / VOCAB_FILE)
            if (path / HF_VOCAB_FILE).is_file():
                ranks, specials = load_hf_vocab(path)
                return cls(ranks, specials)
            raise VocabError(f"{path}: the directory has neither {VOCAB_FILE} nor {HF_VOCAB_FILE}")
        if not path.exists():
            raise VocabError(
                f"{path}: no such file or directory (expected a model directory or a {VOCAB_FILE} file)"
            )
        return cls._from_tiktoken_file(path)

    @classmethod
    def _from_tiktoken_file(cls, path: Path) -> QwenTokenizer:
        return _cached_tiktoken_tokenizer(str(path.resolve()), path.stat().st_mtime_ns)

    # -- encoding ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding underneath (ranks, special tokens, pre-tokenizer), for grammar libraries."""
        return self._encoding

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of ``text`` after NFC normalisation.

        ``allowed_special`` is empty by default, so ``"<|im_start|>"`` in the text is encoded as ordinary
        characters. Pass ``"all"`` or a set of special-token strings to parse those as control tokens.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() expects str, got {type(text).__name__}")
        allowed = self._check_allowed(allowed_special)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if not allowed:
            return self._encoding.encode_ordinary(text)
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def _check_allowed(self, allowed_special: AllowedSpecial) -> Collection[str]:
        if allowed_special == "all":
            return self._encoding.special_tokens_set
        if isinstance(allowed_special, str):
            allowed_special = {allowed_special}
        unknown = [s for s in allowed_special if s not in self.special_tokens]
        if unknown:
            raise TokenizerError(
                f"unknown special token {unknown[0]!r}; known: {ENDOFTEXT}, {IM_START}, {IM_END}"
                + (", <|extra_0|> .. <|extra_204|>" if "<|extra_0|>" in self.special_tokens else "")
            )
        return set(allowed_special)

    # -- decoding ------------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The bytes of ``ids``; special tokens as their UTF-8 surface form unless skipped.

        Ids past the vocabulary (the padding rows of the embedding) have no text and decode to nothing.
        """
        pieces: list[bytes] = []
        ordinary: list[int] = []
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise TokenizerError(f"token ids must be non-negative integers, got {i!r}")
            special = self._special_by_id.get(i)
            if special is None and i < self._size:
                ordinary.append(i)
                continue
            if ordinary:
                pieces.append(self._encoding.decode_bytes(ordinary))
                ordinary = []
            if special is not None and not skip_special_tokens:
                pieces.append(special.encode())
        if ordinary:
            pieces.append(self._encoding.decode_bytes(ordinary))
        return b"".join(pieces)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of ``ids``; incomplete UTF-8 is handled per ``errors`` (``"replace"`` gives U+FFFD)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors=errors)

    def id_to_piece(self, token_id: int) -> bytes | str:
        """The bytes of one regular token, or the string of a special token."""
        special = self._special_by_id.get(token_id)
        return special if special is not None else self.decode_bytes([token_id])

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A decoder for streaming: feed ids as they are generated, get text that never splits a character."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of ids into text deltas whose concatenation equals ``decode`` of all the ids.

    Bytes of a character that is not complete yet are held back until the next ids (or ``flush``) arrive.
    """

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: Iterable[int]) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes(ids, self._skip))

    def flush(self) -> str:
        """Text of any bytes still held back (as U+FFFD when they never completed a character)."""
        return self._utf8.decode(b"", final=True)


@cache
def _cached_tiktoken_tokenizer(path: str, _mtime_ns: int) -> QwenTokenizer:
    ranks = load_tiktoken_ranks(Path(path))
    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    return QwenTokenizer(ranks, specials)
