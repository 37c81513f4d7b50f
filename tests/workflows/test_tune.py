"""`persona-export tune`: a grid chosen on validation items, reported on test items it never looked at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.cli import main
from exporter.errors import RecipeError
from exporter.recipe.load import load_recipe
from exporter.workflows.tune import grid
from tests.helpers import NEUTRAL, write_pair_data, write_recipe


def _paired(path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "prompt_field": "prompt",
        "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
        "max_items": 6,
        "exclude_calibration": True,
    }


def _recipe(tmp_path: Path, model_dir: Path, validation_file: Path, **tune: Any) -> Path:
    (tmp_path / "neutral.txt").write_text(NEUTRAL)
    test_file = write_pair_data(tmp_path / "test-pairs.jsonl", n=8, seed=11)
    neutral = {"path": str(tmp_path / "neutral.txt"), "window": 24}
    section = {
        "sparsity": [0.0, 0.25],
        "steer": [0.0, 1.0],
        "max_perplexity_ratio": 1000.0,
        "validation": {"paired": _paired(validation_file), "neutral": neutral},
    } | tune
    return write_recipe(
        tmp_path,
        model_dir,
        prune={"mlp": {"sparsity": 0.25}},
        eval={"paired": _paired(test_file), "neutral": neutral, "bootstrap": 200, "baselines": ["random"]},
        tune=section,
    )


def test_tune_chooses_on_validation_and_reports_on_test(tmp_path: Path, tiny_llama_dir: Path) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = _recipe(tmp_path, tiny_llama_dir, validation)
    out = tmp_path / "tune"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["grid"]) == 4 and sum(bool(p.get("chosen")) for p in report["grid"]) == 1
    chosen = next(p for p in report["grid"] if p.get("chosen"))
    assert chosen["min_shift"] == max(p["min_shift"] for p in report["grid"] if p["feasible"])
    assert all(p["feasible"] == (p["setting"]["sparsity"] > 0) for p in report["grid"])  # removal is required
    assert report["chosen"] == chosen["setting"]
    # the validation and test items are different files, and the test figures come from the test file only
    assert report["validation_splits"]["paired"]["files"] != report["test"]["introvert"]["splits"]["paired"]["files"]
    assert "test-pairs.jsonl" in json.dumps(report["test"]["introvert"]["splits"]["paired"])
    assert "val-pairs.jsonl" not in json.dumps(report["test"])
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert written["method"]["steer"] == chosen["setting"]["steer"] and "tune" not in written
    assert written["prune"]["mlp"]["sparsity"] == chosen["setting"]["sparsity"]
    assert (out / "pareto.png").stat().st_size > 0 and "**chosen**" in (out / "report.md").read_text()


def test_tune_refuses_validation_items_that_are_reported(tmp_path: Path, tiny_llama_dir: Path) -> None:
    same_as_test = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=11)
    recipe = load_recipe(_recipe(tmp_path, tiny_llama_dir, same_as_test))
    from exporter.workflows.tune import tune

    with pytest.raises(RecipeError, match=r"tune.validation and eval share \d+ text"):
        tune(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grid_covers_every_combination(tmp_path: Path, tiny_llama_dir: Path) -> None:
    validation = write_pair_data(tmp_path / "val-pairs.jsonl", n=8, seed=7)
    recipe = load_recipe(
        _recipe(
            tmp_path, tiny_llama_dir, validation, compensate=["none", "personas"], gamma=[0.0, 0.5], amplify=[1.0, 2.0]
        )
    )
    settings = {
        (r.prune.mlp.sparsity, r.method.steer, r.prune.mlp.compensate, r.prune.mlp.gamma, r.prune.mlp.amplify)  # type: ignore[union-attr]
        for r in grid(recipe)
    }
    assert len(settings) == 32 and (0.25, 1.0, "personas", 0.5, 2.0) in settings
