"""Verification results, one typed record per kind of check (the kind each format declares in
exporter/recipe/formats.py): what report.json's `verification` holds per format.

A verdict is computed from the figures it rests on, never stored state: `passed` (and `below_floor` of a
measured format) is written to report.json for its readers but not read back. Fields that reports of earlier
releases lack are optional (left out of the JSON while unset).
"""

from __future__ import annotations

from typing import Any

from pydantic import SerializerFunctionWrapHandler, computed_field, model_serializer, model_validator

from exporter.recipe.formats import Q4_ACTIVATIONS, Floor
from exporter.reports.record import Record


class Check(Record):
    """One format's verification result; `passed` when the format computes what it must."""

    def verdict(self) -> bool:
        raise NotImplementedError

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.verdict()


class LogitThresholds(Record):
    """Bounds on |logit difference| from the masked reference (fp32)."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float

    def admit(self, worst: float, mean: float) -> bool:
        return worst <= self.max_abs_logit_diff and mean <= self.mean_abs_logit_diff


class Parity(Record):
    """A checkpoint's logits and greedy continuations against the masked reference in one dtype."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_identical: bool
    greedy_first_divergence: int | None


class CheckpointThresholds(Record):
    fp64_max_abs: float
    greedy_tokens: int


class LayerParity(Check):
    """Parity proven layer by layer in float64 (exporter/verify/layers.py)."""

    method: str
    max_abs_layer_output_diff: float
    worst_layer: int
    per_layer_max_abs: list[float]
    outside_layers_differ: list[str]
    threshold: float

    def verdict(self) -> bool:
        return self.max_abs_layer_output_diff <= self.threshold and not self.outside_layers_differ


class CheckpointCheck(Check):
    """The pruned checkpoint (hf/) against the masked model: proven in float64 end to end, or layer by layer
    (`fp64_layers`) when the model's float64 copy does not fit; fp32 figures reported."""

    thresholds: CheckpointThresholds
    fp64: Parity | None = None
    fp32: Parity
    fp64_layers: LayerParity | None = None

    def verdict(self) -> bool:
        if self.fp64 is not None:
            return self.fp64.max_abs_logit_diff <= self.thresholds.fp64_max_abs and self.fp64.greedy_identical
        return self.fp64_layers is not None and self.fp64_layers.passed

    @property
    def exact_max_abs(self) -> float:
        """The float64 proof's largest difference: logits end to end, else the worst layer output."""
        if self.fp64 is not None:
            return self.fp64.max_abs_logit_diff
        return self.fp64_layers.max_abs_layer_output_diff if self.fp64_layers else float("nan")

    @property
    def exact_greedy_identical(self) -> bool:
        """Greedy continuations of the float64 proof (fp32's when proven layer by layer)."""
        return (self.fp64 or self.fp32).greedy_identical


class Divergence(Record):
    """Where a greedy continuation first left the reference's, and how near a tie the reference was there."""

    batch: int | None = None  # ONNX: the batch of verification prompts and the row in it
    row: int | None = None
    prompt: int | None = None  # onnxruntime-genai: the prompt (run one at a time)
    step: int
    reference_margin: float | None
    LAYOUT = ("batch", "row", "prompt", "step", "reference_margin")


def near_ties(diverged: int, near: bool | None) -> bool:
    """Greedy continuations pass when none diverged, or when every divergence was a near tie of the reference."""
    return diverged == 0 or bool(near)


class OnnxCheck(Check):
    """The fp32 ONNX export, run by the project's onnxruntime loop, against the masked reference."""

    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_identical: bool
    greedy_first_divergence: Divergence | None
    greedy_rows_diverged: int
    greedy_divergences_are_near_ties: bool
    thresholds: LogitThresholds
    batches: int
    greedy_tokens: int
    decode_steps: int
    LAYOUT = (
        "max_abs_logit_diff",
        "mean_abs_logit_diff",
        "greedy_identical",
        "greedy_first_divergence",
        "greedy_rows_diverged",
        "greedy_divergences_are_near_ties",
        "passed",
    )

    def verdict(self) -> bool:
        within = self.thresholds.admit(self.max_abs_logit_diff, self.mean_abs_logit_diff)
        return within and near_ties(self.greedy_rows_diverged, self.greedy_divergences_are_near_ties)


class FloorLimits(Record):
    """A quantized format's floor as applied: the persona margin's only when it was measured."""

    top1_agreement: float
    ppl_ratio: float
    persona_shift: float | None = None

    @classmethod
    def of(cls, floor: Floor, persona_shift: bool) -> FloorLimits:
        return cls(
            top1_agreement=floor.top1_agreement,
            ppl_ratio=floor.ppl_ratio,
            persona_shift=floor.persona_shift if persona_shift else None,
        )


