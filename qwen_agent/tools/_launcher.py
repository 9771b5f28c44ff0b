"""Start a sandboxed kernel: run as ``python -I -S _launcher.py '<json config>'``. Standard library only.

Outer stage (child of the host): ask for SIGKILL when the host dies, join the pids cgroup, apply the resource
limits, then exec ``unshare`` (new pid/net/mount namespaces) running the inner stage, or run the inner stage
directly when no namespaces are used.

Inner stage: ask for SIGKILL when the parent dies, make every mount of its namespace read-only but the workspace
and runtime directory, drop to the sandbox uid if one is set, drop every capability (root in the kernel keeps
uid 0 but no privilege over the host), confine the file system with Landlock (last, since Landlock forbids
mounting), and exec the kernel.
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

PR_SET_PDEATHSIG = 1
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


def drop_capabilities() -> None:
    """Empty the bounding and ambient sets, then the effective, permitted and inheritable ones (capset to 0):
    with all five empty, neither this process nor anything it execs (even as uid 0) holds a capability."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: then there is nothing to keep
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} triples, all zero
    if libc.capset(header, data) != 0:
        sys.exit(f"launcher: capset failed: {os.strerror(ctypes.get_errno())}")


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 1024, 2048, 4096, 1 << 21
# statvfs f_flag bits -> mount flags that must be kept on a remount (a user namespace locks them)
_KEPT_FLAGS = {
    2: MS_NOSUID,
    4: MS_NODEV,
    8: MS_NOEXEC,
    1024: MS_NOATIME,
    2048: MS_NODIRATIME,
    4096: MS_RELATIME,
}


def _mount(source, target: str, flags: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    src = source.encode() if source else None
    if libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
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


def make_mounts_read_only(writable: list) -> None:
    """In the kernel's own mount namespace: every mount read-only except ``writable``, each bind-mounted on itself.

    Landlock already refuses writes outside; this also refuses what Landlock does not govern: chmod, chown,
    utime and extended attributes of files the kernel's uid owns. Mounts that cannot be remounted (other
    mounts over them) are left as they are; the root mount must succeed."""
    if os.getpid() != 1:  # never the host's mounts: only as init of the namespaces unshare made
        sys.exit("launcher: read-only mounts are made only inside a new pid and mount namespace")
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


def confine_filesystem(rules: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _landlock

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


def main() -> None:
    if sys.argv[1] == "--probe-mounts":  # run by the host once, inside the namespaces a kernel would get
        make_mounts_read_only([])
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
    if config.get("read_only_mounts"):
        make_mounts_read_only(config["read_only_mounts"])
    if config.get("uid") is not None:
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
    if os.getpid() == 1:
        run_as_init(config["argv"])
    os.execv(config["argv"][0], config["argv"])


if __name__ == "__main__":
    main()
