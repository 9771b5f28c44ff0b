"""Start a sandboxed kernel: run as ``python -I -S _launcher.py '<json config>'``. Standard library only.

Outer stage (child of the host): ask for SIGKILL when the host dies, join the pids cgroup, apply the resource
limits, then exec ``unshare`` (new pid/net/mount namespaces) running the inner stage, or run the inner stage
directly when no namespaces are used.

Inner stage: ask for SIGKILL when the parent dies; pivot into a private root holding only the read roots, the
workspace and runtime directory (or, where that cannot be had, show the sandbox uid the roots below directories
it cannot search and make every other mount read-only); make ``/proc/sys`` read-only; drop to the sandbox uid if
one is set, drop every capability (root in the kernel keeps uid 0 but no privilege over the host), confine the
file system with Landlock (after the mounts, since Landlock forbids mounting), set ``no_new_privs`` and install
the seccomp filter (last: it refuses mounts), and exec the kernel.
As pid 1 of a new pid namespace it instead forks the kernel and stays as a minimal init that reaps orphans and
exits with the kernel's status; when it dies the kernel of the namespace kills every process left in it.

Each confining step runs only when the config asks for it: MCP servers (``tools/mcp.py``) are started through
this launcher for the die-with-the-host and pid-namespace part alone.
"""

import ctypes
import json
import os
import re
import resource
import signal
import sys

# imported now: once the kernel's new root is entered, this directory may be out of view
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _landlock  # noqa: E402
import _seccomp  # noqa: E402

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
LIMITS = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}


def die_with_parent(expected_parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        sys.exit("launcher: prctl(PR_SET_PDEATHSIG) failed")
    # 0: the parent is outside our new pid namespace (unshare --kill-child covers that case)
    if os.getppid() not in (expected_parent, 0):  # the parent died before prctl took effect
        sys.exit(1)


def apply_limits(limits: dict) -> None:
    for name, value in limits.items():
        soft, hard = (value, value) if not isinstance(value, list) else value
        _, current_hard = resource.getrlimit(LIMITS[name])
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(LIMITS[name], (soft, hard))


def drop_bounding_set() -> None:
    """Empty the bounding set: needs CAP_SETPCAP, so it runs before a switch to the sandbox uid takes that away."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: then there is nothing to keep


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets, then the effective, permitted and inheritable ones (capset to 0):
    with all five empty, neither this process nor anything it execs (even as uid 0) holds a capability."""
    libc = ctypes.CDLL(None, use_errno=True)
    drop_bounding_set()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} triples, all zero
    if libc.capset(header, data) != 0:
        sys.exit(f"launcher: capset failed: {os.strerror(ctypes.get_errno())}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 21
# statvfs f_flag bits -> mount flags that must be kept on a remount (a user namespace locks them)
_KEPT_FLAGS = {
    2: MS_NOSUID,
    4: MS_NODEV,
    8: MS_NOEXEC,
    1024: MS_NOATIME,
    2048: MS_NODIRATIME,
    4096: MS_RELATIME,
}


def _mount(source, target: str, flags: int, fstype=None, data=None) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    args = [arg.encode() if arg else None for arg in (source, target, fstype, data)]
    if libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
        return ctypes.get_errno()
    return 0


def _remount(target: str, read_only: bool) -> int:
    try:
        current = os.statvfs(target).f_flag
    except OSError as exc:
        return exc.errno
    flags = MS_REMOUNT | MS_BIND | (MS_RDONLY if read_only else 0)
    flags |= sum(ms for st, ms in _KEPT_FLAGS.items() if current & st)
    return _mount(None, target, flags)


def _require_own_namespace() -> None:
    if os.getpid() != 1:  # never the host's mounts: only as init of the namespaces unshare made
        sys.exit("launcher: mounts are changed only inside a new pid and mount namespace")


def show_hidden_paths(entries: list) -> None:
    """Make each ``(hidden, path, read_only)`` entry reachable by any uid in this mount namespace only: a tmpfs of
    mode 0755 over ``hidden`` (a directory other uids cannot search, e.g. /root), holding just ``path``,
    bind-mounted back in place. Nothing on the host changes: no chmod, and unshare made the mounts private."""
    _require_own_namespace()
    os.umask(0o022)
    # opened before any tmpfs covers them; bind-mounted from /proc/self/fd afterwards
    try:
        fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for _, path, _ in entries]
    except OSError as exc:
        sys.exit(f"launcher: cannot open {exc.filename} to show it to the sandbox uid: {exc.strerror}")
    for hidden in dict.fromkeys(hidden for hidden, _, _ in entries):
        err = _mount("tmpfs", hidden, MS_NOSUID | MS_NODEV, fstype="tmpfs", data="mode=0755,size=1m")
        if err:
            sys.exit(f"launcher: cannot mount a tmpfs over {hidden}: {os.strerror(err)}")
    for (_, path, read_only), fd in zip(entries, fds, strict=True):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.lexists(path):  # nothing there yet unless an outer entry already holds it
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(path)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        err = _mount(f"/proc/self/fd/{fd}", path, MS_BIND | MS_REC) or (read_only and _remount(path, True))
        if err:
            sys.exit(f"launcher: cannot bind-mount {path} below the tmpfs: {os.strerror(err)}")
        os.close(fd)


