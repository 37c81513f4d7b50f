"""`serve`: the models of a run (or one export) behind the OpenAI-compatible server, and the run's dense base
model as an export beside its personas, RUN_DIR/base/ (hf/ and the format served), so that `serve --base` can
answer for it next to the personas. The base is made once, on request; each folder is written atomically, and
folders already there are kept.

The base is the model as the run loaded it (a GGUF source de-quantized to fp32) with the tokenizer the exports
ship, exported by the same functions as a persona; it is not pruned, so there is nothing to verify against.
"""

from __future__ import annotations

import logging
from pathlib import Path

from exporter.errors import ExportFolderError
from exporter.folders.run_folder import RunFolder
from exporter.io import staged
from exporter.recipe.formats import FORMATS, with_sources
from exporter.recipe.schema import Recipe
from exporter.runtime.exports import BASE, run_personas
from exporter.serve.server import Limits, serve

log = logging.getLogger(__name__)
# the formats the base can be served in: those onnxruntime and onnxruntime-genai run
BUILT = tuple(n for n, f in FORMATS.items() if f.family in ("onnxruntime", "onnxruntime-genai"))


def serve_path(
    path: Path, fmt: str | None, host: str, port: int, limits: Limits, api_key: str | None, base: bool = False
) -> None:
    """Serve the models at `path` until interrupted; with `base`, the run's dense model too (exported first)."""
    if base:
        base_export(path, fmt or "onnx")
    serve(path, fmt, host, port, limits, api_key)


def base_export(run_dir: Path, fmt: str) -> Path:
    """RUN_DIR/base with `fmt` (and what it is made from); returns the folder."""
    fix = "the base model is served from a run: pass the --out folder of a `run`"
    run = RunFolder(run_dir, ExportFolderError, fix).check()
    run.info()  # run.json, or the same refusal
    if BASE in run_personas(run_dir):
        raise ExportFolderError(f"{run_dir} has a persona named {BASE!r}; the dense model cannot be served beside it")
    if fmt not in BUILT:
        raise ExportFolderError(f"the base model is exported as {', '.join(BUILT)}, not {fmt!r}")
    recipe = run.recipe()
    folder = run_dir / BASE
    missing = [f for f in with_sources([fmt]) if not (folder / FORMATS[f].folder).is_dir()]
    if missing:
        log.info("exporting the dense base model into %s: %s", folder, ", ".join(missing))
    for name in missing:
        _export(name, folder, recipe)
    return folder


def _export(name: str, folder: Path, recipe: Recipe) -> None:
    """One format into its folder; each exporter writes its folder atomically."""
    fmt = FORMATS[name]
    out = folder / fmt.folder
    source = folder / FORMATS[fmt.source].folder if fmt.source is not None else None
    if source is None:  # the checkpoint
        from exporter.export.hf import export_hf
        from exporter.model.sources import open_model

        with open_model(recipe) as m, staged(out) as stage:
            export_hf(m.model, m.export_tokenizer, stage, "float32")  # what the fp32 ONNX and genai exports read
    elif fmt.quantization is not None:
        from exporter.export.quantize import quantize_weights

        q = fmt.quantization
        quantize_weights(source, out, q.bits, accuracy_level=q.accuracy_level)
    elif fmt.family == "onnxruntime":
        from exporter.export.onnx import export_onnx

        export_onnx(source, out)
    else:
        from exporter.export.genai import build_genai

        build_genai(source, out, recipe.output.genai_precision)
