"""Property-based fuzzing: any recipe text or data file either loads or raises the project's own error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.errors import CalibrationDataError, RecipeError
from exporter.masking.data import read_samples
from exporter.recipe.load import load_recipe
from exporter.recipe.schema import DataSpec
from tests.helpers import REPO

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DEMO = yaml.safe_load((REPO / "recipes" / "smollm2-introvert-extravert.yaml").read_text())

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


DEMO_PATHS = [p for p in _paths(DEMO) if p]


def _load_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(path)
        except RecipeError as exc:
            assert str(exc)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_is_a_recipe_or_a_recipe_error(text: str) -> None:
    _load_text(text)


@FUZZ
@given(st.sampled_from(DEMO_PATHS), values)
def test_demo_recipe_with_one_value_replaced(path: tuple, value: Any) -> None:
    data = json.loads(json.dumps(DEMO))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _load_text(yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(st.sampled_from(["json", "jsonl", "csv", "text"]), st.binary(max_size=400))
def test_any_bytes_are_samples_or_a_data_error(fmt: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{fmt}"
        path.write_bytes(content)
        spec = DataSpec(path=str(path), format=fmt, prompt_field=None, response_field="r", max_samples=1)
        try:
            samples = read_samples(spec)
        except CalibrationDataError as exc:
            assert str(exc)
        else:
            assert samples and all(isinstance(s.response, str) and s.response for s in samples)


@FUZZ
@given(st.sampled_from(["json", "jsonl"]), st.lists(values, max_size=5))
def test_any_json_records_are_samples_or_a_data_error(fmt: str, records: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{fmt}"
        text = json.dumps(records) if fmt == "json" else "\n".join(json.dumps(r) for r in records)
        path.write_text(text)
        spec = DataSpec(path=str(path), prompt_field="p", response_field="r", max_samples=1)
        try:
            samples = read_samples(spec)
        except CalibrationDataError as exc:
            assert str(exc)
        else:
            assert all(isinstance(s.prompt, str) and isinstance(s.response, str) for s in samples)
