"""CodeInterpreter against a real sandboxed IPython kernel: outputs, deadlines, crashes, limits, isolation."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qwen_agent.errors import InterpreterError
from qwen_agent.tools import CodeInterpreter, CodeInterpreterTool, SandboxLimits

TIMEOUT = 2.0  # short per-call deadline for the timeout tests
SLACK = 3.0  # the spec: a timeout result within timeout + 3 s


def _procs_mentioning(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _wait_gone(marker: str, within: float = 5.0) -> list[int]:
    end = time.monotonic() + within
    while time.monotonic() < end:
        left = _procs_mentioning(marker)
        if not left:
            return []
        time.sleep(0.05)
    return _procs_mentioning(marker)


@pytest.fixture(scope="module")
def ci():
    with CodeInterpreter(timeout=10) as interp:
        yield interp


@pytest.fixture
def fresh():
    """A separate interpreter for tests that break or restart the kernel."""
    made = []

    def make(**kwargs):
        interp = CodeInterpreter(**{"timeout": 10, **kwargs})
        made.append(interp)
        return interp

    yield make
    for interp in made:
        interp.close()


# ---- outputs ------------------------------------------------------------------------------------------------


def test_state_persists_across_calls(ci):
    assert ci.execute("counter = 40").ok
    ci.execute("counter += 2")
    assert ci.execute("print(counter)").stdout == "42\n"


def test_stdout_stderr_result_and_error_are_captured(ci):
    r = ci.execute("import sys\nprint('out')\nprint('err', file=sys.stderr)\n6 * 7")
    assert (r.stdout, r.stderr, r.result, r.error) == ("out\n", "err\n", "42", None)
    assert r.ok and not r.timed_out and not r.truncated

    r = ci.execute("def f():\n    return 1 / 0\nf()")
    assert r.error.name == "ZeroDivisionError"
    assert r.error.value == "division by zero"
    assert "return 1 / 0" in r.error.traceback and "\x1b[" not in r.error.traceback
    obs = r.to_observation()
    assert obs.startswith("error:\n\n```\n") and obs.endswith("ZeroDivisionError: division by zero\n```")


def test_observation_format_follows_the_qwen_benchmark(ci):
    assert (
        ci.call({"code": "print('hi')\n'done'"})
        == "stdout:\n\n```\nhi\n```\n\nexecute_result:\n\n```\n'done'\n```"
    )
    assert ci.call("```python\nx_unused = 1\n```") == "Finished execution."


def test_matplotlib_figure_comes_back_as_png_file(ci):
    r = ci.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')")
    assert r.error is None, r.error
    assert len(r.images) == 1
    png = r.images[0]
    # the host's copy is in its own directory; the code finds one under the same name in the workspace
    assert png.parent == ci.host_dir and png.suffix == ".png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ci.workdir / png.name).read_bytes() == png.read_bytes()
    assert f"![fig-001]({png})" in r.to_observation()


# ---- deadlines ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["while True:\n    pass", "import time\ntime.sleep(10**6)"], ids=["busy", "sleep"]
)
def test_runaway_code_times_out_and_the_interpreter_keeps_working(fresh, code):
    interp = fresh()
    interp.execute("kept = 'yes'")
    start = time.monotonic()
    r = interp.execute(code, timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert r.timed_out and r.error.name == "TimeoutError"
    assert elapsed < TIMEOUT + SLACK
    assert "time limit" in r.to_observation()
    assert interp.execute("print(kept)").stdout == "yes\n"  # interrupted, not restarted


def test_input_fails_at_once_instead_of_hanging(fresh):
    interp = fresh()
    start = time.monotonic()
    r = interp.execute("name = input('name? ')", timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert r.error is not None and r.error.name == "StdinNotImplementedError"
    assert interp.execute("print('alive')").stdout == "alive\n"


def test_code_that_ignores_the_interrupt_is_killed_and_the_kernel_restarted(fresh):
    interp = fresh(grace=0.5)
    interp.execute("lost = 1")
    old_pid = interp.pid
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    start = time.monotonic()
    r = interp.execute(code, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + SLACK
    assert r.timed_out and r.restarted and r.state_lost
    assert "restarted" in r.error.value
    assert interp.pid != old_pid
    assert interp.execute("print('lost' in globals())").stdout == "False\n"


# ---- crashes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "how"),
    [("import os\nos._exit(1)", "exited with status 1"), ("import ctypes\nctypes.string_at(0)", "SIGSEGV")],
    ids=["os_exit", "segfault"],
)
def test_dead_kernel_is_restarted_and_reported(fresh, code, how):
    interp = fresh()
    interp.execute("before = 1")
    r = interp.execute(code)
    assert r.restarted and r.state_lost and r.error.name == "KernelDied"
    assert how in r.error.value and "variables were lost" in r.error.value
    assert interp.execute("print(1 + 1)").stdout == "2\n"
    assert interp.execute("print('before' in globals())").stdout == "False\n"


def _unreaped_child(pid: int) -> bool:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def test_a_dead_kernels_process_group_is_signalled_only_before_it_is_reaped(fresh, monkeypatch):
    """Once the kernel's launcher is reaped, its pid (the group's id) may be handed to an unrelated process (pids
    wrap at pid_max, 32,768 on many machines): restarting after a crash, and closing, signal the group only while
    the launcher is still an unreaped child, and do signal it (what the dead kernel started must not live on)."""
    interp = fresh()
    dead = interp._kernel.proc.pid
    signalled, killpg = [], os.killpg
    monkeypatch.setattr(
        os,
        "killpg",
        lambda pgid, sig: (signalled.append((pgid, _unreaped_child(pgid))), killpg(pgid, sig))[1],
    )
    assert interp.execute("import os\nos._exit(1)").restarted
    interp.close()
    assert (dead, True) in signalled and (dead, False) not in signalled


# ---- resource limits ----------------------------------------------------------------------------------------


def test_fork_bomb_is_contained(fresh):
    interp = fresh(limits=SandboxLimits(max_processes=16))
    if interp.sandbox_info()["process_limit"] is None:
        pytest.skip(f"no process limit on this platform: {interp.sandbox_info()['notes']}")
    bomb = textwrap.dedent("""
        import os, time
        forks = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(120)
                    os._exit(0)
                forks += 1
        except OSError as exc:
            print(forks, type(exc).__name__)
    """)
    r = interp.execute(bomb, timeout=20)
    forks, error = r.stdout.split()
    assert error == "BlockingIOError" and int(forks) <= 16
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
    interp.reset()  # kills the sleeping children with the old kernel
    assert interp.execute("import subprocess\nprint(subprocess.run(['true']).returncode)").stdout == "0\n"


def test_memory_bomb_is_contained(fresh):
    interp = fresh(limits=SandboxLimits(memory_bytes=1 << 30))
    host_rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = interp.execute("blob = bytearray(10**12)")
    assert r.error.name == "MemoryError"
    r = interp.execute("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", timeout=20)
    assert r.error.name in ("MemoryError", "KernelDied"), r.error
    assert interp.execute("chunks = None\nprint('ok')").stdout.endswith("ok\n")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - host_rss_before < 200 * 1024  # KiB


def test_huge_output_is_truncated_with_head_tail_and_count(fresh):
    interp = fresh(max_output_chars=2000)
    r = interp.execute("print('a' * 1000 + 'x' * 50_000_000 + 'z' * 1000)", timeout=30)
    assert r.truncated and len(r.stdout) < 2100
    assert r.stdout.startswith("a" * 1000) and r.stdout.endswith("z" * 999 + "\n")
    assert "[50000001 characters elided]" in r.stdout
    r = interp.execute("for i in range(100_000):\n    print(i)", timeout=30)
    assert r.truncated and r.stdout.startswith("0\n1\n2\n") and r.stdout.endswith("99998\n99999\n")
    assert interp.execute("print('after')").stdout == "after\n"


def test_disk_fill_is_stopped_by_the_file_size_limit(fresh):
    interp = fresh(limits=SandboxLimits(max_file_bytes=1 << 20))
    r = interp.execute("with open('big.bin', 'wb') as f:\n    f.write(b'0' * (2 << 20))")
    assert r.error is not None and "File too large" in r.error.value
    assert (interp.workdir / "big.bin").stat().st_size <= 1 << 20


# ---- isolation ----------------------------------------------------------------------------------------------


def test_kernel_cannot_read_parent_secrets(fresh, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    interp = fresh()
    r = interp.execute("import os\nprint(os.environ.get('OPENAI_API_KEY'))")
    assert r.stdout == "None\n"
    info = interp.sandbox_info()
    if not (info["pid_namespace"] or info["separate_uid"] is not None):
        pytest.skip("without a pid namespace or a separate uid the host's /proc/<pid>/environ is readable")
    scan = textwrap.dedent(f"""
        import glob
        hits = []
        for path in glob.glob('/proc/*/environ'):
            try:
                if b'{secret}' in open(path, 'rb').read():
                    hits.append(path)
            except OSError:
                pass
        print(hits)
    """)
    assert interp.execute(scan).stdout == "[]\n"


def _tcp_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=lambda: server.accept()[0].close(), daemon=True).start()
    return server


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"


def test_network_egress_fails_when_the_network_layer_is_active(fresh):
    interp = fresh()
    if not interp.sandbox_info()["network_isolated"]:
        pytest.skip(f"no network namespace here: {interp.sandbox_info()['notes']}")
    server = _tcp_server()
    r = interp.execute(CONNECT.format(port=server.getsockname()[1]))
    assert r.stdout == "" and r.error.name in ("ConnectionRefusedError", "OSError", "TimeoutError"), r.error
    # control: the same code reaches the server when the network is allowed
    open_interp = fresh(network=True)
    assert open_interp.execute(CONNECT.format(port=server.getsockname()[1])).stdout == "connected\n"
    server.close()


def test_two_interpreters_share_neither_variables_nor_files(fresh):
    a, b = fresh(), fresh()
    a.execute("only_in_a = 1\nopen('a.txt', 'w').write('a')")
    assert b.execute("print('only_in_a' in globals())").stdout == "False\n"
    assert (
        b.execute("import os\nprint(sorted(f for f in os.listdir('.') if not f.startswith('.')))").stdout
        == "[]\n"
    )
    assert a.workdir != b.workdir and (a.workdir / "a.txt").exists()


# ---- no orphans ---------------------------------------------------------------------------------------------


def _daemons_are_contained(info: dict) -> bool:
    """A daemon that left the kernel's process group dies with it only inside a pid namespace or pids cgroup."""
    return bool(info["pid_namespace"] or info["pids_cgroup"])


