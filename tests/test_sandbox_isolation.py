"""The code interpreter attacked from the kernel's side: swaps of names the host touches (timed by inotify), modules
planted for the next start, another session's kernel, host IPC, and the host's own settings. Each test asserts the
host is unchanged (content, mode, owner) and the secret shows up nowhere the host hands out.

Run as the current user (root here and in CI); ``test_the_attacks_hold_as_an_unprivileged_host`` runs this file
again as uid 65534.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

from qwen_agent.errors import InterpreterError, SandboxError
from qwen_agent.serve.web_session import WebSession
from qwen_agent.tools import CodeInterpreter, _landlock, sandbox, workspace
from qwen_agent.tools.kernel import _SPAWNER

pytestmark = pytest.mark.skipif(
    _landlock.abi_version()[0] < 1, reason=f"no Landlock here: {_landlock.abi_version()[1]}"
)
libc = ctypes.CDLL(None, use_errno=True)

# Kernel-side helper: a background thread that waits (inotify) for the host to create or finish a file whose name
# matches, then puts a symlink to ``target`` in its place, as often as the host gives it the chance.
_SWAPPER = textwrap.dedent("""
    import ctypes, fnmatch, os, struct, threading
    def swap_when(pattern, target, events=0x100 | 0x8 | 0x4):  # IN_CREATE | IN_CLOSE_WRITE | IN_ATTRIB
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init()
        assert libc.inotify_add_watch(fd, b".", events) >= 0
        def run():
            while True:
                buf = os.read(fd, 65536)
                at = 0
                while at < len(buf):
                    _, _, _, size = struct.unpack_from("iIII", buf, at)
                    name = buf[at + 16 : at + 16 + size].rstrip(b"\\0").decode()
                    at += 16 + size
                    if fnmatch.fnmatch(name, pattern) and not os.path.islink(name):
                        try:
                            os.unlink(name)
                            os.symlink(target, name)
                        except OSError:
                            pass
        threading.Thread(target=run, daemon=True).start()
""")


class Host:
    """Host files the attacks aim at: a secret (mode 0600) and a victim whose mode and owner must not change."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qa-test-host-"))
        self.secret_text = f"TOPSECRET-{uuid.uuid4().hex}"
        self.secret = self.dir / "secret.txt"
        self.secret.write_text(self.secret_text)
        self.secret.chmod(0o600)
        self.victim = self.dir / "victim.txt"
        self.victim.write_text("keep me")
        self.victim.chmod(0o600)
        self.before = self.state()

    def state(self) -> dict[str, tuple[bytes, int, int, int]]:
        return {
            p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_uid, p.stat().st_gid)
            for p in sorted(self.dir.iterdir())
        }

    def assert_unchanged(self, *outputs: object) -> None:
        assert self.state() == self.before, "a host file changed"
        for out in outputs:
            text = out if isinstance(out, str | bytes) else repr(out)
            needle = self.secret_text.encode() if isinstance(text, bytes) else self.secret_text
            assert needle not in text, "the secret leaked"


@pytest.fixture
def host():
    h = Host()
    yield h
    shutil.rmtree(h.dir, ignore_errors=True)


def ok(ci: CodeInterpreter, code: str) -> str:
    r = ci.execute(code, timeout=60)
    assert r.ok, r.to_observation()
    return r.to_observation()


# ---- class 1: the host never follows a name the kernel controls -----------------------------------------------


def test_upload_never_chmods_or_chowns_through_a_swapped_name(host):
    big = os.urandom(32 << 20)  # a long write: the swap lands between the host's create and its chmod/chown
    with CodeInterpreter(timeout=30) as ci:
        ok(ci, _SWAPPER + f"swap_when('.*', {str(host.victim)!r}, 0x100)")
        for attempt in range(3):
            # the kernel may remove the host's temporary file each time (a refusal of its own upload, named);
            # either way nothing is followed
            try:
                ci.upload(big, f"data{attempt}.bin")
            except InterpreterError as exc:
                assert f"cannot write 'data{attempt}.bin' into the workspace" in str(exc)
        obs = ok(ci, "import os; print(sorted(os.listdir('.')))")
        host.assert_unchanged(obs)


