"""The run's dense base model as an export beside its personas, RUN_DIR/base/ (hf/ and the formats asked for),
so that `serve` can answer for it next to the personas. Made once, on request (`serve --base`); each folder
is written atomically, and folders already there are kept.

It is the model as the run loaded it (a GGUF source de-quantized to fp32) with the tokenizer the exports ship,
exported by the same functions as a persona; it is not pruned, so there is nothing to verify against.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from exporter.errors import ExportFolderError
from exporter.io import staged
from exporter.recipe.formats import FOLDERS, QUANT_FORMATS, with_sources
from exporter.recipe.schema import Recipe
from exporter.runtime.exports import BASE, run_personas

log = logging.getLogger(__name__)
BUILT = ("onnx", "onnx-int8", "onnx-int4", "onnx-genai")


def base_export(run_dir: Path, fmt: str) -> Path:
    """RUN_DIR/base with `fmt` (and what it is made from); returns the folder."""
    from exporter.recipe.load import parse_recipe

    recipe_file = run_dir / "recipe.json"
    if not recipe_file.is_file() or not (run_dir / "run.json").is_file():
        raise ExportFolderError(
            f"{run_dir} is not a run folder (no recipe.json and run.json): the base model is served from a run"
        )
    if BASE in run_personas(run_dir):
        raise ExportFolderError(f"{run_dir} has a persona named {BASE!r}; the dense model cannot be served beside it")
    if fmt not in BUILT:
        raise ExportFolderError(f"the base model is exported as {', '.join(BUILT)}, not {fmt!r}")
    recipe = parse_recipe(json.loads(recipe_file.read_text(encoding="utf-8")), run_dir, str(recipe_file))
    folder = run_dir / BASE
    missing = [f for f in with_sources([fmt]) if not (folder / FOLDERS[f]).is_dir()]
    if missing:
        log.info("exporting the dense base model into %s: %s", folder, ", ".join(missing))
    for name in missing:
        _export(name, folder, recipe)
    return folder


def _export(name: str, folder: Path, recipe: Recipe) -> None:
    """One format into folder/FOLDERS[name]; each exporter writes its folder atomically."""
    out = folder / FOLDERS[name]
    if name == "hf":
        from exporter.export.hf import export_hf
        from exporter.model.sources import open_model

        with open_model(recipe) as m, staged(out) as stage:
            export_hf(m.model, m.export_tokenizer, stage, "float32")  # what the fp32 ONNX and genai exports read
    elif name == "onnx":
        from exporter.export.onnx import export_onnx

        export_onnx(folder / FOLDERS["hf"], out)
    elif name in QUANT_FORMATS:
        from exporter.export.quantize import quantize_weights

        spec = QUANT_FORMATS[name]
        quantize_weights(folder / FOLDERS["onnx"], out, spec.bits, accuracy_level=spec.accuracy_level)
    else:
        from exporter.export.genai import build_genai

        build_genai(folder / FOLDERS["hf"], out, recipe.output.genai_precision)