def _reap_or_skip(info: dict, marker: str) -> None:
    if _daemons_are_contained(info):
        assert _wait_gone(marker) == []
        return
    for pid in _procs_mentioning(marker):
        os.kill(pid, signal.SIGKILL)
    pytest.skip(
        "no pid namespace or pids cgroup here: a setsid daemon outlives the kernel (see sandbox_info notes)"
    )


def test_close_leaves_no_process_behind_even_a_setsid_daemon():
    interp = CodeInterpreter(timeout=10)
    info = interp.sandbox_info()
    marker = "1000.4242"
    r = interp.execute(
        f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'], start_new_session=True)\nprint('ok')"
    )
    assert r.stdout == "ok\n"
    runtime = str(interp._kernel.runtime)
    assert _procs_mentioning(runtime) and _procs_mentioning(marker)
    interp.close()
    assert _wait_gone(runtime) == []
    with pytest.raises(InterpreterError, match="closed"):
        interp.execute("1")
    _reap_or_skip(info, marker)


HOST = textwrap.dedent("""
    import sys, time
    from qwen_agent.tools import CodeInterpreter
    ci = CodeInterpreter(timeout=10)
    ci.execute("import subprocess; subprocess.Popen(['sleep', '1000.777'], start_new_session=True)")
    print(ci._kernel.runtime, ci.workdir, flush=True)
    sys.stdin.readline()     # the test checks the kernel is up, then lets us go
    if sys.argv[1] == "exit":
        sys.exit(0)          # no close(): the finalizer must clean up
    time.sleep(600)          # killed by the test
""")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_kernel_survives_the_host(how, ci):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    with subprocess.Popen([sys.executable, "-c", HOST, how], text=True, env=env, **pipes) as host:
        runtime, workdir = host.stdout.readline().split()
        assert runtime and _procs_mentioning(runtime)
        host.stdin.write("go\n")
        host.stdin.flush()
        if how == "sigkill":
            os.kill(host.pid, signal.SIGKILL)
        host.wait(timeout=30)
    assert _wait_gone(runtime) == []
    info = ci.sandbox_info()
    if how == "exit":
        assert not Path(workdir).exists() and not Path(runtime).exists()
    else:  # the dead host's leftovers go when the next host starts an interpreter
        cleaner = "from qwen_agent.tools import CodeInterpreter; CodeInterpreter().close()"
        subprocess.run([sys.executable, "-c", cleaner], env=env, check=True, timeout=60)
        assert not Path(workdir).exists() and not Path(runtime).exists()
        assert not list(Path("/sys/fs/cgroup/pids").glob(f"qwen-agent-{host.pid}-*"))
    _reap_or_skip(info, "1000.777")


