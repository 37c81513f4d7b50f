"""Disk space: what a command will write, estimated before the model loads from the model's parameter count, and
refused when the file system it goes to has less free space (the output's, which also holds the staging folder,
and, for a bounded-memory run, the offload folder's).

The estimate is an upper bound per format, in bytes per parameter of the dense model: the checkpoint at the
output dtype, the fp32 ONNX model at 4, the int8 and int4 ONNX models at 2 and 1.5 (their embeddings stay fp32),
the GGUF files (F16 and Q8_0) at 3.1, the genai folder at its precision's 4, 2 or 1.5, the onnx-q4 folder at 2
(4-bit blocks with fp32 scales and offsets, about 0.75, and fp32 embeddings beside the tied Q8_0 head: SmolLM2-135M
about 1.65); statistics take at most 1 % of the model's fp32 size plus 1 MiB per persona (SmolLM2-135M: 3.0 MB
against 538 MB). A format whose build keeps a working copy next to the output (onnx-q4: the checkpoint at dense
width and an fp32 graph, removed once the folder is built) adds that copy once, as personas are built one at a
time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from exporter.errors import OutputError
from exporter.recipe.schema import Recipe

PER_PARAMETER = {"onnx": 4.0, "onnx-int8": 2.0, "onnx-int4": 1.5, "gguf": 3.1, "onnx-q4": 2.0}
WORKING = {"onnx-q4": 4.0}  # bytes per parameter a build keeps next to the output, beside a checkpoint copy
GENAI = {"fp32": 4.0, "int8": 2.0, "int4": 1.5}
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 4}  # auto: at most fp32


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or would hold it once created."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def persona_bytes(formats: Sequence[str], dtype: str, genai_precision: str, params: int) -> int:
    """Upper estimate of the bytes one persona's `formats` take on disk."""
    per = {**PER_PARAMETER, "hf": float(ELEMENT[dtype]), "onnx-genai": GENAI[genai_precision]}
    return int(sum(per[f] for f in formats) * params)


def working_bytes(formats: Sequence[str], dtype: str, params: int) -> int:
    """The largest working copy one of `formats` keeps next to the output while it is built (counted once)."""
    return int(max((WORKING[f] + ELEMENT[dtype] for f in formats if f in WORKING), default=0.0) * params)


def statistics_bytes(params: int) -> int:
    return params * 4 // 100 + (1 << 20)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_space(needs: dict[Path, tuple[int, str]], fix: str = "free some space or choose another --out") -> None:
    """`needs`: folder -> (bytes that will be written there, what they are). Folders on one file system add up;
    a file system with less free space than its sum refuses the command before anything is written."""
    by_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, (size, what) in needs.items():
        existing = folder.absolute()
        while not existing.exists():
            existing = existing.parent
        by_device.setdefault(os.stat(existing).st_dev, []).append((folder, size, what))
    for entries in by_device.values():
        total = sum(size for _, size, _ in entries)
        free = free_bytes(entries[0][0])
        if total > free:
            parts = "; ".join(f"{_size(size)} under {str(folder)!r} ({what})" for folder, size, what in entries)
            raise OutputError(
                f"not enough disk space: about {_size(total)} needed ({parts}), {_size(free)} free there; {fix}. "
                "Nothing was written."
            )


def check_run_space(recipe: Recipe, out: Path, params: int) -> None:
    """What `run` writes for a model of `params` parameters: every persona's formats and statistics into the
    staging folder next to `out`, and the whole model into the offload folder when memory is bounded."""
    n = len(recipe.personas)
    formats = recipe.output.formats
    each = persona_bytes(formats, recipe.output.dtype, recipe.output.genai_precision, params)
    stats = statistics_bytes(params)
    working = working_bytes(formats, recipe.output.dtype, params)
    what = f"{n} persona(s) x {', '.join(formats)}: {_size(each)} each, statistics {_size(stats)} each"
    what += f", a build's working copy {_size(working)}" if working else ""
    needs = {out.parent: (n * (each + stats) + working, what)}
    fix = "free some space or choose another --out"
    if recipe.model.max_memory is not None:
        needs[Path(tempfile.gettempdir())] = (params * 4, "the offload folder: the model at fp32")
        fix += " (and TMPDIR for the offload folder)"
    check_space(needs, fix)
