"""A checkpoint against its masked reference (exporter/verify/hf.py, exporter/verify/layers.py): the reference rounded
as the export stores it, half-precision sources, and parity proven layer by layer, a broken layer found."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.masking.calibrate import calibrate
from exporter.model.adapters import adapter_for
from exporter.verify.hf import PromptSet, reference_copy
from tests.helpers import TINY_MODELS, contrastive_mask, samples, tiny_model


def test_reference_copy_rounds_parameters_not_buffers() -> None:
    dense = tiny_model("llama")
    ref = reference_copy(dense, torch.bfloat16, torch.float64)
    assert torch.equal(ref.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq.double())
    w = dense.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ref.model.layers[0].mlp.up_proj.weight, w.to(torch.bfloat16).double())


def test_bf16_source_keeps_its_dtype_and_matches_the_rounded_reference(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from exporter.export.hf import export_hf
    from exporter.export.prune import prune_model
    from exporter.verify.hf import build_prompts, verify_export
    from tests.helpers import tiny_tokenizer

    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "src")
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()  # as loaded

    half = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16).eval()
    half_stats = calibrate(half, adapter_for(half.config), samples(1), pad_id=0, batch_size=6, response_only=True)
    assert all(t.dtype == torch.float64 and torch.isfinite(t).all() for t in half_stats.sum.values())

    adapter, mask = contrastive_mask(dense, "kv-group")
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
    assert figures.passed, figures.fp64


def prompt_set() -> PromptSet:
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 250, (n,), generator=gen) for n in (5, 9, 12)]
    singles = [(r[None], torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    ids = torch.zeros(len(rows), 12, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 12 - len(r) :], attn[i, 12 - len(r) :] = r, 1
    return PromptSet(singles, (ids, attn))


def rewrite(folder: Path, name: str, change) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from exporter.model.checkpoint import SourceCheckpoint

    shard = folder / SourceCheckpoint(folder).weight_map[name]
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_layer_by_layer_verification_proves_parity_and_finds_the_broken_layer(model_type: str, tmp_path: Path) -> None:
    from exporter.export.shards import prune_checkpoint
    from exporter.verify.layers import verify_layers

    dense = tiny_model(model_type)
    dense.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    adapter, mask = contrastive_mask(dense, "query-head" if model_type == "phi3" else "kv-group")
    out = tmp_path / "out"
    prune_checkpoint(tmp_path / "src", adapter, mask, out, dtype=torch.float32, max_shard_bytes=60_000)
    check = dict(storage=torch.float32, max_abs=1e-9)
    good = verify_layers(tmp_path / "src", out, adapter, mask, prompt_set(), **check)
    assert good.passed, good
    assert len(good.per_layer_max_abs) == mask.geometry.layers and good.outside_layers_differ == []
    assert good.max_abs_layer_output_diff < 1e-12

    # the same verification against the unmasked model fails: the mask is what the export computes
    unmasked = type(mask)(mask.persona, mask.geometry, None, None, None)
    assert not verify_layers(tmp_path / "src", out, adapter, unmasked, prompt_set(), **check).passed

    down = f"{adapter.layers_prefix}.1.mlp.down_proj.weight"
    rewrite(out, down, lambda t: t * 1.001)
    bad = verify_layers(tmp_path / "src", out, adapter, mask, prompt_set(), **check)
    assert not bad.passed and bad.worst_layer == 1 and bad.per_layer_max_abs[0] < 1e-12
    rewrite(out, down, lambda t: t / 1.001)
    rewrite(out, "model.norm.weight", lambda t: t + 1e-3)
    bad = verify_layers(tmp_path / "src", out, adapter, mask, prompt_set(), **check)
    assert not bad.passed and bad.outside_layers_differ == ["model.norm.weight"]


def _biased_soft_mask(dense, storage: torch.dtype):  # type: ignore[no-untyped-def]
    """The contrastive mask with a soft MLP mask (gamma 0.5) and a steering + compensation down_proj bias."""
    from exporter.masking.masks import compute_mask
    from exporter.masking.scoring import column_sq_norms
    from exporter.masking.steer import with_biases
    from exporter.recipe.schema import MethodSpec, MlpPrune, PruneSpec
    from tests.helpers import OpposedPair, opposed_stats

    adapter, pos, neg = opposed_stats(dense)
    method = MethodSpec(score="contrastive-wanda", steer=1.5)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25, compensate="personas", gamma=0.5))
    col = column_sq_norms(dense, adapter)
    masks = {"p": compute_mask("p", method, prune, pos, neg, col), "q": compute_mask("q", method, prune, neg, pos, col)}
    mask = with_biases(OpposedPair(method, prune), masks, {"p": pos, "q": neg}, dense, adapter, storage)["p"]
    assert mask.mlp_bias is not None and mask.mlp_scale is not None
    return adapter, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_by_shard_export_and_layer_proof_carry_biases_and_scaled_columns(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    """A persona's down_proj bias (zero gate/up biases, config mlp_bias) and soft-mask column scales: written
    shard by shard exactly as the in-memory export writes them, and proven layer by layer."""
    from dataclasses import replace

    from exporter.export.hf import export_hf
    from exporter.export.prune import prune_model
    from exporter.export.shards import prune_checkpoint
    from exporter.model.checkpoint import SourceCheckpoint
    from exporter.verify.layers import verify_layers
    from tests.helpers import tiny_tokenizer

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    adapter, mask = _biased_soft_mask(dense, dtype)
    export_hf(prune_model(copy.deepcopy(dense), adapter, mask), tiny_tokenizer(), tmp_path / "memory", str(dtype)[6:])
    prune_checkpoint(tmp_path / "src", adapter, mask, tmp_path / "shards", dtype=dtype, max_shard_bytes=60_000)
    expected = load_file(str(tmp_path / "memory" / "model.safetensors"))
    got = SourceCheckpoint(tmp_path / "shards")
    assert set(got.weight_map) == set(expected) and "model.layers.1.mlp.up_proj.bias" in expected
    for name, tensor in got.load(sorted(expected)).items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[name]), name
    import json

    assert json.loads((tmp_path / "shards" / "config.json").read_text())["mlp_bias"] is True

    check = dict(storage=dtype, max_abs=1e-9)
    good = verify_layers(tmp_path / "src", tmp_path / "shards", adapter, mask, prompt_set(), **check)
    assert good.passed and good.max_abs_layer_output_diff < 1e-12, good
    for without in (replace(mask, mlp_bias=None), replace(mask, mlp_scale=None)):  # each part is checked
        assert not verify_layers(tmp_path / "src", tmp_path / "shards", adapter, without, prompt_set(), **check).passed
    rewrite(tmp_path / "shards", "model.layers.1.mlp.down_proj.bias", lambda t: t + 1e-3)
    bad = verify_layers(tmp_path / "src", tmp_path / "shards", adapter, mask, prompt_set(), **check)
    assert not bad.passed and bad.worst_layer == 1 and bad.per_layer_max_abs[0] < 1e-12


def test_layer_by_layer_verification_of_a_bf16_export(tmp_path: Path) -> None:
    """Storage rounding is part of the reference, as in the whole-model check."""
    from exporter.export.shards import prune_checkpoint
    from exporter.verify.layers import verify_layers

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "src")
    adapter, mask = contrastive_mask(dense, "kv-group")
    prune_checkpoint(tmp_path / "src", adapter, mask, tmp_path / "out", dtype=torch.bfloat16)
    args = (tmp_path / "src", tmp_path / "out", adapter, mask, prompt_set())
    assert verify_layers(*args, storage=torch.bfloat16, max_abs=1e-9).passed
    fp32 = verify_layers(*args, storage=torch.float32, max_abs=1e-9)  # the unrounded reference differs
    assert not fp32.passed and fp32.outside_layers_differ
