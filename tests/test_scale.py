"""Scaling paths on tiny models: layer-by-layer calibration, shard-by-shard export, half-precision sources."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.adapters import adapter_for
from exporter.calibrate import calibrate
from exporter.layerwise import calibrate_layerwise, column_sq_norms_from_checkpoint
from exporter.scoring import column_sq_norms
from exporter.stats import KINDS, Statistics
from exporter.verify import reference_copy
from tests.conftest import TINY_MODELS, tiny_model
from tests.test_masks import samples


def assert_same_statistics(a: Statistics, b: Statistics) -> None:
    assert (a.n_samples, a.n_tokens, a.geometry) == (b.n_samples, b.n_tokens, b.geometry)
    for kind in KINDS:
        torch.testing.assert_close(a.sum[kind], b.sum[kind], rtol=1e-5, atol=1e-7, msg=f"sum.{kind}")
        torch.testing.assert_close(a.sumsq[kind], b.sumsq[kind], rtol=1e-5, atol=1e-7, msg=f"sumsq.{kind}")
    for part in ("mlp", "attn"):
        torch.testing.assert_close(a.chan_sq[part], b.chan_sq[part], rtol=1e-5, atol=1e-7, msg=f"chan_sq.{part}")


@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_layerwise_calibration_equals_whole_model(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_model(model_type).save_pretrained(tmp_path / "src", max_shard_size="100KB")  # several shards
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", torch_dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    data = samples(1)
    whole = calibrate(model, adapter, data, pad_id=0, batch_size=6, response_only=True)
    layered = calibrate_layerwise(tmp_path / "src", adapter, data, pad_id=0, batch_size=6, response_only=True)
    assert_same_statistics(layered, whole)
    assert whole.sum["mlp"].abs().min() > 0  # every layer was really run
    from_shards = column_sq_norms_from_checkpoint(tmp_path / "src", adapter)
    for part, value in column_sq_norms(model, adapter).items():
        assert torch.equal(from_shards[part], value), part


def _mask(model, unit: str):  # type: ignore[no-untyped-def]
    from tests.test_prune import _mask as prune_mask

    return prune_mask(model, unit)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen2"])
def test_shard_by_shard_export_equals_in_memory_prune(model_type: str, tmp_path: Path) -> None:
    from exporter.prune import prune_model
    from exporter.shards import SourceCheckpoint, prune_checkpoint

    dense = tiny_model(model_type)
    dense.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    adapter, mask = _mask(dense, "query-head" if model_type == "phi3" else "kv-group")
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    pruned.save_pretrained(tmp_path / "memory")
    files = prune_checkpoint(
        tmp_path / "src", adapter, mask, tmp_path / "shards", dtype=torch.float32, max_shard_bytes=60_000
    )
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1

    expected = load_file(str(tmp_path / "memory" / "model.safetensors"))
    got = SourceCheckpoint(tmp_path / "shards")
    assert set(got.weight_map) == set(expected)
    for name, tensor in got.load(sorted(expected)).items():
        assert torch.equal(tensor, expected[name]), name

    from transformers import AutoConfig, AutoModelForCausalLM

    a, b = AutoConfig.from_pretrained(tmp_path / "memory"), AutoConfig.from_pretrained(tmp_path / "shards")
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(a, key) == getattr(b, key), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shards").eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_reference_copy_rounds_parameters_not_buffers() -> None:
    dense = tiny_model("llama")
    ref = reference_copy(dense, torch.bfloat16, torch.float64)
    assert torch.equal(ref.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq.double())
    w = dense.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ref.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16).double())


def test_bf16_source_keeps_its_dtype_and_matches_the_rounded_reference(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from exporter.export_hf import export_hf
    from exporter.prune import prune_model
    from exporter.verify import build_prompts, verify_export
    from tests.conftest import tiny_tokenizer

    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src", torch_dtype=torch.float32).eval()  # as loaded

    half = AutoModelForCausalLM.from_pretrained(tmp_path / "src", torch_dtype=torch.bfloat16).eval()
    half_stats = calibrate(half, adapter_for(half.config), samples(1), pad_id=0, batch_size=6, response_only=True)
    assert all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in half_stats.sum.values())

    adapter, mask = _mask(dense, "kv-group")
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    tok = tiny_tokenizer()
    export_hf(pruned, tok, tmp_path / "hf", "bfloat16")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    # bf16 -> fp32 -> bf16 is exact: the export holds the source's own values, sliced
    keep = mask.mlp_keep[0]
    assert torch.equal(exported["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"][keep])

    references = {d: reference_copy(dense, torch.bfloat16, d) for d in (torch.float64, torch.float32)}
    figures = verify_export(
        references,
        adapter,
        mask,
        tmp_path / "hf",
        build_prompts(tok),
        pad_id=tok.pad_token_id,
        greedy_tokens=4,
        fp64_max_abs=1e-10,
    )
    assert figures["passed"], figures["fp64"]


def test_run_layerwise_with_auto_dtype_on_a_bf16_source(tmp_path: Path) -> None:
    import json

    from exporter.cli import main
    from tests.conftest import tiny_tokenizer, write_recipe

    src = tmp_path / "bf16-llama"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    recipe = write_recipe(tmp_path, src, calibration={"batch_size": 4, "layerwise": True}, output={"dtype": "auto"})
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    for persona in ("introvert", "extravert"):
        report = json.loads((tmp_path / "run" / persona / "report.json").read_text())
        assert report["status"] == "passed" and report["dtype"] == "bfloat16"
        hf = tmp_path / "run" / persona / "hf"
        assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
        assert {t.dtype for t in load_file(str(hf / "model.safetensors")).values()} == {torch.bfloat16}
