"""A run with composite personas: only the requested personas are exported, each proven exact; the poles a
composite mixes are calibrated once and reused; evaluation, `eval RUN_DIR` and the model card follow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from safetensors.torch import load_file

from exporter.cli import main
from exporter.publish.modelcard import CardContext, render_card
from exporter.reports.checks import CheckpointCheck
from exporter.reports.persona import read_report
from tests.helpers import eval_section, write_mix_recipe

STEER = {
    "score": "contrastive-wanda",
    "steer": {"introvert": 1.5, "extravert": 1.0, "thinking": 2.0, "feeling": 1.0},
    "steer_vector": {"thinking": "residual"},
    "steer_layers": {"thinking": 0.5},
}


def test_run_exports_the_requested_personas_composites_proven_exact(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    exported = ["IT", "mostly-E", "introvert"]
    (tmp_path / "everyday.txt").write_text("what do you cook\nwhere do you walk\n")
    section = eval_section(tmp_path, baselines=[], replies={"path": "everyday.txt", "max_new_tokens": 6})
    recipe = write_mix_recipe(tmp_path, tiny_llama_dir, method=STEER, output={"personas": exported}, eval=section)
    assert main(["validate", str(recipe)]) == 0
    listing = capsys.readouterr().out
    assert "IT: a composite of introvert 1, thinking 1 (no calibration of its own)" in listing
    assert "exported: IT, mostly-E, introvert (output.personas)" in listing

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="exporter.evaluation.scorer"):
        assert main(["run", str(recipe), "--out", str(out)]) == 0
    # a composite's replies are told apart from its mirror's; a pole without its partner gets none, and says why
    assert "eval: no replies for introvert: extravert is not evaluated beside it" in caplog.text
    assert sorted(p.parent.name for p in out.glob("*/report.json")) == sorted(exported)
    run = json.loads((out / "run.json").read_text())
    assert list(run["personas"]) == exported and set(run["personas"].values()) == {"passed"}
    # every pole is calibrated once, exported or not: the composites' ingredients
    assert sorted(p.stem for p in (out / "stats").glob("*.safetensors")) == sorted(
        ["introvert", "extravert", "thinking", "feeling"]
    )

    it = read_report(out / "IT")
    assert it.status == "passed" and it.partner is None and it.calibration is None and it.mix is not None
    assert {p: (m.weight, m.partner) for p, m in it.mix.items()} == {
        "introvert": (1.0, "extravert"),
        "thinking": (1.0, "feeling"),
    }
    assert it.description == "the introvert side the thinking side"  # derived from the parts
    hf = it.verification["hf"]
    assert isinstance(hf, CheckpointCheck) and hf.fp64 is not None
    assert hf.fp64.max_abs_logit_diff < 1e-10 and hf.fp64.greedy_identical
    assert [len(r) for r in it.removed_per_layer["mlp"]] == [18, 18]  # 9 + 9 neurons of 96 in every layer
    config = json.loads((out / "IT" / "hf" / "config.json").read_text())
    assert config["mlp_bias"] is True and config["intermediate_size"] == 96 - 18
    weights = load_file(str(out / "IT" / "hf" / "model.safetensors"))
    assert weights["model.layers.1.mlp.down_proj.bias"].abs().max() > 0  # thinking's residual bias, layer 1
    manifest = json.loads((out / "IT" / "masks.json").read_text())
    assert set(manifest["stats_keys"]) == {"introvert", "thinking"} and "stats_key" not in manifest
    mostly = read_report(out / "mostly-E")
    assert mostly.mix is not None and mostly.mix["extravert"].weight == 0.7
    assert [len(r) for r in mostly.removed_per_layer["mlp"]] == [6 + 3, 6 + 3]  # round(0.7 x 9) + round(0.3 x 9)

    # evaluation covers the exported personas: paired rows for the pole and for the composite, toward its part
    # on the E/I items (introvert), perplexity for every one
    ev = it.evaluation
    assert ev is not None and ev.opposite == "extravert" and all(r.paired is not None for r in ev.rows)
    assert any(r.condition == "mask-only" and r.neutral is not None for r in ev.rows)
    pole = read_report(out / "introvert").evaluation
    assert pole is not None and any(r.paired is not None for r in pole.rows) and pole.replies is None
    assert ev.replies is not None and ev.replies.opposite == "mostly-E" and "export" in ev.replies.gap
    assert main(["eval", str(out)]) == 0  # `eval RUN_DIR` reads the exported personas' folders only

    card = render_card(it, CardContext("org/it", "org/it", ())).text
    assert "A composite persona" in card and "| thinking | 1 | feeling | 10.0% | 2 x residual |" in card
    assert "the introvert texts of `pairs.jsonl`" in card and "the thinking texts of `tf.jsonl`" in card


def test_a_composite_reuses_the_poles_statistics(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A second run that exports only a composite calibrates nothing: the poles' statistics are cached by a key
    over model, data and settings, whichever personas a run exports."""
    recipe = write_mix_recipe(tmp_path, tiny_llama_dir, method=STEER)
    assert main(["run", str(recipe), "--out", str(tmp_path / "poles"), "output.personas=[introvert, thinking]"]) == 0
    first = json.loads((tmp_path / "poles" / "run.json").read_text())["timings_s"]
    assert {k for k in first if k.startswith("calibrate.")} == {
        f"calibrate.{p}" for p in ("introvert", "extravert", "thinking", "feeling")
    }
    assert main(["run", str(recipe), "--out", str(tmp_path / "it"), "output.personas=[IT]"]) == 0
    second = json.loads((tmp_path / "it" / "run.json").read_text())
    assert not any(k.startswith("calibrate.") for k in second["timings_s"]) and list(second["personas"]) == ["IT"]
