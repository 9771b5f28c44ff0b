"""``qwen-agent web`` in a real browser: headless Chromium (Debian's) driven by Playwright on 127.0.0.1.

The agent is driven by a ScriptedLLM (so the steps are known) and once by the tiny random-weight checkpoint; the
kernels are real sandboxed Jupyter kernels. Screenshots go into the test's temp dir.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="the web UI needs the [web] extra (gradio)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright (the [test] extra)"
)

from qwen_agent.llm import ScriptedLLM  # noqa: E402
from qwen_agent.serve.web import build_app  # noqa: E402

CHROMIUM = Path(os.environ.get("QWEN_AGENT_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (install Debian's chromium package, or set QWEN_AGENT_CHROMIUM)",
        allow_module_level=True,
    )

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
UI_TIMEOUT_MS = 60_000

STEP_CODE = (
    "Thought: I will compute it with Python.\nAction: code_interpreter\nAction Input:\n"
    "```py\nsecret = 'alpha-42'\nprint(6 * 7)\n```\nObservation:"
)
FINAL_42 = (
    "Thought: I now know the final answer.\nFinal Answer: The answer is 42, computed in Python by the agent."
)
STEP_PLOT = (
    "Thought: I will plot the uploaded table.\nAction: code_interpreter\nAction Input:\n```py\n"
    "import pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_csv('data.csv')\n"
    "plt.figure(figsize=(5, 3))\nplt.plot(df['x'], df['y'], marker='o')\nplt.title('y against x')\n"
    "plt.show()\n```\nObservation:"
)
FINAL_PLOT = "Thought: I now know the final answer.\nFinal Answer: The chart shows y growing faster than x."
STEP_PEEK = (
    "Thought: Let me look for a variable.\nAction: code_interpreter\nAction Input:\n"
    "```py\nimport os\nprint(sorted(os.listdir('.')))\nprint(secret)\n```\nObservation:"
)
FINAL_PEEK = "Thought: I now know the final answer.\nFinal Answer: There is no such variable here."


class SlowLLM:
    """Replays a ScriptedLLM with a pause per piece, so the page can be seen streaming."""

    def __init__(self, outputs: list[str], delay: float = 0.08):
        self.llm = ScriptedLLM(outputs, chunk_size=4)
        self.delay = delay

    def complete(self, prompt, *, stop=(), sampling=None):
        return self.llm.complete(prompt, stop=stop, sampling=sampling)

    def stream(self, prompt, *, stop=(), sampling=None):
        for item in self.llm.stream(prompt, stop=stop, sampling=sampling):
            time.sleep(self.delay)
            yield item


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kernel_processes() -> int:
    """Live kernels started by this process (the server runs in it)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        # the launcher, or the kernel it became by exec where no namespaces are used
        is_kernel = b"_launcher.py" in cmdline or b"ipykernel_launcher" in cmdline
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and is_kernel:
            count += 1
    return count


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        # a launched (non-persistent) browser gets a fresh temporary profile (user-data-dir) from Playwright
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    apps = []

    def start(new_llm, tools=("code_interpreter", "current_time"), **options) -> str:
        app = build_app(new_llm, list(tools), **options)
        port = _free_port()
        app.launch("127.0.0.1", port, prevent_thread_lock=True, quiet=True)
        apps.append(app)
        return f"http://127.0.0.1:{port}/"

    yield start
    for app in apps:
        app.close()


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#qa-input textarea")
    page.wait_for_function("document.querySelector('#qa-status')?.innerText.includes('kernels')")
    return context, page


