"""MkDocs hook: the API reference page lists every public name of ``qwen_agent.__all__``.

The page holds a placeholder; this hook replaces it with one mkdocstrings directive per exported name, read from
the package's own export table, so a name added to the public API appears in the reference without an edit.
"""

from __future__ import annotations

import ast
from pathlib import Path

PLACEHOLDER = "<!-- public-api -->"
PACKAGE_INIT = Path(__file__).parents[2] / "qwen_agent" / "__init__.py"


def public_names() -> dict[str, str]:
    """``qwen_agent._EXPORTS`` (public name -> defining module), read without importing the package."""
    tree = ast.parse(PACKAGE_INIT.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{PACKAGE_INIT}: no _EXPORTS table")


def on_page_markdown(markdown: str, page, **_) -> str:  # noqa: ANN001 (mkdocs' Page)
    if PLACEHOLDER not in markdown:
        return markdown
    by_module: dict[str, list[str]] = {}
    for name, module in public_names().items():
        by_module.setdefault(module, []).append(name)
    sections = []
    for module, names in by_module.items():
        directives = "\n\n".join(
            f"::: {module}.{name}\n    options:\n      heading_level: 3" for name in names
        )
        sections.append(f"## `{module}`\n\n{directives}")
    return markdown.replace(PLACEHOLDER, "\n\n".join(sections))
