"""The shipped catalog data (recipes/data/): held-out parts never repeat calibration text, and the files are
exactly what ci/build_recipe_data.py makes from the public sources when those are present."""

from __future__ import annotations

import importlib.util
import json
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import REPO, SHARED_DATA

DATA = REPO / "recipes" / "data"
BUILD = REPO / "ci" / "build_recipe_data.py"
# the sources cut leak-free by the build (the energy files predate it and keep their cut)
LEAK_FREE = (
    "machine-mindset-sensing",
    "machine-mindset-intuition",
    "machine-mindset-judging",
    "machine-mindset-perceiving",
    "machine-mindset-decision",
    "anthropic-power-seeking",
    "anthropic-wealth-seeking",
)


@cache
def build_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("build_recipe_data", BUILD)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_no_held_out_text_repeats_a_calibration_text() -> None:
    module = build_module()
    calibration = module.Index()
    for path in sorted(DATA.glob("*-calibration.jsonl")):
        for r in records(path):
            for value in r.values():
                if isinstance(value, str) and value and not value.isdigit() and value not in ("(A)", "(B)"):
                    calibration.add(value)
    leaks = []
    for stem in LEAK_FREE:
        for split in ("validation", "test"):
            for r in records(DATA / f"{stem}-{split}.jsonl"):
                leaks += [f"{stem}-{split} {r['id']}" for k, v in r.items() if k != "id" and calibration.leaks(v)]
    assert len(LEAK_FREE) == 7 and not leaks, leaks[:5]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_the_shipped_files_are_what_the_sources_give() -> None:
    built = build_module().build(SHARED_DATA)
    assert len(built) >= 20
    differ = [
        name for name, rows in built.items() if (DATA / f"{name}.jsonl").read_text() != build_module().render(rows)
    ]
    assert not differ, differ
