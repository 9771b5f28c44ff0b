"""The documentation stays whole: the site builds with ``--strict``, the API reference lists every public name,
README links resolve, and every code block in README.md and docs/ either runs here or says what it needs.

A code block is marked by an HTML comment just above its opening fence:

- ``<!-- run -->``: this test runs it (``python`` blocks in a fresh interpreter, ``sh`` blocks line by line in
  bash with the environment's ``bin`` on ``PATH``, ``json`` blocks are parsed), each in an empty directory;
- ``<!-- ran-by: tests/test_x.py -->``: that test file runs it (it must exist and read this document);
- ``<!-- needs: WHAT -->``: it cannot run here, and WHAT says why (a real model, a GPU, a fresh machine ...).

``text`` and ``mermaid`` blocks are pictures (trees, diagrams), not code, and need no mark.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PICTURES = {"text", "mermaid"}
MARK = re.compile(r"<!--\s*(run|ran-by:\s*(?P<by>\S+)|needs:\s*(?P<needs>.+?))\s*-->")


@dataclass
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    mark: re.Match | None

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line} ({self.language or 'no language'})"


def code_blocks(document: Path) -> list[Block]:
    """The fenced blocks of a markdown file (``` fences, possibly indented in a list)."""
    lines = document.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"(\s*)```(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, language = opening.group(1), opening.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        code = "\n".join(line[len(indent) :] for line in lines[i + 1 : end]) + "\n"
        above = i - 1  # the comments stacked just above the fence
        while above >= 0 and lines[above].strip().startswith("<!--"):
            above -= 1
        mark = next(filter(None, (MARK.search(line) for line in lines[above + 1 : i])), None)
        blocks.append(Block(document, i + 1, language, code, mark))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for document in DOCUMENTS for block in code_blocks(document)]
RUNNABLE = [b for b in ALL_BLOCKS if b.mark and b.mark.group(1) == "run"]


def test_every_code_block_runs_or_says_what_it_needs():
    unmarked = [str(b) for b in ALL_BLOCKS if b.language not in PICTURES and b.mark is None]
    assert not unmarked, "code blocks with no <!-- run -->, <!-- ran-by: ... --> or <!-- needs: ... -->: " + (
        ", ".join(unmarked)
    )


def test_blocks_ran_elsewhere_are_read_by_that_test():
    for block in ALL_BLOCKS:
        if block.mark and block.mark.group("by"):
            runner = ROOT / block.mark.group("by")
            assert runner.is_file(), f"{block}: {runner} does not exist"
            assert block.document.name in runner.read_text(), f"{block}: {runner.name} never reads it"


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block: Block, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if block.language == "json":
        json.loads(block.code)
    elif block.language == "python":
        subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, env=env, check=True, timeout=600)
    elif block.language == "sh":
        script = "set -euo pipefail\n" + block.code
        subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, check=True, timeout=600)
    else:
        pytest.fail(f"{block}: no way to run a {block.language!r} block")


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_site_builds_strict_with_every_public_name(tmp_path):
    import qwen_agent

    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", ROOT / "mkdocs.yml", "-d", site],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    broken = [
        f"{page.relative_to(site)} -> {link}" for page in site.rglob("*.html") for link in dead_anchors(page)
    ]
    assert not broken, f"links to anchors that do not exist: {broken}"
    api = (site / "reference" / "api" / "index.html").read_text()
    public = [name for name in qwen_agent.__all__ if name not in ("__version__", "errors")]
    missing = [name for name in public if f'id="{qwen_agent._EXPORTS[name]}.{name}"' not in api]
    assert not missing, f"the API reference lacks {missing}"


def dead_anchors(page: Path) -> list[str]:
    """The links of a built page to ``#anchor`` on itself or on another page of the site that has no such id
    (MkDocs checks that linked pages exist, not the anchors within them)."""
    html, dead = page.read_text(), []
    for target, anchor in re.findall(r'href="([^"#:]*)#([^"]+)"', html):
        if not target:
            other = page
        elif target.endswith("/"):
            other = page.parent / target / "index.html"
        else:
            other = page.parent / target
        if other.is_file() and f'id="{anchor}"' not in other.read_text():
            dead.append(f"{target}#{anchor}")
    return dead
