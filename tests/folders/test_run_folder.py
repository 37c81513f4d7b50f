"""A finished run's files read in one place (exporter/folders/run_folder.py): the recipe as the run resolved it,
run.json, reports, masks and statistics, each problem raised as the calling command's error with its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.errors import ExportFolderError, HubError, OutputError, RecipeError
from exporter.folders.run_folder import RunFolder
from exporter.recipe.load import load_recipe
from tests.helpers import edited_recipe, make_report, with_eval


def _run(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    recipe = load_recipe(edited_recipe(tmp_path, tiny_llama_dir, with_eval()))
    run = tmp_path / "run"
    (run / "introvert" / "hf").mkdir(parents=True)
    (run / "introvert" / "hf" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (run / "introvert" / "report.json").write_text(json.dumps(make_report("introvert")))
    (run / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    (run / "run.json").write_text(json.dumps({"model_sha256": "ab" * 32}))
    return run


def test_the_recipe_is_read_as_the_run_wrote_it_with_overrides(tmp_path: Path, tiny_llama_dir: Path) -> None:
    run = RunFolder(_run(tmp_path, tiny_llama_dir))
    recipe = run.recipe()
    assert recipe.eval is not None and recipe.eval.random_seeds == 3
    assert run.recipe(["eval.random_seeds=5"]).eval.random_seeds == 5  # type: ignore[union-attr]
    with pytest.raises(RecipeError, match=r"recipe.json with eval.random_seeds=1: 1 problem\(s\)"):
        run.recipe(["eval.random_seeds=1"])
    assert run.info()["model_sha256"] == "ab" * 32
    persona = run.persona("introvert")
    assert persona.report().persona == "introvert" and persona.config()["model_type"] == "llama"
    assert run.statistics("introvert") is None  # none saved: the Wanda baseline calibrates instead


@pytest.mark.parametrize(
    ("error", "fix"), [(ExportFolderError, "re-run `persona-export run`"), (OutputError, "pass the --out folder")]
)
def test_problems_are_the_commands_own_errors(
    error: type[Exception], fix: str, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    run = _run(tmp_path, tiny_llama_dir)
    folder = RunFolder(run, error, fix)  # type: ignore[arg-type]
    (run / "run.json").write_text("[1]")
    with pytest.raises(error, match=rf"run.json holds a JSON list, expected an object; {fix}"):
        folder.info()
    (run / "recipe.json").unlink()
    with pytest.raises(error, match=rf"is not a run folder \(no recipe.json\); {fix}"):
        folder.recipe()
    with pytest.raises(error, match="does not exist"):
        RunFolder(tmp_path / "nowhere", error, fix).recipe()  # type: ignore[arg-type]


def test_a_persona_folder_names_its_own_files(tmp_path: Path, tiny_llama_dir: Path) -> None:
    persona = RunFolder(_run(tmp_path, tiny_llama_dir), HubError, "re-run the export").persona("introvert")
    (persona.path / "hf" / "config.json").write_text("{")
    with pytest.raises(HubError, match=r"hf/config.json is not valid JSON .*; re-run the export"):
        persona.config()
    assert persona.run.path == persona.path.parent
