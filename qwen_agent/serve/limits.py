"""What the server refuses before doing work: the limits an operator sets (``qwen-agent serve --max-body-mb
--max-prompt-tokens --request-timeout``) and the ASGI middleware that holds request bodies to their size.

:class:`BodyLimit` answers 413 before the application reads a byte of a body whose ``Content-Length`` is over the
limit, and, for a chunked body (no length given), counts the bytes as they arrive and answers 413 as soon as
they pass it: a slowly streamed 1 GB body costs the server the limit at most, never the gigabyte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .schema import APIError, error_body

__all__ = ["ServerLimits", "BodyLimit", "generation_budget"]


@dataclass(frozen=True)
class ServerLimits:
    """``max_body_bytes``: the largest request body (413 past it). ``max_prompt_tokens``: the longest prompt
    (None: what the context holds). ``request_timeout``: seconds a request may run before it is aborted (None:
    no limit)."""

    max_body_bytes: int = 32 * 1024 * 1024
    max_prompt_tokens: int | None = None
    request_timeout: float | None = None


def generation_budget(
    prompt: int,
    max_tokens: int | None,
    *,
    limits: ServerLimits,
    context: int,
    default: int,
    where: tuple[str, str],
) -> int:
    """The generation budget of a prompt of ``prompt`` tokens, or a 400 ``context_length_exceeded`` before any
    work when the prompt is over ``--max-prompt-tokens`` or the prompt plus ``max_tokens`` over the context (as
    OpenAI and vLLM answer; a prompt that fills the context alone the engine refuses). ``where`` names the
    prompt's field and the budget's (``messages``, ``max_completion_tokens``)."""
    param, field = where
    limit = limits.max_prompt_tokens
    if limit is not None and prompt > limit:
        raise APIError(
            400,
            f"'{param}': the prompt has {prompt} tokens; this server takes at most {limit} (--max-prompt-tokens)",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and prompt < context < prompt + max_tokens:
        raise APIError(
            400,
            f"'{field}': {max_tokens} tokens after a prompt of {prompt} exceed the model's context of "
            f"{context} tokens; ask for at most {context - prompt}",
            param=field,
            code="context_length_exceeded",
        )
    if max_tokens is not None:
        return max_tokens
    # Absent, vLLM's default is what the context leaves. The scheduler's cache rows all hold as many slots as its
    # longest request, within a budget of slots, so that default would decode such requests one at a time: until
    # a KV-block cache lands, the checkpoint's default stays, within what the context leaves.
    return max(1, min(default, context - prompt))


class _TooLarge(Exception):
    """Raised into the application by ``receive`` once the body passed the limit (the 413 is sent already)."""


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 ``request_too_large`` without being read."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, int(length))
            return
        received, responded, refused = 0, False, False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not responded:
                        await self._refuse(send, None)
                        refused = True
                    raise _TooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal responded
            if refused:  # the application answering the error it saw: the 413 went out already
                return
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send: Any, length: int | None) -> None:
        given = f"{length} bytes" if length is not None else "more"
        message = (
            f"the request body is too large: {given}, the limit is {self.max_bytes} bytes (--max-body-mb)"
        )
        body = json.dumps(error_body(message, "invalid_request_error", None, "request_too_large")).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
