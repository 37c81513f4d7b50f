"""Reading recipes (exporter/recipe/load.py): YAML tags never build objects or run code, duplicate keys are errors
naming the key path, null and wrong-type fields are not called missing, a byte-order mark and CRLF are read.
The recipe problems that are a single error each are cases of the recipe table in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import RecipeError
from exporter.recipe.load import load_recipe
from tests.helpers import RECIPE_CASES, Case, expect, write_recipe

MARKER_OVERRIDES = [
    ("name=!!python/object/apply:os.system ['touch {marker}']", "the YAML tag 'tag:yaml.org,2002:python/object/apply"),
    ("name=!!python/object/new:subprocess.Popen [['touch', '{marker}']]", "is not allowed"),
]


@pytest.mark.parametrize(("override", "message"), MARKER_OVERRIDES, ids=["os-system", "popen"])
@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.usefixtures("no_model_load")
def test_tags_in_an_override_are_refused_and_run_nothing(
    command: str, override: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "MARKER"
    recipe = write_recipe(tmp_path, tmp_path / "model")
    argv = [command, str(recipe), *(["--out", str(tmp_path / "out")] if command == "run" else [])]
    text = expect([*argv, override.replace("{marker}", str(marker))], RecipeError, message, capsys)
    assert "override" in text and not marker.exists()


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/module:os",
        "!mytag 3",
    ],
)
def test_tags_in_a_recipe_file_run_nothing(value: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "MARKER"
    recipe = write_recipe(tmp_path, tmp_path / "model")
    recipe.write_text(recipe.read_text().replace("name: tiny", "name: " + value.replace("{marker}", str(marker))))
    expect(["validate", str(recipe)], RecipeError, "is not allowed", capsys)
    assert not marker.exists()


DUPLICATES = [
    ("top-level", "name: tiny\n", "name: tiny\nname: other\n", "  name: duplicate key (lines"),
    (
        "persona-block",
        "personas:\n",
        "personas:\n  introvert: {description: x, calibration: {path: a.jsonl, max_samples: 1}}\n",
        "personas.introvert: duplicate key",
    ),
    (
        "nested",
        "      response_field: introvert\n",
        "      response_field: introvert\n      response_field: extravert\n",
        "personas.introvert.calibration.response_field: duplicate key",
    ),
    ("in-a-list", "pairs:\n", "pairs:\n- {a: 1, a: 2}\n", "pairs.0.a: duplicate key"),
    ("flow-mapping", "verify:\n", "verify: {greedy_tokens: 4, greedy_tokens: 8}\nverify_:\n", "verify.greedy_tokens"),
]


@pytest.mark.parametrize(("case", "anchor", "replacement", "message"), DUPLICATES, ids=[d[0] for d in DUPLICATES])
def test_duplicate_keys_are_errors_naming_the_key(
    case: str, anchor: str, replacement: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "model")
    text = recipe.read_text()
    assert anchor in text
    recipe.write_text(text.replace(anchor, replacement, 1))
    expect(["validate", str(recipe)], RecipeError, message, capsys)


def test_all_duplicates_are_reported_at_once(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tmp_path / "model")
    recipe.write_text(recipe.read_text() + "name: again\nmethod: {score: wanda}\n")
    with pytest.raises(RecipeError, match=r"2 problem\(s\)") as err:
        load_recipe(recipe)
    assert "name: duplicate key" in str(err.value) and "method: duplicate key" in str(err.value)


@pytest.mark.parametrize("case", [c for c in RECIPE_CASES if c.id.startswith(("null-", "type-"))], ids=lambda c: c.id)
def test_null_and_wrong_type_fields_are_not_called_missing(case: Case, tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, tmp_path), list(case.overrides))
    assert case.message in str(err.value) and "required key is missing" not in str(err.value)


def test_a_recipe_with_a_byte_order_mark_and_crlf_loads(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    recipe.write_bytes(b"\xef\xbb\xbf" + recipe.read_text().replace("\n", "\r\n").encode())
    assert load_recipe(recipe).name == "tiny"
