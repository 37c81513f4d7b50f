"""The onnxruntime decoder (exporter/runtime/onnx.py): greedy decoding as transformers generates, optimum's
runner with the head_dim workaround, and folders that are not a decoder export refused."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporter.errors import OnnxModelError
from exporter.runtime.onnx import OnnxCausalLM, load_ort_model
from tests.helpers import OnnxExport, left_padded_batch


def test_greedy_matches_transformers_generate(onnx_export: Callable[[str], OnnxExport]) -> None:
    _, onnx_dir, model = onnx_export("qwen2")
    ids, mask = left_padded_batch()
    runner = OnnxCausalLM.from_dir(onnx_dir)
    free = runner.greedy(ids.numpy(), mask.numpy(), 12)
    eos = free[0][3]  # make row 0 stop after 4 tokens
    ours = runner.greedy(ids.numpy(), mask.numpy(), 12, eos_token_id=eos)
    theirs = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0
    )[:, ids.shape[1] :].tolist()
    for row, (got, want) in enumerate(zip(ours, theirs, strict=True)):
        want = want[: want.index(eos) + 1] if eos in want else want
        assert got == want, f"row {row}"
    assert ours[0] == free[0][: free[0].index(eos) + 1]


def test_load_ort_model_runs_a_head_pruned_shape(onnx_export: Callable[[str], OnnxExport]) -> None:
    _, onnx_dir, model = onnx_export("llama")
    ids, mask = left_padded_batch()
    ort_model = load_ort_model(onnx_dir)
    assert ort_model.embed_size_per_head == 16
    got = ort_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("io_binding", [False, True])
def test_stock_optimum_needs_the_one_line_workaround(
    onnx_export: Callable[[str], OnnxExport], io_binding: bool
) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    _, onnx_dir, model = onnx_export("llama")
    ids, mask = left_padded_batch()
    stock = ORTModelForCausalLM.from_pretrained(onnx_dir, use_io_binding=io_binding)
    with pytest.raises(Exception, match=r"past_key_values|present|dimension|shape"):
        # If this stops raising, optimum sizes the cache from head_dim and the workaround can go.
        stock.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    stock.embed_size_per_head = stock.config.head_dim  # the documented workaround
    got = stock.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def _broken_copy(onnx_dir: Path, dst: Path, how: str) -> Path:
    shutil.copytree(onnx_dir, dst)
    if how == "missing":
        (dst / "model.onnx").unlink()
    elif how == "corrupt":
        (dst / "model.onnx").write_bytes(b"\x08\x07not a protobuf" * 100)
    elif how == "no-config":
        (dst / "config.json").unlink()
    elif how == "not-a-decoder":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnx.save(model, dst / "model.onnx")
    elif how == "wrong-head-dim":
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config | {"head_dim": 8}))
    return dst


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "no model.onnx"),
        ("corrupt", "cannot load"),
        ("no-config", "no config.json"),
        ("not-a-decoder", "not a text-generation-with-past"),
        ("wrong-head-dim", "head_dim=16 but config.json says 8"),
    ],
)
def test_bad_folders_raise_onnx_model_error(
    onnx_export: Callable[[str], OnnxExport], tmp_path: Path, how: str, message: str
) -> None:
    _, onnx_dir, _ = onnx_export("llama")
    broken = _broken_copy(onnx_dir, tmp_path / how, how)
    with pytest.raises(OnnxModelError, match=re.escape(message)):
        OnnxCausalLM.from_dir(broken)
    with pytest.raises(OnnxModelError, match=re.escape(message)):
        load_ort_model(broken)


def test_a_hugging_face_folder_is_not_an_export(onnx_export: Callable[[str], OnnxExport]) -> None:
    hf_dir, _, _ = onnx_export("llama")
    with pytest.raises(OnnxModelError, match="not an ONNX export"):
        OnnxCausalLM.from_dir(hf_dir)
