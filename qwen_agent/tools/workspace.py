"""The one place the host touches files a kernel can reach: by directory file descriptor, never following links.

The kernel's code may swap any name in its workspace for a symlink at any moment (inotify tells it exactly when
the host is about to look). So the host never opens, reads, chmods or chowns such a file by path: it holds a
descriptor of the workspace directory, opens each entry beneath it with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)`` (or, on kernels before 5.6, a walk that opens every component with ``O_NOFOLLOW``), and
changes modes and owners with ``fchmod``/``fchown`` on the descriptor it opened. What leaves the host (figures,
downloads) is a copy in a directory only the host can reach (:func:`host_only_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

__all__ = [
    "Workspace",
    "remove_tree",
    "private_temp_dir",
    "remove_private_temp_dir",
    "remove_stale_temp_dirs",
]

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# listings stop there: the kernel can nest directories deeper than any stack or descriptor limit
_MAX_DEPTH = 64
_WRITE_ATTEMPTS = 3


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_works: bool | None = None  # unknown until the first call: ENOSYS on kernels before 5.6


def _openat2(dir_fd: int, path: str, flags: int, mode: int) -> int | None:
    """``openat2`` confined beneath ``dir_fd`` with no symlinks at all; None where the kernel lacks it."""
    global _openat2_works
    if _SYS_OPENAT2 is None or _openat2_works is False:
        return None
    mode = mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0  # openat2 refuses a mode it would not use
    how = _OpenHow(
        flags | os.O_CLOEXEC, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
    )
    fd = _libc.syscall(
        _SYS_OPENAT2, dir_fd, path.encode(), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))
    )
    if fd >= 0:
        _openat2_works = True
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:  # EPERM: a seccomp filter refused it
        _openat2_works = False
        return None
    raise OSError(err, os.strerror(err), path)


def _parts(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or relpath.startswith("/") or ".." in parts or "\0" in relpath:
        raise ValueError(f"not a path inside the workspace: {relpath!r}")
    return parts


def open_beneath(dir_fd: int, relpath: str, flags: int, mode: int = 0o600) -> int:
    """Open ``relpath`` beneath ``dir_fd`` refusing a symlink at every component (ELOOP) and any ``..``."""
    parts = _parts(relpath)
    fd = _openat2(dir_fd, "/".join(parts), flags | os.O_NOFOLLOW, mode)
    if fd is not None:
        return fd
    current = dir_fd
    try:
        for part in parts[:-1]:
            step = os.open(part, _DIR_FLAGS, dir_fd=current)
            if current != dir_fd:
                os.close(current)
            current = step
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
    finally:
        if current != dir_fd:
            os.close(current)


class Workspace:
    """A directory the kernel can write, handled by the host only through a descriptor of it.

    ``owner``: the uid (and gid) that files the host puts here are given, the kernel's; None leaves them the
    host's."""

    def __init__(self, path: str | Path, owner: int | None = None) -> None:
        self.path = Path(path)
        self.owner = owner
        self.fd = os.open(self.path, _DIR_FLAGS)
        self._exported: dict[str, tuple[int, int, int]] = {}  # relative path -> (inode, size, mtime) copied

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write_bytes(self, name: str, data: bytes, *, replace: bool = True) -> bool:
        """Put ``data`` under ``name`` (a plain file name), mode 0644 and given to the owner, via a new file and
        a rename: whatever the kernel left under ``name`` (a symlink included) is replaced, never followed. With
        ``replace=False`` an existing ``name`` is kept and False returned."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        for _ in range(_WRITE_ATTEMPTS - 1):  # again when the kernel removed the temporary name in between
            try:
                return self._write_once(name, data, replace)
            except FileNotFoundError:
                pass
        return self._write_once(name, data, replace)

    def _write_once(self, name: str, data: bytes, replace: bool) -> bool:
        tmp = f".host-{uuid.uuid4().hex}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fchmod(fd, 0o644)
            if self.owner is not None:
                os.fchown(fd, self.owner, self.owner)
            if replace:
                os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            else:
                try:
                    os.link(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
                except FileExistsError:
                    return False
            return True
        finally:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=self.fd)
            except FileNotFoundError:
                pass

    def files(self) -> list[str]:
        """Relative paths of the regular files, hidden names, links and what lies deeper than ``_MAX_DEPTH``
        directories left out, sorted."""
        found: list[str] = []

        def walk(fd: int, prefix: str, depth: int) -> None:
            for entry in sorted(os.scandir(fd), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False) and depth < _MAX_DEPTH:
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    try:
                        walk(sub, f"{prefix}{entry.name}/", depth + 1)
                    finally:
                        os.close(sub)
                elif entry.is_file(follow_symlinks=False):
                    found.append(prefix + entry.name)

        try:
            top = os.open(".", _DIR_FLAGS, dir_fd=self.fd)  # its own offset: listings never share one
        except OSError:
            return []
        try:
            walk(top, "", 0)
        except OSError:
            pass  # a directory the code made unreadable: what was found so far
        finally:
            os.close(top)
        return found

    def export(self, dest: Path) -> list[Path]:
        """Host-owned copies of :meth:`files` under ``dest`` (same relative paths), each read through a descriptor
        opened here; a file is copied again only when its inode, size or mtime changed since the last export."""
        copies = []
        for relpath in self.files():
            try:
                fd = open_beneath(self.fd, relpath, os.O_RDONLY | os.O_NONBLOCK)
            except (OSError, ValueError):
                continue  # swapped for a link (or gone) since the listing
            with os.fdopen(fd, "rb"):  # closes fd
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    continue
                target, key = dest / relpath, (info.st_ino, info.st_size, info.st_mtime_ns)
                if self._exported.get(relpath) != key or not target.is_file():
                    _clear_way(dest, target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
                    with open(tmp, "wb") as out:
                        _copy_data(fd, out.fileno(), info.st_size)
                    os.replace(tmp, target)
                    self._exported[relpath] = key
            copies.append(target)
        return copies


def _copy_data(src: int, out: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` leaving its holes as holes: a sparse file costs the kernel no disk,
    and a plain copy of one would cost the host's disk its full size."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        while start < end:
            chunk = os.pread(src, min(end - start, 1 << 20), start)
            if not chunk:
                break
            os.pwrite(out, chunk, start)
            start += len(chunk)
        offset = end
    os.ftruncate(out, size)


def _clear_way(dest: Path, target: Path) -> None:
    """Remove the earlier copies in the way of ``target`` (all in the host's own ``dest``): a file where the
    kernel has since made a directory of the same name, or a directory where it has since made a file."""
    for parent in reversed(target.relative_to(dest).parents[:-1]):  # a, a/b, ... above the file
        if (dest / parent).is_file() or (dest / parent).is_symlink():
            (dest / parent).unlink()
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)


def _open_unlocked(dir_fd: int, name: str) -> int | None:
    """A descriptor of the directory ``name`` beneath ``dir_fd`` (never a link), first given mode 0700 so the
    owner can empty it (a kernel may chmod one 0); None when it is not such a directory or cannot be opened."""
    try:
        handle = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        os.chmod(f"/proc/self/fd/{handle}", 0o700)  # the directory itself: an O_PATH handle is never a link
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(handle)


def _move(dir_fd: int, name: str, to_fd: int) -> None:
    """Move ``name`` from ``dir_fd`` to a fresh name in ``to_fd``."""
    new_name = f".rm-{uuid.uuid4().hex}"
    try:
        os.rename(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=to_fd)
    except PermissionError:  # moving a directory needs write access to it, which the kernel may have taken
        unlocked = _open_unlocked(dir_fd, name)
        if unlocked is not None:
            os.close(unlocked)
        os.rename(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=to_fd)


def _empty(top: int) -> None:
    """Empty the directory ``top`` without recursion, however deep the kernel nested directories: files are
    unlinked, and each subdirectory's entries are moved up into ``top`` until it is empty and can go."""
    progress = True
    while progress:
        progress = False
        for name in os.listdir(top):
            try:
                os.unlink(name, dir_fd=top)
                progress = True
                continue
            except IsADirectoryError:
                pass
            except OSError:
                continue
            sub = _open_unlocked(top, name)
            if sub is None:
                continue
            try:
                for child in os.listdir(sub):
                    _move(sub, child, top)
                    progress = True
                os.rmdir(name, dir_fd=top)
                progress = True
            except OSError:
                pass
            finally:
                os.close(sub)


def remove_tree(path: Path) -> bool:
    """Remove ``path`` whatever modes and depth the kernel left inside; True when it is gone."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        os.fchmod(fd, 0o700)
        _empty(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass
    return not os.path.lexists(path)


# ---- private temporary directories, and the sweep of those a killed host left ---------------------------------


def _owner_identity(pid: int) -> dict[str, Any] | None:
    """What tells this process apart from any later one with the same pid: boot, pid namespace, start time."""
    try:
        return {
            "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid_ns": os.readlink("/proc/self/ns/pid"),
            "pid": pid,
            "start": Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19],
        }
    except (OSError, IndexError):
        return None


def _owner_gone(marker: dict[str, Any]) -> bool:
    """True only when the marker's process provably no longer runs (another boot, or the same pid namespace and
    no process with that pid and start time); a process in another pid namespace cannot be checked, so it is not."""
    here = _owner_identity(os.getpid())
    if here is None:
        return False
    if marker.get("boot_id") != here["boot_id"]:
        return True
    if marker.get("pid_ns") != here["pid_ns"]:
        return False
    now = _owner_identity(int(marker["pid"]))
    return now is None or now["start"] != marker.get("start")


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".owner")


def private_temp_dir(kind: str) -> Path:
    """A new 0700 directory ``qa-<kind>-<host pid>-XXXX`` in the temp dir, with an owner marker beside it (outside,
    where the kernel cannot write) that lets a later host remove it once this process is provably gone."""
    path = Path(tempfile.mkdtemp(prefix=f"qa-{kind}-{os.getpid()}-"))
    identity = _owner_identity(os.getpid())
    if identity is not None:
        _marker(path).write_text(json.dumps(identity))
    return path


def remove_private_temp_dir(path: Path) -> None:
    """Remove the directory whatever modes the kernel set inside; its marker only once it is gone, so the stale
    sweep of a later host retries what could not be removed now."""
    if remove_tree(path):
        _marker(path).unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def remove_stale_temp_dirs() -> None:
    """Delete the workspaces, kernel runtime dirs and host-only dirs of hosts that died without cleaning up."""
    for marker in Path(tempfile.gettempdir()).glob("qa-*-*-*.owner"):
        if marker.name.split("-")[1] not in ("work", "kernel", "host"):
            continue
        try:
            gone = _owner_gone(json.loads(marker.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a marker this package wrote
        if gone:
            remove_private_temp_dir(marker.with_name(marker.name[: -len(".owner")]))
