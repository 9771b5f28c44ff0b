"""A seccomp filter for the kernel: the system calls an interpreter never needs fail with EPERM. Standard library
only (the launcher loads it); a small classic-BPF program, so no libseccomp is needed.

Refused: the keyring (``keyctl``, ``add_key``, ``request_key``: the host's session keyring is inherited),
``ptrace`` and ``process_vm_*`` of other processes, ``userfaultfd``, mounts of every kind and ``pivot_root``,
``unshare``/``setns`` and ``clone`` with namespace flags (no new user namespace to regain capabilities in),
``sethostname``, modules, ``kexec``, ``bpf``, ``perf_event_open``, ``open_by_handle_at``, ``io_uring_*`` (its
operations run without passing this filter), ``TIOCSTI`` and ``TIOCLINUX`` (pushing keystrokes into a terminal),
and sockets of any family but Unix, IPv4, IPv6 and netlink (``AF_VSOCK`` reaches the hypervisor whatever the
network namespace). ``clone3`` answers ENOSYS so libc falls back to ``clone``, whose flags can be checked. x32 and
32-bit system calls are refused whole.
"""

import ctypes
import errno
import os
import struct

__all__ = ["SUPPORTED", "DENIED", "install"]

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
# x86_64 numbers
DENIED = {
    "ptrace": 101,
    "chroot": 161,
    "pivot_root": 155,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
_IOCTL, _SOCKET, _CLONE, _CLONE3 = 16, 41, 56, 435
# AF_UNIX, AF_INET, AF_INET6, AF_NETLINK: what Python and its libraries use. The others are refused with
# EAFNOSUPPORT (libraries fall back as on a kernel without them): some, like AF_VSOCK to the hypervisor, are not
# covered by the network namespace, and the rest are kernel attack surface an interpreter never needs
_SOCKET_FAMILIES = (1, 2, 10, 16)
_DENIED_IOCTLS = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX
_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
SUPPORTED = os.uname().machine == "x86_64"

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_NR, _ARCH, _ARG0, _ARG1 = 0, 4, 16, 24  # offsets in struct seccomp_data (low 32 bits of each argument)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def _program() -> list[tuple[int, int, int, int]]:
    deny = (_RET, 0, 0, _ERRNO | errno.EPERM)
    prog = [(_LD_W_ABS, 0, 0, _ARCH), (_JEQ, 1, 0, _AUDIT_ARCH_X86_64), deny, (_LD_W_ABS, 0, 0, _NR)]
    prog += [(_JGE, 0, 1, _X32_BIT), deny]
    for number in DENIED.values():
        prog += [(_JEQ, 0, 1, number), deny]
    prog += [(_JEQ, 0, 1, _CLONE3), (_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    ioctl_block = [(_LD_W_ABS, 0, 0, _ARG1)]
    for request in _DENIED_IOCTLS:
        ioctl_block += [(_JEQ, 0, 1, request), deny]
    ioctl_block.append((_RET, 0, 0, _ALLOW))
    prog += [(_JEQ, 0, len(ioctl_block), _IOCTL), *ioctl_block]
    families = [(_LD_W_ABS, 0, 0, _ARG0)]
    families += [(_JEQ, len(_SOCKET_FAMILIES) - i, 0, family) for i, family in enumerate(_SOCKET_FAMILIES)]
    families += [(_RET, 0, 0, _ERRNO | errno.EAFNOSUPPORT), (_RET, 0, 0, _ALLOW)]
    prog += [(_JEQ, 0, len(families), _SOCKET), *families]
    clone_block = [(_LD_W_ABS, 0, 0, _ARG0), (_JSET, 0, 1, _NAMESPACE_FLAGS), deny, (_RET, 0, 0, _ALLOW)]
    prog += [(_JEQ, 0, len(clone_block), _CLONE), *clone_block]
    prog.append((_RET, 0, 0, _ALLOW))
    return prog


def install() -> None:
    """Set ``no_new_privs`` and load the filter for this process and everything it execs. Raises OSError."""
    if not SUPPORTED:
        raise OSError(errno.ENOTSUP, f"no seccomp filter for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    code = b"".join(struct.pack("HBBI", *ins) for ins in _program())
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HxxxxxxQ", len(code) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
