"""ONNX through the run pipeline and the CLI (export, generate, chat) on a tiny head-pruned model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import dispatch, main
from exporter.errors import OutputError
from exporter.model.encoding import prompt_ids
from exporter.runtime.runner import Runner, Sampling
from exporter.stages.base import StageInputs
from tests.helpers import REPO, expect, kill_at, make_persona, snapshot, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("persona", ["introvert", "extravert"])
def test_run_exports_verified_onnx(tiny_run: Path, persona: str) -> None:
    folder = tiny_run / persona
    report = json.loads((folder / "report.json").read_text())
    onnx = report["verification"]["onnx"]
    assert report["status"] == "passed" and onnx["passed"]
    assert onnx["max_abs_logit_diff"] <= 1e-2 and onnx["mean_abs_logit_diff"] <= 1e-3
    assert onnx["greedy_identical"] and onnx["decode_steps"] >= 3
    int8 = report["verification"]["onnx-int8"]
    # not a parity target, but on this tiny model 8-bit weights keep nearly every argmax and the perplexity
    assert int8["parity_target"] is False and int8["top1_agreement"] >= 0.9 and int8["ppl_quantized"] > 0
    assert abs(int8["ppl_ratio"] - 1) < 0.05 and int8["mb_quantized"] < int8["mb_fp32"]
    assert int8["floor"] == {"top1_agreement": 0.97, "ppl_ratio": 1.05} and int8["folder"] == "ort-int8"
    assert int8["below_floor"] is not (int8["top1_agreement"] >= 0.97 and int8["ppl_ratio"] <= 1.05)
    config = json.loads((folder / "onnx" / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] != config["head_dim"]
    for name in ("model.onnx", "tokenizer.json", "generation_config.json"):
        assert (folder / "onnx" / name).is_file()
    assert (folder / "ort-int8" / "model.onnx").is_file() and not (folder / "onnx-int8").exists()


def test_export_adds_onnx_to_an_existing_run(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = run / "introvert"
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        dispatch(["export", str(folder), "--format", "onnx"])
    shutil.rmtree(folder / "onnx")
    shutil.rmtree(folder / "ort-int8")
    report = json.loads((folder / "report.json").read_text())
    del report["verification"]["onnx"], report["verification"]["onnx-int8"]
    (folder / "report.json").write_text(json.dumps(report))
    assert main(["export", str(folder), "--format", "onnx"]) == 0
    again = json.loads((folder / "report.json").read_text())
    assert again["verification"]["onnx"]["passed"] and (folder / "onnx" / "model.onnx").is_file()
    assert not (folder / "ort-int8").exists()


def test_quantized_format_measures_the_persona_margin_on_the_held_out_pairs(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With eval.paired in the run's recipe, a quantized format reports how far it moves the persona's paired
    margin from the fp32 export's, on the pairs the evaluation holds out, and is judged on it."""
    from exporter.evaluation.items import CalibrationIndex, persona_pairs
    from exporter.recipe.schema import Recipe

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    recipe = json.loads((run / "recipe.json").read_text())
    pairs_file = recipe["personas"]["introvert"]["calibration"]["path"]
    recipe["eval"] = {
        "paired": {
            "path": pairs_file,
            "prompt_field": "prompt",
            "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
            "max_items": 8,
            "exclude_calibration": True,
        }
    }
    (run / "recipe.json").write_text(json.dumps(recipe))
    assert main(["export", str(run / "extravert"), "--format", "onnx-int4"]) == 0
    assert "persona margin" in capsys.readouterr().out
    int4 = json.loads((run / "extravert" / "report.json").read_text())["verification"]["onnx-int4"]
    held_out = persona_pairs(Recipe.model_validate(recipe), "extravert")
    assert int4["paired_items"] == len(held_out) == 8 and int4["floor"]["persona_shift"] == 0.03
    assert int4["persona_shift"] != 0 and abs(int4["persona_shift"]) < 1  # 4-bit weights move it, a little
    assert int4["persona_shift"] == pytest.approx(int4["paired_margin_quantized"] - int4["paired_margin_fp32"])
    within = int4["top1_agreement"] >= 0.9 and int4["ppl_ratio"] <= 1.15 and abs(int4["persona_shift"]) <= 0.03
    assert int4["below_floor"] is not within
    parsed = Recipe.model_validate(recipe)
    calibration = CalibrationIndex({n: p.calibration for n, p in parsed.personas.items()})
    assert len(calibration.texts) >= 16 and not any(calibration.find(p) for p, _, _ in held_out)


