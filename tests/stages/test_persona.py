"""One persona's export (exporter/stages/persona.py): a mask that removes nothing is warned and recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from exporter.cli import main
from exporter.publish.modelcard import CardContext, render_card
from exporter.reports.persona import load_report
from tests.helpers import write_recipe


def test_a_mask_that_rounds_to_nothing_is_warned_and_reported(
    tmp_path: Path, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = write_recipe(
        tmp_path, tiny_llama_dir, prune={"mlp": {"sparsity": 0.001}}, method={"score": "wanda"}, pairs=[]
    )
    caplog.set_level(logging.WARNING)
    data = yaml.safe_load(recipe.read_text())
    del data["personas"]["extravert"]
    recipe.write_text(yaml.safe_dump(data))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "introvert" / "report.json").read_text())
    assert report["warnings"] and "unpruned model" in report["warnings"][0]
    assert "NOTHING WAS REMOVED" in caplog.text


@pytest.mark.parametrize(
    ("soft", "warned"),
    [({}, True), ({"mlp_scale": 0.5}, False), ({"attn_scale": 2.0}, False), ({"mlp_scale": 1.0}, True)],
)
def test_nothing_removed_counts_soft_masks_as_a_change(soft: dict[str, float], warned: bool) -> None:

    from exporter.masking.masks import PersonaMask
    from exporter.model.adapters import Geometry
    from exporter.stages.persona import nothing_removed

    g = Geometry(2, 8, 16, 4, 2, 2)
    scales = {
        name: torch.full(
            (g.layers, g.intermediate if name == "mlp_scale" else g.heads * g.head_dim), value, dtype=torch.float64
        )
        for name, value in soft.items()
    }
    mask = PersonaMask("introvert", g, torch.arange(16).repeat(2, 1), None, None, **scales)
    assert bool(nothing_removed(mask)) == warned


def test_each_persona_exports_at_its_own_sparsity(tmp_path: Path, tiny_llama_dir: Path) -> None:
    sparsity = {"introvert": 0.1, "extravert": 0.25}
    recipe = write_recipe(tmp_path, tiny_llama_dir, prune={"mlp": {"sparsity": sparsity}})
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for persona, fraction in sparsity.items():
        config = json.loads((out / persona / "hf" / "config.json").read_text())
        dense = json.loads((tiny_llama_dir / "config.json").read_text())["intermediate_size"]
        assert config["intermediate_size"] == dense - int(fraction * dense)
        report = json.loads((out / persona / "report.json").read_text())
        assert report["status"] == "passed" and report["prune"]["mlp"]["sparsity"] == sparsity
        card = render_card(load_report(out / persona / "report.json"), CardContext("org/x", "org/x", ())).text
        assert f"MLP: {fraction:.0%} of the intermediate neurons" in card
