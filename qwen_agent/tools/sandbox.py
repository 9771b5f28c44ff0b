"""The sandbox layers around a kernel process: what this platform allows, and how to launch inside them.

Layers, each reported by :meth:`SandboxPlan.info`:

- own session/process group, killed as a whole; parent-death signal so the kernel dies with the host;
- pid + mount namespace (``unshare --pid --fork --kill-child --mount-proc``): the kernel sees only its own
  processes, daemons it starts die with it, and the host's ``/proc/<pid>/environ`` is out of sight;
- network namespace (``unshare --net``): only a down loopback, so no egress at all (ZMQ uses Unix sockets);
- a pids cgroup capping the number of processes (a fork bomb stops there), or RLIMIT_NPROC where it counts;
- resource limits: address space, CPU seconds, file size, open files, no core dumps;
- a separate unprivileged uid when the host runs as root and the Python installation is readable by it, or can
  be shown to it: a read root below a directory other uids cannot search (``/root``, mode 0700) is bind-mounted
  back in place under a world-searchable tmpfs, in the kernel's mount namespace only (the host is not changed);
- a scrubbed environment: only PATH, HOME, LANG and the kernel's own settings, never the host's secrets;
- no capabilities and ``no_new_privs``, always: root in the kernel keeps uid 0 but cannot load modules, mount, or
  override file permissions; ``/proc/sys`` read-only in any namespace the kernel has;
- IPC, UTS and (where the kernel has them) cgroup namespaces: no host SysV IPC by key, no renaming the host;
- a private root (``_launcher.enter_new_root``): only the read roots, the workspace and runtime dir, ``/proc``, a
  minimal ``/dev`` and an empty ``/tmp`` are in the kernel's view; other kernels and host sockets are not;
- a seccomp filter (``_seccomp``): keyring, ptrace, userfaultfd, mounts, namespaces, TIOCSTI and more refused;
- the file system (Landlock): reads only beneath the system, Python and granted roots, writes only in the
  workspace and the kernel's private directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SandboxError
from . import _landlock, _seccomp

__all__ = [
    "SandboxConfig",
    "SandboxLimits",
    "SandboxPlan",
    "plan_sandbox",
    "plan_filesystem",
    "python_installation",
    "kernel_env",
]

NOBODY_UID = 65534
# What the kernel reads besides its Python installation. Running CPython, numpy, pandas and matplotlib with only
# /usr, /lib* and the installation granted, the denials were TLS certificates, user and group names and
# fontconfig's configuration; the other /etc entries, /proc and the CPU topology are read when present (loader
# cache, time zone, name service, thread-pool sizing).
SYSTEM_READ_ROOTS = (
    "/usr",
    "/lib",
    "/lib32",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/fonts",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/mime.types",
    "/proc",
    "/sys/devices/system/cpu",
)
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
LAUNCHER = Path(__file__).with_name("_launcher.py")
_PIDS_V1 = Path("/sys/fs/cgroup/pids")
_CGROUP_PREFIX = "qwen-agent-"  # + host pid + random suffix


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one kernel; ``None`` leaves a limit as inherited."""

    memory_bytes: int | None = 4 << 30  # RLIMIT_AS: address space, not resident memory
    cpu_seconds: int | None = 600  # RLIMIT_CPU over the kernel's lifetime (a restart resets it)
    max_processes: int | None = 64  # pids cgroup or RLIMIT_NPROC
    max_file_bytes: int | None = 256 << 20  # RLIMIT_FSIZE: writing past it fails with EFBIG
    max_open_files: int | None = 1024  # RLIMIT_NOFILE

    def rlimits(self) -> dict[str, Any]:
        out: dict[str, Any] = {"core": 0}
        for key, value in (
            ("as", self.memory_bytes),
            ("fsize", self.max_file_bytes),
            ("nofile", self.max_open_files),
        ):
            if value is not None:
                out[key] = value
        if self.cpu_seconds is not None:
            out["cpu"] = [self.cpu_seconds, self.cpu_seconds + 5]  # SIGXCPU first, SIGKILL 5 s later
        return out


