"""ONNX export: a Hugging Face checkpoint folder -> one `model.onnx` decoder with KV cache (optimum,
`text-generation-with-past`), written atomically. Weight-only quantized copies: exporter/export/quantize.py."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import onnx

from exporter.errors import OnnxExportError, OnnxModelError
from exporter.io import staged
from exporter.quiet import onnx_export_noise
from exporter.runtime.onnx import ONNX_FILE, read_export

log = logging.getLogger(__name__)

TASK = "text-generation-with-past"
# Copied verbatim from the source folder so that every export ships the same tokenizer and generation
# defaults as the checkpoint (optimum re-saves the tokenizer through AutoTokenizer, which rewrites them).
CARRIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def export_onnx(hf_dir: Path, out_dir: Path) -> Path:
    """Export `hf_dir` (config, weights, tokenizer, generation config) to `out_dir`, which must not exist."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise OnnxExportError(f"{str(hf_dir)!r} has no config.json; pass a folder written by save_pretrained")
    from optimum.exporters.onnx import main_export

    start = time.perf_counter()
    with staged(out_dir) as stage:
        try:
            # do_validation=False: optimum only warns on a mismatch; verify_onnx is the parity check.
            with onnx_export_noise():
                main_export(
                    str(hf_dir),
                    output=stage,
                    task=TASK,
                    device="cpu",
                    library_name="transformers",
                    do_validation=False,
                    local_files_only=True,
                )
        except Exception as e:
            raise OnnxExportError(f"optimum could not export {str(hf_dir)!r} ({TASK}): {e}") from e
        carry_files(hf_dir, stage)
        _check_cache_inputs(stage)
    log.debug("exported %s to ONNX in %.1f s", hf_dir, time.perf_counter() - start)
    return out_dir


def carry_files(src: Path, dst: Path, names: tuple[str, ...] = CARRIED_FILES) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _check_cache_inputs(export_dir: Path) -> None:
    """The exported cache inputs must be (batch, kv_heads, past, head_dim) as config.json says."""
    if not (export_dir / ONNX_FILE).is_file():
        raise OnnxExportError(f"optimum wrote no {ONNX_FILE} into {str(export_dir)!r}")
    try:
        _, layout = read_export(export_dir)
    except OnnxModelError as e:
        raise OnnxExportError(str(e)) from e
    graph = onnx.load(export_dir / ONNX_FILE, load_external_data=False).graph
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in graph.input
        if i.name.startswith("past_key_values.")
    }
    if len(shapes) != 2 * layout.num_layers:
        raise OnnxExportError(f"export has {len(shapes) // 2} cache layers, config.json {layout.num_layers}")
    for name, shape in shapes.items():
        if shape[1] != layout.kv_heads or shape[3] != layout.head_dim:
            raise OnnxExportError(
                f"exported {name} has shape {shape}; config.json says "
                f"(batch, {layout.kv_heads}, past, {layout.head_dim})"
            )
