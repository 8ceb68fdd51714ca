"""The README is a front door: short, and every docs page is reachable from it; no link points nowhere."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")  # [text](target#anchor)


def local_links(page: Path) -> list[Path]:
    targets = [m.group(1) for m in LINK.finditer(page.read_text())]
    return [(page.parent / t).resolve() for t in targets if not re.match(r"[a-z]+://", t)]


def test_the_readme_is_at_most_300_lines_and_links_every_docs_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    linked = set(local_links(readme))
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_every_local_link_of_the_readme_and_the_docs_exists():
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for target in local_links(page)
        if not target.exists()
    ]
    assert broken == []
