"""The README's and docs/*.md's relative links (pages, images, folders, #anchors) resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _links() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        out += [(page.relative_to(ROOT).as_posix(), target)
                for target in re.findall(r"\]\(([^)\s]+)\)", text)
                if not re.match(r"[a-z]+:", target)]
    return out


def test_slug_is_githubs() -> None:
    assert _slug("The lens (`gradlens.GradLens`)") == "the-lens-gradlensgradlens"
    assert _slug("Comparing optimizers (`gradlens compare`)") == "comparing-optimizers-gradlens-compare"


def test_pages_link_to_the_docs() -> None:
    targets = {t for page, t in _links() if page == "README.md"}
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in targets, f"the README links {doc.name}"


@pytest.mark.parametrize(("page", "target"), _links())
def test_relative_link_resolves(page: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    where = (ROOT / page).parent / path if path else ROOT / page
    assert where.exists(), f"{page}: {target}"
    if anchor:
        assert anchor in _anchors(where), f"{page}: {target}"
