"""`eval RUN_DIR` (exporter/workflows/evaluate.py): run files that are not JSON objects are refused before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import OutputError, RecipeError
from exporter.recipe.load import load_recipe, parse_recipe
from tests.helpers import edited_recipe, expect, with_eval

RUN_FILES: dict[str, tuple[str, bytes | None]] = {
    "recipe-not-json": ("recipe.json", b"{not json"),
    "recipe-a-list": ("recipe.json", b"[1, 2]"),
    "recipe-not-utf8": ("recipe.json", b"\xff\xfe{}"),
    "recipe-empty": ("recipe.json", b""),
    "run-not-json": ("run.json", b"name: yaml"),
    "run-missing": ("run.json", None),
    "report-not-json": ("introvert/report.json", b"<html>"),
    "report-a-string": ("introvert/report.json", b'"passed"'),
    "report-missing": ("introvert/report.json", None),
}


@pytest.mark.parametrize("case", sorted(RUN_FILES))
@pytest.mark.usefixtures("no_model_load")
def test_eval_refuses_run_files_that_are_not_json_objects(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe_path = edited_recipe(tmp_path, tiny_llama_dir, with_eval())
    recipe = load_recipe(recipe_path)
    run = tmp_path / "run"
    for p in ("introvert", "extravert"):
        (run / p).mkdir(parents=True)
        (run / p / "report.json").write_text("{}")
    (run / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    (run / "run.json").write_text("{}")
    parse_recipe(json.loads((run / "recipe.json").read_text()), run)  # the untouched folder is a run
    name, content = RUN_FILES[case]
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_bytes(content)
    text = expect(["eval", str(run)], OutputError, name.split("/")[-1], capsys)
    assert "pass the --out folder of a `run`" in text


@pytest.mark.usefixtures("no_model_load")
def test_eval_takes_overrides_of_the_eval_section_only(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    text = expect(["eval", str(run), "eval.baselines=all", "prune.mlp.sparsity=0.5"], RecipeError, "prune.mlp", capsys)
    assert "overrides of the eval section only" in text and "the masks were made by the run's recipe" in text


@pytest.mark.usefixtures("no_model_load")
def test_an_override_that_breaks_the_eval_section_is_named(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = load_recipe(edited_recipe(tmp_path, tiny_llama_dir, with_eval()))
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    text = expect(["eval", str(run), "eval.random_seeds=-1"], RecipeError, "eval.random_seeds", capsys)
    assert "recipe.json with eval.random_seeds=-1: 1 problem(s)" in text, text
