"""The fp32 ONNX stage: export the proven checkpoint with optimum and prove the ONNX model, run by the
project's onnxruntime loop, against the masked reference (fatal on failure)."""

from __future__ import annotations

import logging

from exporter.export.onnx import export_onnx
from exporter.io import shown_name
from exporter.quiet import progress
from exporter.recipe.formats import Format
from exporter.reports.checks import OnnxCheck
from exporter.stages.base import StageInputs
from exporter.verify.hf import masked
from exporter.verify.onnx import verify_onnx

log = logging.getLogger(__name__)


def onnx_stage(fmt: Format, x: StageInputs) -> OnnxCheck:
    reference, adapter = x.proven_reference()
    name = shown_name(x.folder)
    with x.timer.timed("export_onnx"):
        log.info("%s: exporting ONNX", name)
        with progress(1, f"export ONNX {name}") as bar:  # one opaque optimum call: the bar shows the time
            export_onnx(x.folder / "hf", x.folder / fmt.folder)
            bar.update()
    with x.timer.timed("verify_onnx"):
        log.info("%s: verifying ONNX against the masked model (prefill, 3 cached steps, greedy)", name)
        with masked(reference, adapter, x.mask):
            spec = x.probes.spec
            folder = x.folder / fmt.folder
            return verify_onnx(
                reference, folder, x.probes.prompts.all(), spec.greedy_tokens, 3, thresholds=spec.onnx_thresholds
            )