class Quality(Record):
    """A quantized model measured against the model it was made from: top-1 next-token agreement, both
    perplexities and, on held-out pairs, how far the persona's paired margin moved."""

    top1_agreement: float
    positions: int
    ppl_fp32: float
    ppl_quantized: float
    ppl_ratio: float
    persona_shift: float | None = None
    paired_items: int | None = None
    paired_margin_fp32: float | None = None
    paired_margin_quantized: float | None = None


QUALITY = tuple(Quality.model_fields)


class Measured(Check):
    """A check that may hold quantized weights' quality and the floor it is judged against."""

    top1_agreement: float | None = None
    positions: int | None = None
    ppl_fp32: float | None = None
    ppl_quantized: float | None = None
    ppl_ratio: float | None = None
    persona_shift: float | None = None
    paired_items: int | None = None
    paired_margin_fp32: float | None = None
    paired_margin_quantized: float | None = None
    floor: FloorLimits | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def below_floor(self) -> bool | None:
        """Below the floor (not pushed unless asked); None when nothing was measured against one."""
        f = self.floor
        if f is None or self.top1_agreement is None or self.ppl_ratio is None:
            return None
        within = self.top1_agreement >= f.top1_agreement and self.ppl_ratio <= f.ppl_ratio
        if self.persona_shift is not None and f.persona_shift is not None:
            within = within and abs(self.persona_shift) <= f.persona_shift
        return not within

    @classmethod
    def measured(cls, quality: Quality, floor: Floor) -> dict[str, Any]:
        """The fields of `quality` judged against `floor`, for the constructor."""
        return {**quality.model_dump(), "floor": FloorLimits.of(floor, quality.persona_shift is not None)}

    def describe(self, name: str) -> str:
        """One line for the terminal: the quality against fp32 and the floor."""
        assert self.floor is not None and self.top1_agreement is not None and self.ppl_ratio is not None
        floor = self.floor
        mark = "BELOW FLOOR (not pushed unless asked)" if self.below_floor else "within floor"
        shift = ""
        if self.persona_shift is not None and floor.persona_shift is not None:
            shift = f", persona margin {self.persona_shift:+.3f} nats/token (floor ±{floor.persona_shift:.2f})"
        return (
            f"{name}: top-1 agreement {100 * self.top1_agreement:.1f} % (floor {100 * floor.top1_agreement:.0f} %), "
            f"perplexity x{self.ppl_ratio:.3f} (floor x{floor.ppl_ratio:.2f}){shift}{self.size_text()}: {mark}"
        )

    def size_text(self) -> str:
        return ""

    def margin_text(self) -> str:
        """The persona-margin change, when it was measured (model cards)."""
        if self.persona_shift is None:
            return ""
        return f", persona margin {self.persona_shift:+.3f} nats/token on {self.paired_items} held-out pairs"


class QuantizedCheck(Measured):
    """A weight-only quantized ONNX export (onnx-int8, onnx-int4): made from the proven fp32 export and measured
    against it, never a parity target (it passes; below its floor it is not pushed by default)."""

    measured_on: str
    mb_fp32: float
    mb_quantized: float
    folder: str
    bits: int
    parity_target: bool = False
    LAYOUT = (*QUALITY, "measured_on", "mb_fp32", "mb_quantized", "floor", "below_floor", "folder", "bits")

    def verdict(self) -> bool:
        return True

    def size_text(self) -> str:
        return f", {self.mb_quantized:.0f} MB vs {self.mb_fp32:.0f} MB"


class GgufFileCheck(Measured):
    """One GGUF file loaded back by transformers: a parity target when it holds every matrix exactly (then it
    has `thresholds`), else measured against the 8-bit or 4-bit floor."""

    file: str
    stored: dict[str, int] | None = None  # block type -> matrices stored in it
    restored_neurons_per_layer: int | None = None
    parity_target: bool | None = None
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_identical: bool
    greedy_first_divergence: int | None
    mb: float
    thresholds: LogitThresholds | None = None
    LAYOUT = (
        "file",
        "stored",
        "restored_neurons_per_layer",
        "parity_target",
        "max_abs_logit_diff",
        "mean_abs_logit_diff",
        "greedy_identical",
        "greedy_first_divergence",
        "mb",
        *QUALITY,
        "floor",
        "below_floor",
    )

    def verdict(self) -> bool:
        if self.thresholds is None:  # measured, not a parity target
            return True
        return self.thresholds.admit(self.max_abs_logit_diff, self.mean_abs_logit_diff) and self.greedy_identical


