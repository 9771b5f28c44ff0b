"""Tool registries, ``@register_tool`` for classes and ``@tool`` for plain functions.

A registry maps names to tool classes (or ready instances). ``registry.get(name)`` returns that registry's
instance, created on first use; ``registry.select(names)`` gives a new registry with fresh instances, so two
agents never share a tool's state (two code interpreters never share a kernel).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from ..errors import ToolError, ToolNotFoundError
from .base import BaseTool
from .schema import schema_from_function

__all__ = ["ToolRegistry", "default_registry", "register_tool", "tool", "FunctionTool"]

T = TypeVar("T", bound=type[BaseTool])


class ToolRegistry:
    """Tools by name: classes are instantiated on first :meth:`get`; instances are used as given."""

    def __init__(self, tools: Iterable[type[BaseTool] | BaseTool] = ()) -> None:
        self._entries: dict[str, type[BaseTool] | BaseTool] = {}
        self._instances: dict[str, BaseTool] = {}
        self._mcp_servers: list[Any] = []  # MCPServerConnection, closed with the registry
        for t in tools:
            self.register(t)

    def register(
        self, tool: type[BaseTool] | BaseTool, *, overwrite: bool = False
    ) -> type[BaseTool] | BaseTool:
        """Add a tool class or instance under its ``name``; a second tool of the same name needs ``overwrite``."""
        is_class = isinstance(tool, type) and issubclass(tool, BaseTool)
        if not is_class and not isinstance(tool, BaseTool):
            raise ToolError(f"only BaseTool subclasses or instances can be registered, got {tool!r}")
        name = tool.name
        if not name:
            raise ToolError(f"tool {tool!r} has no name")
        if name in self._entries and not overwrite and self._entries[name] is not tool:
            raise ToolError(
                f"a tool named {name!r} is already registered ({self._entries[name]!r}); "
                "pass overwrite=True to replace it"
            )
        self._entries[name] = tool
        self._instances.pop(name, None)
        if not is_class:
            self._instances[name] = tool  # type: ignore[assignment]
        return tool

    def unregister(self, name: str) -> None:
        self._lookup(name)
        del self._entries[name]
        self._instances.pop(name, None)

    def _lookup(self, name: str) -> type[BaseTool] | BaseTool:
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise ToolNotFoundError(f"no tool named {name!r}; available tools: {valid}") from None

    def get(self, name: str) -> BaseTool:
        """The instance registered under ``name``; raises ToolNotFoundError listing the valid names."""
        entry = self._lookup(name)
        if name not in self._instances:
            self._instances[name] = entry()  # type: ignore[operator]
        return self._instances[name]

    def select(self, names: Iterable[str] | None = None) -> ToolRegistry:
        """A new registry holding fresh instances of ``names`` (all tools when None), in that order."""
        chosen = self.names() if names is None else list(names)
        return ToolRegistry(self._lookup(n) for n in chosen)

    def names(self) -> list[str]:
        return list(self._entries)

    def tools(self) -> list[BaseTool]:
        """Every tool as an instance, in registration order."""
        return [self.get(n) for n in self._entries]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_mcp(
        cls,
        config: str | os.PathLike[str] | Mapping[str, Any],
        *,
        image_dir: str | os.PathLike[str] | None = None,
    ) -> ToolRegistry:
        """A registry of the tools of the MCP servers in an ``mcpServers`` config (see :meth:`add_mcp`)."""
        registry = cls()
        registry.add_mcp(config, image_dir=image_dir)
        return registry

    def add_mcp(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any],
        *,
        image_dir: str | os.PathLike[str] | None = None,
    ) -> list[str]:
        """Start the MCP servers of an ``mcpServers`` config (a JSON file or the parsed object) and register their
        tools; they stop when the registry is closed. A tool whose name is taken is registered as
        ``<server>_<tool>``: the returned lines say which were renamed. Images a tool returns are written into
        ``image_dir`` (a new temporary directory by default). If a server fails to start, the servers started
        by this call are stopped, their tools removed, and ToolError names the server."""
        from .mcp import MCPServerConnection, MCPTool, read_mcp_config, tool_name

        servers = read_mcp_config(config)
        images = (
            Path(image_dir) if image_dir is not None else Path(tempfile.mkdtemp(prefix="qwen-agent-mcp-"))
        )
        started: list[MCPServerConnection] = []
        added: list[str] = []
        renamed: list[str] = []
        try:
            for server in servers:
                connection = MCPServerConnection(server)
                started.append(connection)
                for spec in connection.start():
                    name = tool_name(server.name, spec.name, set(self._entries))
                    if name != spec.name:
                        renamed.append(
                            f"MCP server {server.name!r}: tool {spec.name!r} registered as {name!r}"
                        )
                    self.register(MCPTool(connection, spec, name=name, image_dir=images))
                    added.append(name)
        except BaseException:
            for name in added:
                self.unregister(name)
            for connection in started:
                connection.close()
            raise
        self._mcp_servers += started
        return renamed

    def close(self) -> None:
        """Close every instantiated tool that holds resources (a code interpreter's kernel) and stop the MCP
        servers this registry started."""
        for inst in self._instances.values():
            close = getattr(inst, "close", None)
            if callable(close):
                close()
        servers, self._mcp_servers = self._mcp_servers, []
        for server in servers:
            server.close()

    def __repr__(self) -> str:
        return f"ToolRegistry({self.names()})"


class _DefaultRegistry(ToolRegistry):
    """The global registry; the built-in tools are registered the first time it is used."""

    _loaded = False

    def _lookup(self, name: str) -> Any:
        self._load_builtins()
        return super()._lookup(name)

    def names(self) -> list[str]:
        self._load_builtins()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return super().__contains__(name)

    def __iter__(self) -> Iterator[str]:
        self._load_builtins()
        return super().__iter__()

    def __len__(self) -> int:
        self._load_builtins()
        return super().__len__()

    def _load_builtins(self) -> None:
        if not self._loaded:
            self._loaded = True
            from .builtin import BUILTIN_TOOLS

            for cls in BUILTIN_TOOLS:
                self.register(cls)


default_registry: ToolRegistry = _DefaultRegistry()


@overload
def register_tool(cls: T, /) -> T: ...
@overload
def register_tool(*, registry: ToolRegistry | None = None, overwrite: bool = False) -> Callable[[T], T]: ...


def register_tool(
    cls: Any = None, /, *, registry: ToolRegistry | None = None, overwrite: bool = False
) -> Any:
    """Class decorator: register a BaseTool subclass (in the default registry unless ``registry`` is given)."""

    def decorate(c: T) -> T:
        (registry if registry is not None else default_registry).register(c, overwrite=overwrite)
        return c

    return decorate(cls) if cls is not None else decorate


class FunctionTool(BaseTool):
    """A tool made from a plain function by :func:`tool`; the schema comes from its type hints and docstring.

    An ``async def`` function is awaited on the agent's loop by ``Agent.arun``; the sync ``Agent.run`` runs it to
    completion on an event loop of its own. A plain function runs on a worker thread under ``Agent.arun``."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        name: str,
        name_for_human: str,
        description: str,
        parameters: dict[str, Any],
        args_format: Literal["json", "code"],
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.name_for_human = name_for_human  # type: ignore[misc]
        self.description = description  # type: ignore[misc]
        self.parameters = parameters  # type: ignore[misc]
        self.args_format = args_format  # type: ignore[misc]
        self.func = func
        super().__init__()

    def call(self, arguments: dict[str, Any]) -> str:
        if inspect.iscoroutinefunction(self.func):
            return str(_run_to_completion(self.func(**arguments)))
        return str(self.func(**arguments))

    async def _arun(self, arguments: dict[str, Any]) -> tuple[str, Any]:
        if inspect.iscoroutinefunction(self.func):
            return str(await self.func(**arguments)), None
        return await super()._arun(arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


def _run_to_completion(coroutine: Any) -> Any:
    """Await ``coroutine`` from sync code: on a new event loop, or on a new thread's when this one runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    name_for_human: str | None = None,
    description: str | None = None,
    args_format: Literal["json", "code"] = "json",
    registry: ToolRegistry | None = None,
    register: bool = True,
) -> Any:
    """Function decorator: make a :class:`FunctionTool` (and register it unless ``register=False``).

    The description is the docstring's first part; each parameter's description comes from its ``Args:``
    (or ``:param x:``) entry; parameters without a default are required.
    """

    def decorate(f: Callable[..., Any]) -> FunctionTool:
        doc_description, parameters = schema_from_function(f)
        t = FunctionTool(
            f,
            name=name or f.__name__,
            name_for_human=name_for_human or name or f.__name__,
            description=description if description is not None else doc_description,
            parameters=parameters,
            args_format=args_format,
        )
        if register:
            (registry if registry is not None else default_registry).register(t)
        return t

    return decorate(func) if func is not None else decorate
