"""The registry of format stages, one per format made from a persona's checkpoint (the way optimum registers one
export config per architecture), and `build_formats`, which `run` and `export` both use.

A new format is declared in exporter/recipe/formats.py and its stage (a module of this package) registered in
STAGES under the same name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from exporter.io import shown_name
from exporter.recipe.formats import ADDED, FORMATS
from exporter.reports.checks import Check
from exporter.stages.base import Stage, StageInputs
from exporter.stages.genai import genai_stage
from exporter.stages.gguf import gguf_stage
from exporter.stages.onnx import onnx_stage
from exporter.stages.q4 import q4_stage
from exporter.stages.quantized import quantized_stage

log = logging.getLogger(__name__)

STAGES: dict[str, Stage] = {
    "onnx": onnx_stage,
    "onnx-int8": quantized_stage,
    "onnx-int4": quantized_stage,
    "gguf": gguf_stage,
    "onnx-genai": genai_stage,
    "onnx-q4": q4_stage,
}
assert set(STAGES) == set(ADDED), "every format made from the checkpoint has a stage, and only those"


def build_formats(x: StageInputs, todo: list[str], done: Mapping[str, Check]) -> dict[str, Check]:
    """Build and check the formats `todo` (in build order, exporter/recipe/formats.py `with_sources`) in
    `x.folder`; {format: check}. A format is made only from a proven source: one built here, or one of `done`
    (the persona's checks of the formats already there)."""
    results: dict[str, Check] = {}
    for name in todo:
        fmt = FORMATS[name]
        assert fmt.source is not None, f"{name} is the checkpoint, not a format made from it"
        source = results.get(fmt.source) or done.get(fmt.source)
        if source is None or not source.passed:
            log.error("%s: %s is made from the proven %s export only; skipped", shown_name(x.folder), name, fmt.source)
            continue
        results[name] = STAGES[name](fmt, x)
    return results
