"""The Qwen tokenizer: byte-level BPE through tiktoken, exactly as Qwen-7B-Chat's ``tokenization_qwen.py``.

Two vocabulary forms load into the same tokenizer:

* ``qwen.tiktoken`` (Qwen v1): one ``<base64 token bytes> <rank>`` line per token; the rank is the id.
* ``vocab.json`` (+ ``merges.txt``) with the added tokens in ``tokenizer_config.json`` (Qwen1.5 / Qwen2 /
  Qwen2.5): the same byte-level BPE, written with GPT-2's byte-to-unicode alphabet; ids serve as ranks.
* ``tokenizer.json`` alone (what ``save_pretrained`` of current transformers writes for Qwen2-family models): the
  same vocabulary, merges and added tokens in the ``tokenizers`` library's one-file form.

Ids serve as ranks, which is exact only when the merge rules are in rank order; merges that are not (a
tokenizer tiktoken cannot reproduce) are refused with :class:`~qwen_agent.errors.VocabError`.

Encoding is injection-safe by default: the surface form of a control token (``<|im_start|>``) inside text
becomes ordinary tokens unless the caller opts in with ``allowed_special``. Text with a very long run of
whitespace (which overflows the backtracking stack of tiktoken's regex engine) is split into the same pieces by
the ``regex`` package, and the long pieces are byte-pair encoded one by one: the ids are those tiktoken gives.
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
from typing import Any, Literal

import regex
import tiktoken

from ..errors import TokenizerError, VocabError
from .chatml import ENDOFTEXT, IM_END, IM_START

__all__ = ["QwenTokenizer", "IncrementalDecoder", "PAT_STR", "ENDOFTEXT", "IM_START", "IM_END"]

# The pre-tokenizer of every Qwen generation: cl100k-like, but digits are split one by one.
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen v1's special tokens follow the 151,643 ranks: endoftext, im_start, im_end, then 205 reserved extras.
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))

VOCAB_FILE = "qwen.tiktoken"
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"
HF_TOKENIZER_FILE = "tokenizer.json"

# Whitespace runs at least this long are pieced out in Python: tiktoken's regex engine overflows its backtracking
# stack somewhere between 500,000 and 1,000,000 whitespace characters (a Rust panic, not an exception).
LONG_WHITESPACE = 100_000
# `regex` reads \s as Unicode's White_Space, as tiktoken's engine does (Python's `re` adds U+001C..U+001F)
_LONG_WHITESPACE_RE = regex.compile(rf"\s{{{LONG_WHITESPACE},}}")
_WHITESPACE_RE = regex.compile(r"\s+")

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


def _bpe_ranks(pieces: dict[Any, Any], where: Path) -> dict[bytes, int]:
    """Token bytes -> id from a byte-level BPE vocabulary spelled in GPT-2's byte-to-unicode alphabet."""
    alphabet = unicode_to_byte()
    ranks: dict[bytes, int] = {}
    for piece, rank in pieces.items():
        try:
            if isinstance(rank, bool):
                raise TypeError
            ranks[bytes(alphabet[ch] for ch in piece)] = int(rank)
        except (KeyError, TypeError, ValueError):
            raise VocabError(f"{where}: entry {piece!r}: {rank!r} is not a byte-level BPE token") from None
    return ranks


def check_merges_follow_ranks(merges: Iterable[Any], ranks: dict[bytes, int], where: Path) -> None:
    """Raise VocabError unless each merge rule makes a token of the vocabulary ranked above the ones before.

    Ranks stand for merge priority in tiktoken, so this is the condition for ids equal to the merge rules'.
    """
    alphabet = unicode_to_byte()
    previous = -1
    for number, rule in enumerate(merges, start=1):
        parts = rule.split(" ") if isinstance(rule, str) else rule
        try:
            if not isinstance(parts, list) or len(parts) != 2:
                raise TypeError
            merged = bytes(alphabet[ch] for ch in parts[0] + parts[1])
        except (KeyError, TypeError):
            raise VocabError(
                f"{where}: merge rule {number} ({rule!r}) is not a pair of byte-level tokens"
            ) from None
        rank = ranks.get(merged)
        if rank is None:
            raise VocabError(
                f"{where}: merge rule {number} ({rule!r}) makes a token that is not in the vocabulary"
            )
        if rank <= previous:
            raise VocabError(
                f"{where}: merge rule {number} ({rule!r}) makes id {rank}, not above the id {previous} of the "
                f"rule before: merges out of id order cannot be encoded exactly by this tokenizer"
            )
        previous = rank


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VocabError(f"cannot read {path}: {exc}") from None


def _qwen_specials(
    specials: dict[str, int], ranks: dict[bytes, int], where: Path
) -> tuple[dict[bytes, int], dict[str, int]]:
    """The BPE ranks and the added tokens, which must include ChatML's (Qwen's three after the vocabulary when
    none are listed). An added token the vocabulary lists too (some conversions, e.g. from GGUF, write every id
    into it) is a control token only: it leaves the ranks, so byte-pair merges never produce it."""
    if not specials:
        return ranks, {tok: len(ranks) + i for i, tok in enumerate((ENDOFTEXT, IM_START, IM_END))}
    missing = [tok for tok in (ENDOFTEXT, IM_START, IM_END) if tok not in specials]
    if missing:
        raise VocabError(f"{where}: the added tokens have no {missing[0]} (a Qwen chat vocabulary needs it)")
    added = set(specials.values())
    return {piece: rank for piece, rank in ranks.items() if rank not in added}, specials