def _ask(page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.set_input_files("#qa-input input[type=file]", [str(f) for f in files])
        page.locator("#qa-input .thumbnail-item").nth(len(files) - 1).wait_for()
    page.fill("#qa-input textarea", text)
    page.keyboard.press("Enter")


def _bot_texts(page) -> list[str]:
    return page.eval_on_selector_all(
        "#qa-chat [data-testid=bot] .message-content", "els => els.map(e => e.innerText.trim())"
    )


def _wait_answer(page, answer: str) -> None:
    page.wait_for_function(
        """answer => [...document.querySelectorAll('#qa-chat [data-testid=bot] .message-content')]
            .some(e => e.innerText.trim() === answer)""",
        arg=answer,
    )


def _wait_turn_done(page) -> None:
    """Until the chat's event has finished (Gradio hides the component's status tracker)."""
    page.locator("#qa-chat [data-testid=bot]").first.wait_for()
    page.wait_for_function(
        "document.querySelector('#qa-chat > [data-testid=status-tracker]').classList.contains('hide')"
    )
    assert not page.locator("#qa-chat .thought-group .title", has_text="running").count()


def _status_kernels(page) -> int:
    return int(re.search(r"kernels on this server: (\d+)", page.inner_text("#qa-status")).group(1))


def _open_step(page, title: str) -> str:
    """Open the step block with this title and return its text."""
    group = page.locator("#qa-chat .thought-group", has=page.locator(".title", has_text=title)).last
    group.locator(".title").click()
    group.locator("pre").first.wait_for()
    return group.inner_text()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_browser_run_with_steps_upload_figure_and_new_chat(browser, serve, tmp_path: Path) -> None:
    scripts = iter([[STEP_CODE, FINAL_42, STEP_PLOT, FINAL_PLOT], [STEP_PEEK, FINAL_PEEK]])
    backends: list[SlowLLM] = []

    def new_llm() -> SlowLLM:
        backends.append(SlowLLM(next(scripts)))
        return backends[-1]

    url = serve(new_llm)
    csv = tmp_path / "data.csv"
    csv.write_text("x,y\n1,1\n2,4\n3,9\n4,16\n5,25\n")
    kernels_before = _kernel_processes()

    context_a, page = _open(browser, url)
    assert _status_kernels(page) == 0

    # a question; the answer streams in
    _ask(page, "What is 6 times 7?")
    answer = "The answer is 42, computed in Python by the agent."
    seen: set[str] = set()
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while answer not in seen and time.monotonic() < deadline:
        seen.update(t for t in _bot_texts(page) if t and answer.startswith(t))
        time.sleep(0.03)
    assert answer in seen
    assert any(len(t) < len(answer) for t in seen), f"the answer appeared at once, not streamed: {seen}"

    # the step block: thought, code (highlighted as Python), observation
    _wait_turn_done(page)
    step = _open_step(page, "Step 1 · code_interpreter")
    assert "I will compute it with Python." in step
    assert "print(6 * 7)" in step and "secret = 'alpha-42'" in step
    assert "42" in step.split("Observation", 1)[1]
    assert page.locator("#qa-chat .thought-group pre code.language-python").count() >= 1
    assert _status_kernels(page) == 1

    # upload a CSV: the model is told its name; the figure comes back as an image
    _ask(page, "Plot y against x", [csv])
    _wait_answer(page, "The chart shows y growing faster than x.")
    prompt, _ = backends[0].llm.calls[2]
    assert prompt.query.endswith("[Upload file data.csv]\nPlot y against x")
    image = page.locator("#qa-chat [data-testid=bot] img").first
    image.wait_for()
    assert image.evaluate("img => img.complete && img.naturalWidth > 100")
    page.wait_for_selector("#qa-files td.filename[aria-label='data.csv']")
    page.wait_for_selector("#qa-files td.filename[aria-label='fig-001.png']")
    _wait_turn_done(page)  # a later update of the chat would close the block again
    plot_step = _open_step(page, "Step 1 · code_interpreter")
    assert "pd.read_csv('data.csv')" in plot_step and "fig-001" in plot_step

    # a second browser context at the same time: its own session, kernel, history and files
    context_b, other = _open(browser, url)
    _ask(other, "Is there a variable called secret?")
    _wait_answer(other, "There is no such variable here.")
    peek = _open_step(other, "Step 1 · code_interpreter")
    assert "[]" in peek, "the second session's workspace is not empty"
    assert "NameError" in peek and "name 'secret' is not defined" in peek
    chat_b = other.inner_text("#qa-chat")
    assert "6 times 7" not in chat_b and "data.csv" not in chat_b and "alpha-42" not in chat_b
    assert "data.csv" not in other.inner_text("#qa-files")
    assert "secret" not in page.inner_text("#qa-chat").replace("secret = 'alpha-42'", "")
    assert _status_kernels(other) == 2
    assert _kernel_processes() - kernels_before == 2
    other.screenshot(path=str(tmp_path / "web-other.png"), full_page=True)

    # the first page after the run, with the plot step open (the README's screenshot)
    group = page.locator("#qa-chat .thought-group").last
    if not group.locator("pre").count():
        group.locator(".title").click()
    group.locator("pre").first.wait_for()
    page.set_viewport_size({"width": 1280, "height": 1350})  # room for the step and its figure
    time.sleep(0.5)  # the block's opening animation, the resize
    page.screenshot(path=str(tmp_path / "web-run.png"))

    # New chat closes this session's kernel; its chat and files are gone
    page.click("#qa-new")
    page.wait_for_function("document.querySelector('#qa-status').innerText.includes('not started')")
    assert _status_kernels(page) == 1
    assert page.locator("#qa-chat [data-testid=bot]").count() == 0
    _wait(lambda: _kernel_processes() - kernels_before == 1, "the kernel to be closed by New chat")

    # closing the other tab closes its kernel (Gradio's unload event)
    context_b.close()
    _wait(lambda: _kernel_processes() == kernels_before, "the closed tab's kernel to be closed")
    context_a.close()


class RecordingLLM:
    """Passes calls to a backend and keeps the sampling settings and prompts it was given."""

    def __init__(self, llm):
        self.llm = llm
        self.calls = []

    def complete(self, prompt, *, stop=(), sampling=None):
        self.calls.append((prompt, sampling))
        return self.llm.complete(prompt, stop=stop, sampling=sampling)

    def stream(self, prompt, *, stop=(), sampling=None):
        self.calls.append((prompt, sampling))
        yield from self.llm.stream(prompt, stop=stop, sampling=sampling)


def test_browser_with_the_tiny_checkpoint_and_the_settings_panel(
    browser, serve, tiny_qwen_dir, tmp_path
) -> None:
    from qwen_agent.llm import LocalLLM
    from qwen_agent.runtime.engine import load_model

    engine = load_model(tiny_qwen_dir, device="cpu")  # as `qwen-agent web` runs it: one LocalLLM, shared
    engine.scheduler.configure(max_batch=4)
    backend = RecordingLLM(LocalLLM(engine))
    try:
        url = serve(lambda: backend, max_tokens=16)
        context, page = _open(browser, url)
        page.click("#qa-settings button")  # open the settings panel
        page.locator("#qa-tools label", has_text="current_time").click()  # turn the tool off
        page.locator("#qa-greedy label").click()
        page.fill("#qa-system textarea", "You are a terse test assistant.")
        _ask(page, "What time is it?")
        _wait_turn_done(page)
        assert backend.calls, "the model was never called"
        prompt, sampling = backend.calls[0]
        assert sampling.temperature == 0.0 and sampling.max_tokens == 16
        assert prompt.system == "You are a terse test assistant."
        assert "code_interpreter" in prompt.query and "current_time" not in prompt.query
        assert page.locator("#qa-chat [data-testid=bot]").count() >= 1
        page.screenshot(path=str(tmp_path / "web-tiny.png"), full_page=True)
        context.close()
    finally:
        engine.close()


def test_browser_stop_ends_a_running_cell_and_backend_errors_show_in_the_chat(
    browser, serve, tmp_path
) -> None:
    loop = (
        "Thought: This will take a while.\nAction: code_interpreter\nAction Input:\n```py\nkept = 7\n"
        "import time\nwhile True:\n    time.sleep(0.1)\n```\nObservation:"
    )
    after = "Thought: Checking the kernel.\nAction: code_interpreter\nAction Input:\n```py\nprint(kept * 6)\n```\nObservation:"
    url = serve(lambda: ScriptedLLM([loop, after, "Final Answer: The kernel kept its variables."]))
    context, page = _open(browser, url)
    _ask(page, "Run forever")
    page.locator("#qa-chat .thought-group .title", has_text="running").wait_for()  # the step is running
    time.sleep(1.0)  # the cell is in its loop
    started = time.monotonic()
    page.click("#qa-stop")
    _wait_answer(page, "Stopped.")
    took = time.monotonic() - started
    assert took < 15, f"Stop took {took:.1f} s:\n{_open_step(page, 'Step 1 · code_interpreter')}"
    assert page.locator("#qa-chat .thought-group .title", has_text="failed").count() == 1
    # the session goes on, with the kernel and its variables
    _ask(page, "Is the kernel alive?")
    _wait_answer(page, "The kernel kept its variables.")
    assert "42" in _open_step(page, "Step 1 · code_interpreter").split("Observation")[-1]
    context.close()

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    from qwen_agent.openai_client import OpenAICompatibleLLM

    url = serve(lambda: OpenAICompatibleLLM(dead, "qwen", max_retries=0, connect_timeout=2))
    context, page = _open(browser, url)
    _ask(page, "Hello?")
    page.wait_for_selector("#qa-chat [data-testid=bot] :text('Error')")
    text = page.inner_text("#qa-chat")
    assert "LLMConnectionError" in text and "127.0.0.1" in text
    assert "Traceback" not in text
    page.screenshot(path=str(tmp_path / "web-error.png"), full_page=True)
    context.close()


# the kernel's code keeps swapping its files for links to a host secret, so any host step that checks a name and
# then reads it (Gradio copies files again on every update) would hand the secret to the browser
STEP_SWAP = (
    "Thought: I will write a report and a chart.\nAction: code_interpreter\nAction Input:\n```py\n"
    "import os, threading, time\nimport matplotlib.pyplot as plt\n"
    "open('report.txt', 'w').write('numbers')\nplt.plot([1, 2, 3]); plt.show()\n"
    "done = threading.Event()\n"
    "def swap():\n"
    "    while not done.is_set():\n"
    "        for name in [n for n in os.listdir('.') if n.endswith(('.txt', '.png'))]:\n"
    "            data = open(name, 'rb').read() if not os.path.islink(name) else None\n"
    "            if data is None:\n                continue\n"
    "            os.unlink(name); os.symlink(SECRET_PATH, name); time.sleep(0.002)\n"
    "            os.unlink(name); open(name, 'wb').write(data)\n"
    "        time.sleep(0.001)\n"
    "swapper = threading.Thread(target=swap, daemon=True)\nswapper.start()\n```\nObservation:"
)
STEP_AGAIN = (
    "Thought: Once more.\nAction: code_interpreter\nAction Input:\n```py\nimport time; time.sleep(1); print('ok')\n"
    "```\nObservation:"
)
STEP_STOP = (  # the files stay from here on, for the last update to list
    "Thought: Enough.\nAction: code_interpreter\nAction Input:\n```py\ndone.set(); swapper.join(); print('ok')\n"
    "```\nObservation:"
)
FINAL_SWAP = "Thought: I now know the final answer.\nFinal Answer: Done."


def test_the_browser_gets_host_copies_of_workspace_files_and_figures(browser, serve, tmp_path: Path) -> None:
    import urllib.request

    secret_dir = Path(tempfile.mkdtemp(prefix="qa-test-host-"))
    secret_text = f"TOPSECRET-{uuid.uuid4().hex}"
    secret = secret_dir / "secret.txt"
    secret.write_text(secret_text)
    secret.chmod(0o600)
    step = STEP_SWAP.replace("SECRET_PATH", repr(str(secret)))
    url = serve(lambda: SlowLLM([step, STEP_AGAIN, STEP_AGAIN, STEP_STOP, FINAL_SWAP], delay=0.01))
    try:
        context, page = _open(browser, url)
        _ask(page, "Write a report")
        _wait_answer(page, "Done.")
        page.wait_for_selector("#qa-files td.filename[aria-label='report.txt']")
        links = page.eval_on_selector_all(
            "#qa-files a[href], #qa-chat [data-testid=bot] img[src]", "els => els.map(e => e.href || e.src)"
        )
        assert len(links) >= 3, links  # report.txt, fig-001.png and the figure in the chat
        fetched = [urllib.request.urlopen(link, timeout=10).read() for link in links]
        assert b"numbers" in fetched and any(f.startswith(b"\x89PNG") for f in fetched)
        assert all(secret_text.encode() not in f for f in fetched)
        assert secret_text not in page.content()
        cached = [p for p in Path(gr.Blocks().GRADIO_CACHE).rglob("*") if p.is_file()]
        assert not [p for p in cached if secret_text.encode() in p.read_bytes()], "Gradio cached the secret"
        assert secret.read_text() == secret_text and secret.stat().st_mode & 0o777 == 0o600
        context.close()
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