@functools.lru_cache(maxsize=4)
def _probe_unshare(isolate_network: bool) -> tuple[tuple[str, ...], str]:
    """The unshare command prefix that works here, or ``()`` and the reason none does."""
    exe = shutil.which("unshare")
    if exe is None:
        return (), "unshare(1) is not installed"
    flags = [exe]
    if os.geteuid() != 0:
        flags += ["--user", "--map-root-user"]
    flags += ["--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--uts"]
    if isolate_network:
        flags.append("--net")
    reason = ""
    for extra in (["--cgroup"], []):  # a cgroup namespace where the kernel has them
        try:
            probe = subprocess.run([*flags, *extra, "true"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return (), f"unshare failed: {exc}"
        if probe.returncode == 0:
            return tuple(flags + extra), ""
        reason = reason or probe.stderr.strip()[:200]
    return (), f"namespaces not permitted here: {reason}"


@functools.lru_cache(maxsize=8)
def _probe_read_only_mounts(unshare: tuple[str, ...], show: tuple[tuple[str, str, bool], ...] = ()) -> str:
    """Why the launcher cannot make the mounts of a new namespace read-only here, after showing the ``show``
    entries (see ``_launcher.show_hidden_paths``) when given ("" when it can)."""
    return _launcher_probe(unshare, "--probe-mounts", show)


@functools.lru_cache(maxsize=8)
def _probe_new_root(unshare: tuple[str, ...], read_roots: tuple[str, ...]) -> str:
    """Why the launcher cannot build a kernel root of only ``read_roots`` here ("" when it can)."""
    spec = {"read": list(read_roots), "write": [], "devices": list(DEVICES), "cwd": "/"}
    return _launcher_probe(unshare, "--probe-root", spec)


def _launcher_probe(unshare: tuple[str, ...], flag: str, payload: object) -> str:
    """Run the launcher's ``flag`` probe with ``payload`` in the namespaces of ``unshare``: why it failed, or ""."""
    try:
        probe = subprocess.run(
            [*unshare, sys.executable, "-I", "-S", str(LAUNCHER), flag, json.dumps(payload)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if probe.returncode == 0 else probe.stderr.strip()[-200:] or f"status {probe.returncode}"


def _open_to_others(path: str) -> bool:
    """Whether another uid may read ``path`` itself (and list it, for a directory), its parents aside."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    need = stat.S_IROTH | stat.S_IXOTH if stat.S_ISDIR(mode) else stat.S_IROTH
    return mode & need == need


def _hidden_ancestor(path: str) -> str | None:
    """The outermost directory above ``path`` that other uids cannot search (e.g. ``/root``, mode 0700), if any."""
    for parent in reversed(Path(path).parents):
        try:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return str(parent)
        except OSError:
            return None
    return None


def _readable_by_others(path: str) -> bool:
    """Whether a process of another uid can reach and read ``path``."""
    real = os.path.realpath(path)
    return _hidden_ancestor(real) is None and _open_to_others(real)


def _hidden_paths(paths: list[str]) -> list[tuple[str, str]]:
    """``(hidden ancestor, path)`` for each path below a directory other uids cannot search, outermost first."""
    found = [(_hidden_ancestor(p), p) for p in sorted(paths, key=len)]
    return [(top, p) for top, p in found if top is not None]


def _uid_task_count(uid: int) -> int:
    """The threads of every process of ``uid``: what RLIMIT_NPROC counts (a dying kernel's threads included)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    count += len(os.listdir(f"{entry.path}/task"))
            except OSError:
                pass
    return count


def _create_pids_cgroup(limit: int) -> tuple[Path | None, str]:
    """A fresh pids cgroup (v1 hierarchy, or v2 under our own cgroup) with ``pids.max = limit``."""
    candidates = [_PIDS_V1]
    try:
        v2 = [
            ln[3:].strip()
            for ln in Path("/proc/self/cgroup").read_text().splitlines()
            if ln.startswith("0::")
        ]
        if v2 and "pids" in Path("/sys/fs/cgroup/cgroup.controllers").read_text():
            candidates.append(Path("/sys/fs/cgroup") / v2[0].lstrip("/"))
    except OSError:
        pass
    reason = "no writable pids cgroup hierarchy"
    for base in candidates:
        if not (base / "cgroup.procs").exists():
            continue
        _remove_stale_cgroups(base)
        path = base / f"{_CGROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(limit))
            return path, ""
        except OSError as exc:
            reason = f"cannot create a pids cgroup under {base}: {exc.strerror}"
            if path.exists():
                path.rmdir()
    return None, reason


def _remove_stale_cgroups(base: Path) -> None:
    """Remove the empty cgroups of hosts that died without cleaning up (SIGKILL); rmdir fails on busy ones."""
    for path in base.glob(f"{_CGROUP_PREFIX}*-*"):
        owner = path.name[len(_CGROUP_PREFIX) :].split("-")[0]
        if not owner.isdigit():
            continue
        try:
            os.kill(int(owner), 0)
        except ProcessLookupError:
            try:
                path.rmdir()
            except OSError:
                pass
        except PermissionError:
            pass


def kill_cgroup(path: Path) -> None:
    """SIGKILL every process in the cgroup (escaped daemons included) and remove it."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.02)


@dataclass
class SandboxPlan:
    """How one kernel is launched: the wrapper command, uid, cgroup and limits, and what is (not) active."""

    python: str  # the kernel's interpreter
    unshare: tuple[str, ...]
    isolate_network: bool
    uid: int | None
    cgroup: Path | None
    limits: SandboxLimits
    rlimits: dict[str, Any]
    nproc_effective: bool
    read_roots: list[str] | None  # None: the file-system layer is off
    landlock_abi: int
    read_only_mounts: bool
    notes: list[str] = field(default_factory=list)
    new_root: bool = (
        False  # the kernel's root holds only the read and write roots (see _launcher.enter_new_root)
    )
    seccomp: bool = False
    # the launcher shows the uid the roots below directories it cannot search (see _launcher.show_hidden_paths)
    show_hidden: bool = False

    def launcher_config(self, argv: list[str], write_roots: list[str]) -> dict[str, Any]:
        landlock = None
        if self.read_roots is not None:
            landlock = {"read": self.read_roots, "write": write_roots, "devices": list(DEVICES)}
        return {
            "stage": "outer",
            "parent": os.getpid(),
            "unshare": list(self.unshare),
            "cgroup_procs": str(self.cgroup / "cgroup.procs") if self.cgroup else None,
            "uid": self.uid,
            "gid": self.uid,
            "limits": self.rlimits,
            "drop_capabilities": True,
            "landlock": landlock,
            "read_only_mounts": write_roots if self.read_only_mounts else None,
            "show_hidden": self._hidden(write_roots),
            "new_root": {
                "read": self.read_roots,
                "write": write_roots,
                "devices": list(DEVICES),
                "cwd": write_roots[0],
            }
            if self.new_root
            else None,
            "proc_sys_read_only": bool(self.unshare),
            "no_new_privs": True,
            "seccomp": self.seccomp,
            "argv": argv,
        }

    def _hidden(self, write_roots: list[str]) -> list[tuple[str, str, bool]]:
        """``(hidden ancestor, path, read-only)`` for the roots the launcher must show to the sandbox uid."""
        if not self.show_hidden or self.new_root:  # a new root's own directories are searchable by any uid
            return []
        writable = set(write_roots)
        return [
            (top, p, p not in writable) for top, p in _hidden_paths([*(self.read_roots or []), *write_roots])
        ]

    def info(self, write_roots: list[str]) -> dict[str, Any]:
        active = self.read_roots is not None
        filesystem = {
            "active": active,
            "mechanism": f"landlock ABI {self.landlock_abi}" if active else None,
            "read_roots": list(self.read_roots or []),
            "write_roots": write_roots if active else [],
            "devices": list(DEVICES) if active else [],
            "read_only_mounts": self.read_only_mounts,
        }
        return {
            "process_group": True,
            "parent_death_signal": True,
            "pid_namespace": bool(self.unshare),
            "ipc_namespace": bool(self.unshare),
            "uts_namespace": bool(self.unshare),
            "cgroup_namespace": "--cgroup" in self.unshare,
            "private_root": self.new_root,
            "seccomp": sorted(_seccomp.DENIED) if self.seccomp else None,
            "no_new_privs": True,
            "proc_sys_read_only": bool(self.unshare) or self.read_roots is not None,
            "network_isolated": bool(self.unshare) and self.isolate_network,
            "separate_uid": self.uid,
            "shown_to_uid": sorted({top for top, _, _ in self._hidden(write_roots)}),
            "pids_cgroup": str(self.cgroup) if self.cgroup else None,
            "process_limit": self.limits.max_processes if (self.cgroup or self.nproc_effective) else None,
            "rlimits": {k: v for k, v in self.rlimits.items() if k != "nproc"},
            "scrubbed_env": True,
            "capabilities": "none",
            "filesystem": filesystem,
            "transport": "ipc",
            "notes": list(self.notes),
        }

    def release(self) -> None:
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)


# Run by the kernel's Python: its prefixes and every site-packages directory on its path (not the rest of
# sys.path, which may hold the caller's checkout), or why it cannot run a kernel.
_INSTALLATION_PROBE = """
import importlib.util, json, site, sys
paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()]
paths += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
result = paths if importlib.util.find_spec("ipykernel") else "has no ipykernel"
"""


@functools.lru_cache(maxsize=8)
def python_installation(python: str) -> tuple[str, ...]:
    """The directories the kernel's ``python`` reads its standard library and packages from.

    Raises :class:`ConfigError` naming ``python`` when it cannot run or lacks ipykernel."""
    if python == sys.executable:  # this interpreter: no need to start another
        scope: dict[str, Any] = {}
        exec(_INSTALLATION_PROBE, scope)
        paths = scope["result"]
    else:
        try:
            proc = subprocess.run(
                [python, "-I", "-c", _INSTALLATION_PROBE + "print(json.dumps(result))"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            paths = json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr.strip()[-300:]
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            paths = str(exc)
    if isinstance(paths, str):
        raise ConfigError(f"CodeInterpreter: python {python!r} cannot run a kernel: {paths}")
    paths.append(os.path.dirname(os.path.realpath(python)))
    return tuple(dict.fromkeys(os.path.realpath(p) for p in paths if os.path.exists(p)))


def plan_filesystem(
    read_paths: list[str], *, enabled: bool, required: bool, python: str = sys.executable
) -> tuple[list[str] | None, int, str]:
    """The read roots of the file-system layer, the Landlock ABI, and the reason when the layer is off.

    Raises :class:`SandboxError` when ``required`` and the layer cannot be applied."""
    if not enabled:
        if required:
            raise SandboxError("CodeInterpreter: require_isolation=True contradicts filesystem=False")
        return None, 0, "file system not confined: disabled by configuration (filesystem=False)"
    abi, reason = _landlock.abi_version()
    if abi < 1:
        if required:
            raise SandboxError(
                f"CodeInterpreter: the file-system layer is required but unavailable: {reason}"
            )
        return None, 0, f"file system not confined (the host's, with the kernel user's rights): {reason}"
    return _outermost([*SYSTEM_READ_ROOTS, *python_installation(python), *read_paths]), abi, ""


def _outermost(paths: list[str]) -> list[str]:
    """The existing paths, without those beneath another one in the list (a rule covers everything beneath)."""
    kept: list[str] = []
    for path in sorted({p for p in paths if os.path.lexists(p)}, key=len):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return sorted(kept, key=paths.index)


@dataclass(frozen=True)
class SandboxConfig:
    """The sandbox settings of one interpreter, checked once; :meth:`plan` works out the layers for each kernel.

    Field meanings are those of :class:`~qwen_agent.tools.CodeInterpreter`'s arguments of the same names."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    network: bool = False
    sandbox_uid: int | str | None = "auto"
    filesystem: bool = True
    read_paths: tuple[str, ...] = ()
    require_isolation: bool = False
    python: str = sys.executable
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "read_paths", tuple(_existing(p) for p in self.read_paths))
        python = str(self.python)
        if python != sys.executable and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ConfigError(f"CodeInterpreter: python {python!r} is not an executable file")
        object.__setattr__(self, "python", python)
        python_installation(python)  # fails here, naming the interpreter, if it cannot run a kernel

    def plan(self) -> SandboxPlan:
        return plan_sandbox(
            self.limits,
            network=self.network,
            sandbox_uid=self.sandbox_uid,
            filesystem=self.filesystem,
            read_paths=list(self.read_paths),
            require_isolation=self.require_isolation,
            python=self.python,
        )


def _existing(path: str | Path) -> str:
    resolved = Path(path).resolve()
    if not resolved.exists():
        raise ConfigError(f"CodeInterpreter: read_paths entry {str(path)!r} does not exist")
    return str(resolved)


def plan_sandbox(
    limits: SandboxLimits,
    *,
    network: bool,
    sandbox_uid: int | str | None,
    filesystem: bool = True,
    read_paths: list[str] = (),
    require_isolation: bool = False,
    python: str = sys.executable,
) -> SandboxPlan:
    """Work out which layers this platform allows for one kernel and say why the others are off."""
    notes: list[str] = []
    read_roots, abi, reason = plan_filesystem(
        list(read_paths), enabled=filesystem, required=require_isolation, python=python
    )
    if reason:
        notes.append(reason)
    unshare, reason = _probe_unshare(not network)
    if not unshare:
        notes.append(f"no pid/network namespace: {reason}")
    if network:
        notes.append("network allowed by configuration (network=True)")
    read_only_mounts = False
    if read_roots is not None and unshare:  # the remounts need the mount namespace that unshare gives
        reason = _probe_read_only_mounts(unshare)
        read_only_mounts = not reason
        if reason:
            notes.append(
                f"mounts not made read-only (chmod/utime of the kernel user's files possible): {reason}"
            )

    new_root = False
    if read_roots is not None and unshare:
        reason = _probe_new_root(unshare, tuple(read_roots))
        new_root = not reason
        if reason:
            notes.append(f"no private root (host paths outside the read roots stay in view): {reason}")
    elif not unshare:
        notes.append("no private root: it needs the mount namespace that unshare gives")
    if not _seccomp.SUPPORTED:
        notes.append(f"no seccomp filter: none written for {os.uname().machine}")
    if require_isolation:
        missing = [
            name
            for name, ok in (
                ("pid/ipc/uts/mount namespaces", bool(unshare)),
                ("private root", new_root),
                ("seccomp filter", _seccomp.SUPPORTED),
            )
            if not ok
        ]
        if missing:
            raise SandboxError(
                f"CodeInterpreter: require_isolation=True but these layers are unavailable: {', '.join(missing)}"
                f" ({'; '.join(notes)})"
            )

    uid: int | None = None
    show_hidden = False
    if sandbox_uid == "auto" and os.geteuid() == 0:
        uid, show_hidden, reason = _choose_uid(python, read_roots, unshare if read_only_mounts else ())
        notes.append(reason)
    elif sandbox_uid not in (None, "auto"):
        uid = int(sandbox_uid)
        show_hidden = os.geteuid() == 0 and read_only_mounts

    cgroup = None
    if limits.max_processes is not None:
        cgroup, reason = _create_pids_cgroup(limits.max_processes + 2)  # + init and kernel
        if cgroup is None:
            notes.append(f"no pids cgroup: {reason}")

    rlimits = limits.rlimits()
    effective_uid = uid if uid is not None else os.geteuid()
    nproc_effective = False
    if limits.max_processes is not None and effective_uid != 0 and cgroup is None:
        # RLIMIT_NPROC counts every process of the uid, so allow for those already running. Only without a
        # pids cgroup: kernels of other sessions run as the same uid, and one that forks after this count is
        # taken would leave this kernel too few processes to start or fork
        rlimits["nproc"] = _uid_task_count(effective_uid) + limits.max_processes + 2
        nproc_effective = True
    elif limits.max_processes is not None and cgroup is None:
        notes.append("process count not limited: RLIMIT_NPROC does not apply to root and no pids cgroup")
    return SandboxPlan(
        python,
        unshare,
        not network,
        uid,
        cgroup,
        limits,
        rlimits,
        nproc_effective,
        read_roots,
        abi,
        read_only_mounts,
        notes,
        show_hidden=show_hidden,
        new_root=new_root,
        seccomp=_seccomp.SUPPORTED,
    )


def _choose_uid(
    python: str, read_roots: list[str] | None, unshare: tuple[str, ...]
) -> tuple[int | None, bool, str]:
    """For a root host: the kernel's uid (None: root), whether the launcher must show it hidden read roots, and a
    note saying which case applies and why. ``unshare``: the namespaces the launcher may mount in (or none)."""
    can_mount = bool(unshare)
    needed = [python, *python_installation(python), *(read_roots or [])]
    unreadable = [os.path.realpath(p) for p in needed if not _readable_by_others(p)]
    if not unreadable:  # a workspace below an unsearchable directory is still shown where mounts allow
        return NOBODY_UID, can_mount, f"kernel runs as uid {NOBODY_UID}"
    closed = [p for p in unreadable if not _open_to_others(p)]
    if closed:
        return None, False, f"kernel runs as root: {closed[0]} is not readable by an unprivileged uid"
    hidden = sorted({top for top, _ in _hidden_paths(unreadable)})
    if not can_mount:
        return (
            None,
            False,
            f"kernel runs as root: {unreadable[0]} lies below {hidden[0]}, which an unprivileged uid cannot "
            "search, and no private mount namespace (with the file-system layer on) can show it",
        )
    failure = _probe_read_only_mounts(
        unshare, tuple((top, p, True) for top, p in _hidden_paths(read_roots or []))
    )
    if failure:
        return (
            None,
            False,
            f"kernel runs as root: {hidden[0]} cannot be shown to an unprivileged uid: {failure}",
        )
    return (
        NOBODY_UID,
        True,
        f"kernel runs as uid {NOBODY_UID}; {', '.join(hidden)} (not searchable by it) is replaced in the kernel's "
        "mount namespace only by a tmpfs holding the read roots below it, bind-mounted read-only",
    )


def kernel_env(
    workdir: Path, runtime: Path, extra: dict[str, str] | None, python: str = sys.executable
) -> dict[str, str]:
    """A minimal explicit environment: nothing of the host's (API keys live there) unless passed in ``extra``."""
    bin_dir = os.path.dirname(python)
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(runtime / "tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": str(runtime / "mpl"),
        "IPYTHONDIR": str(runtime / "ipython"),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_RUNTIME_DIR": str(runtime / "jupyter"),
        "JUPYTER_DATA_DIR": str(runtime / "jupyter"),
        "PYTHONDONTWRITEBYTECODE": "1",
        # nothing from the cwd (the workspace) on sys.path before the kernel's own start-up has run, and no user
        # site directory (below HOME, the workspace): a planted ipykernel_launcher.py or usercustomize.py is inert
        "PYTHONSAFEPATH": "1",
        "PYTHONNOUSERSITE": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "OPENBLAS_NUM_THREADS": "1",  # thread pools reserve address space against RLIMIT_AS
        "OMP_NUM_THREADS": "1",
    }
    env.update(extra or {})
    return env
