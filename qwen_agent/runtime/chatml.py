"""ChatML's fixed strings and defaults, with no dependencies, so modules that only name them (the LLM protocol,
prompt renderers) do not load the tokenizer. :mod:`.chat_format` builds the token ids."""

from __future__ import annotations

__all__ = ["ENDOFTEXT", "IM_START", "IM_END", "DEFAULT_SYSTEM", "DEFAULT_MAX_WINDOW_SIZE"]

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
# make_context's own default; checkpoints override it through generation_config.max_window_size.
DEFAULT_MAX_WINDOW_SIZE = 6144
