"""The ChatML prompt exactly as Qwen-7B-Chat's ``make_context`` builds it.

The prompt is encoded piece by piece: role names and every message are encoded as plain text (no special
tokens parsed), and the control tokens ``<|im_start|>`` / ``<|im_end|>`` are inserted as ids. So no user, system
or history text can ever produce a control token. Piece-wise encoding also matters for fidelity: ``"\\nHello"``
encodes differently alone than after ``"user"`` in one string, and the model was trained on the piece-wise form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from ..errors import ConfigError
from .chatml import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM, IM_END, IM_START
from .tokenizer import QwenTokenizer

__all__ = [
    "DEFAULT_SYSTEM",
    "DEFAULT_MAX_WINDOW_SIZE",
    "make_context",
    "chatml_ids",
    "stop_ids",
    "History",
    "Conversation",
]

NEWLINE = 198  # "\n" between ChatML turns

History = Sequence[tuple[str, str]]
ChatFormat = Literal["chatml", "raw"]


def make_context(
    tokenizer: QwenTokenizer,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: ChatFormat = "chatml",
) -> tuple[str, list[int]]:
    """The prompt text and ids for ``query`` after ``history`` (a list of ``(query, response)`` turns).

    History is added newest first while ``system + turn + kept turns < max_window_size`` (the current query is
    not counted) and stops at the first turn that does not fit, so the oldest turns are the ones dropped.
    ``chat_format="raw"`` (base models) is just the query's tokens.
    """
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise ConfigError(f"chat_format must be 'chatml' or 'raw', got {chat_format!r}")

    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        text = f"{role}\n{content}"
        return text, tokenizer.encode(role) + [NEWLINE] + tokenizer.encode(content)

    system_text, system_ids = turn("system", system)
    system_tokens = im_start + system_ids + im_end

    kept_text, kept_tokens = "", []
    for old_query, old_response in reversed(list(history or ())):
        query_text, query_ids = turn("user", old_query)
        response_text, response_ids = turn("assistant", old_response)
        turn_tokens = [NEWLINE] + im_start + query_ids + im_end + [NEWLINE] + im_start + response_ids + im_end
        if len(system_tokens) + len(turn_tokens) + len(kept_tokens) >= max_window_size:
            break
        turn_text = f"\n{IM_START}{query_text}{IM_END}\n{IM_START}{response_text}{IM_END}"
        kept_text, kept_tokens = turn_text + kept_text, turn_tokens + kept_tokens

    query_text, query_ids = turn("user", query)
    ids = (
        system_tokens
        + kept_tokens
        + [NEWLINE]
        + im_start
        + query_ids
        + im_end
        + [NEWLINE]
        + im_start
        + tokenizer.encode("assistant")
        + [NEWLINE]
    )
    text = (
        f"{IM_START}{system_text}{IM_END}{kept_text}\n{IM_START}{query_text}{IM_END}\n{IM_START}assistant\n"
    )
    return text, ids


class Conversation(Protocol):
    """What :func:`chatml_ids` reads of a prompt (:class:`qwen_agent.llm_protocol.ChatPrompt` is one)."""

    @property
    def query(self) -> str: ...
    @property
    def history(self) -> History: ...
    @property
    def system(self) -> str: ...
    @property
    def assistant_prefix(self) -> str: ...


def chatml_ids(
    tokenizer: QwenTokenizer,
    prompt: Conversation,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: ChatFormat = "chatml",
) -> list[int]:
    """The ids of ``prompt``: :func:`make_context` of its turns, then the unfinished assistant turn
    (``assistant_prefix``) as plain text, so neither user text nor tool output can become a control token.
    A prompt a chat template rendered (``rendered``, :mod:`.chat_template`) is taken as it is rendered."""
    rendered = getattr(prompt, "rendered", None)
    if rendered is not None:  # only the template's own control tokens are controls
        return rendered.ids(tokenizer) + tokenizer.encode(prompt.assistant_prefix)
    _, ids = make_context(
        tokenizer, prompt.query, list(prompt.history), prompt.system, max_window_size, chat_format
    )
    return ids + tokenizer.encode(prompt.assistant_prefix)


def stop_ids(tokenizer: QwenTokenizer, chat_format: ChatFormat = "chatml") -> list[list[int]]:
    """Token sequences that end a reply: ``<|im_end|>`` and ``<|im_start|>`` for ChatML; ``Human:`` and
    ``<|endoftext|>`` for the raw (base-model) format."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "raw":
        return [tokenizer.encode("Human:"), [tokenizer.eod_id]]
    raise ConfigError(f"chat_format must be 'chatml' or 'raw', got {chat_format!r}")