def test_figures_are_kept_by_the_host_and_never_chowned_through_a_swapped_name(host):
    plot = "import matplotlib.pyplot as plt\nplt.figure(dpi=300, figsize=(12, 12)); plt.plot(range(9)); plt.show()"
    with CodeInterpreter(timeout=60) as ci:
        ok(ci, _SWAPPER + f"swap_when('fig-*.png', {str(host.victim)!r})")
        results = [ci.execute(plot, timeout=60) for _ in range(3)]
        for r in results:
            assert r.ok and len(r.images) == 1, r.to_observation()
            assert (
                r.images[0].read_bytes().startswith(b"\x89PNG")
            )  # the host's copy: the figure, never a link
        host.assert_unchanged(*[r.to_observation() for r in results])


PLANTED = textwrap.dedent("""
    import os, sys
    runtime = os.path.dirname(os.environ["JUPYTER_RUNTIME_DIR"])
    for name in ("kernel.log",):
        try:
            os.unlink(os.path.join(runtime, name))
        except OSError:
            pass
        os.symlink({secret!r}, os.path.join(runtime, name))
    open(os.path.join(os.environ["HOME"], "PLANTED-RAN"), "w").write("x")
    os._exit(1)
""")


def test_modules_planted_in_the_workspace_do_not_run_at_the_next_start(host):
    planted = PLANTED.format(secret=str(host.secret))
    with CodeInterpreter(timeout=30, startup_timeout=30) as ci:
        site = f".local/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
        ok(
            ci,
            f"import os\nos.makedirs({site!r}, exist_ok=True)\n"
            + "".join(
                f"open({name!r}, 'w').write({planted!r})\n"
                for name in ("ipykernel_launcher.py", "sitecustomize.py", f"{site}/usercustomize.py")
            ),
        )
        died = ci.execute("import os; os._exit(3)")  # the next kernel starts in that workspace
        try:
            after = ci.execute("import os; print(os.path.exists('PLANTED-RAN'))", timeout=30)
            seen = after.to_observation()
        except InterpreterError as exc:  # the planted launcher killed the start: its message is what leaks
            seen = str(exc)
        assert "False" in seen, seen
        host.assert_unchanged(died.to_observation(), seen)


def test_web_downloads_and_figures_are_host_copies_the_kernel_cannot_swap(host):
    session = WebSession("attacker", llm=None, tool_names=["code_interpreter"])
    try:
        session.upload([_write(host.dir.parent / f"qa-test-{uuid.uuid4().hex}.csv", "a\n1\n")])
        ci = session._interpreter()
        ok(
            ci,
            "open('report.txt', 'w').write('numbers'); import matplotlib.pyplot as plt; plt.plot([1]); plt.show()",
        )
        files = session.export_files()
        figure = next(iter(ci.host_dir.glob("fig-*.png")))
        assert files and all(p.is_relative_to(ci.host_dir) for p in files)
        # the code now swaps every name in its workspace for a link to the host's secret
        swap = "import os\nfor n in os.listdir('.'):\n    if os.path.isfile(n):\n        os.unlink(n)\n"
        ok(ci, swap + f"        os.symlink({str(host.secret)!r}, n)")
        contents = [p.read_bytes() for p in files] + [figure.read_bytes()]
        again = [p.read_bytes() for p in session.export_files()]  # a later refresh of the download panel
        assert b"numbers" in contents and figure.read_bytes().startswith(b"\x89PNG")
        host.assert_unchanged(*contents, *again)
    finally:
        session.close()


def test_the_download_panel_survives_a_file_turned_into_a_directory_and_back():
    # a name the host copied as a file and the kernel then made a directory (or the reverse) must not make every
    # later export fail: the panel of that session would be broken for good
    with CodeInterpreter(timeout=30) as ci:
        ok(ci, "open('a', 'w').write('file')")
        assert [p.read_text() for p in ci.export_files()] == ["file"]
        ok(ci, "import os\nos.unlink('a'); os.mkdir('a'); open('a/b', 'w').write('inside')")
        assert {
            p.relative_to(ci.host_dir / "files").as_posix(): p.read_text() for p in ci.export_files()
        } == {"a/b": "inside"}
        ok(ci, "import shutil\nshutil.rmtree('a'); open('a', 'w').write('file again')")
        assert [p.read_text() for p in ci.export_files()] == ["file again"]


