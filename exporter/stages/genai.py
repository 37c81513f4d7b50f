"""The onnxruntime-genai stage: build `genai/` from the proven checkpoint with onnxruntime-genai's model builder
and check it, run by onnxruntime-genai, against the masked reference (fp32 fatal on failure; int4 / int8
measured against their floors)."""

from __future__ import annotations

import logging

from exporter.export.genai import build_genai
from exporter.io import shown_name
from exporter.recipe.formats import Format
from exporter.reports.checks import GenaiCheck
from exporter.stages.base import StageInputs
from exporter.verify.genai import verify_genai
from exporter.verify.hf import masked

log = logging.getLogger(__name__)


def genai_stage(fmt: Format, x: StageInputs) -> GenaiCheck:
    reference, adapter = x.proven_reference()
    name, precision, out = shown_name(x.folder), x.genai_precision, x.folder / fmt.folder
    with x.timer.timed("export_genai"):
        log.info("%s: building the onnxruntime-genai folder (%s)", name, precision)
        built = build_genai(x.folder / "hf", out, precision)
    with x.timer.timed("verify_genai"):
        log.info("%s: verifying the onnxruntime-genai folder against the masked model", name)
        with masked(reference, adapter, x.mask):
            eos = built["eos_token_id"]
            check = verify_genai(reference, out, fmt.folder, precision, eos, x.probes)
    if check.below_floor is not None:
        log.info("%s: %s", name, check.describe(f"onnx-genai {precision}"))
    if not check.passed:
        log.error("%s: onnx-genai does not match the masked model: %s", name, check.failures())
    return check
