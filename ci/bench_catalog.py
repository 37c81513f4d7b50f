"""The 16 MBTI types of recipes/smollm2-mbti.yaml on the test items, printed (not asserted).

For each type (a composite of four poles, exporter/masking/mix.py) and, for comparison, each pole alone: the
export's shift toward each of its four letters on that axis's test items (E/I and T/F paired, S/N and J/P
unpaired), with its 95 % interval, its perplexity on the neutral corpus against dense, and switch success (all
four intervals above 0). This is the evaluation stage of `persona-export run recipes/smollm2-mbti.yaml` without
writing the exports: it scores the masked model with the steering biases, which each export computes exactly
(the parity tests prove it for composites too), so the 24 checkpoints (about 0.5 GB each) need not be written.
A pole of S/N, T/F or J/P gets its E/I figure as crosstalk on the recipe's main items (the evaluation's set
named after the main items' personas). Baselines are left out (a type has no system prompt of its own); the
dense model's scores are shared by all types.

With --replies, instead: each type's greedy replies to the eval section's reply prompts beside its mirror's (every
letter flipped), the repetition bound that `tune` applies (repeated 4-grams over the dense model's replies) and
the reply gap between the two types' exports against the gap their system prompts give the dense model.

    .venv/bin/python ci/bench_catalog.py [--types INTJ ESFP ...] [--json out.json] [--replies] [KEY.PATH=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from exporter.evaluation.items import prepare
from exporter.evaluation.scorer import MaskScorer
from exporter.masking.collect import column_norms, down_weights, persona_statistics
from exporter.masking.masks import PersonaMask, compute_masks
from exporter.masking.mix import composite_masks
from exporter.masking.steer import with_biases
from exporter.model.sources import load_model
from exporter.recipe.load import load_recipe
from exporter.recipe.schema import Recipe
from exporter.reports.evaluation import PersonaEvaluation
from exporter.reports.provenance import Timer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-mbti.yaml"
AXES = ("E/I", "S/N", "T/F", "J/P")  # the first is the recipe's main items' axis (eval.paired)


def axis_shifts(ev: PersonaEvaluation, main_pair: set[str]) -> dict[str, tuple[str, float, float, float]]:
    """Each axis the persona names: (toward, mean, low, high) of the export's shift on that axis's items;
    `main_pair`: the personas of the main items, whose axis is AXES[0]."""
    out = {}
    main = ev.row("mask-only")
    from_set = any(s.own and ev.opposite in s.personas for s in ev.sets)  # a pole whose axis is a set: its rows
    if ev.opposite is not None and not from_set and main is not None and main.shift_ci is not None:
        ci = main.shift_ci
        out[AXES[0]] = (ev.opposite, ci.mean, ci.ci95[0], ci.ci95[1])  # toward the partner of `opposite`
    for s in ev.sets:
        row = next((r for r in s.rows if r.condition == "mask-only"), None)
        if row is not None and row.shift is not None:
            label = s.toward if s.own else f"crosstalk toward {s.toward}"
            axis = AXES[0] if set(s.personas) == main_pair else s.name  # the main items' crosstalk set
            out[axis] = (label, row.shift.mean, row.shift.ci95[0], row.shift.ci95[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--types", nargs="*", default=None, help="composites to score (default: all; none: --types)")
    parser.add_argument("--poles", nargs="*", default=None, help="poles to score alone (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--replies", action="store_true", help="each type's replies beside its mirror's instead")
    parser.add_argument("--penalty", type=float, default=1.0, help="--replies decoded with this repetition penalty")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. eval.sets.0.unpaired.max_items=32")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, [*args.overrides, "eval.baselines=[]"])
    assert recipe.eval is not None
    main_pair = set(recipe.eval.main_sections[0].responses) if recipe.eval.main_sections else set()
    composites = [p for p in recipe.personas if p not in recipe.poles]
    types = composites if args.types is None else args.types
    poles = list(recipe.poles) if args.poles is None else args.poles
    t0 = time.perf_counter()
    m = load_model(recipe)
    stats = {p: persona_statistics(recipe, p, m, None, Timer())[0] for p in recipe.poles}
    col_sq = column_norms(m)
    masks = compute_masks(recipe, stats, col_sq) | composite_masks(recipe, stats, col_sq, types)
    masks = with_biases(recipe, masks, stats, m.model, m.adapter, torch.float32, down=down_weights(m))
    items = prepare(recipe)
    scorer = MaskScorer(recipe, recipe.eval, items, m.model, m.tokenizer, m.adapter)
    if args.replies:
        mirror_replies(recipe, scorer, {t: masks[t] for t in types}, args.json, args.penalty)
        print(f"\nscored in {time.perf_counter() - t0:.0f} s")
        return
    figures: dict[str, dict[str, tuple[str, float, float, float]]] = {}
    success: dict[str, bool | None] = {}
    perplexity: dict[str, float | None] = {}
    for name in [*poles, *types]:  # one at a time: the dense model's scores are reused
        ev = scorer.evaluate({name: masks[name]}, replies=False)[name]
        figures[name], success[name] = axis_shifts(ev, main_pair), ev.switch_success
        main = ev.row("mask-only")
        perplexity[name] = main.neutral.perplexity_ratio if main is not None and main.neutral is not None else None
        shifts = "; ".join(f"{a} {v[1]:+.3f} [{v[2]:+.3f}, {v[3]:+.3f}]" for a, v in figures[name].items())
        print(f"{name}: {shifts}; perplexity {perplexity[name] or float('nan'):.3f}x dense")
    print(f"\nscored in {time.perf_counter() - t0:.0f} s\n")
    print("| persona | " + " | ".join(f"{a} shift [95% CI]" for a in AXES) + " | perplexity | switch success |")
    print("|---|" + "---|" * (len(AXES) + 2))
    for name in [*poles, *types]:
        cells = []
        for a in AXES:
            v = figures[name].get(a)
            cross = " (x)" if v is not None and v[0].startswith("crosstalk") else ""
            cells.append("–" if v is None else f"{v[1]:+.3f} [{v[2]:+.3f}, {v[3]:+.3f}]{cross}")
        ok, ppl = success[name], perplexity[name]
        cells.append("–" if ppl is None else f"{ppl:.3f}x")
        print(f"| {name} | " + " | ".join(cells) + f" | {'–' if ok is None else 'yes' if ok else 'no'} |")
    n_ok = sum(bool(success[t]) for t in types)
    if types:
        print(f"\nswitch success: {n_ok}/{len(types)} types ((x): crosstalk, the shift toward the set's first pole)")
    if args.json:
        args.json.write_text(
            json.dumps({"figures": figures, "switch_success": success, "perplexity_ratio": perplexity}, indent=1)
        )


def mirror_replies(
    recipe: Recipe, scorer: MaskScorer, masks: dict[str, PersonaMask], out: Path | None, penalty: float = 1.0
) -> None:
    """Each type's replies beside its mirror's (both must be among `masks`), decoded greedily under `penalty`
    (1: plain greedy), printed per type."""
    if recipe.eval is None or recipe.eval.replies is None:
        raise SystemExit(
            "--replies: give the reply prompts, e.g. 'eval.replies={path: data/everyday-prompts-test.txt}'"
        )
    figures: dict[str, dict[str, float]] = {}
    for name in masks:
        mirror = recipe.opposite(name)
        if name in figures or mirror is None or mirror not in masks:
            continue
        for p, r in scorer.replier.reply_set({name: masks[name], mirror: masks[mirror]}, penalty).items():
            dense = r.conditions["dense"].degeneration.repeated_4grams
            figures[p] = {
                "repeated_4grams": r.conditions["export"].degeneration.repeated_4grams,
                "repeated_4grams_over_dense": r.repeated_over_dense,
                "reply_gap": r.gap["export"].mean,
                "reply_gap_low": r.gap["export"].ci95[0],
                "reply_gap_high": r.gap["export"].ci95[1],
                "prompt_only_reply_gap": r.gap["prompt_only"].mean,
            }
            f = figures[p]
            print(
                f"{p} (vs {r.opposite}): repeated 4-grams {f['repeated_4grams']:.3f} (dense {dense:.3f}, "
                f"{f['repeated_4grams_over_dense']:+.3f}); reply gap {f['reply_gap']:+.3f} "
                f"[{f['reply_gap_low']:+.3f}, {f['reply_gap_high']:+.3f}], prompt-only {f['prompt_only_reply_gap']:+.3f}"
            )
            for ex in r.examples[:2]:
                print(f"  {ex.prompt!r}\n    {p}: {ex.export!r}\n    {r.opposite}: {ex.opposite_export!r}")
    skipped = sorted(set(masks) - set(figures))
    if skipped:
        print(f"no mirror among the scored types (add it to --types): {', '.join(skipped)}")
    if out:
        out.write_text(json.dumps({"repetition_penalty": penalty, "replies": figures}, indent=1))


if __name__ == "__main__":
    main()