def test_a_sparse_file_costs_the_hosts_disk_no_more_than_the_kernels():
    # a 200 MiB file of holes takes no disk in the workspace; a plain copy would write 200 MiB on the host's, and
    # a few hundred such files would fill it
    with CodeInterpreter(timeout=30) as ci:
        ok(
            ci,
            "f = open('holes.bin', 'wb'); f.seek(100 << 20); f.write(b'data'); f.truncate(200 << 20); f.close()",
        )
        (copy,) = ci.export_files()
        assert copy.stat().st_size == 200 << 20 and copy.stat().st_blocks * 512 < 1 << 20
        with copy.open("rb") as f:
            f.seek(100 << 20)
            assert f.read(4) == b"data"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_mcp_image_content_is_the_hosts_copy(host):
    pytest.importorskip("mcp")
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "qwen_agent.cli", "mcp"],
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    plot = "import matplotlib.pyplot as plt\nplt.figure(dpi=200); plt.plot([1, 2]); plt.show()"
    swap = _SWAPPER + f"swap_when('fig-*.png', {str(host.secret)!r})"

    async def main():
        async with Client(server) as client:
            await client.call_tool("code_interpreter", {"code": swap})
            return [await client.call_tool("code_interpreter", {"code": plot}) for _ in range(3)]

    results = asyncio.run(main())
    images = [base64.b64decode(i.data) for r in results for i in r.content if i.type == "image"]
    assert len(images) == 3 and all(i.startswith(b"\x89PNG") for i in images)
    host.assert_unchanged(*images, *[r.model_dump_json() for r in results])


# ---- class 2: one session never reaches another -------------------------------------------------------------


def test_a_kernel_cannot_find_watch_or_connect_to_another(host):
    with CodeInterpreter(timeout=30) as a, CodeInterpreter(timeout=30) as b:
        ok(b, "secret_of_b = 'B-' + 'PRIVATE'")
        runtime = b._kernel.runtime
        shell = f"{b._kernel._conn['ip']}-{b._kernel._conn['shell_port']}"
        obs = ok(
            a,
            textwrap.dedent(f"""
            import ctypes, glob, json, os, socket
            libc = ctypes.CDLL(None, use_errno=True)
            found = {{"list": []}}
            try:
                found["list"] = [n for n in os.listdir("/tmp") if n.startswith("qa-")]
            except OSError:
                pass
            fd = libc.inotify_init()
            found["watch"] = libc.inotify_add_watch(fd, {str(runtime)!r}.encode(), 0xfff) >= 0
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect({shell!r}); found["connect"] = True
            except OSError as exc:
                found["connect"] = False
            try:
                found["key"] = open({str(runtime / "kernel.json")!r}).read()
            except OSError:
                found["key"] = None
            print(json.dumps(found))
            """),
        )
        assert '"watch": false' in obs and '"connect": false' in obs and '"key": null' in obs, obs
        assert '"list": []' in obs, obs
        assert "B-PRIVATE" in ok(b, "print(secret_of_b)")
        host.assert_unchanged(obs)


# ---- class 3: host IPC is out of reach ------------------------------------------------------------------------


def test_a_kernel_that_forks_cannot_starve_another_sessions_kernel():
    # kernels of a root host all run as uid 65534: a per-uid process limit counted when B started is used up by
    # what A forks afterwards, and B can then neither fork nor restart
    limits = sandbox.SandboxLimits(max_processes=32)  # a kernel alone has about 13 tasks
    with CodeInterpreter(timeout=30, limits=limits) as b, CodeInterpreter(timeout=30, limits=limits) as a:
        if b.sandbox_info()["pids_cgroup"] is None:
            pytest.skip(f"no pids cgroup here, only a per-uid limit: {b.sandbox_info()['notes']}")
        ok(b, "print('B is up')")
        ok(
            a,
            "import os, time\nfor _ in range(18):\n    if os.fork() == 0:\n        time.sleep(60); os._exit(0)",
        )
        obs = ok(
            b,
            textwrap.dedent("""
            import os, signal, time
            children = []
            try:
                for _ in range(6):
                    pid = os.fork()
                    if pid == 0:
                        time.sleep(60); os._exit(0)
                    children.append(pid)
            except OSError as exc:
                print(type(exc).__name__)
            print("forked", len(children))
            for pid in children:
                os.kill(pid, signal.SIGKILL); os.waitpid(pid, 0)
            """),
        )
    assert "forked 6" in obs, obs


