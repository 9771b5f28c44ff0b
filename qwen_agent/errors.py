"""One exception hierarchy for the whole package.

Every error the package raises on purpose derives from :class:`QwenAgentError`, so an application can catch
that one class. Each message names the problem and the place (file, line, field, tool, argument).

::

    QwenAgentError
    ├── ConfigError                 a bad argument or setting given by the caller
    ├── TokenizerError              bad text or ids handed to the tokenizer
    │   └── VocabError              a missing or corrupt vocabulary file
    ├── CheckpointError             a model directory that cannot be loaded
    ├── GenerationError             generation cannot proceed (e.g. the context is full)
    ├── ToolError                   tool declaration or tool lookup problems
    │   ├── ToolNotFoundError       no tool registered under that name
    │   └── ToolArgumentError       arguments that do not satisfy the tool's schema
    ├── InterpreterError            the code interpreter's kernel could not be started or used
    │   └── SandboxError            a required sandbox layer is unavailable on this platform
    ├── LLMError                    a language-model backend failed
    │   ├── LLMConnectionError      the server could not be reached
    │   ├── LLMAuthError            the server refused the credentials (401/403)
    │   ├── LLMTimeoutError         no answer within the deadline
    │   └── LLMProtocolError        the server answered something that is not the protocol
    └── BenchmarkError              a benchmark dataset or run file is malformed

Errors inside a tool call (bad arguments, a failing tool, a dead kernel) are *not* raised into the agent loop:
they become Observations the model can act on. These classes are for the API boundary.
"""

from __future__ import annotations

__all__ = [
    "QwenAgentError",
    "ConfigError",
    "TokenizerError",
    "VocabError",
    "CheckpointError",
    "GenerationError",
    "ToolError",
    "ToolNotFoundError",
    "ToolArgumentError",
    "InterpreterError",
    "SandboxError",
    "LLMError",
    "LLMConnectionError",
    "LLMAuthError",
    "LLMTimeoutError",
    "LLMProtocolError",
    "BenchmarkError",
]


class QwenAgentError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(QwenAgentError, ValueError):
    """A caller passed an argument or setting that cannot work; the message names it and the accepted values."""


class TokenizerError(QwenAgentError, ValueError):
    """Text or ids handed to the tokenizer are not acceptable (wrong type, unknown special token)."""


class VocabError(TokenizerError):
    """The vocabulary file is missing or corrupt; the message names the path and, for a bad line, its number."""


class CheckpointError(QwenAgentError):
    """A model directory cannot be loaded: missing or corrupt file, missing tensor, shape or config mismatch.

    The message names the file and, where there is one, the tensor. A model is never returned half loaded.
    """


class GenerationError(QwenAgentError):
    """Generation cannot proceed, for example because the prompt does not fit the context."""


class ToolError(QwenAgentError):
    """A tool is declared wrongly or cannot be found."""


class ToolNotFoundError(ToolError, KeyError):
    """No tool is registered under the requested name; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ToolArgumentError(ToolError, ValueError):
    """Arguments do not satisfy the tool's parameter schema; the message is short enough to show the model."""


class InterpreterError(QwenAgentError):
    """The code interpreter's kernel could not be started, or was used after it was closed."""


class SandboxError(InterpreterError):
    """A sandbox layer the caller required (``require_isolation=True``) is not available on this platform."""


class LLMError(QwenAgentError):
    """A language-model backend failed."""


class LLMConnectionError(LLMError):
    """The model server could not be reached (DNS, refused connection, reset)."""


class LLMAuthError(LLMError):
    """The model server refused the credentials (HTTP 401 or 403)."""


class LLMTimeoutError(LLMError):
    """The model server did not answer within the deadline."""


class LLMProtocolError(LLMError):
    """The model server answered with something that is not the expected protocol."""


class BenchmarkError(QwenAgentError):
    """A benchmark dataset or run file is malformed; the message names the file and line."""
