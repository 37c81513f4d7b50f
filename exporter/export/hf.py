"""Hugging Face export: a complete checkpoint (safetensors, config, tokenizer, chat template, generation config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: Any, tokenizer: Any, out_dir: Path, dtype: str) -> dict[str, int]:
    """Save `model` (converted to `dtype`) and its tokenizer into `out_dir`; returns {file name: bytes}."""
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
