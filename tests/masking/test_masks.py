"""Scores and masks: counts, tie-breaking, disjoint pairs, symmetry, dependence on data, determinism."""

from __future__ import annotations

import pytest
import torch

from exporter.errors import MaskError
from exporter.masking.calibrate import calibrate
from exporter.masking.masks import PersonaMask, compute_mask, removal_count, select_keep
from exporter.masking.scoring import centred, column_sq_norms, zscore
from exporter.masking.statistics import Statistics
from exporter.model.adapters import adapter_for
from exporter.recipe.schema import AttentionPrune, MethodSpec, MlpPrune, PruneSpec
from tests.helpers import samples, tiny_model

METHODS = ["wanda", "sparse", "contrastive-wanda", "contrastive-sparse"]


@pytest.fixture(scope="module")
def setup() -> tuple:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    # two "personas" that speak from disjoint halves of the vocabulary
    pos = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=4, response_only=True)
    neg = calibrate(model, adapter, samples(2, (160, 320)), pad_id=0, batch_size=4, response_only=True)
    return model, adapter, pos, neg, column_sq_norms(model, adapter)


def test_removal_count() -> None:
    assert removal_count(100, 0.05) == 5
    assert removal_count(1536, 0.05, round_to=64) == 1536 - 1472
    assert removal_count(3, 0.34) == 1
    assert removal_count(3, 0.0) == 0
    assert removal_count(1, 0.99, round_to=1, what="KV groups") == 0  # floor(0.99) = 0 removed: fine
    with pytest.raises(MaskError, match="leaves no"):
        removal_count(0, 0.5)


def test_select_keep_breaks_ties_by_tiebreak() -> None:
    scores = torch.zeros(1, 6, dtype=torch.float64)
    z = torch.tensor([[0.5, -0.1, -2.0, 0.3, -1.0, -0.5]], dtype=torch.float64)
    keep = select_keep(scores, 2, allowed=z < 0, tiebreak=z)
    assert centred(z).tolist() == centred(-z).neg().tolist() and centred(z).quantile(0.5).abs() < 1e-15
    assert keep.tolist() == [[0, 1, 3, 5]]  # removed 2 and 4: the most negative z
    with pytest.raises(MaskError, match="only 4 units can be removed disjointly"):
        select_keep(scores, 5, allowed=z < 0, tiebreak=z)


def test_select_keep_per_group() -> None:
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5, 9.0, 8.0]])
    assert select_keep(scores, 1, groups=2).tolist() == [[0, 2, 4, 5]]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("unit", ["kv-group", "query-head"])
def test_counts_per_layer(setup: tuple, method: str, unit: str) -> None:
    _, _, pos, neg, col = setup
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25, round_to=8), attention=AttentionPrune(unit=unit, sparsity=0.5))
    mask = compute_mask("p", MethodSpec(score=method), prune, pos, neg, col)
    g = mask.pruned_geometry()
    assert g.intermediate == 72 and mask.mlp_keep is not None and mask.mlp_keep.shape == (2, 72)
    assert all(row.tolist() == sorted(set(row.tolist())) for row in mask.mlp_keep)
    if unit == "kv-group":
        assert (g.heads, g.kv_heads) == (3, 1)
    else:
        assert (g.heads, g.kv_heads) == (4, 2)
        assert mask.head_keep is not None
        for row in mask.head_keep:  # the same number of query heads kept in every group
            assert torch.bincount(row // 3, minlength=2).tolist() == [2, 2]


@pytest.mark.parametrize("method", ["contrastive-wanda", "contrastive-sparse"])
@pytest.mark.parametrize("phi", ["softplus", "relu"])
@pytest.mark.parametrize("unit", ["kv-group", "query-head"])
def test_pair_removal_sets_are_disjoint_and_swap(setup: tuple, method: str, phi: str, unit: str) -> None:
    _, _, pos, neg, col = setup
    attention = AttentionPrune(unit=unit, sparsity=0.5 if unit == "kv-group" else 0.34)  # 1 of 2 groups, 1 of 3 heads
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.3), attention=attention)
    spec = MethodSpec(score=method, phi=phi)
    a = compute_mask("a", spec, prune, pos, neg, col)
    b = compute_mask("b", spec, prune, neg, pos, col)
    for kind in ("mlp", "head"):
        for ra, rb in zip(a.removed(kind), b.removed(kind), strict=True):
            assert ra and rb and not set(ra) & set(rb)
    # swapping the personas swaps the masks
    a2 = compute_mask("a", spec, prune, neg, pos, col)
    b2 = compute_mask("b", spec, prune, pos, neg, col)
    assert torch.equal(b2.mlp_keep, a.mlp_keep) and torch.equal(b2.head_keep, a.head_keep)
    assert torch.equal(a2.mlp_keep, b.mlp_keep) and torch.equal(a2.head_keep, b.head_keep)


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_per_persona_gives_each_persona_the_mask_of_its_own_sparsity(setup: tuple, method: str) -> None:
    _, _, pos, neg, col = setup
    spec = MethodSpec(score=method)
    per = PruneSpec(
        mlp=MlpPrune(sparsity={"a": 0.1, "b": 0.3}), attention=AttentionPrune(unit="kv-group", sparsity={"b": 0.5})
    )
    a, b = compute_mask("a", spec, per, pos, neg, col), compute_mask("b", spec, per, neg, pos, col)
    assert [len(r) for r in a.removed("mlp")] == [9, 9] and [len(r) for r in b.removed("mlp")] == [28, 28]
    assert a.pruned_geometry().kv_heads == 2 and b.pruned_geometry().kv_heads == 1  # a left out: removes none
    # a persona's mask depends only on its own sparsity, not on what its partner removes
    alone = PruneSpec(mlp=MlpPrune(sparsity=0.3), attention=AttentionPrune(unit="kv-group", sparsity=0.5))
    b_alone = compute_mask("b", spec, alone, neg, pos, col)
    assert torch.equal(b.mlp_keep, b_alone.mlp_keep) and torch.equal(b.group_keep, b_alone.group_keep)
    a_alone = compute_mask("a", spec, PruneSpec(mlp=MlpPrune(sparsity=0.1)), pos, neg, col)
    assert torch.equal(a.mlp_keep, a_alone.mlp_keep) and a.head_keep is None


