"""The `run` command end to end on a tiny model: outputs, verification, bad input, atomicity, determinism."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.cli import main
from exporter.publish.modelcard import CardContext, render_card
from exporter.reports.persona import SCHEMA_VERSION, read_report
from exporter.stages import checkpoint as checkpoint_stage
from tests.helpers import write_recipe


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def recipe(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return write_recipe(tmp_path, tiny_llama_dir)


def test_run_writes_verified_smaller_exports(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "introvert" in table and "passed" in table
    last = table.rstrip().splitlines()[-2:]  # the output ends with the verdict: one line per persona
    for persona, line in zip(("introvert", "extravert"), last, strict=True):
        assert line.startswith(f"{persona}: exports proven exact ✓ | persona effect not evaluated"), line
        assert f"report: {out / persona / 'report.json'}" in table
    run = json.loads((out / "run.json").read_text())
    assert run["personas"] == {"introvert": "passed", "extravert": "passed"}
    # one recipe hash: printed by validate, written to run.json, each report, each masks.json and the model card
    assert main(["validate", str(recipe)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == f"{recipe}: valid (recipe sha256 {run['recipe_sha256']})"
    for persona in ("introvert", "extravert"):
        report = read_report(out / persona)
        assert report.recipe.sha256 == run["recipe_sha256"]
        assert json.loads((out / persona / "masks.json").read_text())["recipe_sha256"] == run["recipe_sha256"]
        card = render_card(report, CardContext(repo_id="me/x", hf_repo_id="me/x", onnx_folders=()))
        assert f"(sha256 `{run['recipe_sha256']}`" in str(card)
    assert {p.name for p in out.iterdir()} == {"introvert", "extravert", "stats", "run.json", "recipe.json"}
    for persona in ("introvert", "extravert"):
        folder = out / persona
        report = json.loads((folder / "report.json").read_text())
        assert read_report(folder).dump() == report and report["schema_version"] == SCHEMA_VERSION  # one layout
        hf = report["verification"]["hf"]
        assert report["status"] == "passed" and hf["passed"]
        assert hf["fp64"]["max_abs_logit_diff"] <= 1e-6 and hf["fp64"]["greedy_identical"]
        assert hf["fp32"]["max_abs_logit_diff"] < 1e-3
        # 25 % of 96 neurons and 1 of 2 KV groups removed in both layers
        assert [len(r) for r in report["removed_per_layer"]["mlp"]] == [24, 24]
        assert [len(r) for r in report["removed_per_layer"]["group"]] == [1, 1]
        config = json.loads((folder / "hf" / "config.json").read_text())
        assert (
            config["intermediate_size"],
            config["num_attention_heads"],
            config["num_key_value_heads"],
        ) == (72, 3, 1)
        assert config["head_dim"] == 16
        for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (folder / "hf" / name).is_file()
        # the size on disk falls with the parameters: fp32 weights plus a small header
        weights = (folder / "hf" / "model.safetensors").stat().st_size
        assert 0 <= weights - 4 * report["parameters"]["pruned"] < 16_000
        assert report["parameters"]["pruned"] < report["parameters"]["dense"]
        masks = load_file(str(folder / "masks.safetensors"))
        assert masks["mlp_keep"].dtype == torch.int64 and masks["mlp_keep"].shape == (2, 72)
        assert (out / "stats" / f"{persona}.safetensors").is_file()
        umask = os.umask(0)
        os.umask(umask)
        for f in (folder / "hf" / "model.safetensors", folder / "masks.safetensors", folder / "report.json"):
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f"{f.name}: {oct(f.stat().st_mode)}"  # others read
    removed_i = json.loads((out / "introvert" / "report.json").read_text())["removed_per_layer"]
    removed_e = json.loads((out / "extravert" / "report.json").read_text())["removed_per_layer"]
    for kind in ("mlp", "group"):
        for a, b in zip(removed_i[kind], removed_e[kind], strict=True):
            assert not set(a) & set(b)
    assert not list(tmp_path.glob(".run.partial-*"))


def test_same_inputs_give_identical_files(recipe: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):  # --no-cache: both runs calibrate
        assert main(["run", str(recipe), "--out", str(tmp_path / name), "--no-cache"]) == 0
    for rel in (
        "introvert/masks.safetensors",
        "introvert/hf/model.safetensors",
        "extravert/hf/model.safetensors",
    ):
        assert sha(tmp_path / "a" / rel) == sha(tmp_path / "b" / rel), rel


def test_existing_output_is_refused_then_overwritten(recipe: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["run", str(recipe), "--out", str(out), "--overwrite"]) == 2  # not a run folder: never replaced
    assert "--overwrite replaces only a run folder that persona-export wrote" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    out.rmdir()
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    (out / "keep.txt").write_text("left in the run folder")
    assert main(["run", str(recipe), "--out", str(out), "--overwrite"]) == 0
    assert (out / "run.json").is_file() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_reused_statistics_give_the_same_masks(recipe: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    assert main(["run", str(recipe), "--out", str(tmp_path / "a"), "--no-cache"]) == 0
    caplog.clear()
    args = ["run", str(recipe), "--out", str(tmp_path / "b"), "--reuse-stats", str(tmp_path / "a")]
    assert main(args) == 0
    assert "reusing statistics" in caplog.text
    assert sha(tmp_path / "a/introvert/masks.safetensors") == sha(tmp_path / "b/introvert/masks.safetensors")
    caplog.clear()  # other data: the saved statistics are stale and recomputed
    args = [*args[:3], str(tmp_path / "c"), *args[4:], "personas.introvert.calibration.seed=5"]
    assert main(args) == 0
    assert "are stale" in caplog.text


def test_a_parity_failure_is_fatal_and_marked(recipe: Path, tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    real = checkpoint_stage.prune_model

    def broken(model, adapter, mask):  # type: ignore[no-untyped-def]
        pruned = real(model, adapter, mask)
        with torch.no_grad():
            adapter.mlp_out(adapter.layers(pruned)[0]).weight[0, 0] += 1e-3
        return pruned

    monkeypatch.setattr(checkpoint_stage, "prune_model", broken)
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 3
    assert "verification failed" in capsys.readouterr().err
    report = json.loads((out / "introvert" / "report.json").read_text())
    assert report["status"] == "failed" and report["verification"]["hf"]["fp64"]["max_abs_logit_diff"] > 1e-6


def test_validate_does_not_load_a_model(recipe: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from exporter.model import sources

    monkeypatch.setattr(sources, "load", lambda *a, **k: pytest.fail("validate loaded a model"))
    assert main(["validate", str(recipe)]) == 0
    assert "16 calibration samples" in capsys.readouterr().out
    assert main(["validate", str(recipe), "pairs=[[extravert, nobody]]"]) == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


def test_verbosity_before_or_after_the_command_version_and_help_defaults(
    recipe: Path, capsys: pytest.CaptureFixture
) -> None:
    from exporter import __version__
    from exporter.cli import parse

    for argv in (["-v", "validate", str(recipe)], ["validate", str(recipe), "-v"]):
        args = parse(argv)
        assert args.verbose and not args.quiet
    assert parse(["validate", str(recipe), "--quiet"]).quiet and not parse(["validate", str(recipe)]).verbose
    with pytest.raises(SystemExit):
        parse(["validate", str(recipe), "-q", "-v"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        parse(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"persona-export {__version__}"
    with pytest.raises(SystemExit):
        parse(["--help"])
    assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in shown and "default: onnx, else onnx-genai, else torch" in shown  # --backend's: None


def test_an_eval_item_that_does_not_fit_fails_before_the_exports(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A test item whose prompt fills eval.max_tokens stops the run once the tokenizer is loaded: no persona
    is exported (minutes, on a real model) only for the evaluation to fail after."""
    from tests.helpers import edited_recipe, point_eval_at, write_pair_data

    def edit(d: dict, t: Path) -> None:  # type: ignore[type-arg]
        point_eval_at(d, write_pair_data(t / "test-pairs.jsonl", n=8, seed=11))
        d["eval"]["max_tokens"] = 16

    recipe = edited_recipe(tmp_path, tiny_llama_dir, edit)
    exported = []
    monkeypatch.setattr("exporter.workflows.run.export_persona", lambda *a, **k: exported.append(a))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) != 0
    assert "a prompt fills all 16 tokens (eval.max_tokens)" in capsys.readouterr().err
    assert not exported and not (tmp_path / "run").exists()
