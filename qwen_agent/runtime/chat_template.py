"""A checkpoint's Jinja chat template, rendered exactly as transformers' ``apply_chat_template`` renders it, and
encoded so that only the template's own control tokens become control ids.

Rendering
---------
The template runs in jinja2's ``ImmutableSandboxedEnvironment`` with transformers' settings: ``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that is ``json.dumps`` with
``ensure_ascii=False`` and Python's default separators (``", "``, ``": "``; jinja's own escapes HTML), and the
globals ``raise_exception`` (a :class:`~qwen_agent.errors.ConfigError` here) and ``strftime_now`` beside jinja's
own. Messages and tools go in as plain data, a message's keys whose value is None dropped, as transformers does.
A Qwen2.5 template lists ``tools`` in the system turn, writes calls as ``<tool_call>`` JSON and results in a
``user`` turn of ``<tool_response>`` blocks; whatever a template writes, the text is its own.

Injection safety
----------------
transformers encodes the rendered text with every added token parsed, so a user who types ``<|im_start|>``
forges a turn. Here the template is rendered a second time with every string of the data (messages and tools)
defused: the first character of each control token inside them is replaced by a private-use character of the
same length. Both renderings have the same length, and a control token counts only where the defused one has it
too, i.e. where the template wrote it. (A template that branches on such a string, or changes its length, gives
renderings of different lengths; the defused text is then the prompt.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError

__all__ = ["ChatTemplate", "RenderedPrompt", "read_chat_template"]

_DEFUSE = "\ue000"  # private use: no template or model writes it


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt rendered by a chat template, as ``(text, is_control)`` pieces: a control piece is a control
    token the template itself wrote; text pieces never hold one that counts (see the module docstring)."""

    pieces: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)

    def ids(self, tokenizer: Any) -> list[int]:
        """Token ids: control pieces by the tokenizer's table, text pieces encoded as plain text (as a
        tokenizer that splits on added tokens first encodes the parts between them)."""
        ids: list[int] = []
        for text, control in self.pieces:
            ids += [tokenizer.special_tokens[text]] if control else tokenizer.encode(text)
        return ids


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False
):
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise ConfigError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the sandbox (str subclasses and tuples become str and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str.__str__(value)
    return value


def _messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    # templates test whether a key is present: a None value (OpenAI's content=None) counts as absent
    return [{k: v for k, v in _plain(m).items() if v is not None} for m in messages]


class ChatTemplate:
    """A compiled chat template. ``special_tokens`` are the tokenizer's added tokens: those the template writes
    are the prompt's control pieces. ``where`` names the template in errors."""

    def __init__(
        self, source: str, special_tokens: Collection[str] = (), where: str = "chat template"
    ) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{where}: the chat template is empty")
        self.source, self.where = source, where
        self.special_tokens = tuple(sorted(set(special_tokens), key=len, reverse=True))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        try:
            self._env = env
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"{where}: not a valid Jinja template ({exc})") from None
        self._specials_re = (
            re.compile("|".join(map(re.escape, self.special_tokens))) if self.special_tokens else None
        )

    @cached_property
    def handles_tools(self) -> bool:
        """Whether the template reads ``tools`` (a Qwen2.5-style template that writes a tool-call format)."""
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(self._env.parse(self.source))

    @classmethod
    def from_dir(cls, model_dir: str | Path, special_tokens: Collection[str] = ()) -> ChatTemplate | None:
        """The template of a model directory, or None when it has none."""
        found = read_chat_template(Path(model_dir))
        return None if found is None else cls(found[0], special_tokens, str(found[1]))

    def render_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        **options,
    ) -> str:
        """The text ``apply_chat_template(messages, tools=tools, tokenize=False, **options)`` gives."""
        import jinja2

        try:
            return self._template.render(messages=_messages(messages), tools=_plain(tools), **options)
        except ConfigError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{self.where}: rendering failed ({type(exc).__name__}: {exc})") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        **options: Any,
    ) -> RenderedPrompt:
        """The prompt for ``messages`` (OpenAI-style dicts; a call's ``arguments`` a dict, as templates dump it
        with ``tojson``) and ``tools`` (``{"type": "function", "function": {...}}`` dicts), as pieces."""
        options["add_generation_prompt"] = add_generation_prompt
        text = self.render_text(messages, tools, **options)
        if self._specials_re is None:
            return RenderedPrompt(((text, False),) if text else ())
        defused = self.render_text(self._defuse(messages), self._defuse(tools), **options)
        if len(defused) != len(text):
            text = defused  # the template branched on a defused string: its content stays defused
        pieces: list[tuple[str, bool]] = []
        start = 0
        for found in self._specials_re.finditer(text):
            if defused[found.start() : found.end()] != found.group():
                continue  # written by the data, not the template: plain text
            if found.start() > start:
                pieces.append((text[start : found.start()], False))
            pieces.append((found.group(), True))
            start = found.end()
        if start < len(text):
            pieces.append((text[start:], False))
        return RenderedPrompt(tuple(pieces))

    def _defuse(self, value: Any) -> Any:
        if isinstance(value, str):
            return (
                self._specials_re.sub(lambda m: _DEFUSE + m.group()[1:], value)
                if self._specials_re
                else value
            )
        if isinstance(value, Mapping):
            return {k: self._defuse(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._defuse(v) for v in value]
        return value


def read_chat_template(model_dir: Path) -> tuple[str, Path] | None:
    """``(template, file)`` from ``chat_template.jinja`` (current transformers) or ``tokenizer_config.json``'s
    ``chat_template`` (a string, or named templates of which ``tool_use`` wins, then ``default``); None when
    there is none."""
    jinja = model_dir / "chat_template.jinja"
    config = model_dir / "tokenizer_config.json"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), jinja
        if not config.is_file():
            return None
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{jinja if jinja.exists() else config}: not a readable file ({exc})") from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("tool_use") or named.get("default")
    return (template, config) if isinstance(template, str) and template.strip() else None
