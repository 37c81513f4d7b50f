"""Export formats: their names (recipes, `--format`, `--backend`, report keys), the folder each is written to
inside a persona folder, what each is made from, and the quality floors of the quantized ones.

No folder name is a prefix of another: optimum-onnx 0.1.0 matches `subfolder` as a prefix of the Hub's file
paths, so with `onnx/` and `onnx-int8/` side by side `subfolder="onnx"` loaded the int8 model.
"""

from __future__ import annotations

from dataclasses import dataclass

FOLDERS = {
    "hf": "hf",
    "onnx": "onnx",  # fp32, proven against the masked reference
    "onnx-int8": "ort-int8",  # weight-only MatMulNBits, measured against onnx/
    "onnx-int4": "ort-int4",
    "gguf": "gguf",  # F16 and Q8_0 llama.cpp files, F16 proven through transformers' GGUF loader
    "onnx-genai": "genai",  # onnxruntime-genai's builder on hf/; fp32 proven, int4 / int8 measured
    # onnxruntime-genai's graph on the checkpoint's own 4-bit blocks: proven when it holds the weights exactly
    "onnx-q4": "q4-genai",
}
GENAI_FORMATS = ("onnx-genai", "onnx-q4")  # folders that onnxruntime-genai loads and runs
# what each format is made from (built first when missing)
SOURCES = {"onnx": "hf", "onnx-int8": "onnx", "onnx-int4": "onnx", "gguf": "hf", "onnx-genai": "hf", "onnx-q4": "hf"}


def with_sources(formats: list[str]) -> list[str]:
    """`formats` plus what they are made from, in build order (hf first)."""
    out: list[str] = []
    for name in formats:
        chain = [name]
        while chain[-1] in SOURCES:
            chain.append(SOURCES[chain[-1]])
        out += [n for n in reversed(chain) if n not in out]
    order = list(FOLDERS)
    return sorted(out, key=order.index)


@dataclass(frozen=True)
class Floor:
    """The least quality a quantized format must keep against the fp32 export."""

    top1_agreement: float  # fraction of next-token argmaxes equal to fp32's
    ppl_ratio: float  # neutral perplexity / fp32's
    # |paired-margin change| against fp32's, nats/token, on the evaluation's held-out pairs
    persona_shift: float = 0.03


@dataclass(frozen=True)
class QuantFormat:
    name: str  # the format's name in recipes and on the command line
    bits: int
    floor: Floor
    # MatMulNBits accuracy_level: 4 quantizes activations to int8 per block inside the kernel (fastest on
    # AVX2/VNNI/NEON), 1 keeps them fp32
    accuracy_level: int

    @property
    def folder(self) -> str:
        return FOLDERS[self.name]


# Dense SmolLM2-135M (its fp32 export) on 8 paragraphs of the demo's neutral text (870 positions), block 32,
# LM head quantized too: 8-bit symmetric with int8 activations (level 4) 95.8 % top-1 agreement, x1.009
# perplexity; with fp32 activations (level 1) 98.2 %, x1.003 (asymmetric: 98.2 %, x1.002). 4-bit: symmetric
# 64.5 %, x1.26; asymmetric 67.8 %, x1.32, with fp32 activations 67.6 %, x1.31. SmolLM2's weights come from
# a Q4_1 GGUF, and a second 4-bit grid that does not line up with Q4_1's adds its full rounding error again.
QUANT_FORMATS = {
    "onnx-int8": QuantFormat("onnx-int8", 8, Floor(0.97, 1.05), accuracy_level=1),
    "onnx-int4": QuantFormat("onnx-int4", 4, Floor(0.90, 1.15), accuracy_level=4),
}

# formats with a quantized file whose quality (and persona margin) is measured: GGUF's Q8_0, genai below fp32
MEASURED_FORMATS = {*QUANT_FORMATS, "gguf", "onnx-genai", "onnx-q4"}
