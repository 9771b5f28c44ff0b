"""One sandboxed IPython kernel process and the ZMQ client that talks to it over Unix sockets.

The host never waits on the kernel without a deadline: every receive is a bounded poll, and the process is
checked between polls, so a dead kernel is noticed within a fraction of a second.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from ..errors import InterpreterError
from .sandbox import LAUNCHER, SandboxPlan, kernel_env
from .workspace import private_temp_dir, remove_private_temp_dir

__all__ = ["KernelProcess"]

# Run once the kernel is up: plain tracebacks (no colours, no IPython frames), PNG figures.
_INIT_CODE = "%xmode Plain\n%config InlineBackend.figure_formats = ['png']\n"
# The launcher asks for SIGKILL when its parent dies, and Linux takes the *thread* that forked it as the parent:
# a kernel started from a short-lived thread (a web server's worker) would be killed when that thread ends. So
# every launcher is forked from this one long-lived thread.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel-spawner")


class KernelProcess:
    """A running kernel: ``launch`` returns at once; ``wait_ready`` blocks until it answers."""

    def __init__(self, workdir: Path, plan: SandboxPlan, env: dict[str, str] | None, log_dir: Path) -> None:
        """``log_dir``: a directory only the host can reach; the kernel's output goes to a file there through an
        inherited descriptor, so reading it back never follows a name the kernel controls."""
        self.workdir = workdir
        self.plan = plan
        self.runtime = private_temp_dir("kernel")  # a short path: Unix socket names are capped at 107 bytes
        for sub in ("tmp", "mpl", "ipython", "jupyter"):
            (self.runtime / sub).mkdir()
        conn_file, self._conn = write_connection_file(
            str(self.runtime / "kernel.json"),
            transport="ipc",
            ip=str(self.runtime / "zmq"),
            key=secrets.token_hex(16).encode(),
            kernel_name="python3",
        )
        if plan.uid is not None:  # children first, never following a link: nothing runs as that uid here yet
            for path in [*self.runtime.iterdir(), self.runtime]:
                os.chown(path, plan.uid, plan.uid, follow_symlinks=False)
        argv = [
            plan.python,
            "-m",
            "ipykernel_launcher",
            "-f",
            conn_file,
            "--HistoryManager.enabled=False",
            "--IPKernelApp.quiet=True",
        ]
        self._log_path = log_dir / f"{self.runtime.name}.log"
        self._log = open(self._log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = _SPAWNER.submit(
            subprocess.Popen,
            [
                sys.executable,
                "-I",
                "-S",
                str(LAUNCHER),
                json.dumps(plan.launcher_config(argv, self.write_roots)),
            ],
            cwd=workdir,
            env=kernel_env(workdir, self.runtime, env, plan.python),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        ).result()
        self.client = BlockingKernelClient()
        self.client.load_connection_info(self._conn)
        self.client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self._poller = zmq.Poller()
        self._poller.register(self.client.iopub_channel.socket, zmq.POLLIN)
        self._poller.register(self.client.shell_channel.socket, zmq.POLLIN)
        self.ready = False

    @property
    def write_roots(self) -> list[str]:
        """Where the kernel may write: the workspace and its private runtime directory (sockets, temp, caches)."""
        return [str(self.workdir), str(self.runtime)]

    # ---- state ------------------------------------------------------------------------------------------
    def exit_status(self) -> int | None:
        """None while the kernel runs; otherwise its exit code (128+N when killed by signal N).

        The launcher is not reaped here (``WNOWAIT``) but in :meth:`kill`, after its process group is signalled:
        until it is reaped its pid, the group's id, cannot be given to another process."""
        if self.proc.returncode is not None:
            code = self.proc.returncode
        else:
            try:
                info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere
                return self.proc.poll()
            if info is None:
                return None
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return 128 - code if code < 0 else code

    def log_tail(self, limit: int = 600) -> str:
        try:
            return self._log_path.read_bytes()[-limit:].decode("utf-8", "replace").strip()
        except OSError:
            return ""

    # ---- messaging --------------------------------------------------------------------------------------
    def poll(self, timeout: float) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Wait up to ``timeout`` s for a message: returns ``(iopub_msg, shell_msg)``, either may be None."""
        events = dict(self._poller.poll(max(0, int(timeout * 1000))))
        iopub = shell = None
        if self.client.iopub_channel.socket in events:
            iopub = self.client.iopub_channel.get_msg(timeout=0)
        elif self.client.shell_channel.socket in events:
            shell = self.client.shell_channel.get_msg(timeout=0)
        return iopub, shell

    def wait_ready(self, timeout: float) -> None:
        """Block until the kernel answers a kernel_info request and its iopub stream reaches us."""
        if self.ready:
            return
        deadline = time.monotonic() + timeout
        msg_id = self.client.kernel_info()
        last_sent = time.monotonic()
        got_reply = got_iopub = False
        while not (got_reply and got_iopub):
            status = self.exit_status()
            if status is not None:
                raise InterpreterError(
                    f"the kernel exited during start-up (status {status}): {self.log_tail()}"
                )
            now = time.monotonic()
            if now > deadline:
                raise InterpreterError(f"the kernel did not start within {timeout:.0f} s: {self.log_tail()}")
            if not got_iopub and now - last_sent > 0.2:  # iopub may not be subscribed yet: ask again
                msg_id = self.client.kernel_info()
                last_sent = now
            iopub, shell = self.poll(0.05)
            got_reply |= shell is not None and shell["msg_type"] == "kernel_info_reply"
            got_iopub |= iopub is not None and iopub["parent_header"].get("msg_id") == msg_id
        self.ready = True
        self.run_silent(_INIT_CODE, deadline - time.monotonic())

    def run_silent(self, code: str, timeout: float) -> None:
        """Run set-up code and wait for its reply (no outputs are collected)."""
        msg_id = self.client.execute(code, silent=True, store_history=False, allow_stdin=False)
        deadline = time.monotonic() + max(timeout, 1.0)
        while time.monotonic() < deadline and self.exit_status() is None:
            _, shell = self.poll(0.05)
            if shell is not None and shell["parent_header"].get("msg_id") == msg_id:
                return
        raise InterpreterError(f"the kernel did not run its set-up code: {self.log_tail()}")

    # ---- signals ----------------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """SIGINT to the whole process group; the init and launcher ignore it, the kernel raises KeyboardInterrupt."""
        self._signal_group(signal.SIGINT)

    def kill(self) -> None:
        """Kill the process group (and through the pid namespace / cgroup everything the code started)."""
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.plan.release()

    def _signal_group(self, signum: int) -> None:
        # once the launcher is reaped its pid, the group's id, may be another process's: signal only before
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.kill()
        self.client.stop_channels()
        self._log.close()
        self._log_path.unlink(missing_ok=True)
        remove_private_temp_dir(self.runtime)