def test_export_adds_a_quantized_format_without_rebuilding_the_others(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import exporter.model.sources

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = run / "extravert"
    before = json.loads((folder / "report.json").read_text())["verification"]
    stamps = {p: p.stat().st_mtime_ns for p in [*(folder / "onnx").iterdir(), *(folder / "ort-int8").iterdir()]}

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model was loaded although nothing needed a reference")

    monkeypatch.setattr(exporter.model.sources, "load_model", no_model)
    assert main(["export", str(folder), "--format", "onnx-int4"]) == 0
    out = capsys.readouterr().out
    assert "onnx-int4: top-1 agreement" in out and "floor 90 %" in out
    after = json.loads((folder / "report.json").read_text())["verification"]
    assert {k: after[k] for k in before} == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert after["onnx-int4"]["bits"] == 4 and (folder / "ort-int4" / "model.onnx").is_file()
    with pytest.raises(OutputError, match="ort-int4 exists; pass --overwrite"):
        dispatch(["export", str(folder), "--format", "onnx-int4"])
    ids = prompt_ids(Runner(folder, "onnx").tokenizer, [{"role": "user", "content": "plan a trip"}])
    for backend in ("onnx-int4", "onnx-int8"):
        assert main(["generate", str(folder), "--prompt", "plan a trip", "--backend", backend]) == 0
        runner = Runner(folder, backend)
        assert runner.onnx.session._model_path.endswith(f"ort-{backend[5:]}/model.onnx")
        assert len(list(runner.next_tokens(ids, 12, Sampling()))) == 12


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_overwrite_is_staged_and_an_interruption_keeps_the_verified_onnx(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.stages.build import STAGES

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = run / "introvert"
    before = _files(folder)
    real = STAGES["onnx"]

    def interrupted(fmt: object, x: StageInputs) -> None:
        assert x.folder != folder  # the new export is built elsewhere
        (x.folder / "onnx").mkdir()
        (x.folder / "onnx" / "model.onnx").write_bytes(b"half an export")
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "onnx", interrupted)
    assert main(["export", str(folder), "--format", "onnx", "--overwrite"]) == 130
    assert _files(folder) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_run.iterdir())  # nothing hidden left

    monkeypatch.setitem(STAGES, "onnx", real)
    (folder / "onnx" / "stale.txt").write_text("from the old export")
    assert main(["export", str(folder), "--format", "onnx", "--overwrite"]) == 0
    after = _files(folder)
    report = json.loads(after["report.json"])
    assert report["verification"]["onnx"]["passed"] and "onnx/stale.txt" not in after
    assert {k: v for k, v in after.items() if k.startswith(("hf/", "ort-int8/", "masks"))} == {
        k: v for k, v in before.items() if k.startswith(("hf/", "ort-int8/", "masks"))
    }
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_run.iterdir())


@pytest.mark.parametrize(
    ("fmt", "marker"),
    [("onnx", "verifying ONNX"), ("onnx-int8", "quantizing ONNX weights"), ("gguf", "verifying GGUF")],
)
@pytest.mark.subprocess
def test_export_overwrite_killed_by_sigterm_leaves_the_persona_as_it_was(
    tiny_run: Path, tmp_path: Path, fmt: str, marker: str
) -> None:
    import signal

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = run / "introvert"
    before = _files(folder)
    cmd = [sys.executable, "-m", "exporter", "export", str(folder), "--format", fmt, "--overwrite"]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = kill_at(proc, marker, signal.SIGTERM)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err, err  # 128 + 15
    assert _files(folder) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_run.iterdir())


def test_export_overwrite_refuses_a_symlinked_onnx_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    persona = make_persona(tmp_path / "run", checkpoint)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.onnx").write_text("keep me")
    (persona / "onnx").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    for fmt in ("onnx", "onnx-int8", "onnx-int4"):  # onnx/ is written, or read as their source
        argv = ["export", str(persona), "--format", fmt, "--overwrite"]
        expect(argv, OutputError, "onnx is a symlink (to", capsys)
    assert snapshot(tmp_path) == before


def test_export_adds_a_verified_gguf(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("onnx", "ort-*"))
    folder = run / "introvert"
    assert main(["export", str(folder), "--format", "gguf"]) == 0
    gguf = json.loads((folder / "report.json").read_text())["verification"]["gguf"]
    assert gguf["passed"] and gguf["F16"]["passed"] and gguf["F16"]["greedy_identical"]
    assert gguf["F16"]["max_abs_logit_diff"] <= 1e-2 and gguf["F16"]["max_abs_logit_diff"] > 0
    assert 0 < gguf["Q8_0"]["top1_agreement"] <= 1 and "below_floor" in gguf["Q8_0"]
    assert sorted(p.name for p in (folder / "gguf").iterdir()) == [
        "model-f16.gguf",
        "model-q4_1.gguf",
        "model-q8_0.gguf",
    ]
    assert not (folder / "onnx").exists()  # gguf is made from hf/ alone


@pytest.mark.parametrize(
    ("fmt", "module", "step"),
    [
        ("onnx-int8", "exporter.stages.quantized", "quantize_weights"),
        ("gguf", "exporter.stages.gguf", "export_gguf"),
    ],
)
def test_a_failed_export_leaves_the_verified_formats_and_report_as_they_were(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, module: str, step: str
) -> None:
    import importlib

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    folder = run / "introvert"
    before = _files(folder)

    def failing(src: Path, out: Path, *args: object, **kwargs: object) -> None:
        out.mkdir()
        (out / "model.part").write_bytes(b"half a file")
        raise RuntimeError("the writer failed")

    monkeypatch.setattr(importlib.import_module(module), step, failing)
    with pytest.raises(RuntimeError, match="the writer failed"):
        dispatch(["export", str(folder), "--format", fmt, "--overwrite"])
    assert _files(folder) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in tiny_run.iterdir())