# ---- tool wrapper and reporting -----------------------------------------------------------------------------


def test_code_interpreter_tool_runs_fenced_code(ci):
    tool = CodeInterpreterTool(interpreter=ci)
    res = tool.invoke("```py\nprint(sum(range(5)))\n```")
    assert res.ok and res.observation == "stdout:\n\n```\n10\n```"
    assert res.data.stdout == "10\n"
    res = tool.invoke('{"code": "print(\\"json form\\")"}')
    assert res.data.stdout == "json form\n"


def test_code_that_raises_is_a_failed_tool_call(ci):
    res = CodeInterpreterTool(interpreter=ci).invoke("```py\n1 / 0\n```")
    assert not res.ok and res.error_kind == "tool_error"
    assert "ZeroDivisionError" in res.observation and res.error == res.observation
    assert res.data.error.name == "ZeroDivisionError"


def test_sandbox_info_reports_layers_and_reasons(ci):
    info = ci.sandbox_info()
    assert info["process_group"] and info["parent_death_signal"] and info["scrubbed_env"]
    assert info["transport"] == "ipc" and info["workspace"] == str(ci.workdir)
    assert info["rlimits"]["as"] == 4 << 30 and info["rlimits"]["core"] == 0
    for layer in ("pid_namespace", "network_isolated"):
        if not info[layer]:
            assert info["notes"], "an inactive layer must come with a reason"
    assert ci.execute("import os\nprint(os.getcwd())").stdout == f"{ci.workdir}\n"


