"""`sweep`: its --sparsity values and its points checked before anything is loaded (exporter/workflows/sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import RecipeError
from exporter.recipe.load import load_recipe
from exporter.workflows.sweep import check_sweep
from tests.helpers import edited_recipe, expect, snapshot, with_eval

SWEEP_VALUES = [
    ("nan", "item 1 ('nan') is not a fraction"),
    ("0.1,nan", "item 2 ('nan') is not a fraction"),
    ("inf", "is not a fraction"),
    ("-inf,0.1", "is not a fraction"),
    (",,", "item 1 is empty; item 2 is empty; item 3 is empty"),
    ("0.1,,0.2", "item 2 is empty"),
    ("0.1,", "item 2 is empty"),
    ("", "item 1 is empty"),
    (" ", "item 1 is empty"),
    ("1", "item 1 ('1') is not a fraction in [0, 1)"),
    ("1.5", "is not a fraction"),
    ("-0.1", "is not a fraction"),
    ("abc", "item 1 ('abc') is not a number"),
    ("0.1;0.2", "is not a number"),
    ("0.1,0.10", "item 2 ('0.10') repeats an earlier value"),
    ("0,0.1", "0 with no other unit pruned and no steering removes nothing"),
]


@pytest.mark.parametrize(("values", "message"), SWEEP_VALUES, ids=[v or "empty" for v, _ in SWEEP_VALUES])
@pytest.mark.usefixtures("no_model_load")
def test_sweep_checks_its_sparsities_before_loading(
    values: str, message: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = edited_recipe(tmp_path, tiny_llama_dir, with_eval(), prune={"mlp": {"sparsity": 0.25}})
    before = snapshot(tmp_path)
    argv = ["sweep", str(recipe), f"--sparsity={values}", "--out", str(tmp_path / "sw")]  # "=": "-0.1" is a value
    expect(argv, RecipeError, message, capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("steer", "refused"), [(0.0, True), (1.0, False)])
def test_sweep_takes_sparsity_zero_only_as_a_steering_point(
    steer: float, refused: bool, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    path = edited_recipe(
        tmp_path,
        tiny_llama_dir,
        with_eval(),
        prune={"mlp": {"sparsity": 0.25}},
        method={"score": "wanda", "steer": steer},
    )
    recipe = load_recipe(path)
    if refused:
        with pytest.raises(RecipeError, match="removes nothing"):
            check_sweep(recipe, [0.0, 0.1], "mlp")
    else:
        check_sweep(recipe, [0.0, 0.1], "mlp")
