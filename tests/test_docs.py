"""The README is the front door: short, and every page of docs/ is one link away; no link points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        REPO / "weights" / "README.md",
        REPO / "tests" / "golden" / "README.md",
    ]


def test_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {m.group(1) for m in LINK.finditer(readme)}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"
    assert "make serve" in readme and "make test" in readme


def test_relative_links_point_at_files_that_exist():
    broken = []
    for md in markdown_files():
        for m in LINK.finditer(md.read_text()):
            target = m.group(1).split("#")[0]
            if not target or re.match(r"^[a-z]+:", target):  # in-page anchors, http(s), mailto
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(REPO)} -> {m.group(1)}")
    assert not broken, broken
