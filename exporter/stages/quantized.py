"""The weight-only quantized ONNX stages (onnx-int8, onnx-int4): MatMulNBits copies of the proven fp32 export,
measured against it (top-1 agreement, perplexity, persona margin) and judged against their floor, never a
parity target: below the floor a copy is kept but not pushed by default."""

from __future__ import annotations

import logging

from exporter.export.quantize import quantize_weights
from exporter.io import shown_name
from exporter.recipe.formats import FORMATS, Format
from exporter.reports.checks import QuantizedCheck
from exporter.stages.base import StageInputs
from exporter.verify.onnx import compare_quantized

log = logging.getLogger(__name__)


def quantized_stage(fmt: Format, x: StageInputs) -> QuantizedCheck:
    q = fmt.quantization
    assert q is not None and fmt.source is not None, f"{fmt.name} is not a quantized copy"
    source, out = x.folder / FORMATS[fmt.source].folder, x.folder / fmt.folder
    with x.timer.timed(f"quantize_{fmt.name}"):
        log.info("%s: quantizing ONNX weights to %d bits (MatMulNBits)", shown_name(x.folder), q.bits)
        quantize_weights(source, out, q.bits, accuracy_level=q.accuracy_level)
        probes = x.probes
        check = compare_quantized(fmt, source, out, probes.prompts.all(), probes.neutral, pairs=probes.pairs)
    log.info("%s: %s", shown_name(x.folder), check.describe(fmt.name))
    return check