def make_mounts_read_only(writable: list) -> None:
    """In the kernel's own mount namespace: every mount read-only except ``writable``, each bind-mounted on itself.

    Landlock already refuses writes outside; this also refuses what Landlock does not govern: chmod, chown,
    utime and extended attributes of files the kernel's uid owns. Mounts that cannot be remounted (other
    mounts over them) are left as they are; the root mount must succeed."""
    _require_own_namespace()
    for path in writable:
        err = _mount(path, path, MS_BIND)
        if err:
            sys.exit(f"launcher: cannot bind-mount {path}: {os.strerror(err)}")
    with open("/proc/self/mountinfo") as f:
        targets = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in f]
    for target in dict.fromkeys(targets):
        if target in writable:
            continue
        err = _remount(target, read_only=True)
        if err and target == "/":
            sys.exit(f"launcher: cannot make / read-only: {os.strerror(err)}")
    for path in writable:
        err = _remount(path, read_only=False)
        if err:
            sys.exit(f"launcher: cannot make {path} writable: {os.strerror(err)}")
    os.chdir(os.getcwd())  # the cwd still points into the mount below the workspace's bind mount


MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def enter_new_root(spec: dict) -> None:
    """Make a root of only what the kernel needs and pivot into it: a tmpfs holding each read root bind-mounted
    read-only at its own path, the workspace and runtime dir writable, the /proc of this pid namespace, a /dev of
    the listed device nodes, an empty /tmp. Nothing else of the host is in view: no /run, /var/run, home dirs,
    host sockets or other kernels' dirs. Every directory the tmpfs adds is 0755, so the sandbox uid reaches roots
    that lie below a directory it could not search (``/root``) without anything being shown beside them."""
    _require_own_namespace()
    libc = ctypes.CDLL(None, use_errno=True)
    os.umask(0o022)
    entries = [(p, False) for p in spec["read"] + spec["devices"]] + [(p, True) for p in spec["write"]]
    entries = sorted(((p, w) for p, w in entries if os.path.exists(p)), key=lambda e: len(e[0]))
    try:  # opened before the tmpfs covers anything; bind-mounted from /proc/self/fd afterwards
        fds = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path, _ in entries]
    except OSError as exc:
        sys.exit(f"launcher: cannot open {exc.filename} for the kernel's root: {exc.strerror}")
    base = "/tmp"
    err = _mount("tmpfs", base, MS_NOSUID | MS_NODEV, fstype="tmpfs", data="mode=0755,size=4m")
    if err:
        sys.exit(f"launcher: cannot mount the kernel's root: {os.strerror(err)}")
    for (path, _), fd in zip(entries, fds, strict=True):
        target = base + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        err = _mount(f"/proc/self/fd/{fd}", target, MS_BIND | MS_REC)
        if err:
            sys.exit(f"launcher: cannot bind-mount {path} into the kernel's root: {os.strerror(err)}")
        os.close(fd)
    for path in ("/tmp", "/dev/shm"):
        os.makedirs(base + path, exist_ok=True)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        if os.path.isdir(base + "/dev") and not os.path.lexists(f"{base}/dev/{name}"):
            os.symlink(target, f"{base}/dev/{name}")
    os.chdir(base)
    if libc.syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b".") != 0:
        sys.exit(f"launcher: pivot_root failed: {os.strerror(ctypes.get_errno())}")
    if libc.umount2(b".", MNT_DETACH) != 0:
        sys.exit(f"launcher: cannot detach the host's root: {os.strerror(ctypes.get_errno())}")
    os.chdir("/")
    make_mounts_read_only(spec["write"])
    os.chdir(spec["cwd"])


