"""The docs stay true: measured figures match their committed result files, every relative link and image
resolves (anchors included), code points only at docs that exist, and the README stays a front page."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def load_figures():
    """scripts/ is not an installed package: load the generator from its file."""
    spec = importlib.util.spec_from_file_location("figures", ROOT / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = load_figures()


def prose(text: str) -> str:
    """The markdown without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m[1])  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def dead_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link or image of a markdown file that does not resolve inside the repository."""
    out = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path.resolve()
        where = f"{path.relative_to(root)}: {target}"
        if not dest.is_relative_to(root.resolve()):
            out.append(f"{where} (outside the repository)")
        elif not dest.exists():
            out.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where} (no such heading)")
    return out


def test_every_figure_matches_its_result_file():
    stale = figures.problems(figures.markdown_files())
    assert not stale, "stale figures; run `python scripts/figures.py`:\n" + "\n".join(stale)


def test_the_readme_shows_generated_figures():
    assert figures.REGION.search((ROOT / "README.md").read_text())


def test_the_generator_rewrites_stale_regions_and_reports_broken_ones(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": {"b": [0.5, 2]}, "run x": {"n": 8}}))
    page = tmp_path / "p.md"
    page.write_text("x <!-- fig r.json#a.b.0:.1% -->1%<!-- /fig --> and "
                    "<!-- fig r.json#a.b.1 / run x.n:.2f -->0.25<!-- /fig -->\n"
                    "<!-- fig r.json#a.c:.1f -->?<!-- /fig -->\n")
    found = figures.problems([page], tmp_path)
    assert found[0] == "p.md:1: r.json#a.b.0:.1% shows '1%', the file gives '50.0%'"
    assert len(found) == 2 and "KeyError" in found[1]
    fixed = figures.render(page.read_text().splitlines()[0], tmp_path)
    assert fixed == ("x <!-- fig r.json#a.b.0:.1% -->50.0%<!-- /fig --> and "
                     "<!-- fig r.json#a.b.1 / run x.n:.2f -->0.25<!-- /fig -->")


def test_every_relative_link_and_image_resolves():
    dead = [d for path in figures.markdown_files() for d in dead_links(path)]
    assert not dead, "\n".join(dead)


def test_the_link_check_finds_dead_links_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text("# Hello, world\n## Hello, world\n")
    page = tmp_path / "p.md"
    page.write_text("[ok](a.md#hello-world-1) [bad](a.md#nope) ![gone](x.png) [web](https://x.org)\n"
                    "```\n[code](missing.md)\n```\n`[inline](missing.md)` [up](../x.md)\n")
    assert [d.split(": ", 1)[1] for d in dead_links(page, tmp_path)] == [
        "a.md#nope (no such heading)", "x.png (no such file)", "../x.md (outside the repository)"]


def test_code_points_only_at_docs_that_exist():
    missing = {f"{py.relative_to(ROOT)}: {ref}"
               for pkg in ("policy", "actors", "rewards", "learner", "world", "bench", "cluster")
               for py in (ROOT / pkg).rglob("*.py")
               for ref in re.findall(r"docs/[\w/.-]*?\.(?:md|json|png)", py.read_text())
               if not (ROOT / ref).exists()}
    assert not missing, "\n".join(sorted(missing))


def test_the_readme_is_a_front_page_that_indexes_every_doc():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md is too long; move detail into docs/"
    linked = set(LINK.findall(prose(text)))
    unlisted = [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")) if f"docs/{p.name}" not in linked]
    assert not unlisted, f"add to the README's documentation index: {unlisted}"


def test_the_studies_index_is_generated_from_their_results():
    from learner.study_index import main

    assert main(["--check"]) == 0, "docs/study/README.md or README.md is stale: run python -m learner.study_index"


def test_the_readme_quotes_the_study_table_between_its_markers():
    from learner.study_index import BEGIN, END, quoted

    text = quoted(f"intro\n{BEGIN}\na stale row\n{END}\noutro\n")
    assert text.startswith(f"intro\n{BEGIN}\n| study | claim | verdict |") and text.endswith(f"{END}\noutro\n")
    assert "a stale row" not in text and "| [rethinking](docs/study/rethinking/RESULTS.md) |" in text
    with pytest.raises(ValueError, match="lacks the study table's markers"):
        quoted("a README without them")
