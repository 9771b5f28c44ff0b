"""The code interpreter's file-system layer, attacked from inside a real kernel; the host must be unchanged.

Run as the current user (root here and in CI) and, when that is root, again as uid 65534 in a subprocess, so
both the root path (caps dropped, Landlock) and the unprivileged path (user namespace, Landlock) are exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from qwen_agent.errors import ConfigError, SandboxError
from qwen_agent.tools import CodeInterpreter, _landlock, sandbox, workspace

pytestmark = pytest.mark.skipif(
    _landlock.abi_version()[0] < 1, reason=f"no Landlock here: {_landlock.abi_version()[1]}"
)

# Each attack is one expression run in the kernel; ``try_all`` reports what it returned or the error it raised.
_TRY_ALL = """
import json, os
def try_all(attacks):
    out = {}
    for name, fn in attacks.items():
        try:
            out[name] = "ok: " + repr(fn())[:80]
        except Exception as exc:
            out[name] = f"denied: {type(exc).__name__}: {exc}"[:160]
    print(json.dumps(out))
"""


def attack_code(host: Path, other_workspace: Path, metadata: bool = True) -> tuple[str, str]:
    """The attacks of the file-system layer's threat list, as kernel code; ``host`` holds secret.txt/victim.txt."""
    escape = f"/tmp/qa-escape-{uuid.uuid4().hex}"
    return _TRY_ALL + textwrap.dedent(f"""
        host, other, escape = {str(host)!r}, {str(other_workspace)!r}, {escape!r}
        open("mine.txt", "w").write("mine")
        os.symlink(host + "/secret.txt", "file_link")
        os.symlink(host, "dir_link")
        def chdir_then(fn):
            os.chdir("/")
            try:
                return fn()
            finally:
                os.chdir(os.environ["HOME"])
        attacks = {{
            "read /etc/shadow": lambda: open("/etc/shadow").read(),
            "list /root": lambda: os.listdir("/root"),
            "list /home": lambda: os.listdir("/home"),
            "read host secret": lambda: open(host + "/secret.txt").read(),
            "list host dir": lambda: os.listdir(host),
            "read other workspace": lambda: open(other + "/theirs.txt").read(),
            "list other workspace": lambda: os.listdir(other),
            "write host dir": lambda: open(host + "/new.txt", "w").write("x"),
            "write /tmp": lambda: open(escape, "w").write("x"),
            "write /dev/shm": lambda: open("/dev/shm/qa-escape", "w").write("x"),
            "delete host file": lambda: os.remove(host + "/victim.txt"),
            "truncate host file": lambda: os.truncate(host + "/victim.txt", 0),
            "mkdir in host dir": lambda: os.mkdir(host + "/d"),
            "read through symlink": lambda: open("file_link").read(),
            "write through dir symlink": lambda: open("dir_link/new.txt", "w").write("x"),
            "hard link host file": lambda: os.link(host + "/secret.txt", "hard"),
            "rename out of workspace": lambda: os.rename("mine.txt", host + "/mine.txt"),
            "rename host file in": lambda: os.rename(host + "/victim.txt", "stolen.txt"),
            "chdir / then read": lambda: chdir_then(lambda: open("etc/shadow").read()),
            "chdir / then write": lambda: chdir_then(lambda: open(escape[1:], "w").write("x")),
            "read project checkout": lambda: open({str(Path(__file__).resolve())!r}).read(),
            "mount tmpfs": lambda: __import__("ctypes").CDLL(None, use_errno=True).mount(
                b"none", b"/mnt", b"tmpfs", 0, None) or "mounted",
        }}
        if {metadata!r}:  # what Landlock does not govern: refused by the read-only mounts
            attacks["chmod host file"] = lambda: os.chmod(host + "/secret.txt", 0o666)
            attacks["utime host file"] = lambda: os.utime(host + "/victim.txt", (0, 0))
            attacks["setxattr host file"] = lambda: os.setxattr(host + "/victim.txt", "user.x", b"1")
        try_all(attacks)
    """), escape


