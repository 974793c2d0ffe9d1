"""The bounds of the tests' float-order comparisons (bench/tolerances.json, written by ``python -m bench.tolerances``):
each sits at least 3x above the largest spread measured over at least 20 seeds, every one the tests ask for is
measured and used, and each is documented beside its assertion by the comment line the bench wrote for it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import TOLERANCES, tolerance

TESTS = Path(__file__).resolve().parent
DOC = json.loads(TOLERANCES.read_text())
ENTRIES = {e["name"]: e for e in DOC["comparisons"]}
# where the bounds are used: every test module (helpers.py only reads them, this file only checks them)
SOURCES = {p.name: p.read_text().splitlines() for p in sorted(TESTS.glob("*.py"))
           if p.name not in ("helpers.py", "test_tolerances.py")}


@pytest.mark.parametrize("name", ENTRIES)
def test_a_bound_is_at_least_three_times_its_spread(name):
    e = ENTRIES[name]
    assert e["seeds"] >= 20, f"{name}: measured over {e['seeds']} seeds only"
    assert e["bound"] >= 3 * e["max_spread"], f"{name}: bound {e['bound']} is within 3x of spread {e['max_spread']}"
    assert tolerance(name) == e["bound"]


def test_every_tolerance_the_tests_ask_for_is_measured():
    asked = {m for lines in SOURCES.values() for line in lines for m in re.findall(r'tolerance\("([^"]+)"\)', line)}
    assert asked and asked <= ENTRIES.keys(), sorted(asked - ENTRIES.keys())


@pytest.mark.parametrize("name", ENTRIES)
def test_a_bound_is_used_and_documented_beside_each_use(name):
    """Every line that names the comparison has the bench's comment line on it or just above it."""
    comment = ENTRIES[name]["comment"]
    uses = [(f, i) for f, lines in SOURCES.items() for i, line in enumerate(lines) if f'"{name}"' in line]
    assert uses, f"no test uses {name}: remove it from bench/tolerances.py"
    for f, i in uses:
        near = [line.strip() for line in SOURCES[f][max(0, i - 2) : i + 1]]
        assert comment in near, f"tests/{f}:{i + 1}: put this line above it:\n{comment}"
