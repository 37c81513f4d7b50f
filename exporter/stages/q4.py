"""The `onnx-q4` stage: build `q4-genai/` (onnxruntime-genai's graph on 4-bit blocks: the source's own Q4_1 / Q8_0
blocks where the checkpoint has them, HQQ blocks elsewhere) from the proven checkpoint and check it, run by
onnxruntime-genai, against the masked reference.

Its quality is always measured against the 4-bit floor. A folder whose every quantized matrix holds the
checkpoint's weights exactly, run with fp32 activations (output.q4_activations: fp32, MatMulNBits accuracy_level
1), is a parity target as well, with the ONNX tolerances (failing it fails the persona)."""

from __future__ import annotations

import logging

from exporter.export.genai import build_q4_genai
from exporter.io import shown_name
from exporter.recipe.formats import Q4_ACTIVATIONS, Format
from exporter.reports.checks import GenaiCheck
from exporter.stages.base import StageInputs
from exporter.stages.gguf import dense_mlp
from exporter.verify.genai import verify_genai
from exporter.verify.hf import masked

log = logging.getLogger(__name__)


def q4_stage(fmt: Format, x: StageInputs) -> GenaiCheck:
    reference, adapter = x.proven_reference()
    name, out, level = shown_name(x.folder), x.folder / fmt.folder, Q4_ACTIVATIONS[x.q4_activations]
    with x.timer.timed("export_q4"):
        log.info("%s: building the 4-bit onnxruntime-genai folder from the checkpoint's blocks", name)
        built = build_q4_genai(x.folder / "hf", out, dense_mlp(reference, adapter, x.mask), level)
    with x.timer.timed("verify_q4"):
        log.info("%s: verifying the 4-bit folder against the masked model", name)
        with masked(reference, adapter, x.mask):
            check = verify_genai(reference, out, fmt.folder, "q4", built["eos_token_id"], x.probes, built["stored"])
    log.info("%s: %s", name, check.describe(fmt.name))
    if not check.passed:
        log.error("%s: onnx-q4 does not match the masked model: %s", name, check.failures())
    return check
