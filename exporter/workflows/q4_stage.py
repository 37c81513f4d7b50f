"""The `onnx-q4` stage of a persona: build `q4-genai/` (onnxruntime-genai's graph on 4-bit blocks: the source's
own Q4_1 / Q8_0 blocks where the checkpoint has them, HQQ blocks elsewhere) from the proven checkpoint and
verify it, run by onnxruntime-genai, against the masked reference.

A folder whose every quantized matrix holds the checkpoint's weights exactly, run with fp32 activations
(output.q4_activations: fp32, MatMulNBits accuracy_level 1), is a parity target with the ONNX tolerances (failing it fails the persona); any other is
measured against the 4-bit floor. Its quality figures are measured either way."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from exporter.export.genai import build_q4_genai
from exporter.io import shown_name
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import FOLDERS
from exporter.recipe.schema import VerifySpec
from exporter.verify.genai import verify_genai
from exporter.verify.hf import PromptSet, masked
from exporter.verify.quality import Pair, describe
from exporter.workflows.gguf_stage import dense_mlp

log = logging.getLogger(__name__)

ACCURACY_LEVELS = {"fp32": 1, "int8": 4}  # output.q4_activations -> MatMulNBits accuracy_level


def q4_stage(
    folder: Path,
    activations: str,
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
    """Write `q4-genai/` next to `folder/hf` with `activations` ("int8", "fp32": output.q4_activations) and
    verify it; the report entry for `onnx-q4`."""
    t = time.perf_counter()
    log.info("%s: building the 4-bit onnxruntime-genai folder from the checkpoint's blocks", shown_name(folder))
    out = folder / FOLDERS["onnx-q4"]
    level = ACCURACY_LEVELS[activations]
    built = build_q4_genai(folder / "hf", out, dense_mlp(reference_fp32, adapter, mask), level)
    timings["export_q4"] = round(time.perf_counter() - t, 3)
    # every quantized matrix read back bit for bit (a matrix without whole blocks stays an exact fp32 MatMul)
    exact = built["weights_exact"] == built["weights_quantized"] and "hqq" not in built["blocks"]
    parity = exact and level == 1
    t = time.perf_counter()
    log.info("%s: verifying the 4-bit folder against the masked model", shown_name(folder))
    with masked(reference_fp32, adapter, mask):
        figures = verify_genai(
            reference_fp32,
            out,
            "q4",
            built["eos_token_id"],
            prompts,
            spec,
            tokenizer,
            neutral,
            pairs,
            parity=parity,
            bits=4,
        )
    timings["verify_q4"] = round(time.perf_counter() - t, 3)
    figures |= {k: built[k] for k in ("blocks", "weights_exact", "weights_quantized", "restored", "accuracy_level")}
    figures["activations"] = activations
    figures["folder"] = FOLDERS["onnx-q4"]
    log.info("%s: %s", shown_name(folder), describe("onnx-q4", figures))
    if not figures["passed"]:
        log.error(
            "%s: onnx-q4 does not match the masked model: max |logit diff| %.2e, %d greedy row(s) diverged",
            shown_name(folder),
            figures["max_abs_logit_diff"],
            figures["greedy_rows_diverged"],
        )
    return figures
