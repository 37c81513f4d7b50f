"""The disk-space estimate (exporter/stages/space.py) covers every registered format."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.errors import OutputError
from exporter.recipe.formats import FORMATS
from exporter.stages import space


def test_every_registered_format_has_an_estimate() -> None:
    for name in FORMATS:
        for dtype in space.ELEMENT:
            assert space.persona_bytes([name], dtype, "int4", 1000) > 0, name


def test_a_working_copy_is_counted_once_for_all_personas(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two personas with onnx-q4: two final folders, two statistics files, one working copy (built one at a
    time); one byte less free than that sum is refused, naming the working copy."""
    from exporter.recipe.load import load_recipe
    from tests.helpers import write_recipe

    recipe = load_recipe(str(write_recipe(tmp_path, tmp_path / "model", output={"formats": ["hf", "onnx-q4"]})))
    params, dtype = 10**6, recipe.output.dtype
    each = space.persona_bytes(["hf", "onnx-q4"], dtype, recipe.output.genai_precision, params)
    working = space.working_bytes(["hf", "onnx-q4"], dtype, params)
    assert working == int((space.WORKING["onnx-q4"] + space.ELEMENT[dtype]) * params)
    need = len(recipe.personas) * (each + space.statistics_bytes(params)) + working
    monkeypatch.setattr(space, "free_bytes", lambda path: need)
    space.check_run_space(recipe, tmp_path / "out", params)  # exactly enough
    monkeypatch.setattr(space, "free_bytes", lambda path: need - 1)
    with pytest.raises(OutputError, match="a build's working copy"):
        space.check_run_space(recipe, tmp_path / "out", params)