def check_attacks(out: dict[str, str], info: dict) -> None:
    """Every attack must be refused by the sandbox itself, not fail for some other reason (a missing file)."""
    # Landlock: EACCES, or EXDEV for a link or rename across its rules; the read-only mounts: EROFS (checked first)
    refused = ("denied: PermissionError", "denied: OSError: [Errno 18]")
    if info["filesystem"]["read_only_mounts"]:
        refused += ("denied: OSError: [Errno 30]",)
    if info["private_root"]:  # the kernel's own root: what is not in it does not exist there
        refused += ("denied: FileNotFoundError",)
    wrong = {
        name: outcome
        for name, outcome in out.items()
        if not outcome.startswith(refused)
        and not (name == "mount tmpfs" and outcome == "ok: -1")  # mount(2) returned -1 (EPERM)
        and not (name == "list /home" and not Path("/home").exists() and "FileNotFoundError" in outcome)
    }
    assert not wrong, f"attacks that were not refused: {wrong}"


def make_host_dir() -> Path:
    host = Path(tempfile.mkdtemp(prefix="qa-test-host-"))
    (host / "secret.txt").write_text("TOPSECRET")
    (host / "victim.txt").write_text("keep me")
    return host


def host_snapshot(host: Path) -> dict[str, tuple[bytes, int, int, list[str]]]:
    """Content, mode, mtime and extended attributes of each file."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns, os.listxattr(p))
        for p in sorted(host.iterdir())
    }


def run_json(ci: CodeInterpreter, code: str) -> dict[str, str]:
    r = ci.execute(code, timeout=60)
    assert r.ok, r.to_observation()
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def host_dir():
    host = make_host_dir()
    yield host
    shutil.rmtree(host, ignore_errors=True)


@pytest.mark.parametrize(
    "namespaces, private_root",
    [(True, True), (True, False), (False, False)],
    ids=["private-root+landlock", "landlock+read-only-mounts", "landlock-alone"],
)
def test_attacks_from_the_kernel_fail_and_leave_the_host_unchanged(
    host_dir, namespaces, private_root, monkeypatch
):
    if not namespaces:  # no mount namespace, so no read-only mounts: Landlock must refuse on its own
        monkeypatch.setattr(sandbox, "_probe_unshare", lambda _: ((), "turned off by the test"))
    if not private_root:  # the host's paths in view: Landlock and the read-only mounts must refuse
        monkeypatch.setattr(sandbox, "_probe_new_root", lambda *_: "turned off by the test")
    before = host_snapshot(host_dir)
    with CodeInterpreter(timeout=30) as ci, CodeInterpreter(timeout=30) as other:
        (other.workdir / "theirs.txt").write_text("THEIRS")
        info = ci.sandbox_info()
        assert info["filesystem"]["read_only_mounts"] == namespaces == info["pid_namespace"]
        assert info["private_root"] == private_root
        code, escape = attack_code(host_dir, other.workdir, metadata=namespaces)
        check_attacks(run_json(ci, code), info)
        assert host_snapshot(host_dir) == before
        assert not Path(escape).exists() and not Path("/dev/shm/qa-escape").exists()
        assert sorted(p.name for p in other.workdir.iterdir()) == ["theirs.txt"]
        # what the code may do in its own workspace it did: the file stayed, the links were made
        assert (ci.workdir / "mine.txt").read_text() == "mine" and (ci.workdir / "file_link").is_symlink()


def test_a_restarted_kernel_is_still_confined(host_dir):
    with CodeInterpreter(timeout=30) as ci:
        r = ci.execute("import os; os._exit(1)")
        assert r.restarted and r.error.name == "KernelDied"
        r = ci.execute(f"open({str(host_dir / 'secret.txt')!r}).read()")
        expected = "FileNotFoundError" if ci.sandbox_info()["private_root"] else "PermissionError"
        assert r.error is not None and r.error.name == expected
        assert ci.sandbox_info()["filesystem"]["active"]
        caps = ci.execute(
            "import re; print(re.findall(r'Cap(?:Inh|Prm|Eff|Bnd|Amb):\\s*(\\w+)', open('/proc/self/status').read()))"
        )
        assert caps.stdout == f"{['0000000000000000'] * 5}\n", "root in the kernel keeps no capability"


def test_the_scientific_stack_works_in_the_workspace_and_granted_read_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sales.csv").write_text("month,amount\n1,10\n2,32\n")
    with CodeInterpreter(timeout=60, read_paths=[data]) as ci:
        (ci.workdir / "upload.csv").write_text("x,y\n1,2\n3,4\n")
        r = ci.execute(
            textwrap.dedent(f"""
            import numpy as np, pandas as pd, matplotlib.pyplot as plt
            df = pd.read_csv("upload.csv")
            sales = pd.read_csv({str(data / "sales.csv")!r})
            print(int(df.x.sum()), int(sales.amount.sum()), float(np.mean(df.y)))
            df.to_csv("out.csv", index=False)
            plt.plot(sales.month, sales.amount)
            plt.savefig("saved.png")
            plt.show()
            """),
            timeout=60,
        )
        assert r.ok, r.to_observation()
        assert r.stdout == "4 42 3.0\n"
        assert len(r.images) == 1 and r.images[0].read_bytes()[:4] == b"\x89PNG"
        assert (ci.workdir / "saved.png").stat().st_size > 0 and (ci.workdir / "out.csv").exists()
        r = ci.execute(
            "import scipy.stats, sympy, seaborn as sns\n"
            "print(round(float(scipy.stats.norm.cdf(0)), 2), sympy.factor(sympy.Symbol('x')**2 - 1))\n"
            "sns.histplot(df.x); plt.show()",
            timeout=60,
        )
        assert r.stdout == "0.5 (x - 1)*(x + 1)\n" and len(r.images) == 1, r.to_observation()
        r = ci.execute(f"open({str(data / 'new.csv')!r}, 'w')")
        assert r.error is not None and ("Permission denied" in r.error.value or "Read-only" in r.error.value)
        assert sorted(p.name for p in data.iterdir()) == ["sales.csv"]
        fs = ci.sandbox_info()["filesystem"]
        assert fs["active"] and fs["mechanism"].startswith("landlock ABI")
        assert str(data) in fs["read_roots"] and str(ci.workdir) in fs["write_roots"]
        assert not any(root in ("/", "/root", "/home", "/tmp", "/etc") for root in fs["read_roots"])


def test_the_layer_can_be_turned_off_and_says_so(host_dir):
    with CodeInterpreter(timeout=30, filesystem=False) as ci:
        assert ci.execute(f"print(open({str(host_dir / 'secret.txt')!r}).read())").stdout == "TOPSECRET\n"
        info = ci.sandbox_info()
        assert not info["filesystem"]["active"] and any("filesystem=False" in n for n in info["notes"])
    with pytest.raises(SandboxError, match="require_isolation=True contradicts filesystem=False"):
        CodeInterpreter(filesystem=False, require_isolation=True)
    with pytest.raises(ConfigError, match="read_paths entry '/nonexistent/data' does not exist"):
        CodeInterpreter(read_paths=["/nonexistent/data"])


def test_without_landlock_the_layer_is_reported_off_or_refused(monkeypatch):
    monkeypatch.setattr(_landlock, "abi_version", lambda: (0, "the kernel (4.19) has no Landlock"))
    with pytest.raises(SandboxError, match="required but unavailable: the kernel .4.19. has no Landlock"):
        CodeInterpreter(require_isolation=True)
    with CodeInterpreter(timeout=30) as ci:
        info = ci.sandbox_info()
        assert not info["filesystem"]["active"] and info["filesystem"]["read_roots"] == []
        assert any("file system not confined" in n and "4.19" in n for n in info["notes"])
        assert ci.execute("print(1)").stdout == "1\n"


# ---- the same attacks as an unprivileged user ----------------------------------------------------------------

_NONROOT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from qwen_agent.tools import CodeInterpreter
from tests.test_sandbox_filesystem import attack_code, run_json
host, other_dir = sys.argv[2], sys.argv[3]
with CodeInterpreter(timeout=30) as ci:
    code, escape = attack_code(__import__("pathlib").Path(host), __import__("pathlib").Path(other_dir))
    out = run_json(ci, code)
    print(json.dumps({"attacks": out, "escape": escape, "info": ci.sandbox_info()}))
"""