class GgufCheck(Check):
    """The gguf/ folder: one result per file type ("F16", "Q8_0", "Q4_1"); passed when every file that is a
    parity target meets it. Written flat: {"passed": ..., "F16": {...}, ...}."""

    files: dict[str, GgufFileCheck]

    def verdict(self) -> bool:
        return all(f.passed for f in self.files.values())

    @model_validator(mode="before")
    @classmethod
    def _from_flat(cls, data: Any) -> Any:
        if isinstance(data, dict) and "files" not in data:
            return {"files": {k: v for k, v in data.items() if k != "passed"}}
        return data

    @model_serializer(mode="wrap")
    def _layout(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {"passed": data["passed"], **data["files"]}


class GenaiCheck(Measured):
    """The genai/ folder run by onnxruntime-genai: fp32 is a parity target (ONNX tolerances, near ties); int4 /
    int8 are measured against their floor. Every precision must tokenize, decode and end as the shipped
    tokenizer does."""

    precision: str
    tokenizer_ids_equal: bool
    decode_round_trip: bool
    eos_token_id: list[int]
    eos_declared: bool
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    greedy_identical: bool
    greedy_first_divergence: Divergence | None
    greedy_rows_diverged: int
    mb: float
    thresholds: LogitThresholds | None = None  # a parity target's
    greedy_divergences_are_near_ties: bool | None = None  # a parity target's
    bits: int | None = None  # measured: the bit width whose floor applies
    folder: str
    LAYOUT = (
        "precision",
        "parity_target",
        "tokenizer_ids_equal",
        "decode_round_trip",
        "eos_token_id",
        "eos_declared",
        "max_abs_logit_diff",
        "mean_abs_logit_diff",
        "greedy_identical",
        "greedy_first_divergence",
        "greedy_rows_diverged",
        "mb",
        "thresholds",
        "greedy_divergences_are_near_ties",
        *QUALITY,
        "floor",
        "below_floor",
        "bits",
        "passed",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def parity_target(self) -> bool:
        """Must compute what the masked model computes (ONNX tolerances); else measured against its floor."""
        return self.precision == "fp32"

    @property
    def tokenizer_ok(self) -> bool:
        return self.tokenizer_ids_equal and self.decode_round_trip and self.eos_declared

    def verdict(self) -> bool:
        if not self.parity_target:
            return self.tokenizer_ok  # measured against its floor, not a parity target
        within = self.thresholds is not None and self.thresholds.admit(
            self.max_abs_logit_diff, self.mean_abs_logit_diff
        )
        return (
            within
            and near_ties(self.greedy_rows_diverged, self.greedy_divergences_are_near_ties)
            and (self.tokenizer_ok)
        )

    def failures(self) -> str:
        """What failed, in a few words."""
        checks = {"tokenizer_ids_equal": self.tokenizer_ids_equal, "decode_round_trip": self.decode_round_trip}
        out = [f"{name} is false" for name, ok in (*checks.items(), ("eos_declared", self.eos_declared)) if not ok]
        if self.parity_target:
            out.append(
                f"max |logit diff| {self.max_abs_logit_diff:.2e}, mean {self.mean_abs_logit_diff:.2e}, "
                f"{self.greedy_rows_diverged} greedy continuation(s) diverged"
            )
        return "; ".join(out)


EXACT_BLOCKS = ("fp32", "q4_1", "q8_0")  # how an onnx-q4 matrix can hold the checkpoint's weights exactly


class Q4Check(GenaiCheck):
    """The q4-genai/ folder (onnx-q4): onnxruntime-genai's graph on 4-bit blocks, always measured against the
    4-bit floor. A parity target as well when it computes what the checkpoint computes: every quantized matrix
    reads back bit for bit from the source's own blocks (none made by a fallback method such as HQQ) and the
    kernels keep fp32 activations (MatMulNBits accuracy_level 1)."""

    blocks: dict[str, int]  # how the matrices are stored ("q4_1", "q8_0", "hqq", "fp32") -> how many
    weights_exact: int  # quantized matrices whose stored blocks give the checkpoint's weights bit for bit
    weights_quantized: int
    restored_neurons_per_layer: int  # removed MLP neurons put back zero-gated (the dense width's blocks)
    accuracy_level: int  # MatMulNBits'
    LAYOUT = (
        *GenaiCheck.LAYOUT[:-1],
        "blocks",
        "weights_exact",
        "weights_quantized",
        "restored_neurons_per_layer",
        "activations",
        "accuracy_level",
        "folder",
        "passed",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def activations(self) -> str:
        """output.q4_activations: how the kernels treat the activations."""
        return next(name for name, level in Q4_ACTIVATIONS.items() if level == self.accuracy_level)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def parity_target(self) -> bool:
        exact = self.weights_exact == self.weights_quantized and set(self.blocks) <= set(EXACT_BLOCKS)
        return exact and self.accuracy_level == 1


CHECKS: dict[str, type[Check]] = {
    "checkpoint": CheckpointCheck,
    "onnx": OnnxCheck,
    "quantized": QuantizedCheck,
    "gguf": GgufCheck,
    "genai": GenaiCheck,
    "q4": Q4Check,
}
