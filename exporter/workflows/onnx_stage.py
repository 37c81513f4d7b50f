"""The ONNX stage of a persona: export the verified checkpoint, prove the ONNX model against the masked
reference (fatal on failure), and add weight-only quantized copies whose quality is measured against the
fp32 export, not proven."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from exporter.export.onnx import export_onnx
from exporter.export.quantize import quantize_weights
from exporter.io import shown_name
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.quiet import progress
from exporter.recipe.formats import FORMATS
from exporter.recipe.schema import VerifySpec
from exporter.verify.hf import PromptSet, masked
from exporter.verify.onnx import compare_quantized, verify_onnx
from exporter.verify.quality import Pair, describe, judge

log = logging.getLogger(__name__)


def onnx_stage(
    folder: Path,
    formats: list[str],
    reference_fp32: nn.Module | None,
    adapter: Adapter | None,
    mask: PersonaMask,
    prompts: PromptSet,
    spec: VerifySpec,
    timings: dict[str, float],
    neutral: list[str] | None = None,
    fp32_passed: bool | None = None,
    pairs: list[Pair] | None = None,
) -> dict[str, Any]:
    """Write `onnx/` (when "onnx" is in `formats`) and each quantized format's folder next to
    `folder/hf`; returns {format: figures}.

    Quantized formats are made from an existing `onnx/` whose proof (`fp32_passed`) is given when "onnx"
    is not rebuilt here. Their quality is measured on the `neutral` texts (else the verification prompts), and
    their persona margin on `pairs` (the evaluation's held-out pairs).
    """
    results: dict[str, Any] = {}
    if "onnx" in formats:
        assert reference_fp32 is not None and adapter is not None, "fp32 ONNX is verified against the reference"
        t = time.perf_counter()
        log.info("%s: exporting ONNX", shown_name(folder))
        with progress(1, f"export ONNX {shown_name(folder)}") as bar:  # one opaque optimum call: the bar shows the time
            export_onnx(folder / "hf", folder / "onnx")
            bar.update()
        timings["export_onnx"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        log.info("%s: verifying ONNX against the masked model (prefill, 3 cached steps, greedy)", shown_name(folder))
        with masked(reference_fp32, adapter, mask):
            results["onnx"] = verify_onnx(
                reference_fp32, folder / "onnx", prompts.all(), spec.greedy_tokens, 3, thresholds=spec.onnx_thresholds
            )
        timings["verify_onnx"] = round(time.perf_counter() - t, 3)
        fp32_passed = results["onnx"]["passed"]

    for name in (n for n in formats if FORMATS[n].quantization):
        if not fp32_passed:
            log.error("%s: %s is made from the proven fp32 ONNX export only; skipped", shown_name(folder), name)
            continue
        fmt, q = FORMATS[name], FORMATS[name].quantization
        assert q is not None
        t = time.perf_counter()
        log.info("%s: quantizing ONNX weights to %d bits (MatMulNBits)", shown_name(folder), q.bits)
        quantize_weights(folder / "onnx", folder / fmt.folder, q.bits, accuracy_level=q.accuracy_level)
        quality = compare_quantized(folder / "onnx", folder / fmt.folder, prompts.all(), neutral, pairs=pairs)
        figures = judge(quality, q.floor)
        # Not a parity target: made from the proven fp32 export; below its floor it is not pushed by default.
        results[name] = {**figures, "folder": fmt.folder, "bits": q.bits, "parity_target": False, "passed": True}
        timings[f"quantize_{name}"] = round(time.perf_counter() - t, 3)
        log.info("%s: %s", shown_name(folder), describe(name, figures))
    return results
