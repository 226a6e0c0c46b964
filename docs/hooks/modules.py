"""MkDocs hook: the architecture page's module table, generated from each module's docstring
at build time, so the layout it shows is the one in the tree."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

MARKER = "<!-- modules -->"
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")


def _summary(path: Path) -> str:
    """The docstring's first paragraph, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def render(root: Path = ROOT) -> str:
    lines = []
    for package in PACKAGES:
        lines += [f"### `{package}/`", "", "| module | what it holds |", "|---|---|"]
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "__main__.py" or "__pycache__" in path.parts:
                continue
            name = path.relative_to(root).as_posix()
            summary = _summary(path)
            if path.name == "__init__.py" and path.parent != root / package:
                name = path.parent.relative_to(root).as_posix() + "/"
            elif path.name == "__init__.py" or not summary:
                continue
            lines.append(f"| `{name}` | {summary} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
