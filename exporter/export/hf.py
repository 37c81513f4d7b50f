"""Hugging Face export: a complete checkpoint (safetensors, config, tokenizer, chat template, generation config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exporter.recipe.generation import HF_FILE, REPLACED, GenerationSpec, decoding_fields

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: Any, tokenizer: Any, out_dir: Path, dtype: str) -> dict[str, int]:
    """Save `model` (converted to `dtype`) and its tokenizer into `out_dir`; returns {file name: bytes}."""
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}


def ship_generation(folder: Path, spec: GenerationSpec) -> None:
    """Write `spec` into the checkpoint's generation_config.json: the source's own file (its token ids, length
    limits) with every field that decides how tokens are chosen replaced by the shipped setting; made from
    config.json when the checkpoint has none. Every other format carries or reads this file."""
    from transformers import AutoConfig, GenerationConfig

    if (folder / HF_FILE).is_file():
        source = GenerationConfig.from_pretrained(folder)
    else:
        source = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    kept = {k: v for k, v in source.to_diff_dict().items() if k not in REPLACED and k != "transformers_version"}
    GenerationConfig(**kept, **decoding_fields(spec.repetition_penalty)).save_pretrained(folder)
