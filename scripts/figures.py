"""Measured figures in README.md and docs/ are read from committed result files, never copied by hand.

A figure region in the markdown is an inline pair of HTML comments around the shown value:

    <!-- fig docs/default_summary.json#after:.4f -->1.3832<!-- /fig -->

``FILE#PATH:FORMAT``: FILE is a JSON file relative to the repository root; PATH a dot-separated key path into it
(keys may hold spaces; a list item by index or by a field's value, ``rows.n=64``), or ``A / B`` or ``A - B`` of
two paths into the same file; FORMAT a Python format spec (``.4f``, ``+.3f``, ``.0%``, ``,d``, ``s``). Markdown
renders the comments as nothing, so a reader sees only the value; a region stays on one line.

    python scripts/figures.py           # rewrite every region from its file
    python scripts/figures.py --check   # change nothing; exit 1 listing stale or broken regions

The standard library only, so it runs without the project's environment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGION = re.compile(r"<!-- fig (?P<spec>.+?) -->(?P<value>.*?)<!-- /fig -->")
OPS = {" / ": lambda a, b: a / b, " - ": lambda a, b: a - b}


def markdown_files(root: Path = ROOT) -> list[Path]:
    """The pages whose figures are checked: the README and everything under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def lookup(data: object, path: str) -> object:
    """The value at a dot-separated key path; a list item by index, or as the first item whose field has a value
    (``rows.n=64``), so a figure names the row it means and fails when the row is gone."""
    for key in path.split("."):
        if not isinstance(data, list):
            data = data[key]
        elif "=" in key:
            field, _, want = key.partition("=")
            data = next((x for x in data if str(x.get(field)) == want), None)
            if data is None:
                raise KeyError(f"no item with {key}")
        else:
            data = data[int(key)]
    return data


def evaluate(spec: str, root: Path = ROOT) -> str:
    """The text a region with this spec shows; raises ValueError naming what is wrong."""
    file, hash_, rest = spec.partition("#")
    expr, colon, fmt = rest.rpartition(":")
    if not (hash_ and colon and expr):
        raise ValueError(f"bad figure spec {spec!r}: expected FILE#PATH:FORMAT")
    try:
        data = json.loads((root / file).read_text())
        for sep, op in OPS.items():
            if sep in expr:
                a, b = expr.split(sep, 1)
                return format(op(lookup(data, a), lookup(data, b)), fmt)
        return format(lookup(data, expr), fmt)
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"figure {spec!r}: {type(e).__name__}: {e}") from None


def render(text: str, root: Path = ROOT) -> str:
    """The text with every region's value recomputed."""
    return REGION.sub(lambda m: f"<!-- fig {m['spec']} -->{evaluate(m['spec'], root)}<!-- /fig -->", text)


def problems(paths: list[Path], root: Path = ROOT) -> list[str]:
    """One line per region whose shown value differs from its file's, or whose spec cannot be evaluated."""
    out = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in REGION.finditer(line):
                where = f"{path.relative_to(root)}:{n}"
                try:
                    want = evaluate(m["spec"], root)
                except ValueError as e:
                    out.append(f"{where}: {e}")
                    continue
                if m["value"] != want:
                    out.append(f"{where}: {m['spec']} shows {m['value']!r}, the file gives {want!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/figures.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any region is stale")
    args = parser.parse_args(argv)
    paths = markdown_files()
    if args.check:
        found = problems(paths)
        print("\n".join(found) or f"figures up to date in {len(paths)} files")
        return 1 if found else 0
    try:  # every page first, so a wrong spec leaves all files as they were
        pages = {path: render(path.read_text()) for path in paths}
    except ValueError as e:
        print(e)
        return 1
    for path, text in pages.items():
        if text != path.read_text():
            path.write_text(text)
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