@pytest.mark.parametrize("private", [False, True], ids=["world-writable", "host-user-only"])
def test_a_host_service_on_a_unix_socket_is_not_reachable(host, private):
    where = Path(tempfile.mkdtemp(prefix="qa-test-sock-"))
    where.chmod(0o700 if private else 0o777)
    path = where / "service.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    path.chmod(0o600 if private else 0o777)
    server.listen(4)
    served: list[bytes] = []

    def serve():
        server.settimeout(20)
        try:
            conn, _ = server.accept()
            conn.sendall(host.secret_text.encode())
            served.append(conn.recv(100))
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with CodeInterpreter(timeout=30) as ci:
            r = ci.execute(
                f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\n"
                "s.sendall(b'rm -rf /'); print(s.recv(100))"
            )
        assert r.error is not None and r.error.name in ("FileNotFoundError", "PermissionError"), (
            r.to_observation()
        )
        assert not served
        host.assert_unchanged(r.to_observation())
    finally:
        server.close()
        shutil.rmtree(where, ignore_errors=True)


def _shmget(key: int, size: int, flags: int) -> int:
    return libc.shmget(key, ctypes.c_size_t(size), flags)


def test_host_shared_memory_is_out_of_reach_and_the_kernels_own_goes_with_it(host):
    ipc_creat, ipc_rmid = 0o1000, 0
    key, kernel_key = 0x5A000000 + os.getpid() % 0x10000, 0x5B000000 + os.getpid() % 0x10000
    shmid = _shmget(key, 4096, ipc_creat | 0o666)
    assert shmid >= 0
    libc.shmat.restype = ctypes.c_void_p
    addr = libc.shmat(shmid, None, 0)
    ctypes.memmove(addr, host.secret_text.encode(), len(host.secret_text))
    try:
        with CodeInterpreter(timeout=30) as ci:
            obs = ok(
                ci,
                textwrap.dedent(f"""
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                libc.shmat.restype = ctypes.c_void_p
                host = libc.shmget({key}, ctypes.c_size_t(0), 0)
                print("host segment:", host, ctypes.string_at(libc.shmat(host, None, 0), 48) if host >= 0 else b"")
                mine = libc.shmget({kernel_key}, ctypes.c_size_t(1 << 20), 0o1000 | 0o666)
                print("own segment made:", mine >= 0)
                """),
            )
            assert "host segment: -1" in obs and "own segment made: True" in obs, obs
        assert _shmget(kernel_key, 0, 0) == -1, "the kernel's segment outlived close()"
        host.assert_unchanged(obs)
    finally:
        libc.shmdt(ctypes.c_void_p(addr))
        libc.shmctl(shmid, ipc_rmid, None)
        leftover = _shmget(kernel_key, 0, 0)
        if leftover >= 0:
            libc.shmctl(leftover, ipc_rmid, None)


def test_the_hosts_session_keyring_is_out_of_reach(host):
    add_key, keyctl = 248, 250
    session_keyring, keyctl_unlink = -3, 9
    description = f"qa-test-{uuid.uuid4().hex[:8]}".encode()

    def add() -> tuple[int, int]:
        made = libc.syscall(
            add_key, b"user", description, secret, len(secret), ctypes.c_long(session_keyring)
        )
        return made, ctypes.get_errno()

    secret = host.secret_text.encode()
    # kernels are started from this thread, and a session keyring is a thread's credential: add it there
    key, err = _SPAWNER.submit(add).result()
    if key < 0:
        pytest.skip(f"cannot add a key to this host's session keyring: {os.strerror(err)}")
    try:
        with CodeInterpreter(timeout=30) as ci:
            obs = ok(
                ci,
                textwrap.dedent(f"""
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                found = libc.syscall(250, 10, -3, b"user", {description!r}, 0)  # KEYCTL_SEARCH the session keyring
                direct = libc.syscall(250, 11, {key}, None, 0)  # KEYCTL_READ by id
                buf = ctypes.create_string_buffer(200)
                read = libc.syscall(250, 11, found, buf, 200) if found >= 0 else -1
                print("search:", found, "direct:", direct, "read:", buf.value if read > 0 else b"")
                """),
            )
        assert "search: -1 direct: -1 read: b''" in obs, obs
        host.assert_unchanged(obs)
    finally:
        _SPAWNER.submit(libc.syscall, keyctl, keyctl_unlink, key, ctypes.c_long(session_keyring)).result()


def test_io_uring_is_refused_since_its_operations_pass_no_seccomp_filter():
    # io_uring runs reads, writes, opens and socket calls submitted through a ring without each passing the
    # filter: a kernel with a ring would have every call the filter allows now and any it refuses later
    with CodeInterpreter(timeout=30) as ci:
        obs = ok(
            ci,
            textwrap.dedent("""
            import ctypes, errno
            libc = ctypes.CDLL(None, use_errno=True)
            params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
            ring = libc.syscall(425, 8, params)  # io_uring_setup
            print("ring:", ring, errno.errorcode.get(ctypes.get_errno()) if ring < 0 else "made")
            """),
        )
    assert "ring: -1 EPERM" in obs, obs


