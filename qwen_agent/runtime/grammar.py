"""Grammars as token constraints: llguidance compiles a Lark grammar (its dialect, where ``%json{...}`` embeds a
JSON Schema) against the model's vocabulary and fills each step's mask.

:class:`Grammar` is compiled once; :meth:`Grammar.constraint` gives each completion a fresh
:class:`~qwen_agent.runtime.constraint.TokenConstraint` over it. llguidance (the ``constrained`` extra) is imported
only when a grammar is built; without it, or for a grammar or schema it cannot compile, a
:class:`~qwen_agent.errors.ConfigError` says so before anything is decoded.
"""

from __future__ import annotations

import json
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .tokenizer import QwenTokenizer

if TYPE_CHECKING:
    from torch import Tensor

    from .constraint import TokenConstraint

__all__ = ["Grammar", "json_schema_grammar", "require_llguidance"]

# the separators Qwen writes ({"a": 1, "b": 2}), and no free whitespace a random or weak model could pad with
COMPACT_JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def require_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ConfigError(
            "constrained decoding needs the llguidance package: pip install 'qwen-react-agent[constrained]'"
        ) from None
    return llguidance


def json_schema_grammar(schema: Any, what: str = "json_schema") -> str:
    """The Lark grammar of JSON text matching ``schema`` (written compactly unless the schema's own
    ``x-guidance`` says otherwise)."""
    if not isinstance(schema, dict):
        raise ConfigError(f"{what} must be a JSON Schema object (a dict), got {type(schema).__name__}")
    own = schema.get("x-guidance", {})
    if not isinstance(own, dict):
        raise ConfigError(f"{what}: x-guidance must be an object, got {type(own).__name__}")
    schema = {**schema, "x-guidance": {**COMPACT_JSON, **own}}
    return f"start: %json{json.dumps(schema, ensure_ascii=False)}\n"


# one llguidance tokenizer per (tokenizer, vocabulary size): building it walks the whole vocabulary (~0.5 s)
_LL_TOKENIZERS: weakref.WeakKeyDictionary[QwenTokenizer, dict[int, Any]] = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: QwenTokenizer, vocab_size: int) -> Any:
    built = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in built:
        encoding = tokenizer.encoding
        built[vocab_size] = require_llguidance().LLTokenizer.from_tiktoken(
            encoder=encoding._mergeable_ranks,
            special_tokens=encoding._special_tokens,
            pattern=encoding._pat_str,
            eos_token=[tokenizer.im_end_id, tokenizer.eod_id],  # either ends the turn
            n_vocab=vocab_size,
        )
    return built[vocab_size]


class MatcherConstraint:
    """A :class:`~qwen_agent.runtime.constraint.TokenConstraint` over one llguidance matcher."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: Tensor) -> None:
        self._matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * bitmask.element_size())

    def accept(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token))


class Grammar:
    """A Lark grammar (llguidance's dialect) compiled for ``tokenizer``'s ids below ``vocab_size``; ``what`` names
    it in errors. The end-of-turn ids are allowed where the grammar may end."""

    def __init__(self, tokenizer: QwenTokenizer, vocab_size: int, lark: str, what: str = "grammar") -> None:
        if not isinstance(lark, str) or not lark.strip():
            raise ConfigError(f"{what} must be a non-empty Lark grammar string")
        llguidance = require_llguidance()
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), lark, log_level=0)
        if self._matcher.is_error():
            raise ConfigError(f"{what} does not compile: {self._matcher.get_error()}")

    @classmethod
    def from_json_schema(
        cls, tokenizer: QwenTokenizer, vocab_size: int, schema: Any, what: str = "json_schema"
    ) -> Grammar:
        """JSON text matching ``schema``."""
        return cls(tokenizer, vocab_size, json_schema_grammar(schema, what), what)

    def constraint(self) -> TokenConstraint:
        """A fresh constraint for one completion."""
        return MatcherConstraint(self._matcher.deep_copy())
