"""The registry of format stages (exporter/stages/build.py): one stage per format made from the checkpoint, run in
build order, each format made only from a proven source."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exporter.recipe.formats import ADDED, FORMATS, with_sources
from exporter.reports.checks import Check, OnnxCheck, QuantizedCheck
from exporter.stages import build
from exporter.stages.base import StageInputs
from tests.helpers import onnx_check, quantized_check


def test_every_format_made_from_the_checkpoint_has_a_stage() -> None:
    assert set(build.STAGES) == set(ADDED) and "hf" not in build.STAGES
    assert all(FORMATS[n].source in FORMATS for n in ADDED)
    assert with_sources(["onnx-int4", "gguf"]) == ["hf", "onnx", "onnx-int4", "gguf"]  # sources first


@pytest.mark.parametrize(("onnx_passes", "built"), [(True, ["onnx", "onnx-int8"]), (False, ["onnx"])])
def test_a_format_is_made_from_a_proven_source_only(
    onnx_passes: bool, built: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The quantized copy is made after its fp32 source in the same build, and only when that source passed."""
    calls: list[str] = []
    checks: dict[str, Check] = {
        "onnx": OnnxCheck.model_validate(onnx_check(max_abs=1e-5 if onnx_passes else 0.5)),
        "onnx-int8": QuantizedCheck.model_validate(quantized_check(8, 0.99)),
    }
    for name in checks:
        monkeypatch.setitem(build.STAGES, name, lambda fmt, x: calls.append(fmt.name) or checks[fmt.name])
    inputs = StageInputs(Path("p"), None, None, None, None, "int4", "int8", None)  # type: ignore[arg-type]
    caplog.set_level(logging.ERROR)
    proven = OnnxCheck.model_validate(onnx_check())  # the checkpoint's check passed
    results = build.build_formats(inputs, ["onnx", "onnx-int8"], {"hf": proven})
    assert calls == built and list(results) == built
    assert ("made from the proven onnx export only; skipped" in caplog.text) is not onnx_passes


def test_a_format_already_there_is_the_source_of_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    int4 = QuantizedCheck.model_validate(quantized_check(4, 0.95))
    monkeypatch.setitem(build.STAGES, "onnx-int4", lambda fmt, x: calls.append(fmt.name) or int4)
    inputs = StageInputs(Path("p"), None, None, None, None, "int4", "int8", None)  # type: ignore[arg-type]
    proven = OnnxCheck.model_validate(onnx_check())
    assert build.build_formats(inputs, ["onnx-int4"], {"onnx": proven}) == {"onnx-int4": int4}
    failed = OnnxCheck.model_validate(onnx_check(max_abs=0.5))
    assert build.build_formats(inputs, ["onnx-int4"], {"onnx": failed}) == {} and calls == ["onnx-int4"]
