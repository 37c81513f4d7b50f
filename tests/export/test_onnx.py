"""ONNX export of tiny seeded models whose head_dim != hidden_size / num_heads (the shape every
head-pruned checkpoint has), and weight-only quantized copies of it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from exporter.errors import OnnxExportError, OnnxModelError, OutputError
from exporter.export.onnx import export_onnx
from exporter.export.quantize import quantize_weights
from exporter.recipe.formats import FLOORS, FORMATS
from exporter.verify.onnx import compare_quantized
from tests.helpers import ONNX_TINY, OnnxExport, onnx_batches


def test_export_writes_a_complete_folder(onnx_export: Callable[[str], OnnxExport]) -> None:
    hf_dir, onnx_dir, _ = onnx_export("llama")
    written = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json"} <= written
    assert (onnx_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    config = json.loads((onnx_dir / "config.json").read_text())
    assert config["head_dim"] == 16 and config["hidden_size"] // config["num_attention_heads"] != 16
    past = {i.name: i for i in onnx.load(onnx_dir / "model.onnx").graph.input}["past_key_values.1.value"]
    dims = [d.dim_value or d.dim_param for d in past.type.tensor_type.shape.dim]
    assert dims[1:] == [2, "past_sequence_length", 16]  # (batch, kv_heads, past, head_dim)
    assert [p.name for p in onnx_dir.parent.iterdir() if "partial" in p.name] == []


def test_export_refuses_an_existing_folder(onnx_export: Callable[[str], OnnxExport], tmp_path: Path) -> None:
    hf_dir, _, _ = onnx_export("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        export_onnx(hf_dir, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(OnnxExportError, match=r"no config\.json"):
        export_onnx(tmp_path / "out", tmp_path / "elsewhere")


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_quantization_and_its_quality(
    onnx_export: Callable[[str], OnnxExport], tmp_path: Path, bits: int
) -> None:
    _, onnx_dir, _ = onnx_export("llama")
    out = quantize_weights(onnx_dir, tmp_path / f"int{bits}", bits)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    graph = onnx.load(out / "model.onnx").graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    # 7 projections per layer and the tied LM head (its own transposed copy); no fp32 MatMul on a weight is left
    assert len(nbits) == 7 * ONNX_TINY["num_hidden_layers"] + 1
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    initializers = {i.name for i in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    fmt = FORMATS[f"onnx-int{bits}"]
    texts = ["hello there, tiny model", "quantized or not"]
    report = compare_quantized(fmt, onnx_dir, out, onnx_batches(), ppl_texts=texts)
    assert report.mb_quantized < (0.75 if bits == 8 else 0.6) * report.mb_fp32 and report.bits == bits
    assert report.positions == sum(len(t.encode()) for t in texts) and report.folder == fmt.folder
    assert report.top1_agreement is not None and report.ppl_ratio is not None
    assert report.top1_agreement >= (0.9 if bits == 8 else 0.3), report  # an unusable model is near 1/259
    assert 0.8 < report.ppl_ratio < 1.25, report
    floor = FLOORS[bits]
    at_floor = report.model_copy(update={"top1_agreement": floor.top1_agreement})
    assert at_floor.below_floor is (report.ppl_ratio > floor.ppl_ratio) and report.passed
    assert report.model_copy(update={"top1_agreement": floor.top1_agreement - 1e-3}).below_floor is True
    on_prompts = compare_quantized(fmt, onnx_dir, out, onnx_batches())
    assert on_prompts.positions == int(sum(mask.sum() for _, mask in onnx_batches()))
    assert on_prompts.measured_on == "verification prompts"


def test_quantizing_a_folder_that_is_not_an_export_fails_cleanly(
    onnx_export: Callable[[str], OnnxExport], tmp_path: Path
) -> None:
    hf_dir, _, _ = onnx_export("llama")
    with pytest.raises(OnnxModelError, match=r"no model\.onnx"):
        quantize_weights(hf_dir, tmp_path / "q", 4)
    assert not (tmp_path / "q").exists()
