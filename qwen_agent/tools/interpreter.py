"""``CodeInterpreter``: untrusted Python on a sandboxed Jupyter kernel, with a host-side deadline on every call.

>>> with CodeInterpreter(timeout=10) as ci:           # doctest: +SKIP
...     ci.execute("x = 21")
...     print(ci.execute("print(x * 2)").stdout)
42

One kernel per interpreter, started when the interpreter is created and reused so variables persist. A call
returns within ``timeout + grace`` whatever the code does: on the deadline the kernel is interrupted; if it does
not come back within ``grace`` seconds it is killed and a fresh one is started. A kernel that dies (``os._exit``,
segfault, a resource limit) is restarted and the result says the state was lost.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, InterpreterError
from .kernel import KernelProcess
from .sandbox import SandboxConfig, SandboxLimits
from .workspace import (
    Workspace,
    private_temp_dir,
    remove_private_temp_dir,
    remove_stale_temp_dirs,
)

__all__ = ["CodeInterpreter", "ExecutionResult", "ExecutionError", "Executor"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SIGNALS = {6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 24: "SIGXCPU", 25: "SIGXFSZ"}


class Executor(Protocol):
    """What the agent needs from a code runner; CodeInterpreter is the Jupyter-backed one."""

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult: ...

    def close(self) -> None: ...


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str = ""


@dataclass
class ExecutionResult:
    """Everything one cell produced. ``images`` are the host's own copies of the PNG figures, in a directory the
    kernel cannot reach (a copy of each is also put in the workspace for the code)."""

    stdout: str = ""
    stderr: str = ""
    result: str = ""  # text/plain of the execute_result and of display_data without an image
    error: ExecutionError | None = None
    images: list[Path] = field(default_factory=list)
    duration: float = 0.0
    timed_out: bool = False
    truncated: bool = False
    restarted: bool = False  # the kernel was replaced during or before this call
    state_lost: bool = False  # variables from earlier calls are gone

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out

    def to_observation(self) -> str:
        """The Observation text, in the Qwen code-interpreter benchmark's format ("stdout:", "error:" blocks)."""
        blocks = [
            f"{kind}:\n\n```\n{text.rstrip()}\n```"
            for kind, text in (
                ("stdout", self.stdout),
                ("stderr", self.stderr),
                ("execute_result", self.result),
            )
            if text.strip()
        ]
        if self.error is not None:
            head = f"{self.error.name}: {self.error.value}".rstrip(": ")
            text = f"{self.error.traceback.rstrip()}\n{head}" if self.error.traceback.strip() else head
            blocks.append(f"error:\n\n```\n{text.strip()}\n```")
        blocks += [f"![fig-{i + 1:03d}]({path})" for i, path in enumerate(self.images)]
        if self.state_lost and self.error is None:
            blocks.insert(
                0, "Note: the kernel had stopped and was restarted; variables from earlier calls are gone."
            )
        return "\n\n".join(blocks) if blocks else "Finished execution."