def test_sockets_the_network_namespace_does_not_cover_are_refused():
    # AF_VSOCK is not covered by the network namespace: on a virtual machine it reaches the hypervisor's services
    # whatever network=False says. Unix and IP sockets (inside the namespace) still work.
    with CodeInterpreter(timeout=30) as ci:
        obs = ok(
            ci,
            textwrap.dedent("""
            import errno, socket
            out = {}
            for name, family in (("vsock", 40), ("unix", socket.AF_UNIX), ("inet", socket.AF_INET)):
                try:
                    socket.socket(family, socket.SOCK_STREAM).close()
                    out[name] = "made"
                except OSError as exc:
                    out[name] = errno.errorcode[exc.errno]
            print(out)
            """),
        )
    assert "'vsock': 'EAFNOSUPPORT'" in obs and "'unix': 'made'" in obs and "'inet': 'made'" in obs, obs


# ---- class 5: defence in depth whatever layer is off ----------------------------------------------------------


def test_with_the_file_system_layer_off_the_host_settings_stay_out_of_reach(host):
    hostname = Path("/proc/sys/kernel/hostname").read_text().strip()
    before = {p: Path(p).read_text() for p in ("/proc/sys/kernel/hostname", "/proc/sys/kernel/domainname")}
    with CodeInterpreter(timeout=30, filesystem=False) as ci:
        # the same value written back: a success would show the hole without changing the host
        obs = ok(
            ci,
            textwrap.dedent(f"""
            import os, re, socket
            out = {{}}
            for path, value in (("/proc/sys/kernel/hostname", {hostname!r}), ("/proc/sys/kernel/domainname", {before["/proc/sys/kernel/domainname"].strip()!r})):
                try:
                    open(path, "w").write(value); out[path] = "written"
                except OSError as exc:
                    out[path] = type(exc).__name__
            try:
                socket.sethostname("qa-renamed"); out["sethostname"] = "renamed"
            except OSError as exc:
                out["sethostname"] = type(exc).__name__
            status = open("/proc/self/status").read()
            out["nnp"] = re.search(r"NoNewPrivs:\\s*(\\d)", status)[1]
            out["seccomp"] = re.search(r"Seccomp:\\s*(\\d)", status)[1]
            out["caps"] = sorted(set(re.findall(r"Cap(?:Inh|Prm|Eff|Bnd|Amb):\\s*(\\w+)", status)))
            print(out)
            """),
        )
        info = ci.sandbox_info()
    assert "written" not in obs and "renamed" not in obs, obs
    assert "'nnp': '1'" in obs and "'seccomp': '2'" in obs and "'caps': ['0000000000000000']" in obs, obs
    assert info["uts_namespace"] and info["no_new_privs"] and info["seccomp"]
    assert {p: Path(p).read_text() for p in before} == before
    host.assert_unchanged(obs)


# ---- class 4: close() leaves nothing --------------------------------------------------------------------------


def test_close_removes_everything_whatever_modes_the_kernel_set():
    ci = CodeInterpreter(timeout=30)
    dirs = [ci.workdir, ci.host_dir, ci._kernel.runtime]
    ok(
        ci,
        "import os\nos.makedirs('a/b/c'); open('a/b/c/f', 'w').write('x')\n"
        "os.chmod('a/b/c', 0); os.chmod('a/b', 0); os.chmod('a', 0)\nos.chmod('.', 0o500)",
    )
    ci.close()
    leftovers = [p for p in dirs if os.path.lexists(p) or os.path.lexists(f"{p}.owner")]
    assert not leftovers


def test_directories_nested_deeper_than_any_stack_neither_break_the_listing_nor_survive_close():
    ci = CodeInterpreter(timeout=30)
    dirs = [ci.workdir, ci.host_dir, ci._kernel.runtime]
    ok(
        ci,
        "import os\nopen('top.txt', 'w').write('x')\ntop = os.open('.', os.O_RDONLY)\n"
        "for _ in range(1500):\n    os.mkdir('d'); os.chdir('d')\nopen('leaf', 'w').write('x')\n"
        "os.chdir('..'); os.chmod('d', 0)\nos.fchdir(top)",
    )
    assert [p.name for p in ci.export_files()] == ["top.txt"]
    ci.close()
    leftovers = [p for p in dirs if os.path.lexists(p) or os.path.lexists(f"{p}.owner")]
    assert not leftovers
    # and what a killed host would have left is swept at the next start without failing it
    with CodeInterpreter(timeout=30) as again:
        ok(again, "print(1)")


