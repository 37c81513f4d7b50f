"""The onnxruntime-genai stage of a persona: build `genai/` from the proven checkpoint with onnxruntime-genai's
model builder and verify it, run by onnxruntime-genai, against the masked reference (fp32 fatal on failure;
int4 / int8 measured against their floors)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from exporter.export.genai import build_genai
from exporter.io import shown_name
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import FORMATS
from exporter.recipe.schema import VerifySpec
from exporter.verify.genai import verify_genai
from exporter.verify.hf import PromptSet, masked
from exporter.verify.quality import Pair, describe

log = logging.getLogger(__name__)


def genai_stage(
    folder: Path,
    precision: str,
    reference_fp32: nn.Module,
    adapter: Adapter,
    mask: PersonaMask,
    prompts: PromptSet,
    spec: VerifySpec,
    tokenizer: Any,
    neutral: list[str] | None,
    timings: dict[str, float],
    pairs: list[Pair] | None = None,
) -> dict[str, Any]:
    """Write `genai/` next to `folder/hf` and verify it; the report entry for `onnx-genai`."""
    t = time.perf_counter()
    log.info("%s: building the onnxruntime-genai folder (%s)", shown_name(folder), precision)
    out = folder / FORMATS["onnx-genai"].folder
    built = build_genai(folder / "hf", out, precision)
    timings["export_genai"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    log.info("%s: verifying the onnxruntime-genai folder against the masked model", shown_name(folder))
    with masked(reference_fp32, adapter, mask):
        eos = built["eos_token_id"]
        figures = verify_genai(reference_fp32, out, precision, eos, prompts, spec, tokenizer, neutral, pairs)
    timings["verify_genai"] = round(time.perf_counter() - t, 3)
    figures["folder"] = FORMATS["onnx-genai"].folder
    if "below_floor" in figures:
        log.info("%s: %s", shown_name(folder), describe(f"onnx-genai {precision}", figures))
    if not figures["passed"]:
        log.error("%s: onnx-genai does not match the masked model: %s", shown_name(folder), _failed(figures))
    return figures


def _failed(figures: dict[str, Any]) -> str:
    """What failed, in a few words."""
    checks = ("tokenizer_ids_equal", "decode_round_trip", "eos_declared")
    out = [f"{name} is false" for name in checks if not figures.get(name)]
    if figures.get("parity_target"):
        out.append(
            f"max |logit diff| {figures['max_abs_logit_diff']:.2e}, mean {figures['mean_abs_logit_diff']:.2e}, "
            f"{figures['greedy_rows_diverged']} greedy continuation(s) diverged"
        )
    return "; ".join(out)