class _CappedText:
    """Keeps the first and last ``limit // 2`` characters of a stream and counts what was dropped between."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = ""
        self.tail = ""
        self.elided = 0

    def add(self, text: str) -> None:
        if len(self.head) < self.head_limit:
            room = self.head_limit - len(self.head)
            self.head += text[:room]
            text = text[room:]
        if not text:
            return
        combined = self.tail + text
        overflow = len(combined) - self.tail_limit
        if overflow > 0:
            self.elided += overflow
            combined = combined[overflow:]
        self.tail = combined

    def render(self) -> str:
        if not self.elided:
            return self.head + self.tail
        return f"{self.head}\n...[{self.elided} characters elided]...\n{self.tail}"


class _Cell:
    """Collects the iopub messages of one execute request."""

    def __init__(self, interp: CodeInterpreter) -> None:
        self.interp = interp
        self.streams = {name: _CappedText(interp.max_output_chars) for name in ("stdout", "stderr", "result")}
        self.error: ExecutionError | None = None
        self.images: list[Path] = []
        self.idle = False
        self.replied_at = 0.0

    def handle(self, msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            self.streams["stdout" if content["name"] == "stdout" else "stderr"].add(content["text"])
        elif kind in ("execute_result", "display_data"):
            data = content.get("data", {})
            if "image/png" in data:
                self.images.append(self.interp._save_png(data["image/png"]))
            elif "text/plain" in data:
                self.streams["result"].add(data["text/plain"])
        elif kind == "error":
            tb = _ANSI.sub("", "\n".join(content.get("traceback", [])))
            lines = [ln for ln in tb.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
            if lines and lines[-1].startswith(content["ename"]):
                lines = lines[:-1]  # the last line repeats name: value
            tb = "\n".join(lines)
            limit = self.interp.max_output_chars // 2
            self.error = ExecutionError(
                content["ename"], content["evalue"], tb if len(tb) <= limit else "..." + tb[-limit:]
            )
        elif kind == "status" and content["execution_state"] == "idle":
            self.idle = True

    def result(self, start: float, **flags: Any) -> ExecutionResult:
        return ExecutionResult(
            stdout=self.streams["stdout"].render(),
            stderr=self.streams["stderr"].render(),
            result=self.streams["result"].render(),
            error=self.error,
            images=self.images,
            duration=time.monotonic() - start,
            truncated=any(s.elided for s in self.streams.values()),
            **flags,
        )


def _close_kernel(holder: dict[str, Any]) -> None:
    kernel = holder.pop("kernel", None)
    if kernel is not None:
        kernel.close()


def _release(holder: dict[str, Any], temp_workdir: Path | None, host_dir: Path) -> None:
    """Everything close() frees; also run at garbage collection and interpreter exit."""
    _close_kernel(holder)
    workspace = holder.pop("workspace", None)
    if workspace is not None:
        workspace.close()
    if temp_workdir is not None:
        remove_private_temp_dir(temp_workdir)
    remove_private_temp_dir(host_dir)


class CodeInterpreter:
    """A sandboxed, persistent Python kernel. See the module docstring; :meth:`sandbox_info` lists the layers.

    Args:
        workdir: the workspace (kernel cwd and HOME; figures are saved here). A private temporary directory,
            removed on close, when None.
        timeout: default per-call deadline in seconds.
        grace: seconds to wait after an interrupt before killing and restarting the kernel.
        max_output_chars: cap per output stream (head and tail kept, the middle elided with a count).
        limits: resource limits (address space, CPU seconds, processes, file size, open files).
        network: allow network access (otherwise a network namespace, where the platform allows it).
        sandbox_uid: uid to run the kernel as; "auto" picks an unprivileged one when the host is root.
        filesystem: confine the kernel's file access (Landlock): reads beneath the system, Python and
            ``read_paths`` roots, writes in the workspace only. Off when False or where Landlock is missing.
        read_paths: files or directories the kernel may read in place (read-only), e.g. a data directory.
        require_isolation: raise :class:`SandboxError` instead of running without the file-system layer, the
            namespaces, the private root or the seccomp filter.
        python: the kernel's Python interpreter (it needs ipykernel); its installation joins the read roots.
        env: extra environment variables for the kernel (the host's environment is never passed on).
        startup_timeout: how long a kernel may take to start.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        timeout: float = 30,
        *,
        grace: float = 1.0,
        max_output_chars: int = 8000,
        limits: SandboxLimits | None = None,
        network: bool = False,
        sandbox_uid: int | str | None = "auto",
        filesystem: bool = True,
        read_paths: Sequence[str | Path] = (),
        require_isolation: bool = False,
        python: str | Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 30,
    ) -> None:
        for label, value, low in (
            ("timeout", timeout, 0.0),
            ("grace", grace, 0.0),
            ("startup_timeout", startup_timeout, 0.0),
        ):
            if not value > low:
                raise ConfigError(
                    f"CodeInterpreter: {label} must be a positive number of seconds, got {value!r}"
                )
        if max_output_chars < 100:
            raise ConfigError(
                f"CodeInterpreter: max_output_chars must be at least 100, got {max_output_chars}"
            )
        self.timeout = timeout
        self.grace = grace
        self.max_output_chars = max_output_chars
        self.startup_timeout = startup_timeout
        self.config = SandboxConfig(
            limits=limits or SandboxLimits(),
            network=network,
            sandbox_uid=sandbox_uid,
            filesystem=filesystem,
            read_paths=tuple(read_paths),
            require_isolation=require_isolation,
            python=sys.executable if python is None else str(python),
            env=env,
        )
        remove_stale_temp_dirs()
        owns_workdir = workdir is None
        self.workdir = (private_temp_dir("work") if workdir is None else Path(workdir)).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # figures, downloads and kernel logs: host-owned, 0700, outside anything the kernel can reach
        self.host_dir = private_temp_dir("host")
        self._figures = 0
        self._closed = False
        self._lock = threading.RLock()  # one cell at a time; reset/close wait for a running cell
        self._export_lock = threading.Lock()
        self._holder: dict[str, Any] = {"workspace": Workspace(self.workdir)}
        # closes the kernel when the interpreter is garbage-collected or at interpreter exit
        self._finalizer = weakref.finalize(
            self, _release, self._holder, self.workdir if owns_workdir else None, self.host_dir
        )
        self._launch()

    # ---- kernel lifecycle -------------------------------------------------------------------------------
    def _launch(self) -> None:
        plan = self.config.plan()
        self.workspace.owner = plan.uid
        if plan.uid is not None:
            os.fchown(self.workspace.fd, plan.uid, plan.uid)
        self._plan = plan
        self._holder["kernel"] = KernelProcess(self.workdir, plan, self.config.env, self.host_dir)

    @property
    def workspace(self) -> Workspace:
        """The workspace as the host handles it: by directory descriptor, never following the kernel's links."""
        workspace = self._holder.get("workspace")
        if workspace is None:
            raise InterpreterError("this CodeInterpreter is closed")
        return workspace

    @property
    def _kernel(self) -> KernelProcess:
        if self._closed:
            raise InterpreterError("this CodeInterpreter is closed")
        return self._holder["kernel"]

    def _restart(self) -> None:
        if self._closed:
            raise InterpreterError("this CodeInterpreter is closed")
        _close_kernel(self._holder)
        self._launch()

    def reset(self) -> None:
        """Start a fresh kernel: all variables are gone; files in the workspace stay."""
        with self._lock:
            self._restart()
            self._kernel.wait_ready(self.startup_timeout)

    def interrupt(self) -> bool:
        """Interrupt the running cell from another thread: the code gets a KeyboardInterrupt, variables stay.
        Returns False, sending nothing, while the kernel is still starting (a signal then would be lost or
        kill it) or when the interpreter is closed; call again to stop a cell that has yet to start."""
        kernel = self._holder.get("kernel")
        if kernel is None or self._closed or not kernel.ready:
            return False
        kernel.interrupt()
        return True

    def close(self) -> None:
        """Kill the kernel and everything it started; remove the workspace if it was a temporary one."""
        with self._lock, self._export_lock:
            if self._closed:
                return
            self._closed = True
            self._finalizer()

    def __enter__(self) -> CodeInterpreter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        """Host pid of the kernel's launcher process (the process-group leader)."""
        return self._kernel.proc.pid

    def sandbox_info(self) -> dict[str, Any]:
        """Which sandbox layers are active for the current kernel, and why any are not (``notes``)."""
        return {**self._plan.info(self._kernel.write_roots), "workspace": str(self.workdir)}

    # ---- running code -----------------------------------------------------------------------------------
    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run ``code`` and return everything it produced; returns within ``timeout + grace`` (+ a kill)."""
        with self._lock:
            return self._execute(code, self.timeout if timeout is None else timeout)

    run = execute  # the Executor interface

    def _execute(self, code: str, timeout: float) -> ExecutionResult:
        start = time.monotonic()
        kernel = self._kernel
        restarted = False
        if kernel.exit_status() is not None:  # died since the last call (e.g. CPU limit)
            self._restart()
            kernel, restarted = self._kernel, True
        kernel.wait_ready(self.startup_timeout)
        cell = _Cell(self)
        msg_id = kernel.client.execute(code, store_history=True, allow_stdin=False, stop_on_error=False)
        deadline = time.monotonic() + timeout
        while not cell.idle:
            now = time.monotonic()
            if cell.replied_at and now - cell.replied_at > 1.0:
                break  # the reply came but the idle status never did (a flooded iopub can drop it)
            if now >= deadline:
                return self._on_timeout(cell, msg_id, start, timeout, restarted)
            if (
                not self._pump(kernel, cell, msg_id, min(0.1, deadline - now))
                and kernel.exit_status() is not None
            ):
                return self._on_death(cell, start)
        self._wait_reply(kernel, cell, msg_id)
        return cell.result(start, restarted=restarted, state_lost=restarted)

    @staticmethod
    def _pump(kernel: KernelProcess, cell: _Cell, msg_id: str, wait: float) -> bool:
        """Receive at most one message (waiting up to ``wait`` s) and file it; False when none came."""
        iopub, shell = kernel.poll(wait)
        if iopub is not None and iopub["parent_header"].get("msg_id") == msg_id:
            cell.handle(iopub)
        elif shell is not None and shell["parent_header"].get("msg_id") == msg_id:
            cell.replied_at = time.monotonic()
        return iopub is not None or shell is not None

    def _wait_reply(self, kernel: KernelProcess, cell: _Cell, msg_id: str) -> None:
        """Consume the shell reply so replies never pile up (it normally arrived before idle)."""
        end = time.monotonic() + 1.0
        while not cell.replied_at and time.monotonic() < end and kernel.exit_status() is None:
            self._pump(kernel, cell, msg_id, 0.05)

    def _on_timeout(
        self, cell: _Cell, msg_id: str, start: float, timeout: float, restarted: bool
    ) -> ExecutionResult:
        kernel = self._kernel
        kernel.interrupt()
        end = time.monotonic() + self.grace
        while not cell.idle and time.monotonic() < end and kernel.exit_status() is None:
            self._pump(kernel, cell, msg_id, 0.05)
        if cell.idle:
            self._wait_reply(kernel, cell, msg_id)
            message = (
                f"execution exceeded the {timeout:g} s time limit and was interrupted; variables are kept"
            )
        else:
            self._restart()  # the new kernel starts in the background; the next call waits for it
            restarted = True
            message = (
                f"execution exceeded the {timeout:g} s time limit and did not stop on interrupt; "
                "the kernel was restarted and all variables were lost"
            )
        cell.error = ExecutionError("TimeoutError", message)
        return cell.result(start, timed_out=True, restarted=restarted, state_lost=restarted)

    def _on_death(self, cell: _Cell, start: float) -> ExecutionResult:
        status = self._kernel.exit_status() or 0
        how = (
            f"was killed by {_SIGNALS.get(status - 128, f'signal {status - 128}')}"
            if status > 128
            else f"exited with status {status}"
        )
        self._restart()
        cell.error = ExecutionError(
            "KernelDied",
            f"the Python kernel {how} while running this code; it was restarted and all variables were lost",
        )
        return cell.result(start, restarted=True, state_lost=True)

    def _save_png(self, b64: str) -> Path:
        """Keep a figure in the host-only directory (what callers show or send on) and put a copy for the code
        in the workspace under a fresh name, never replacing or following a name the kernel made."""
        data = base64.b64decode(b64)
        self._figures += 1
        path = self.host_dir / f"fig-{self._figures:03d}.png"
        path.write_bytes(data)
        try:
            while not self.workspace.write_bytes(path.name, data, replace=False):
                self._figures += 1
                path = path.rename(self.host_dir / f"fig-{self._figures:03d}.png")
        except OSError:
            pass  # a full or vanished workspace: the host's copy is what counts
        return path

    def upload(self, source: str | Path | bytes, name: str | None = None) -> Path:
        """Copy a file (a host path, or bytes) into the workspace as ``name`` (default: the source's file name),
        replacing what the kernel may have put there, and return its path; code in the kernel opens it by name.
        To let the kernel read a large file or a directory in place instead, pass it in ``read_paths``."""
        if name is None:
            if isinstance(source, bytes):
                raise ConfigError("CodeInterpreter.upload: name is required when uploading bytes")
            name = Path(source).name
        if not name or name in (".", "..") or "/" in name or "\0" in name:
            raise ConfigError(f"CodeInterpreter.upload: name must be a plain file name, got {name!r}")
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise ConfigError(f"CodeInterpreter.upload: {str(source)!r} is not a file")
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        with self._lock:
            try:
                self.workspace.write_bytes(name, data)
            except OSError as exc:
                raise InterpreterError(
                    f"CodeInterpreter.upload: cannot write {name!r} into the workspace: {exc}"
                ) from exc
            return self.workdir / name

    def export_files(self) -> list[Path]:
        """Host-owned copies of the workspace's regular files (hidden names and links left out), in a directory
        the kernel cannot reach: what a UI may hand out, since the kernel can swap any workspace name."""
        with self._export_lock:  # not the cell lock: a UI lists files while a cell runs
            if self._closed:
                return []
            out = self.host_dir / "files"
            out.mkdir(mode=0o700, exist_ok=True)
            return self.workspace.export(out)

    def call(self, args: str | dict[str, Any]) -> str:
        """Run the code in ``args`` (``{"code": ...}``, a fenced block or raw code) and return the Observation."""
        from .base import extract_code

        code = args.get("code", "") if isinstance(args, dict) else extract_code(args)
        return self.execute(code).to_observation()