def proc_sys_read_only() -> None:
    """/proc/sys read-only in this mount namespace: a uid-0 kernel without capabilities still passes the owner
    check of most sysctl files (the file-system layer off, nothing else stops it)."""
    _require_own_namespace()
    for path in ("/proc/sys", "/proc/sysrq-trigger"):
        if os.path.exists(path) and (_mount(path, path, MS_BIND) or _remount(path, read_only=True)):
            sys.exit(f"launcher: cannot make {path} read-only")


def confine_filesystem(rules: dict) -> None:
    try:
        _landlock.restrict(rules["read"], rules["write"], rules["devices"])
    except OSError as exc:
        sys.exit(f"launcher: cannot confine the file system: {exc}")


def run_as_init(argv: list) -> None:
    """pid 1 of the namespace: start the kernel, reap everything, exit with the kernel's status."""
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # an interrupt is meant for the kernel, which shares our group
    kernel = os.fork()
    if kernel == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(argv[0], argv)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(kernel, signal.SIGTERM))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
        if pid == kernel:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def install_seccomp() -> None:
    try:
        _seccomp.install()
    except OSError as exc:
        sys.exit(f"launcher: cannot install the seccomp filter: {exc}")


def set_no_new_privs() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit("launcher: prctl(PR_SET_NO_NEW_PRIVS) failed")


def main() -> None:
    if sys.argv[1] == "--probe-mounts":  # run by the host once, inside the namespaces a kernel would get
        show_hidden_paths(json.loads(sys.argv[2]))
        make_mounts_read_only([])
        return
    if sys.argv[1] == "--probe-root":  # the same for a private root: the read roots and nothing else
        enter_new_root(json.loads(sys.argv[2]))
        proc_sys_read_only()
        if os.path.exists("/run") or os.path.exists("/etc/shadow") or not os.path.exists("/usr"):
            sys.exit("launcher: the new root does not hold what it should")
        return
    config = json.loads(sys.argv[1])
    die_with_parent(config["parent"])
    if config["stage"] == "outer":
        if config.get("cgroup_procs"):
            with open(config["cgroup_procs"], "w") as f:
                f.write(str(os.getpid()))
        apply_limits({k: v for k, v in config["limits"].items() if k != "nproc"})
        if config.get("unshare"):
            inner = dict(config, stage="inner", parent=os.getpid())
            argv = [
                *config["unshare"],
                sys.executable,
                "-I",
                "-S",
                os.path.abspath(__file__),
                json.dumps(inner),
            ]
            os.execv(argv[0], argv)
    if config.get("new_root"):
        enter_new_root(config["new_root"])
    else:
        if config.get("show_hidden"):
            show_hidden_paths(config["show_hidden"])
        if config.get("read_only_mounts"):
            make_mounts_read_only(config["read_only_mounts"])
    if config.get("proc_sys_read_only"):
        proc_sys_read_only()
    if config.get("uid") is not None:
        if config.get("drop_capabilities"):
            drop_bounding_set()
        os.setgroups([])
        os.setgid(config["gid"])
        os.setuid(config["uid"])
        die_with_parent(os.getppid())  # changing credentials clears the parent-death signal
    if "nproc" in config["limits"]:
        apply_limits({"nproc": config["limits"]["nproc"]})
    if config.get("drop_capabilities"):
        drop_capabilities()
    if config.get("landlock"):
        confine_filesystem(config["landlock"])
    if config.get("no_new_privs"):
        set_no_new_privs()
    if config.get("seccomp"):
        install_seccomp()
    if os.getpid() == 1:
        run_as_init(config["argv"])
    os.execv(config["argv"][0], config["argv"])


if __name__ == "__main__":
    main()
