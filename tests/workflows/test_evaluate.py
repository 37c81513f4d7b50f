"""`eval RUN_DIR` (exporter/workflows/evaluate.py): run files that are not JSON objects are refused before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.cli import dispatch
from exporter.errors import OutputError, RecipeError
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import adapter_for
from exporter.recipe.eval import EvalSpec
from exporter.recipe.load import load_recipe
from tests.helpers import edited_recipe, expect, make_report, tiny_model, with_eval

RUN_FILES: dict[str, tuple[str, bytes | None, str]] = {  # case: the file, its new content, what the error says
    "recipe-not-json": ("recipe.json", b"{not json", "run/recipe.json is not valid JSON"),
    "recipe-a-list": ("recipe.json", b"[1, 2]", "run/recipe.json holds a JSON list, expected an object"),
    "recipe-not-utf8": ("recipe.json", b"\xff\xfe{}", "run/recipe.json is not UTF-8 text"),
    "recipe-empty": ("recipe.json", b"", "run/recipe.json is not valid JSON"),
    "run-not-json": ("run.json", b"name: yaml", "run/run.json is not valid JSON"),
    "run-missing": ("run.json", None, "run/run.json' does not exist"),
    "report-not-json": ("introvert/report.json", b"<html>", "run/introvert/report.json is not valid JSON"),
    "report-a-string": ("introvert/report.json", b'"passed"', "introvert/report.json holds a JSON str, expected"),
    "report-missing": ("introvert/report.json", None, "run/introvert' is not a persona export (expected report"),
}


def complete_run(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A run folder `eval` reads to the end without a model: recipe.json with an eval section, run.json, and each
    persona's report.json, hf/config.json and masks."""
    recipe = load_recipe(edited_recipe(tmp_path, tiny_llama_dir, with_eval()))
    run = tmp_path / "run"
    geometry = adapter_for(tiny_model("llama").config).geometry(tiny_model("llama").config)
    for p in recipe.personas:
        (run / p / "hf").mkdir(parents=True)
        shutil.copyfile(tiny_llama_dir / "config.json", run / p / "hf" / "config.json")
        (run / p / "report.json").write_text(json.dumps(make_report(p)))
        PersonaMask(p, geometry, None, None, None).save(run / p / "masks.safetensors", {})
    (run / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    (run / "run.json").write_text(
        json.dumps({"model_sha256": "ab" * 32, "personas": dict.fromkeys(recipe.personas, "passed")})
    )
    return run


@pytest.mark.usefixtures("no_model_load")
def test_eval_reads_a_complete_run_folder_up_to_the_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The cases below start from this folder: untouched, it passes every check made before the model loads."""
    with pytest.raises(AssertionError, match="a model was loaded"):
        dispatch(["eval", str(complete_run(tmp_path, tiny_llama_dir))])


@pytest.mark.parametrize("case", sorted(RUN_FILES))
@pytest.mark.usefixtures("no_model_load")
def test_eval_refuses_run_files_that_are_not_json_objects(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = complete_run(tmp_path, tiny_llama_dir)
    name, content, message = RUN_FILES[case]
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_bytes(content)
    text = expect(["eval", str(run)], OutputError, message, capsys)
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


@pytest.mark.usefixtures("no_model_load")
def test_eval_full_scores_the_full_depth(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's own evaluation is the verdict depth; `eval --full` reads the full depth's items."""
    import exporter.evaluation.items as items

    run = complete_run(tmp_path, tiny_llama_dir)
    seen: list[str] = []

    def depth_of(recipe: object, spec: EvalSpec) -> None:
        seen.append(spec.depth)
        raise AssertionError("stop before the model")

    monkeypatch.setattr(items, "prepare", depth_of)  # imported by `eval` when it runs
    for argv, depth in ((["eval", str(run)], "verdict"), (["eval", str(run), "--full"], "full")):
        with pytest.raises(AssertionError, match="stop before the model"):
            dispatch(argv)
        assert seen.pop() == depth
