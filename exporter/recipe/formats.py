"""Export formats, declared once in FORMATS: each format's name (recipes, `export --format`, `--backend`,
report.json keys), the folder it is written to inside a persona folder, what it is made from, the runtime that
loads it, the kind of check that proves or measures it, and the quality floors of the quantized ones. Every
other list of formats (the recipe schema, the command line, the Hub push, the model card) is derived from it;
the stage that builds and checks a format is registered under its name in exporter/stages/.

No folder name is a prefix of another: optimum-onnx 0.1.0 matches `subfolder` as a prefix of the Hub's file
paths, so with `onnx/` and `onnx-int8/` side by side `subfolder="onnx"` loaded the int8 model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

Family = Literal["transformers", "onnxruntime", "llama.cpp", "onnxruntime-genai"]  # the runtime that loads it
CheckKind = Literal["checkpoint", "onnx", "quantized", "gguf", "genai", "q4"]  # exporter/reports/checks.py


@dataclass(frozen=True)
class Floor:
    """The least quality a quantized format must keep against the fp32 export."""

    top1_agreement: float  # fraction of next-token argmaxes equal to fp32's
    ppl_ratio: float  # neutral perplexity / fp32's
    # |paired-margin change| against fp32's, nats/token, on the evaluation's held-out pairs
    persona_shift: float = 0.03


# Dense SmolLM2-135M (its fp32 export) on 8 paragraphs of the demo's neutral text (870 positions), block 32,
# LM head quantized too: 8-bit symmetric with int8 activations (level 4) 95.8 % top-1 agreement, x1.009
# perplexity; with fp32 activations (level 1) 98.2 %, x1.003 (asymmetric: 98.2 %, x1.002). 4-bit: symmetric
# 64.5 %, x1.26; asymmetric 67.8 %, x1.32, with fp32 activations 67.6 %, x1.31. SmolLM2's weights come from
# a Q4_1 GGUF, and a second 4-bit grid that does not line up with Q4_1's adds its full rounding error again.
FLOORS = {8: Floor(0.97, 1.05), 4: Floor(0.90, 1.15)}  # by weight bits (GGUF Q8_0 and F16: 8; Q4_1: 4)
# onnx-q4's output.q4_activations -> MatMulNBits accuracy_level: int8 rounds the activations per block inside
# the kernel (as llama.cpp does), fp32 keeps them
Q4Activations = Literal["int8", "fp32"]
Q4_ACTIVATIONS: dict[Q4Activations, int] = {"int8": 4, "fp32": 1}


@dataclass(frozen=True)
class Quantization:
    """Weight-only MatMulNBits quantization of the fp32 ONNX export."""

    bits: int
    # MatMulNBits accuracy_level: 4 quantizes activations to int8 per block inside the kernel (fastest on
    # AVX2/VNNI/NEON), 1 keeps them fp32
    accuracy_level: int

    @property
    def floor(self) -> Floor:
        return FLOORS[self.bits]


@dataclass(frozen=True)
class Format:
    name: str  # in recipes, on the command line and in report.json
    folder: str  # inside the persona folder
    source: str | None  # the format it is made from (built first when missing); None: the checkpoint itself
    family: Family
    check: CheckKind
    reference: bool  # checked against the masked reference model: the base model loads to add it
    measured: bool  # holds quantized weights whose quality (and persona margin) is measured
    quantization: Quantization | None = None


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("hf", "hf", None, "transformers", "checkpoint", reference=True, measured=False),
        # fp32, proven against the masked reference
        Format("onnx", "onnx", "hf", "onnxruntime", "onnx", reference=True, measured=False),
        # weight-only MatMulNBits, measured against onnx/
        Format("onnx-int8", "ort-int8", "onnx", "onnxruntime", "quantized", False, True, Quantization(8, 1)),
        Format("onnx-int4", "ort-int4", "onnx", "onnxruntime", "quantized", False, True, Quantization(4, 4)),
        # F16, Q8_0 and Q4_1 llama.cpp files, each proven or measured through transformers' GGUF loader
        Format("gguf", "gguf", "hf", "llama.cpp", "gguf", reference=True, measured=True),
        # onnxruntime-genai's builder on hf/: fp32 proven, int4 / int8 measured
        Format("onnx-genai", "genai", "hf", "onnxruntime-genai", "genai", reference=True, measured=True),
        # onnxruntime-genai's fp32 graph on the checkpoint's own Q4_1 / Q8_0 blocks (HQQ where a matrix has none):
        # proven when every matrix reads back bit for bit and activations stay fp32, else measured (4-bit floor)
        Format("onnx-q4", "q4-genai", "hf", "onnxruntime-genai", "q4", reference=True, measured=True),
    )
}
FORMAT_NAMES = tuple(FORMATS)
ADDED = tuple(n for n, f in FORMATS.items() if f.source is not None)  # made from the checkpoint: `export --format`
if TYPE_CHECKING:
    FormatName = str
else:
    FormatName = Literal[FORMAT_NAMES]  # the recipe's output.formats: one of the names above


def folder_format(folder: str) -> str | None:
    """The format written to `folder`, if any."""
    return next((n for n, f in FORMATS.items() if f.folder == folder), None)


def with_sources(formats: Iterable[str]) -> list[str]:
    """`formats` plus what they are made from, in build order (hf first)."""
    out: list[str] = []
    for name in formats:
        chain = [name]
        while (source := FORMATS[chain[-1]].source) is not None:
            chain.append(source)
        out += [n for n in reversed(chain) if n not in out]
    order = list(FORMATS)
    return sorted(out, key=order.index)


BASE_FIX = "leave 'gguf' out of output.formats (the onnx formats carry Linear biases)"


def format_problems(formats: Sequence[str], config: dict[str, Any], config_file: Path, fix: str) -> list[str]:
    """What the export `formats` cannot be made from, read from the config.json of the checkpoint they are
    made from (model.path for a run, a persona's hf/ for `export`): GGUF files are written for llama
    checkpoints without attention biases (exporter/export/gguf.py writes MLP biases only)."""
    if "gguf" not in formats:
        return []
    problems = []
    if config.get("model_type") != "llama":
        problems.append(
            f"GGUF export supports llama checkpoints; {config_file} is {config.get('model_type')!r}: "
            "leave 'gguf' out of output.formats"
        )
    if config.get("attention_bias"):
        problems.append(
            f"GGUF export: {config_file} has attention_bias true (biases on q/k/v/o_proj, which the GGUF export "
            f"does not write); {fix}"
        )
    return problems