def _reachable_by_nobody(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


def test_attacks_fail_as_an_unprivileged_user_too(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("already running as a non-root user: the tests above are the non-root run")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv(1) is not installed")
    repo = Path(__file__).resolve().parents[1]
    needed = [Path(sys.base_prefix), Path(sys.prefix), repo]
    # An installation below a private directory (e.g. /root, mode 0700) is shown to uid 65534 in a private mount
    # namespace: a world-readable tmpfs over that directory with the installation bind-mounted back in place.
    mounts = []
    for path in needed:
        blocked = [p for p in [path, *path.parents] if os.stat(p).st_mode & 0o005 != 0o005]
        if blocked:
            top = blocked[-1]
            if top == Path("/"):
                pytest.skip(f"{path} is not reachable by an unprivileged uid")
            mounts.append((top, path.relative_to(top).parts[0]))
    script = ["set -e"]
    for i, (top, child) in enumerate(dict.fromkeys(mounts)):
        stash = tmp_path / f"stash{i}"
        stash.mkdir()
        script += [
            f"mount --bind '{top / child}' '{stash}'",
            f"mount -t tmpfs -o mode=755 tmpfs '{top}'",
            f"mkdir '{top / child}'",
            f"mount --bind '{stash}' '{top / child}'",
        ]
    host = make_host_dir()
    other = Path(tempfile.mkdtemp(prefix="qa-test-other-"))
    try:
        (other / "theirs.txt").write_text("THEIRS")
        for path in (host, host / "secret.txt", host / "victim.txt", other, other / "theirs.txt"):
            os.chown(
                path, 65534, 65534
            )  # everything the attacker should not reach is its own: only Landlock stops it
        before = host_snapshot(host)
        script.append(
            f"exec setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable} -c '{_NONROOT_SCRIPT}' "
            f"'{repo}' '{host}' '{other}'"
        )
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ["PATH"], "TMPDIR": "/tmp"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        check_attacks(report["attacks"], report["info"])
        assert report["info"]["filesystem"]["active"] and report["info"]["pid_namespace"]
        assert host_snapshot(host) == before and not Path(report["escape"]).exists()
        assert sorted(p.name for p in other.iterdir()) == ["theirs.txt"]
    finally:
        shutil.rmtree(host, ignore_errors=True)
        shutil.rmtree(other, ignore_errors=True)


# ---- a root host: the kernel runs as the sandbox uid --------------------------------------------------------


def _needs_root_with_mount_namespace() -> None:
    if os.geteuid() != 0:
        pytest.skip("the host is not root: the kernel already runs as the host's unprivileged uid")
    unshare = sandbox._probe_unshare(True)[0]
    if not unshare or sandbox._probe_read_only_mounts(unshare):
        pytest.skip("no private mount namespace here to show hidden paths in")


def _unsearchable_dirs(paths: list[Path]) -> list[Path]:
    """The outermost directory above each path that other uids cannot search."""
    tops = ([p for p in reversed(path.parents) if os.stat(p).st_mode & 0o001 == 0][:1] for path in paths)
    return sorted({top for found in tops for top in found})


def _dir_state(paths: list[Path]) -> dict[Path, tuple[int, int, int, list[str]]]:
    """Mode, owner, mtime and entries of each directory: what a chmod, chown or mount on the host would change."""
    return {
        p: (p.stat().st_mode, p.stat().st_uid, p.stat().st_mtime_ns, sorted(os.listdir(p))) for p in paths
    }


def _host_mounts() -> list[str]:
    return sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_a_root_host_runs_the_kernel_as_the_sandbox_uid_with_hidden_paths_shown(tmp_path, monkeypatch):
    _needs_root_with_mount_namespace()
    # without a private root (which holds only the roots anyway), hidden directories are shown by a tmpfs
    monkeypatch.setattr(sandbox, "_probe_new_root", lambda *_: "turned off by the test")
    data, workdir = tmp_path / "data", tmp_path / "work"  # pytest's tmp_path lies below a 0700 directory
    data.mkdir()
    (data / "sales.csv").write_text("month,amount\n1,10\n2,32\n")
    hidden = _unsearchable_dirs([Path(sys.base_prefix).resolve(), data])
    assert hidden, "pytest's base temp dir (mode 0700) is not searchable by others"
    before, mounts = _dir_state(hidden), _host_mounts()
    with CodeInterpreter(timeout=60, workdir=workdir, read_paths=[data]) as ci:
        info = ci.sandbox_info()
        assert info["separate_uid"] == 65534 and info["shown_to_uid"] == [str(p) for p in hidden]
        assert any(n.startswith("kernel runs as uid 65534;") for n in info["notes"]), info["notes"]
        ci.upload(b"x\n5\n", "up.csv")
        r = ci.execute(
            textwrap.dedent(f"""
            import os, numpy as np, pandas as pd, matplotlib.pyplot as plt
            sales = pd.read_csv({str(data / "sales.csv")!r})
            print(os.getuid(), os.getgid(), int(sales.amount.sum()), int(pd.read_csv("up.csv").x.sum()))
            open("made.txt", "w").write("k")
            plt.plot(sales.month, np.asarray(sales.amount)); plt.show()
            """),
            timeout=60,
        )
        assert r.stdout == "65534 65534 42 5\n" and len(r.images) == 1, r.to_observation()
        assert (workdir / "made.txt").stat().st_uid == 65534 and r.images[
            0
        ].stat().st_uid == 0  # the host's copy
        assert (workdir / r.images[0].name).stat().st_uid == 65534  # the code's copy
        # in the kernel's namespace a hidden directory holds only the roots shown (stat is not Landlock's)
        (tmp_path / "beside.txt").write_text("not shown")
        r = ci.execute(
            f"print(os.path.lexists({str(tmp_path / 'beside.txt')!r}), os.path.lexists('made.txt'))"
        )
        assert r.stdout == "False True\n", r.to_observation()
        r = ci.execute(f"open({str(data / 'new.csv')!r}, 'w')")
        assert r.error is not None and "Read-only file system" in r.error.value, r.to_observation()
        assert _host_mounts() == mounts, "a mount leaked into the host's namespace"
    assert _dir_state(hidden) == before and sorted(p.name for p in data.iterdir()) == ["sales.csv"]


def test_a_root_host_keeps_the_kernel_root_and_says_why_when_a_read_root_is_closed(tmp_path):
    _needs_root_with_mount_namespace()
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with CodeInterpreter(timeout=30, read_paths=[closed]) as ci:
        info = ci.sandbox_info()
        assert info["separate_uid"] is None and info["shown_to_uid"] == []
        assert f"kernel runs as root: {closed} is not readable by an unprivileged uid" in info["notes"]
        assert ci.execute("import os; print(os.getuid())").stdout == "0\n"


@pytest.mark.parametrize("why", ["no namespace", "tmpfs refused"])
def test_a_hidden_installation_that_cannot_be_shown_keeps_the_kernel_root(monkeypatch, why):
    if os.geteuid() != 0:
        pytest.skip("the host is not root")
    hidden = _unsearchable_dirs([Path(sys.base_prefix).resolve()])
    if not hidden:
        pytest.skip("the Python installation is readable by others here: the kernel runs as uid 65534 anyway")
    if why == "no namespace":
        monkeypatch.setattr(sandbox, "_probe_unshare", lambda _: ((), "turned off by the test"))
        expected = (
            f"below {hidden[0]}, which an unprivileged uid cannot search, and no private mount namespace"
        )
    else:  # the remounts work but showing the installation does not (as a security module might refuse)
        refused = f"launcher: cannot mount a tmpfs over {hidden[0]}: Permission denied"
        monkeypatch.setattr(sandbox, "_probe_read_only_mounts", lambda _, show=(): refused if show else "")
        expected = f"{hidden[0]} cannot be shown to an unprivileged uid: {refused}"
    with CodeInterpreter(timeout=30) as ci:
        info = ci.sandbox_info()
        assert info["separate_uid"] is None and info["shown_to_uid"] == []
        assert any(n.startswith("kernel runs as root:") and expected in n for n in info["notes"]), info[
            "notes"
        ]
        assert ci.execute("import os; print(os.getuid())").stdout == "0\n"


def test_read_roots_hold_no_home_or_checkout():
    roots = sandbox.plan_filesystem([], enabled=True, required=False)[0]
    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in roots and "/root" not in roots and "/home" not in roots and "/" not in roots


def test_upload_copies_into_the_workspace_without_following_the_kernels_symlinks(host_dir, tmp_path):
    before = host_snapshot(host_dir)
    src = tmp_path / "sales.csv"
    src.write_text("a,b\n1,2\n")
    with CodeInterpreter(timeout=30) as ci:
        # the code plants symlinks to a host file under the names the host will write next
        victim, planted = (
            str(host_dir / "victim.txt"),
            str(host_dir / "planted.png"),
        )  # the latter not there yet
        r = ci.execute(
            f"import os\nos.symlink({victim!r}, 'sales.csv')\nos.symlink({planted!r}, 'fig-001.png')"
        )
        assert r.ok, r.to_observation()
        assert ci.upload(src) == ci.workdir / "sales.csv" and not (ci.workdir / "sales.csv").is_symlink()
        ci.upload(b"x\n7\n", "raw.csv")
        r = ci.execute(
            "import pandas as pd, matplotlib.pyplot as plt\n"
            "print(int(pd.read_csv('sales.csv').b.sum()), int(pd.read_csv('raw.csv').x.sum()))\n"
            "plt.plot([1, 2]); plt.show()"
        )
        assert r.stdout == "2 7\n", r.to_observation()
        # the host keeps its copy apart; the code's copy takes the next name the kernel has not made
        assert r.images == [ci.host_dir / "fig-002.png"] and (ci.workdir / "fig-001.png").is_symlink()
        assert (ci.workdir / "fig-002.png").read_bytes() == r.images[0].read_bytes()
        for bad, message in ((b"x", "name is required"), (src, "plain file name")):
            with pytest.raises(ConfigError, match=message):
                ci.upload(bad, None if isinstance(bad, bytes) else "../up.csv")
        with pytest.raises(ConfigError, match="is not a file"):
            ci.upload(tmp_path)
    assert host_snapshot(host_dir) == before


# ---- the sweep of stale temporary directories ---------------------------------------------------------------


def test_only_directories_whose_owner_is_provably_gone_are_swept():
    dead = subprocess.Popen(["true"])
    dead.wait()
    made = {label: workspace.private_temp_dir("work") for label in ("dead", "other_ns", "rebooted", "alive")}
    unmarked = Path(tempfile.mkdtemp(prefix=f"qa-work-{dead.pid}-"))  # no marker: not provably this package's
    try:
        for label, path in made.items():
            marker = path.with_name(path.name + ".owner")
            identity = json.loads(marker.read_text())
            assert identity["pid"] == os.getpid()
            if label == "dead":
                identity["pid"] = dead.pid
            elif (
                label == "other_ns"
            ):  # a host in another pid namespace sharing /tmp: its pid means nothing here
                identity.update(pid=dead.pid, pid_ns="pid:[1]")
            elif label == "rebooted":
                identity["boot_id"] = "00000000-0000-0000-0000-000000000000"
            marker.write_text(json.dumps(identity))
        workspace.remove_stale_temp_dirs.__wrapped__()
        left = {label for label, path in made.items() if path.exists()}
        assert left == {"other_ns", "alive"} and unmarked.exists()
        assert not made["dead"].with_name(made["dead"].name + ".owner").exists()
    finally:
        for path in [*made.values(), unmarked]:
            workspace.remove_private_temp_dir(path)


@pytest.mark.skipif(_landlock.abi_version()[0] < 6, reason="signal scoping needs Landlock ABI 6")
def test_without_a_pid_namespace_the_kernel_still_cannot_signal_the_host(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_unshare", lambda _: ((), "turned off by the test"))
    with CodeInterpreter(timeout=30) as ci:
        assert not ci.sandbox_info()["pid_namespace"]
        r = ci.execute(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
        assert r.error is not None and r.error.name == "PermissionError", r.to_observation()


def test_cli_sandbox_lists_the_file_system_layer(capsys):
    from qwen_agent.cli import main

    assert main(["sandbox"]) == 0
    fs = json.loads(capsys.readouterr().out)["filesystem"]
    assert fs["active"] and "/usr" in fs["read_roots"] and len(fs["write_roots"]) == 2


def test_the_kernel_can_run_another_python_whose_installation_becomes_readable(tmp_path):
    import sysconfig

    venv = tmp_path / "kernel-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    with pytest.raises(ConfigError, match=f"python '{python}' cannot run a kernel: has no ipykernel"):
        CodeInterpreter(python=python)  # the venv has no packages yet
    # the packages come from this environment's site-packages through a .pth file, as a kernelspec's env may
    site_dir = Path(
        subprocess.check_output(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site_dir / "host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sandbox.python_installation.cache_clear()
    with CodeInterpreter(timeout=30, python=python) as ci:
        r = ci.execute("import sys, pandas\nprint(sys.prefix)")
        assert r.stdout == f"{venv}\n", r.to_observation()
        assert str(venv) in ci.sandbox_info()["filesystem"]["read_roots"]
    with pytest.raises(ConfigError, match="python '/no/such/python' is not an executable file"):
        CodeInterpreter(python="/no/such/python")


def test_where_mounts_cannot_be_made_read_only_the_layer_says_so_and_landlock_still_holds(
    host_dir, monkeypatch
):
    unshare = sandbox._probe_unshare(True)[0]
    if not unshare:
        pytest.skip("no namespaces here: the read-only mounts are off anyway")
    assert sandbox._probe_read_only_mounts(unshare) == "", "works on this machine"
    monkeypatch.setattr(
        sandbox, "_probe_read_only_mounts", lambda *_: "launcher: cannot make / read-only: EPERM"
    )
    monkeypatch.setattr(sandbox, "_probe_new_root", lambda *_: "launcher: pivot_root failed: EPERM")
    with CodeInterpreter(timeout=30) as ci:
        info = ci.sandbox_info()
        assert info["pid_namespace"] and info["filesystem"]["active"]
        assert not info["filesystem"]["read_only_mounts"]
        assert any("mounts not made read-only" in note and "EPERM" in note for note in info["notes"])
        r = ci.execute(f"open({str(host_dir / 'new.txt')!r}, 'w')")
        assert r.error is not None and r.error.name == "PermissionError", r.to_observation()
