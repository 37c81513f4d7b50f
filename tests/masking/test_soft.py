"""Soft masks (prune.*.gamma) and amplified own units (prune.*.amplify): exact exports, stock loading, ONNX."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.cli import main
from exporter.evaluation.baselines import random_mask
from exporter.export.prune import prune_model
from exporter.masking.masks import PersonaMask, compute_mask
from exporter.masking.scoring import column_sq_norms
from exporter.masking.steer import with_biases
from exporter.model.encoding import position_ids
from exporter.recipe.schema import AttentionPrune, MethodSpec, MlpPrune, PruneSpec
from exporter.verify.hf import masked
from tests.helpers import OpposedPair, assert_close, opposed_stats, tiny_model, write_recipe

METHOD = MethodSpec(score="contrastive-wanda", phi="relu")


def _masks(dense: Any, prune: PruneSpec, storage: torch.dtype, method: MethodSpec = METHOD) -> dict[str, PersonaMask]:
    adapter, pos, neg = opposed_stats(dense)
    col = column_sq_norms(dense, adapter)
    hard = {"p": compute_mask("p", method, prune, pos, neg, col), "q": compute_mask("q", method, prune, neg, pos, col)}
    return with_biases(OpposedPair(method, prune), hard, {"p": pos, "q": neg}, dense, adapter, storage)


def _logits(model: Any, mask: PersonaMask | None = None, adapter: Any = None) -> torch.Tensor:
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    kw = {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids(attn)}
    with torch.no_grad():
        if mask is None:
            return model(**kw).logits[attn.bool()]
        with masked(model, adapter, mask):
            return model(**kw).logits[attn.bool()]


SETTINGS = {
    "mlp gamma": PruneSpec(mlp=MlpPrune(sparsity=0.25, gamma=0.3)),
    "mlp amplify + removal": PruneSpec(mlp=MlpPrune(sparsity=0.25, amplify=1.7)),
    "mlp gamma + amplify + compensation": PruneSpec(
        mlp=MlpPrune(sparsity=0.25, gamma=0.5, amplify=1.3, compensate="personas")
    ),
    "query heads gamma + amplify": PruneSpec(
        attention=AttentionPrune(unit="query-head", sparsity=0.5, gamma=0.2, amplify=1.5)
    ),
    "kv groups amplify + removal": PruneSpec(
        mlp=MlpPrune(sparsity=0.25), attention=AttentionPrune(unit="kv-group", sparsity=0.5, amplify=2.0)
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_soft_export_equals_its_reference_and_loads_stock(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    prune = SETTINGS[name]
    dense = tiny_model("llama").double()
    adapter = opposed_stats(dense)[0]
    # float32 storage: the reference must round the scaled columns exactly as the float32 checkpoint does
    mask = _masks(dense, prune, torch.float32)["p"]
    assert mask.mlp_scale is not None or mask.attn_scale is not None
    reference = _logits(dense, mask, adapter)
    hard = PersonaMask(mask.persona, mask.geometry, mask.mlp_keep, mask.head_keep, mask.group_keep, mask.mlp_bias)
    assert (reference - _logits(dense, hard, adapter)).abs().max() > 1e-3  # the factors change the output

    pruned = prune_model(copy.deepcopy(dense), adapter, mask).to(torch.float32)
    pruned.save_pretrained(tmp_path / "hf")
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float64, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(_logits(reloaded.eval()), reference, 1e-10, f"soft export vs reference ({name})")


def test_factors_land_on_the_selected_and_the_own_units() -> None:
    """gamma on the units the persona's hard mask selects, amplify on those its partner's selects, 1 elsewhere."""
    dense = tiny_model("llama").double()
    hard = _masks(dense, PruneSpec(mlp=MlpPrune(sparsity=0.25)), torch.float64)
    soft = _masks(dense, PruneSpec(mlp=MlpPrune(sparsity=0.25, gamma=0.3, amplify=1.7)), torch.float64)
    mask = soft["p"]
    assert mask.mlp_keep is None and mask.mlp_scale is not None  # gamma > 0: nothing removed
    for layer in range(mask.geometry.layers):
        mine, theirs = set(hard["p"].removed("mlp")[layer]), set(hard["q"].removed("mlp")[layer])
        assert mine and theirs and not mine & theirs
        row = mask.mlp_scale[layer]
        assert {int(j) for j in torch.nonzero(row == 0.3).flatten()} == mine
        assert {int(j) for j in torch.nonzero(row == 1.7).flatten()} == theirs
        assert int((row == 1).sum()) == len(row) - len(mine) - len(theirs)
    # the pruned checkpoint keeps every neuron: down_proj columns scaled, not cut
    adapter = opposed_stats(dense)[0]
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    down = adapter.mlp_out(adapter.layers(pruned)[0]).weight
    dense_down = adapter.mlp_out(adapter.layers(dense)[0]).weight
    assert down.shape == dense_down.shape
    assert_close(down, dense_down * mask.mlp_scale[0], 0.0, "scaled down_proj columns")


def test_random_baseline_moves_the_same_factors_to_random_units() -> None:
    dense = tiny_model("llama").double()
    prune = PruneSpec(
        mlp=MlpPrune(sparsity=0.25, amplify=1.7),
        attention=AttentionPrune(unit="query-head", sparsity=0.5, gamma=0.2),
    )
    mask = _masks(dense, prune, torch.float32)["p"]
    rnd = random_mask(mask, seed=5)
    assert rnd.mlp_scale is not None and rnd.attn_scale is not None and rnd.mlp_keep is not None
    for layer in range(mask.geometry.layers):
        assert sorted(rnd.mlp_scale[layer].tolist()) == sorted(
            mask.mlp_scale[layer][mask.mlp_keep[layer]].tolist()
            + [1.0] * (mask.geometry.intermediate - mask.mlp_keep.shape[1])
        )
        assert torch.all(rnd.mlp_scale[layer][rnd.mlp_scale[layer] != 1] == 1.7)
        # amplified units are kept ones
        assert set(torch.nonzero(rnd.mlp_scale[layer] != 1).flatten().tolist()) <= set(rnd.mlp_keep[layer].tolist())
    assert torch.equal(torch.sort(rnd.attn_scale, dim=1).values, torch.sort(mask.attn_scale, dim=1).values)
    assert not torch.equal(rnd.mlp_scale, mask.mlp_scale)


def test_mask_files_keep_the_factors(tmp_path: Path) -> None:
    dense = tiny_model("llama").double()
    mask = _masks(dense, SETTINGS["query heads gamma + amplify"], torch.bfloat16)["q"]
    mask.save(tmp_path / "q.safetensors", {})
    back = PersonaMask.load(tmp_path / "q.safetensors")
    assert back.scale_dtype == "bfloat16" and back.attn_scale is not None
    assert torch.equal(back.attn_scale, mask.attn_scale) and back.mlp_scale is None


def test_run_with_soft_masks_verifies_hf_and_onnx(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        method={"score": "contrastive-wanda", "phi": "relu", "steer": 1.0},
        prune={"mlp": {"sparsity": 0.25, "gamma": 0.4, "amplify": 1.5}},
        output={"formats": ["hf", "onnx"]},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for persona in ("introvert", "extravert"):
        report = json.loads((out / persona / "report.json").read_text())
        assert report["status"] == "passed", report["verification"]
        assert report["prune"]["mlp"]["gamma"] == 0.4 and report["prune"]["mlp"]["amplify"] == 1.5
        assert report["verification"]["onnx"]["passed"]
        config = json.loads((out / persona / "hf" / "config.json").read_text())
        dense = json.loads((tiny_llama_dir / "config.json").read_text())
        assert config["intermediate_size"] == dense["intermediate_size"]  # soft: no neuron removed
        assert PersonaMask.load(out / persona / "masks.safetensors").mlp_scale is not None


def test_run_with_soft_masks_verifies_gguf(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """Scaled columns are plain weights: the GGUF files carry them, and F16 matches the masked reference."""
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        prune={
            "mlp": {"sparsity": 0.25, "gamma": 0.4, "amplify": 1.5},
            "attention": {"unit": "query-head", "sparsity": 0.5, "gamma": 0.2},
        },
        output={"formats": ["hf", "gguf"]},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for persona in ("introvert", "extravert"):
        report = json.loads((out / persona / "report.json").read_text())
        assert report["status"] == "passed", report["verification"]
        gguf = report["verification"]["gguf"]
        assert gguf["F16"]["passed"] and gguf["F16"]["max_abs_logit_diff"] <= 1e-2, gguf
        assert gguf["Q8_0"]["top1_agreement"] > 0.5, gguf
        mask = PersonaMask.load(out / persona / "masks.safetensors")
        assert mask.mlp_scale is not None and mask.attn_scale is not None
