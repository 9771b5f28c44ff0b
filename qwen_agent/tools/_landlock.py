"""Landlock (Linux >= 5.13) over ctypes: confine this process and its children to a set of file-system roots.

Standard library only: the kernel launcher imports it by file path. The three system calls have the same
numbers on x86-64 and on the architectures that use the generic table (arm64, riscv). Rules follow the real
file, not the name: a symlink is checked at its target, and a hard link or rename to a directory outside the
granted roots fails (``EXDEV`` or ``EACCES``). What Landlock does not govern: ``stat()`` and path walking (a
path's existence can be learnt, not its content), metadata changes (chmod, utime, xattrs) and files opened
before :func:`restrict`.
"""

import ctypes
import os
import stat

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
READ = EXECUTE | READ_FILE | READ_DIR
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV
# the rights a rule for a plain file may name (the others only make sense beneath a directory)
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class LandlockError(OSError):
    pass


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> tuple[int, str]:
    """The running kernel's Landlock ABI (0 when unusable) and, when 0, the reason."""
    system, release = os.uname().sysname, os.uname().release
    if system != "Linux":
        return 0, f"Landlock is Linux-only (this is {system})"
    version = _libc().syscall(
        SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    if version > 0:
        return version, ""
    err = ctypes.get_errno()
    if err == 38:  # ENOSYS
        return 0, f"the kernel ({release}) has no Landlock (needs Linux >= 5.13 built with it)"
    if err == 95:  # EOPNOTSUPP
        return 0, "Landlock is built into the kernel but disabled (not in the lsm= boot list)"
    return 0, f"Landlock is unusable here: {os.strerror(err)}"


def handled_rights(abi: int) -> int:
    """Every file-system right the ABI knows: all of them are denied unless a rule grants them."""
    rights = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def restrict(read: list[str], write: list[str], devices: list[str]) -> None:
    """Allow reading beneath ``read``, everything beneath ``write``, read/write of ``devices``; deny the rest.

    Sets ``PR_SET_NO_NEW_PRIVS`` first (Landlock requires it of an unprivileged process). From ABI 6 on, signals
    and abstract Unix sockets are also scoped: the process cannot signal or connect to anything outside its domain.
    Paths that do not exist are skipped. Raises :class:`LandlockError` when a call fails.
    """
    abi, reason = abi_version()
    if abi < 1:
        raise LandlockError(reason)
    libc = _libc()
    handled = handled_rights(abi)
    attr = _RulesetAttr(handled, 0, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = libc.syscall(
        SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        raise LandlockError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for paths, rights in ((read, READ), (write, handled), (devices, DEVICE)):
            for path in paths:
                _add_rule(libc, ruleset, path, rights & handled)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if libc.syscall(SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
            raise LandlockError(
                ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}"
            )
    finally:
        os.close(ruleset)


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(rights, fd)
        if libc.syscall(
            SYS_ADD_RULE, ruleset, ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)
        ):
            raise LandlockError(
                ctypes.get_errno(), f"landlock_add_rule {path}: {os.strerror(ctypes.get_errno())}"
            )
    finally:
        os.close(fd)