def load_hf_vocab(directory: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read ``vocab.json``, ``merges.txt`` and the added tokens of ``tokenizer_config.json`` (the Qwen2 form)."""
    vocab_path = directory / HF_VOCAB_FILE
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict):
        raise VocabError(f"{vocab_path}: expected a JSON object mapping token to id")
    ranks = _bpe_ranks(vocab, vocab_path)
    merges_path = directory / HF_MERGES_FILE
    if merges_path.is_file():
        try:
            lines = merges_path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise VocabError(f"cannot read {merges_path}: {exc}") from None
        check_merges_follow_ranks(
            (ln for ln in lines if ln and not ln.startswith("#version")), ranks, merges_path
        )
    config_path = directory / "tokenizer_config.json"
    specials: dict[str, int] = {}
    if config_path.is_file():
        try:
            added = _read_json(config_path).get("added_tokens_decoder", {})
            specials = {entry["content"]: int(idx) for idx, entry in added.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VocabError(f"{config_path}: malformed added_tokens_decoder ({exc})") from None
    return _qwen_specials(specials, ranks, config_path)


def load_tokenizer_json(path: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read the vocabulary, merges and added tokens of a ``tokenizer.json`` holding a byte-level BPE model."""
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if (
        not isinstance(model, dict)
        or model.get("type", "BPE") != "BPE"
        or not isinstance(model.get("vocab"), dict)
    ):
        raise VocabError(
            f"{path}: expected a byte-level BPE model ('model': {{'type': 'BPE', 'vocab': ...}})"
        )
    ranks = _bpe_ranks(model["vocab"], path)
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise VocabError(f"{path}: model.merges must be a list of merge rules")
    check_merges_follow_ranks(merges, ranks, path)
    try:
        specials = {entry["content"]: int(entry["id"]) for entry in data.get("added_tokens", [])}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise VocabError(f"{path}: malformed added_tokens (each needs 'id' and 'content')") from None
    return _qwen_specials(specials, ranks, path)


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
        self._size = (
            max(*mergeable_ranks.values(), *special_tokens.values(), -1) + 1
        )  # ranks may skip added ids
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
                    "no vocabulary given and none found: pass a model directory (with qwen.tiktoken, vocab.json "
                    "or tokenizer.json) "
                    "or a qwen.tiktoken file, or install the 'dashscope' package, which ships qwen.tiktoken"
                )
            return cls._from_tiktoken_file(found)
        path = Path(path)
        if path.is_dir():
            if (path / VOCAB_FILE).is_file():
                return cls._from_tiktoken_file(path / VOCAB_FILE)
            if (path / HF_VOCAB_FILE).is_file():
                return cls(*load_hf_vocab(path))
            if (path / HF_TOKENIZER_FILE).is_file():
                return cls(*load_tokenizer_json(path / HF_TOKENIZER_FILE))
            raise VocabError(
                f"{path}: the directory has none of {VOCAB_FILE}, {HF_VOCAB_FILE}, {HF_TOKENIZER_FILE}"
            )
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
        try:
            return self._encode(text, allowed)
        except BaseException as exc:  # pyo3's PanicException derives from BaseException, not Exception
            if type(exc).__name__ != "PanicException":
                raise
            raise TokenizerError(
                f"tiktoken failed on a text of {len(text)} characters ({str(exc)[:200]})"
            ) from None

    def _encode(self, text: str, allowed: Collection[str]) -> list[int]:
        if not allowed:
            return self._encode_ordinary(text)
        if not _has_long_whitespace(text):
            return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        # as tiktoken does: control tokens cut the text, and the parts between are encoded on their own
        ids: list[int] = []
        start = 0
        for found in regex.finditer("|".join(map(regex.escape, allowed)), text):
            ids += self._encode_ordinary(text[start : found.start()])
            ids.append(self.special_tokens[found.group()])
            start = found.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text: str) -> list[int]:
        if not _has_long_whitespace(text):
            return self._encoding.encode_ordinary(text)
        # The regex pieces are found by the `regex` package, which has no stack limit. Each long whitespace piece
        # is byte-pair encoded alone; the text between is handed to tiktoken, which splits it the same way: it
        # starts where a piece starts, and ends before whitespace, where the pattern's only lookahead, (?!\S),
        # holds just as it does at the end of a text.
        ids: list[int] = []
        start = 0
        for piece in _pieces_re().finditer(text):
            begin, end = piece.span()
            if end - begin >= LONG_WHITESPACE and _WHITESPACE_RE.fullmatch(piece.group()):
                ids += self._encoding.encode_ordinary(text[start:begin])
                ids += self._encoding._encode_single_piece(piece.group())
                start = end
        return ids + self._encoding.encode_ordinary(text[start:])

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


def _has_long_whitespace(text: str) -> bool:
    return len(text) >= LONG_WHITESPACE and _LONG_WHITESPACE_RE.search(text) is not None


@cache
def _pieces_re() -> regex.Pattern[str]:
    return regex.compile(PAT_STR)


@cache
def _cached_tiktoken_tokenizer(path: str, _mtime_ns: int) -> QwenTokenizer:
    ranks = load_tiktoken_ranks(Path(path))
    specials = {tok: len(ranks) + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
    return QwenTokenizer(ranks, specials)
