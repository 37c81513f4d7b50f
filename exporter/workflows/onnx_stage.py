"""The ONNX stage of a persona: export the verified checkpoint, prove the ONNX model against the masked
reference (fatal on failure), and optionally add an int8 copy whose quality is measured, not proven."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from exporter.export.onnx import export_onnx, quantize_int8
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.schema import VerifySpec
from exporter.verify.hf import PromptSet, masked
from exporter.verify.onnx import compare_int8, verify_onnx

log = logging.getLogger(__name__)


def onnx_stage(
    folder: Path,
    formats: list[str],
    reference_fp32: nn.Module,
    adapter: Adapter,
    mask: PersonaMask,
    prompts: PromptSet,
    spec: VerifySpec,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Write `onnx/` (and `onnx-int8/`) next to `folder/hf`; returns {"onnx": figures, "onnx-int8": figures}."""
    results: dict[str, Any] = {}
    if "onnx" not in formats:
        return results
    t = time.perf_counter()
    log.info("%s: exporting ONNX", folder.name)
    export_onnx(folder / "hf", folder / "onnx")
    timings["export_onnx"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    log.info("%s: verifying ONNX against the masked model (prefill, 3 cached steps, greedy)", folder.name)
    with masked(reference_fp32, adapter, mask):
        results["onnx"] = verify_onnx(
            reference_fp32, folder / "onnx", prompts.all(), spec.greedy_tokens, 3, thresholds=spec.onnx_thresholds
        )
    timings["verify_onnx"] = round(time.perf_counter() - t, 3)

    if "onnx-int8" in formats:
        t = time.perf_counter()
        log.info("%s: quantizing ONNX to int8 (dynamic)", folder.name)
        quantize_int8(folder / "onnx", folder / "onnx-int8")
        figures = compare_int8(folder / "onnx", folder / "onnx-int8", prompts.all())
        # Not a parity target: it is pushed along when the fp32 ONNX export it was made from is proven.
        results["onnx-int8"] = {**figures, "parity_target": False, "passed": results["onnx"]["passed"]}
        timings["quantize_int8"] = round(time.perf_counter() - t, 3)
    return results