def test_bad_settings_are_config_errors():
    from qwen_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="timeout must be a positive number of seconds, got 0"):
        CodeInterpreter(timeout=0)
    with pytest.raises(ConfigError, match="max_output_chars must be at least 100"):
        CodeInterpreter(max_output_chars=10)


def test_kernel_dead_between_calls_is_restarted_with_a_note(fresh):
    interp = fresh()
    interp.execute("gone = 1")
    os.killpg(interp.pid, signal.SIGKILL)  # e.g. the OOM killer
    interp._kernel.proc.wait(timeout=5)
    r = interp.execute("print('gone' in globals())")
    assert r.stdout == "False\n" and r.restarted and r.state_lost
    assert r.to_observation().startswith("Note: the kernel had stopped and was restarted")


def test_cli_sandbox_prints_the_layers(capsys):
    import json

    from qwen_agent.cli import main

    assert main(["sandbox"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["process_group"] and info["transport"] == "ipc" and "notes" in info


def test_a_kernel_started_from_a_thread_outlives_the_thread(fresh):
    # a web server starts kernels from worker threads that end; the kernel must not die with its thread
    holder = {}

    def start() -> None:
        holder["ci"] = fresh(timeout=10)
        holder["ok"] = holder["ci"].execute("x = 6 * 7").ok  # the kernel is up before the thread ends

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    ci = holder["ci"]
    assert holder["ok"]
    time.sleep(0.5)  # a kernel killed with its thread would be dead by now
    result = ci.execute("print(x)")
    assert result.stdout == "42\n" and not result.restarted


def test_interrupt_from_another_thread_stops_the_cell_and_keeps_variables(fresh):
    ci = fresh(timeout=30)
    ci.execute("kept = 1")
    timer = threading.Timer(1.0, ci.interrupt)
    timer.start()
    started = time.monotonic()
    result = ci.execute("import time\nwhile True: time.sleep(0.05)")
    timer.join()
    assert time.monotonic() - started < 10
    assert result.error is not None and result.error.name == "KeyboardInterrupt"
    assert ci.execute("print(kept)").stdout == "1\n"
