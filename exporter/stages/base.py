"""What every format stage is given and returns: one frozen inputs record, and the stage's typed check.

A stage builds one format next to a persona's proven checkpoint and checks it (proves it against the masked
reference, or measures a quantized copy against what it was made from). Stages are registered by format name
in exporter/stages/build.py; the formats themselves are declared in exporter/recipe/formats.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import Format, Q4Activations
from exporter.reports.checks import Check
from exporter.reports.provenance import Timer
from exporter.verify.hf import Probes


@dataclass(frozen=True)
class StageInputs:
    """What a format stage reads. `reference` and `adapter` are None when the base model is not loaded (only
    formats made from an existing proven export are built then)."""

    folder: Path  # the persona folder (a staged copy) whose hf/ is proven; each format is written next to it
    mask: PersonaMask
    probes: Probes  # verification prompts and bounds, the shipped tokenizer, neutral text and held-out pairs
    reference: nn.Module | None  # the dense fp32 model; a stage applies the mask to it
    adapter: Adapter | None
    genai_precision: str  # onnx-genai: output.genai_precision
    q4_activations: Q4Activations  # onnx-q4: output.q4_activations
    timer: Timer  # seconds of each step, in the order they ran (report.json's timings_s)

    def proven_reference(self) -> tuple[nn.Module, Adapter]:
        """The reference model and its adapter, for a stage that proves its format against them."""
        assert self.reference is not None and self.adapter is not None, "this format is checked against the model"
        return self.reference, self.adapter


Stage = Callable[[Format, StageInputs], Check]  # builds the format into inputs.folder and checks it
