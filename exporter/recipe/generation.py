"""The decoding defaults every export ships (`output.generation`), what each format calls them, and reading them
back from a format folder.

Decoding stays greedy; the setting is a repetition penalty in CTRL's form (Keskar et al., 2019): the logit of
every token already in the context, the prompt included, is divided by the penalty when positive and multiplied
by it when negative. transformers (`repetition_penalty`), onnxruntime-genai 0.15.2 (`search.repetition_penalty`)
and llama.cpp (`general.sampling.penalty_repeat` over `penalty_last_n` tokens) apply it in that form. 1.0 is
plain greedy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from exporter.errors import ExportFolderError
from exporter.inputs import read_json_object

HF_FILE = "generation_config.json"  # hf/, onnx/ and the quantized ONNX folders
GENAI_FILE = "genai_config.json"  # genai/
# the source's GenerationConfig fields that decide how tokens are chosen: the shipped setting replaces them
# (sampling, beam search, n-gram blocking; transformers refuses do_sample=False beside a non-default temperature)
REPLACED = frozenset(
    [
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "repetition_penalty",
        "no_repeat_ngram_size",
    ]
)


class GenerationSpec(BaseModel):
    """`output.generation`: how the exports decode unless their user says otherwise."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # > 1 discourages every token already in the context; 1 = plain greedy. At most 2: beyond that the penalty
    # rewrites the next-token distribution rather than breaking loops
    repetition_penalty: Annotated[float, Field(ge=1.0, le=2.0)] = 1.0

    @property
    def greedy(self) -> bool:
        """Plain greedy decoding: no penalty."""
        return self.repetition_penalty == 1.0


def decoding_fields(penalty: float) -> dict[str, Any]:
    """Greedy decoding with `penalty`, in the names transformers' GenerationConfig (generation_config.json) and
    onnxruntime-genai's `search` section (genai_config.json) share; both apply the penalty in greedy search."""
    return {"do_sample": False, "repetition_penalty": penalty}


def gguf_sampling(penalty: float, context_length: int) -> dict[str, float | int]:
    """llama.cpp's `general.sampling.<key>` values: temperature 0 is its greedy choice, and the penalty counts
    the whole context (llama.cpp's own default window is the last 64 tokens)."""
    return {"temp": 0.0, "penalty_repeat": penalty, "penalty_last_n": context_length}


def shipped_penalty(folder: Path) -> float:
    """The repetition penalty a format folder ships: its genai_config.json's `search` in an onnxruntime-genai
    folder, its generation_config.json in every other; 1.0 (plain greedy) where the folder states none, as an
    export of an earlier release does."""
    genai = folder / GENAI_FILE
    path = genai if genai.is_file() else folder / HF_FILE
    if not path.is_file():
        return 1.0
    data = read_json_object(path, ExportFolderError, "re-export the persona")
    section = data.get("search") if path == genai else data
    value = section.get("repetition_penalty", 1.0) if isinstance(section, dict) else 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ExportFolderError(
            f"{path}: repetition_penalty is {value!r}, not a positive number; re-export the persona or pass "
            "--repetition-penalty"
        )
    return float(value)
