"""The README's mechanism-only Python snippets run as written, and its relative links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-test -->"


def _marked_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```", re.DOTALL)
    return pattern.findall(text)


def test_readme_has_marked_snippets():
    # The mechanism snippet and the design snippet at least; a README edit that drops the marker
    # would silently stop testing them.
    assert len(_marked_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_marked_blocks())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (e.g. a search checkpoint)
    code = _marked_blocks()[index]
    namespace: dict = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code, f"README.md snippet {index}", "exec"), namespace)


def test_readme_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in link]
    missing = [link for link in links if not (README.parent / link).exists()]
    assert not missing, f"README links that do not resolve: {missing}"
    assert "../shared" not in text