# ---- the same attacks with an unprivileged host ---------------------------------------------------------------


def test_the_attacks_hold_as_an_unprivileged_host(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("already running as a non-root user: the tests above are the non-root run")
    if not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("setpriv(1) or unshare(1) is not installed")
    repo = Path(__file__).resolve().parents[1]
    # an installation below a private directory (/root, mode 0700) is shown to uid 65534 by a tmpfs over that
    # directory with the installation bind-mounted back, in a mount namespace of this test only
    script = ["set -e"]
    for i, path in enumerate(dict.fromkeys(Path(p).resolve() for p in (sys.base_prefix, sys.prefix, repo))):
        blocked = [p for p in [path, *path.parents] if os.stat(p).st_mode & 0o005 != 0o005]
        if not blocked:
            continue
        top = blocked[-1]
        if top == Path("/"):
            pytest.skip(f"{path} is not reachable by an unprivileged uid")
        child, stash = top / path.relative_to(top).parts[0], tmp_path / f"stash{i}"
        stash.mkdir()
        script += [
            f"mount --bind '{child}' '{stash}'",
            f"mountpoint -q '{top}' && [ -e '{top}/.qa-shown' ] || "
            f"{{ mount -t tmpfs -o mode=755 tmpfs '{top}'; touch '{top}/.qa-shown'; }}",
            f"mkdir -p '{child}'",
            f"mount --bind '{stash}' '{child}'",
        ]
    script.append(
        f"cd '{repo}' && exec setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"{sys.executable} -m pytest -q -p no:randomly -p no:cacheprovider '{Path(__file__).resolve()}' "
        # a non-root host has no pids cgroup of its own, only the per-uid limit that the starve test is about
        "-k 'not unprivileged_host and not starve_another'"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": os.environ["PATH"], "TMPDIR": "/tmp", "HOME": "/tmp", "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_the_sweep_removes_what_a_killed_host_left_whatever_modes_the_kernel_set():
    code = (
        "import sys\nfrom qwen_agent.tools import CodeInterpreter\nci = CodeInterpreter(timeout=30)\n"
        "r = ci.execute(\"import os\\nos.makedirs('a/b'); os.chmod('a/b', 0); os.chmod('a', 0)\")\n"
        "assert r.ok, r.to_observation()\n"
        "print(ci.workdir, ci.host_dir, ci._kernel.runtime, flush=True)\nsys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    ) as host:
        dirs = [Path(p) for p in host.stdout.readline().split()]
        host.kill()  # no close(), no finalizer: the host is gone
    assert len(dirs) == 3 and all(p.exists() for p in dirs)
    workspace.remove_stale_temp_dirs.__wrapped__()
    assert not [p for p in dirs if os.path.lexists(p) or os.path.lexists(f"{p}.owner")]


def test_require_isolation_refuses_when_a_layer_is_missing(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_new_root", lambda *_: "launcher: pivot_root failed: EPERM")
    with pytest.raises(SandboxError, match="private root"):
        CodeInterpreter(require_isolation=True)
    monkeypatch.setattr(sandbox._seccomp, "SUPPORTED", False)
    with pytest.raises(SandboxError, match="seccomp filter"):
        CodeInterpreter(require_isolation=True)


def test_the_kernel_log_and_the_hosts_copies_are_out_of_the_kernels_reach(host):
    with CodeInterpreter(timeout=30) as ci:
        ok(ci, "import matplotlib.pyplot as plt; plt.plot([1]); plt.show()")
        targets = [ci._kernel._log_path, ci.host_dir / "fig-001.png", ci.host_dir]
        obs = ok(
            ci,
            "import os\nfor t in "
            + repr([str(t) for t in targets])
            + ":\n    try:\n        os.unlink(t) if os.path.isfile(t) else os.listdir(t); print('reached', t)\n"
            "    except OSError as exc:\n        print(type(exc).__name__)\n"
            + f"    try:\n        os.symlink({str(host.secret)!r}, t + '.x'); print('planted', t)\n"
            "    except OSError as exc:\n        print(type(exc).__name__)",
        )
        assert "reached" not in obs and "planted" not in obs, obs
        assert all(t.exists() for t in targets)
        host.assert_unchanged(obs)
