"""The catalog's item kinds: unpaired answers (difference in differences, each pole resampled on its own) and
A/B choices (share of items whose persona letter is the likelier reply), on tiny models with known answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from exporter.evaluation.items import EvalDataError, prepare
from exporter.evaluation.scorer import MaskScorer
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import adapter_for
from exporter.model.encoding import encode_answer
from exporter.recipe.load import load_recipe
from exporter.reports.markdown import evaluation_markdown
from tests.evaluation.test_eval_reference import reference_logliks
from tests.helpers import eval_section, tiny_model, tiny_tokenizer, write_choices, write_recipe, write_unpaired

PERSONAS = ("introvert", "extravert")


def recipe_with(tmp_path: Path, **sections: Any) -> Any:
    folder = tmp_path / "model"
    if not folder.exists():
        tiny_model("llama").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return load_recipe(write_recipe(tmp_path, folder, eval=eval_section(tmp_path, **sections)))


def random_masks(model: nn.Module, seed: int = 0) -> dict[str, PersonaMask]:
    adapter = adapter_for(model.config)
    g = adapter.geometry(model.config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for p in PERSONAS:
        keep = torch.stack([torch.randperm(g.intermediate, generator=gen)[:80].sort().values for _ in range(g.layers)])
        steer = 0.5 * torch.randn(g.layers, g.hidden, generator=gen, dtype=torch.float64)
        out[p] = PersonaMask(p, g, keep, None, None, mlp_bias=steer, steering=steer)
    return out


def test_unpaired_shift_is_a_difference_in_differences_with_each_pole_resampled(tmp_path: Path) -> None:
    unpaired = write_unpaired(tmp_path)
    recipe = recipe_with(tmp_path, paired=None, unpaired=unpaired, baselines=[], bootstrap=300)
    tok, model = tiny_tokenizer(), tiny_model("llama").double()
    adapter = adapter_for(model.config)
    masks = random_masks(model)
    items = prepare(recipe)
    assert {p: len(a) for p, a in items.unpaired.items()} == {"introvert": 6, "extravert": 6}
    evals = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(masks)

    def ll(persona: str, mask: PersonaMask | None) -> np.ndarray:
        seqs = [encode_answer(tok, a.prompt, a.response) for a in items.unpaired[persona]]
        from exporter.verify.hf import masked

        intervention = None if mask is None else (lambda: masked(model, adapter, mask))
        return reference_logliks(model, seqs, intervention=intervention)

    for p, q in (PERSONAS, PERSONAS[::-1]):
        ev = evals[p]
        assert ev.opposite == q
        row = ev.row("mask-only")
        assert row is not None and row.unpaired is not None and row.paired is None
        d_own, d_other = ll(p, masks[p]) - ll(p, None), ll(q, masks[p]) - ll(q, None)
        want = d_own.mean() - d_other.mean()
        assert abs(want) > 1e-3  # the steering moves the answers: a zero would test nothing
        assert row.unpaired.shift.mean == pytest.approx(want, abs=1e-9)
        assert row.shift == row.unpaired.shift.mean
        margin = ll(p, masks[p]).mean() - ll(q, masks[p]).mean()
        assert row.unpaired.margin.mean == pytest.approx(margin, abs=1e-9)
        # the interval: each pole resampled on its own (sizes may differ), not one index drawn for both
        rng = np.random.default_rng(recipe.eval.seed)
        draws = [
            d_own[rng.integers(0, len(d_own), len(d_own))].mean()
            - d_other[rng.integers(0, len(d_other), len(d_other))].mean()
            for _ in range(recipe.eval.bootstrap)
        ]
        assert row.unpaired.shift.ci95 == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), abs=1e-9)
        dense = ev.row("dense")
        assert dense is not None and dense.unpaired is not None and dense.unpaired.shift.mean == 0
    # antisymmetric from the other side at the dense model
    intro, extra = evals["introvert"].row("dense"), evals["extravert"].row("dense")
    assert intro is not None and extra is not None and intro.unpaired and extra.unpaired
    assert intro.unpaired.margin.mean == pytest.approx(-extra.unpaired.margin.mean)
    text = evaluation_markdown("introvert", evals["introvert"])
    assert "unpaired margin" in text and "Unpaired answers" in text and "pair acc." not in text


def test_unpaired_items_must_answer_different_instructions(tmp_path: Path) -> None:
    unpaired = write_unpaired(tmp_path)
    (tmp_path / "extravert.jsonl").write_text((tmp_path / "introvert.jsonl").read_text())
    with pytest.raises(EvalDataError, match="different instructions"):
        prepare(recipe_with(tmp_path, unpaired=unpaired))


def test_unpaired_calibration_answers_are_held_out_or_refused(tmp_path: Path) -> None:
    unpaired = write_unpaired(tmp_path)
    recipe = recipe_with(tmp_path, unpaired=unpaired)  # writes pairs.jsonl, the calibration data
    calib = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (tmp_path / "introvert.jsonl").read_text().splitlines()]
    rows[0] = {"instruction": calib[0]["prompt"], "text": calib[0]["introvert"]}
    (tmp_path / "introvert.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(EvalDataError, match="also occur in the calibration data"):
        prepare(recipe_with(tmp_path, unpaired=unpaired | {"max_items": 7}))
    items = prepare(recipe_with(tmp_path, unpaired=unpaired | {"exclude_calibration": True}))
    assert items.splits["unpaired"]["personas"]["introvert"]["excluded_as_calibration"] == 1
    assert 0 not in items.splits["unpaired"]["personas"]["introvert"]["record_indices"]
    assert recipe.eval is not None


def rigged(model: nn.Module, tok: Any, bias: dict[str, float]) -> nn.Module:
    """Every hidden state zero (final norm weight 0) and an LM head with a bias: each position's next-token
    distribution is softmax(bias), whatever the mask or the prompt."""
    with torch.no_grad():
        model.model.norm.weight.zero_()
        head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True).double()
        head.weight.zero_()
        head.bias.zero_()
        for text, value in bias.items():
            (token,) = tok(text, add_special_tokens=False)["input_ids"]
            head.bias[token] = value
    model.lm_head = head
    return model


def test_choice_accuracy_and_margin_on_a_model_that_always_prefers_a(tmp_path: Path) -> None:
    choices = write_choices(tmp_path)
    recipe = recipe_with(tmp_path, paired=None, choices=choices, baselines=["prompt", "random"])
    tok = tiny_tokenizer()
    model = rigged(tiny_model("llama").double(), tok, {"A": 3.0})
    adapter = adapter_for(model.config)
    items = prepare(recipe)
    assert items.splits["choices"]["letters_of_first"] == {"(A)": 4, "(B)": 4}
    evals = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(random_masks(model))
    a_len = len(encode_answer(tok, "q", "(A)").ids) - encode_answer(tok, "q", "(A)").start
    assert a_len == len(encode_answer(tok, "q", "(B)").ids) - encode_answer(tok, "q", "(B)").start
    for p in PERSONAS:
        for cond in ("dense", "prompt-only", "mask-only", "random mask"):
            row = evals[p].row(cond)
            assert row is not None and row.choices is not None, (p, cond)
            # the model picks (A) everywhere: the persona is right on the half of the items where its letter is A
            assert row.choices.accuracy.mean == 0.5 and row.choices.n == 8
            # per item the letter margin is +-3 nats over the answer's tokens: mean 0 over balanced items
            assert row.choices.margin.mean == pytest.approx(0.0, abs=1e-12)
            assert row.choices.shift.mean == pytest.approx(0.0, abs=1e-12)
    # unbalanced: only even items -> the introvert's letter is always A
    odd_free = write_choices(tmp_path, n=8)
    rows = [json.loads(x) for x in (tmp_path / "choices.jsonl").read_text().splitlines()][::2]
    (tmp_path / "choices.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = recipe_with(tmp_path, paired=None, choices=odd_free | {"max_items": 4}, baselines=[])
    items = prepare(recipe)
    evals = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(random_masks(model))
    intro, extra = evals["introvert"].row("dense"), evals["extravert"].row("dense")
    assert intro is not None and extra is not None and intro.choices and extra.choices
    assert intro.choices.accuracy.mean == 1.0 and extra.choices.accuracy.mean == 0.0
    assert intro.choices.margin.mean == pytest.approx(3.0 / a_len, abs=1e-9)
    assert intro.choices.accuracy.ci95 == [1.0, 1.0]
    text = evaluation_markdown("introvert", evals["introvert"])
    assert "A/B letter acc." in text and "A/B choices: 4 items" in text


def test_choices_with_one_letter_for_both_personas_are_refused(tmp_path: Path) -> None:
    choices = write_choices(tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "choices.jsonl").read_text().splitlines()]
    rows[2]["extra_choice"] = rows[2]["intro_choice"]
    (tmp_path / "choices.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(EvalDataError, match=r"record 2 .* one letter"):
        prepare(recipe_with(tmp_path, choices=choices))


def test_new_sections_name_two_known_personas(tmp_path: Path) -> None:
    from exporter.errors import RecipeError

    unpaired = write_unpaired(tmp_path)
    unpaired["responses"]["sensing"] = unpaired["responses"].pop("extravert")
    with pytest.raises(RecipeError, match=r"eval\.unpaired\.responses\.sensing: unknown persona"):
        prepare(recipe_with(tmp_path, unpaired=unpaired))
    choices = write_choices(tmp_path)
    choices["responses"].pop("extravert")
    with pytest.raises(RecipeError, match=r"eval\.choices\.responses: name exactly two"):
        prepare(recipe_with(tmp_path, choices=choices))


def test_item_sets_give_own_axis_rows_crosstalk_and_switch_success(tmp_path: Path) -> None:
    """Four personas in two pairs: E/I paired (the main items), S/N unpaired (a set). Each persona is scored on
    both; on the set it does not name, the shift is toward the set's first persona, computed by hand here."""
    unpaired = write_unpaired(tmp_path)  # introvert.jsonl / extravert.jsonl: reused as the S/N poles' answers
    sn = {
        "responses": {
            "sensing": unpaired["responses"]["introvert"],
            "intuitive": unpaired["responses"]["extravert"],
        },
        "max_items": 6,
    }
    recipe = recipe_with(tmp_path)
    base = json.loads(json.dumps(recipe.model_dump(mode="json", exclude_none=True)))
    cal = base["personas"]["introvert"]["calibration"]
    base["personas"] |= {
        "sensing": {"description": "concrete", "calibration": cal | {"response_field": "introvert"}},
        "intuitive": {"description": "abstract", "calibration": cal | {"response_field": "extravert"}},
        "IN": {"mix": {"introvert": 1, "intuitive": 1}},  # a composite: scored toward its parts' poles
    }
    base["pairs"] = [["extravert", "introvert"], ["sensing", "intuitive"]]
    base["eval"]["sets"] = [{"name": "S/N", "unpaired": sn}]
    base["eval"]["baselines"] = ["prompt"]
    path = tmp_path / "four.yaml"
    import yaml

    path.write_text(yaml.safe_dump(base, sort_keys=False))
    recipe = load_recipe(path)
    tok, model = tiny_tokenizer(), tiny_model("llama").double()
    adapter = adapter_for(model.config)
    masks = random_masks(model) | {
        "sensing": random_masks(model, seed=1)["introvert"],
        "intuitive": random_masks(model, seed=1)["extravert"],
        "IN": random_masks(model, seed=2)["introvert"],
    }
    items = prepare(recipe)
    assert set(items.sets) == {"S/N"} and items.splits["sets"]["S/N"]["unpaired"]
    evals = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(masks)
    sn_items = items.sets["S/N"].unpaired

    def did(mask: PersonaMask, toward: str, other: str) -> float:
        from exporter.verify.hf import masked

        def ll(persona: str, m: PersonaMask | None) -> np.ndarray:
            seqs = [encode_answer(tok, a.prompt, a.response) for a in sn_items[persona]]
            return reference_logliks(
                model, seqs, intervention=None if m is None else (lambda: masked(model, adapter, m))
            )

        return float((ll(toward, mask) - ll(toward, None)).mean() - (ll(other, mask) - ll(other, None)).mean())

    intro = evals["introvert"]
    (cross,) = intro.sets
    assert not cross.own and cross.toward == "sensing"
    mask_row = next(r for r in cross.rows if r.condition == "mask-only")
    assert mask_row.shift is not None
    assert mask_row.shift.mean == pytest.approx(did(masks["introvert"], "sensing", "intuitive"), abs=1e-9)
    assert {r.condition for r in cross.rows} == {"dense", "prompt-only", "mask-only"}
    # the S/N poles: their rows and acceptance come from their own set
    sensing = evals["sensing"]
    main_cross, sn_own = sensing.sets  # its crosstalk on the main (E/I) items first, then its own set
    assert sensing.opposite == "intuitive" and sn_own.own and sn_own.toward == "sensing"
    assert main_cross.name == "introvert/extravert" and not main_cross.own and main_cross.toward == "introvert"
    row = sensing.row("mask-only")
    assert row is not None and row.unpaired is not None and row.neutral is not None
    assert row.unpaired.shift.mean == pytest.approx(did(masks["sensing"], "sensing", "intuitive"), abs=1e-9)
    assert sensing.acceptance is not None and sensing.acceptance.shift == row.unpaired.shift.mean
    own = sn_own.rows
    assert next(r for r in own if r.condition == "mask-only").shift == row.unpaired.shift
    # the composite: toward introvert on the main items, toward intuitive on S/N, both its own axes
    mixed = evals["IN"]
    assert mixed.opposite == "extravert" and mixed.sets[0].own and mixed.sets[0].toward == "intuitive"
    mixed_main, mixed_sn = mixed.row("mask-only"), next(r for r in mixed.sets[0].rows if r.condition == "mask-only")
    assert mixed_main is not None and mixed_main.shift_ci is not None and mixed_sn.shift is not None
    assert mixed_sn.shift.mean == pytest.approx(did(masks["IN"], "intuitive", "sensing"), abs=1e-9)
    plain = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate({"introvert": masks["IN"]})
    same = plain["introvert"].row("mask-only")  # the same mask scored as the introvert pole: the same E/I figures
    assert same is not None and mixed_main.shift_ci == same.shift_ci
    # the sensing mask scored as the introvert pole: its E/I figures are the sensing persona's main crosstalk
    as_introvert = MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate({"introvert": masks["sensing"]})
    cross_row = next(r for r in main_cross.rows if r.condition == "mask-only")
    intro_row = as_introvert["introvert"].row("mask-only")
    assert intro_row is not None and cross_row.shift == intro_row.shift_ci and cross_row.shift is not None
    assert mixed.switch_success == (mixed_main.shift_ci.ci95[0] > 0 and mixed_sn.shift.ci95[0] > 0)
    # switch success: every own axis's export interval above 0
    for p, ev in evals.items():
        if p == "IN":
            continue
        named = [r.shift_ci for r in ev.rows if r.condition == "mask-only"]
        assert named and named[0] is not None
        assert ev.switch_success == (named[0].ci95[0] > 0), p
    text = evaluation_markdown("introvert", intro)
    assert "sensing (crosstalk)" in text and "Switch success" in text
