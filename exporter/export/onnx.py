"""ONNX export: a Hugging Face checkpoint folder -> one `model.onnx` decoder with KV cache (optimum,
`text-generation-with-past`), plus an int8 dynamically quantized copy. Both outputs appear atomically."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import onnx

from exporter.errors import OnnxExportError, OnnxModelError
from exporter.io import staged
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
        _carry_files(hf_dir, stage)
        _check_cache_inputs(stage)
    log.info("exported %s to ONNX in %.1f s", hf_dir, time.perf_counter() - start)
    return out_dir


# Node-name fragments of optimum's llama-family graphs (llama, mistral, qwen2, qwen3) kept in fp32: the
# embedding (tied to lm_head in SmolLM2) and down_proj, whose input carries the activation outliers that a
# per-tensor uint8 activation scale cannot hold. On SmolLM2-135M quantizing all seven projections and the
# embedding doubled perplexity (ratio 2.18, top-1 agreement 48 %); with these two kept: ratio 1.02, 84 %.
KEEP_FP32 = ("embed_tokens", "down_proj")


def quantize_int8(onnx_dir: Path, out_dir: Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> Path:
    """Dynamic int8 quantization of an export: int8 weights, uint8 activations quantized per call.

    Per-tensor weight scales: per-channel (int8 weights using the full range) collapsed SmolLM2 on this
    AVX2 CPU without VNNI (perplexity x6e6: u8 x s8 products saturate the int16 sums of `vpmaddubsw`), and
    with `reduce_range` it was no better than per-tensor. Nodes whose name contains a `keep_fp32` fragment
    stay fp32; a fragment that matches no node is an error (another architecture names nodes differently).
    Weight-only blockwise int8 (onnxruntime's MatMulNBits quantizer, bits=8, block 32) did much better on
    SmolLM2 (top-1 agreement 97.6 %, perplexity x1.002, 234 MB) but needs the extra `onnx-ir` package.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    read_export(onnx_dir)
    source = onnx_dir / ONNX_FILE
    names = [node.name for node in onnx.load(source, load_external_data=False).graph.node]
    unmatched = [frag for frag in keep_fp32 if not any(frag in name for name in names)]
    if unmatched:
        raise OnnxExportError(f"keep_fp32 fragments {unmatched} match no node of {str(source)!r}")
    external = [p for p in onnx_dir.iterdir() if p.is_file() and p.name.startswith(ONNX_FILE) and p != source]
    with staged(out_dir) as stage:
        try:
            quantize_dynamic(
                source,
                stage / ONNX_FILE,
                weight_type=QuantType.QInt8,
                per_channel=False,
                nodes_to_exclude=[name for name in names if any(frag in name for frag in keep_fp32)],
                use_external_data_format=bool(external),
            )
        except Exception as e:
            raise OnnxExportError(f"onnxruntime could not quantize {str(source)!r}: {e}") from e
        _carry_files(onnx_dir, stage, ("config.json", *CARRIED_FILES))
    return out_dir


def _carry_files(src: Path, dst: Path, names: tuple[str, ...] = CARRIED_FILES) -> None:
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
