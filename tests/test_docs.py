"""The docs hold together: every relative link in README.md, CONTRIBUTING.md and docs/*.md points at a file
of the repository, and the README stays a first page (about 200 lines; the reference lives in docs/)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_link_check_would_see_a_broken_link(tmp_path):
    page = tmp_path / "x.md"
    page.write_text("see [a](missing.md) and [b](https://example.org) and [c](#here)")
    found = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://", t) and not t.startswith("#")]
    assert found == ["missing.md"] and not (tmp_path / "missing.md").exists()


def test_the_readme_is_a_first_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    assert "make demo" in text and "make test" in text  # the two commands, near the top
    assert text.index("make demo") < 1500
