"""Composite personas: one mask from the poles' rankings (equal counts, each part's top units), weighted steering
and compensation, and each pair's steering kept orthogonal to the other pairs' directions."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from exporter.errors import MaskError
from exporter.masking.axes import orthogonalised
from exporter.masking.calibrate import calibrate
from exporter.masking.data import TokenizedSample
from exporter.masking.masks import compute_masks, removals, unit_order
from exporter.masking.mix import composite_masks, merged, mixed_keep, quota
from exporter.masking.scoring import column_sq_norms
from exporter.masking.steer import compensation_bias, mlp_outputs, pole_steering, with_biases
from exporter.model.adapters import adapter_for
from exporter.recipe.rules import semantic_problems
from exporter.recipe.schema import Recipe
from tests.helpers import assert_close, samples, tiny_model

POLES = ("introvert", "extravert", "thinking", "feeling")


def _tokens(pick: list[int], seed: int) -> list[TokenizedSample]:
    rng = random.Random(seed)
    return [TokenizedSample(rng.choices(pick, k=n), 3) for n in range(6, 26)]


@pytest.fixture(scope="module")
def four() -> tuple[Any, Any, dict[str, Any], dict[str, torch.Tensor]]:
    """A tiny float64 Llama and two pairs of poles: low / high token ids, even / odd token ids."""
    model = tiny_model("llama").double()
    adapter = adapter_for(model.config)
    data = {
        "introvert": samples(1, (10, 160)),
        "extravert": samples(2, (160, 320)),
        "thinking": _tokens(list(range(10, 320, 2)), 3),
        "feeling": _tokens(list(range(11, 320, 2)), 4),
    }
    stats = {p: calibrate(model, adapter, d, pad_id=0, batch_size=5, response_only=True) for p, d in data.items()}
    return model, adapter, stats, column_sq_norms(model, adapter)


def recipe(mix: dict[str, dict[str, float]], **sections: Any) -> Recipe:
    pole = {"description": "d", "calibration": {"path": "x.jsonl", "response_field": "r", "max_samples": 1}}
    data: dict[str, Any] = {
        "name": "mix",
        "model": {"path": "m"},
        "personas": {p: {**pole, "description": f"the {p} side."} for p in POLES}
        | {n: {"mix": m} for n, m in mix.items()},
        "pairs": [["introvert", "extravert"], ["thinking", "feeling"]],
        "method": {"score": "contrastive-wanda"},
        "prune": {"mlp": {"sparsity": 0.1}},
    }
    data.update(sections)
    r = Recipe.model_validate(data)
    assert semantic_problems(r) == []
    return r


def removed_mlp(mask: Any) -> list[set[int]]:
    return [set(row) for row in mask.removed("mlp")]


def test_merged_takes_every_top_quota_then_fills_in_turn() -> None:
    a, b = [1, 2, 3, 4, 9], [2, 5, 6, 7]
    assert merged([(a, 2), (b, 2)], 4) == [1, 2, 5, 3]  # 2 is claimed twice: a's next candidate fills in first
    assert merged([(b, 2), (a, 2)], 4) == [2, 5, 1, 6]  # the other order fills from b first
    assert merged([(a, 2), (b, 2)], 6) == [1, 2, 5, 3, 6, 4]  # more slots (round_to): the parts in turn
    assert merged([(a, 1), (b, 0)], 1) == [1]
    assert merged([([1, 2], 2), ([2, 1], 2)], 4) == [1, 2]  # candidates run out: fewer than asked


def test_quota_rounds_halves_up() -> None:
    assert [quota(0.5, k) for k in (1, 3, 5)] == [1, 2, 3]  # round() would give 0, 2, 2
    assert quota(0.7, 9) == 6 and quota(0.3, 9) == 3 and quota(1, 9) == 9


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 0.3), (1.0, 0.5), (2.0, 1.0)])
def test_composite_removes_equal_counts_holding_each_parts_top_units(four: tuple, weights: tuple) -> None:
    _, _, stats, col = four
    r = recipe({"IT": {"introvert": weights[0], "thinking": weights[1]}})
    mask = composite_masks(r, stats, col, ["IT"])["IT"]
    g = mask.geometry
    k = removals("introvert", r.prune, g)["mlp"]
    assert k == 9  # 10 % of 96 neurons
    total = quota(weights[0], k) + quota(weights[1], k)
    removed = removed_mlp(mask)
    assert [len(r) for r in removed] == [total] * g.layers  # the same count in every layer: stock loaders read it
    assert mask.mlp_keep is not None and mask.mlp_keep.shape == (g.layers, g.intermediate - total)
    candidates: list[set[int]] = [set(), set()]
    for part, w in zip(("introvert", "thinking"), weights, strict=True):
        partner = r.partner(part)
        assert partner is not None
        order = unit_order("mlp", r.method, stats[part], stats[partner], col)
        for layer in range(g.layers):
            assert set(order[layer][0][: quota(w, k)]) <= removed[layer], (part, layer)  # its top round(w k)
            candidates[layer] |= set(order[layer][0])
    # every removed unit is a candidate of some part: it leans away from that part's persona
    assert all(removed[i] <= candidates[i] for i in range(g.layers))


def test_half_a_weight_halves_the_parts_removal_and_steering(four: tuple) -> None:
    model, adapter, stats, col = four
    full = recipe({"IT": {"introvert": 1, "thinking": 1}}, method={"score": "contrastive-wanda", "steer": 1.5})
    half = recipe({"IT": {"introvert": 0.5, "thinking": 1}}, method={"score": "contrastive-wanda", "steer": 1.5})
    out = {}
    for name, r in (("full", full), ("half", half)):
        masks = compute_masks(r, stats, col) | composite_masks(r, stats, col, ["IT"])
        out[name] = with_biases(r, masks, stats, model, adapter, torch.float64)
    assert [len(x) for x in removed_mlp(out["full"]["IT"])] == [18, 18]
    assert [len(x) for x in removed_mlp(out["half"]["IT"])] == [9 + 5, 9 + 5]  # round(0.5 x 9) = 5, halves up
    intro, think = out["full"]["introvert"].steering, out["full"]["thinking"].steering
    assert intro is not None and think is not None
    assert_close(out["full"]["IT"].steering, intro + think, 1e-12, "weights 1: the parts' biases summed")
    assert_close(out["half"]["IT"].steering, 0.5 * intro + think, 1e-12, "weight 0.5: half the introvert's bias")
    assert intro.abs().max() > 1e-3 and think.abs().max() > 1e-3  # neither part's bias is negligible


def test_scale_multiplies_every_weight_as_written_weights_would(four: tuple) -> None:
    """`scale: 0.5` on weights (1, 0.6) makes the mask, biases and reported weights of weights (0.5, 0.3)."""
    model, adapter, stats, col = four
    method = {"score": "contrastive-wanda", "steer": 1.5}
    scaled = recipe({"IT": {"introvert": 1, "thinking": 0.6}}, method=method)
    scaled = scaled.model_copy(
        update={"personas": {**scaled.personas, "IT": scaled.composites["IT"].model_copy(update={"scale": 0.5})}}
    )
    written = recipe({"IT": {"introvert": 0.5, "thinking": 0.3}}, method=method)
    assert scaled.composites["IT"].weights == written.composites["IT"].weights == {"introvert": 0.5, "thinking": 0.3}
    out = {}
    for name, r in (("scaled", scaled), ("written", written)):
        masks = compute_masks(r, stats, col) | composite_masks(r, stats, col, ["IT"])
        out[name] = with_biases(r, masks, stats, model, adapter, torch.float64)["IT"]
    assert removed_mlp(out["scaled"]) == removed_mlp(out["written"])
    assert [len(x) for x in removed_mlp(out["scaled"])] == [5 + 3, 5 + 3]  # round(0.5 x 9), round(0.3 x 9)
    assert out["scaled"].steering is not None and out["written"].steering is not None
    assert torch.equal(out["scaled"].steering, out["written"].steering)


def test_a_unit_two_parts_claim_counts_once_and_the_next_fills_in(four: tuple) -> None:
    """Two pairs with the very same statistics rank the same units: the composite removes the first 2k."""
    _, _, stats, col = four
    same = {**stats, "thinking": stats["introvert"], "feeling": stats["extravert"]}
    r = recipe({"IT": {"introvert": 1, "thinking": 1}})
    mask = composite_masks(r, same, col, ["IT"])["IT"]
    order = unit_order("mlp", r.method, same["introvert"], same["extravert"], col)
    assert removed_mlp(mask) == [set(order[layer][0][:18]) for layer in range(2)]


def test_round_to_fills_until_the_kept_count_is_a_multiple(four: tuple) -> None:
    _, _, stats, col = four
    r = recipe({"IT": {"introvert": 1, "thinking": 0.5}}, prune={"mlp": {"sparsity": 0.1, "round_to": 8}})
    k = removals("introvert", r.prune, stats["introvert"].geometry)["mlp"]  # kept 88 of 96: k = 8
    mask = composite_masks(r, stats, col, ["IT"])["IT"]
    assert mask.mlp_keep is not None and mask.mlp_keep.shape[1] % 8 == 0
    assert mask.mlp_keep.shape[1] == 96 - 16 and k + quota(0.5, k) == 12  # 12 asked, 16 removed: kept 80


def test_query_heads_are_merged_per_kv_group() -> None:
    # 1 layer, 2 KV groups of 4 query heads; each part removes 1 head per group
    a = [[[0, 1], [4, 5]]]
    b = [[[0, 2], [6, 4]]]
    keep = mixed_keep("X", "head", [(a, 1), (b, 1)], n=8, round_to=1)
    assert keep.tolist() == [[2, 3, 5, 7]]  # group 0: 0 shared, a's next (1) fills; group 1: 4 and 6


def test_more_units_than_the_parts_can_remove_is_an_error(four: tuple) -> None:
    _, _, stats, col = four
    r = recipe({"IT": {"introvert": 6, "thinking": 6}})
    with pytest.raises(MaskError, match=r"composite 'IT': layer 0 has \d+ MLP neurons that its parts can remove, 108"):
        composite_masks(r, stats, col, ["IT"])


def test_composite_compensation_and_soft_masks_follow_the_parts(four: tuple) -> None:
    model, adapter, stats, col = four
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    r = recipe({"IT": {"introvert": 1, "thinking": 3}}, prune={"mlp": {"sparsity": 0.1, "compensate": "personas"}})
    masks = compute_masks(r, stats, col) | composite_masks(r, stats, col, ["IT"])
    hard = masks["IT"]
    biased = with_biases(r, masks, stats, model, adapter, torch.float64)["IT"]
    mlp, _ = hard.channel_masks()
    assert mlp is not None
    pair_mean = {p: (stats[p].mlp_mean() + stats[q].mlp_mean()) / 2 for p, q in (("introvert", "extravert"),)}
    pair_mean["thinking"] = (stats["thinking"].mlp_mean() + stats["feeling"].mlp_mean()) / 2
    mean = 0.25 * pair_mean["introvert"] + 0.75 * pair_mean["thinking"]  # weighted by the parts' weights
    assert_close(biased.mlp_bias, compensation_bias(down, 1.0 - mlp, mean), 1e-12, "composite compensation")
    soft = recipe({"IT": {"introvert": 1, "thinking": 1}}, prune={"mlp": {"sparsity": 0.1, "gamma": 0.25}})
    masks = compute_masks(soft, stats, col) | composite_masks(soft, stats, col, ["IT"])
    scaled = with_biases(soft, masks, stats, model, adapter, torch.float32)["IT"]
    assert scaled.mlp_keep is None and scaled.mlp_scale is not None  # kept, scaled by gamma
    selected = [set((row == 0.25).nonzero().flatten().tolist()) for row in scaled.mlp_scale]
    assert selected == removed_mlp(masks["IT"])


# -- axes kept apart: method.steer_orthogonal --


def test_orthogonalised_directions_have_no_component_along_the_others() -> None:
    gen = torch.Generator().manual_seed(0)
    d = [torch.randn(4, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    d[1] = d[1] + 2 * d[0]  # strongly correlated axes
    out = orthogonalised(d)
    for a in range(3):
        for b in range(3):
            dots = (out[a] * d[b]).sum(-1)  # per layer
            if a != b:
                assert dots.abs().max() < 1e-12 * d[b].norm(dim=-1).max() * out[a].norm(dim=-1).max(), (a, b)
            else:
                assert (dots > 0).all()  # still toward its own pole: <d_a', d_a> = |d_a'|^2
    assert not torch.allclose(out[1], d[1])
    reordered = orthogonalised([d[2], d[0], d[1]])
    for got, want in zip(reordered, (out[2], out[0], out[1]), strict=True):
        assert_close(got, want, 1e-12, "independent of the pairs' order")
    assert torch.equal(orthogonalised([d[0]])[0], d[0])  # one pair: unchanged
    parallel = orthogonalised([d[0], 3 * d[0]])  # parallel directions: nothing of either is left
    assert parallel[0].abs().max() < 1e-12 and parallel[1].abs().max() < 1e-12


@pytest.mark.parametrize("vector", ["mlp", "residual"])
def test_orthogonal_steering_leaves_the_other_pairs_directions_alone(four: tuple, vector: str) -> None:
    model, adapter, stats, _ = four
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    method = {"score": "contrastive-wanda", "steer": 1.0, "steer_vector": vector}
    plain = recipe({}, method=method)
    ortho = recipe({}, method={**method, "steer_orthogonal": True})
    before, after = pole_steering(plain, stats, down), pole_steering(ortho, stats, down)

    def direction(a: str, b: str) -> torch.Tensor:
        if vector == "residual":
            return stats[a].resid_mean() - stats[b].resid_mean()
        return mlp_outputs(down, {"d": stats[a].mlp_mean() - stats[b].mlp_mean()})["d"]

    steered = [1] if vector == "residual" else [0, 1]  # residual: the last steered layer only
    for pole, other in (("introvert", ("thinking", "feeling")), ("feeling", ("introvert", "extravert"))):
        d = direction(*other)
        for layer in steered:
            cos_before = (before[pole][layer] @ d[layer]) / (before[pole][layer].norm() * d[layer].norm())
            cos_after = (after[pole][layer] @ d[layer]) / (after[pole][layer].norm() * d[layer].norm())
            assert abs(cos_before) > 1e-3 and abs(cos_after) < 1e-10, (pole, layer, cos_before, cos_after)
    assert_close(after["extravert"], -after["introvert"], 1e-12, "the two poles of a pair: opposite biases")
    one_pair = {"pairs": [["introvert", "extravert"]], "personas": {p: plain.personas[p] for p in POLES[:2]}}
    single = Recipe.model_validate({**plain.model_dump(), **one_pair, "method": {**method, "steer_orthogonal": True}})
    alone = pole_steering(single, stats, down)
    assert torch.equal(alone["introvert"], before["introvert"])  # one pair: nothing to keep apart


def test_composite_bias_is_the_weighted_sum_of_the_projected_parts(four: tuple) -> None:
    model, adapter, stats, col = four
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    method = {
        "score": "contrastive-wanda",
        "steer": {"introvert": 1.5, "thinking": 2.0},
        "steer_vector": {"thinking": "residual"},
        "steer_orthogonal": True,
    }
    r = recipe({"IT": {"introvert": 0.7, "thinking": 0.3}}, method=method)
    masks = compute_masks(r, stats, col) | composite_masks(r, stats, col, ["IT"])
    out = with_biases(r, masks, stats, model, adapter, torch.float64)
    poles = pole_steering(r, stats, down)
    assert set(poles) == {"introvert", "thinking"}
    assert_close(out["IT"].steering, 0.7 * poles["introvert"] + 0.3 * poles["thinking"], 1e-12, "weighted sum")
    assert_close(out["IT"].mlp_bias, out["IT"].steering, 0.0, "no compensation: the bias is the steering")
    plain = recipe({"IT": {"introvert": 0.7, "thinking": 0.3}}, method={**method, "steer_orthogonal": False})
    unprojected = pole_steering(plain, stats, down)
    change = (unprojected["introvert"] - poles["introvert"]).abs().max()
    assert change > 1e-3 * unprojected["introvert"].abs().max(), change  # the projection changed it