def test_too_many_units_for_a_disjoint_pair(setup: tuple) -> None:
    _, _, pos, neg, col = setup
    prune = PruneSpec(attention=AttentionPrune(unit="query-head", sparsity=0.67))  # 2 of 3 heads per group
    with pytest.raises(MaskError, match="can be removed disjointly in group 0, 2 asked"):
        compute_mask("a", MethodSpec(score="contrastive-wanda"), prune, pos, neg, col)


def test_contrastive_removes_the_opposite_personas_units(setup: tuple) -> None:
    _, _, pos, neg, col = setup
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.1))
    mask = compute_mask("a", MethodSpec(score="contrastive-wanda", phi="relu"), prune, pos, neg, col)
    z = zscore(pos, neg, "mlp", 1e-6)
    for layer, removed in enumerate(mask.removed("mlp")):
        k = len(removed)
        assert sorted(removed) == sorted(torch.argsort(z[layer])[:k].tolist())  # relu: pure z order
        assert (z[layer, removed] < z[layer].median()).all()


def test_masks_depend_on_calibration_data(setup: tuple) -> None:
    model, adapter, pos, neg, col = setup
    other = calibrate(model, adapter, samples(3, (10, 320)), pad_id=0, batch_size=4, response_only=True)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25))
    for method in METHODS:
        spec = MethodSpec(score=method)
        m1 = compute_mask("a", spec, prune, pos, neg, col)
        m2 = compute_mask("a", spec, prune, other, neg, col)
        assert not torch.equal(m1.mlp_keep, m2.mlp_keep), method


def test_statistics_exclude_padding_and_are_deterministic(setup: tuple) -> None:
    model, adapter, pos, _, _ = setup
    again = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=4, response_only=True)
    batch_of_one = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=1, response_only=True)
    for kind in ("mlp", "head", "group"):
        assert torch.equal(again.sum[kind], pos.sum[kind])
        # padding changes nothing: batch size 1 (no padding) gives the same statistics up to rounding
        torch.testing.assert_close(batch_of_one.sum[kind], pos.sum[kind], rtol=1e-5, atol=1e-6)
    assert pos.n_samples == 20 and pos.n_tokens == sum(n - 3 for n in range(6, 26))


def test_statistics_and_masks_round_trip(setup: tuple, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, _, pos, neg, col = setup
    pos.save(tmp_path / "s.safetensors", {"key": "k"})
    loaded, info = Statistics.load(tmp_path / "s.safetensors")
    assert info["key"] == "k" and loaded.n_tokens == pos.n_tokens
    assert all(torch.equal(loaded.sum[k], pos.sum[k]) for k in pos.sum)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25), attention=AttentionPrune(unit="kv-group", sparsity=0.5))
    mask = compute_mask("a", MethodSpec(score="contrastive-sparse"), prune, pos, neg, col)
    mask.save(tmp_path / "m.safetensors", {})
    back = PersonaMask.load(tmp_path / "m.safetensors")
    assert back.pruned_geometry() == mask.pruned_geometry()
    assert torch.equal(back.mlp_keep, mask.mlp_keep) and torch.equal(back.head_keep, mask.head_keep)
