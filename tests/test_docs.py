"""The README stays a newcomer's path (the reference lives in docs/), and every relative link in the
README and docs/ points at a file of the repository."""
import re

from conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


def test_relative_links_resolve():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
    broken = [f"{page.relative_to(REPO)}: {target}" for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, broken


def test_every_doc_is_reachable_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"docs/{p.name}" not in readme] == []
