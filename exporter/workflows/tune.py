"""`persona-export tune RECIPE --out DIR`: choose a setting on validation items, report it on test items.

Calibrate once; for every point of the recipe's `tune` grid (MLP sparsity x steering alpha x steered layers x
compensation x soft-mask factor x amplification) compute the masks and biases and score them on
`tune.validation` (paired shift, neutral perplexity and, when given, the replies; no baselines). The chosen
point has the largest paired shift of its weaker persona among the points whose every persona stays within
`max_perplexity_ratio` x dense perplexity (and the replies' repetition bound). Only that point is evaluated on
the recipe's `eval` section, with every baseline, and the two sets of items must not share a prompt or an
answer: tune never reports on what it chose on. Writes report.json, report.md, pareto.png and the chosen
recipe.yaml; when no point is within the bounds, the grid's figures (report.json, report.md, pareto.png) and an
error.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from exporter.errors import MaskError, RecipeError
from exporter.evaluation.conditions import (
    Evaluator,
    WeightCondition,
    conditions,
    dense_parameters,
    evaluate_masks,
    persona_evaluation,
    prepare,
    score_conditions,
    system_prompt,
)
from exporter.evaluation.items import EvalItems, norm
from exporter.evaluation.replies import Replies, evaluate_replies
from exporter.io import TUNE_FOLDER, staged, write_json
from exporter.masking.masks import PersonaMask, compute_masks
from exporter.masking.statistics import column_norms, persona_statistics
from exporter.masking.steer import with_biases
from exporter.model.sources import load_model
from exporter.recipe.schema import MethodSpec, Recipe, per_persona
from exporter.reports.markdown import md_table, save_png
from exporter.reports.provenance import Timer
from exporter.workflows.sweep import with_sparsity
from exporter.workflows.validate import check_output, tune_validation, validate

log = logging.getLogger(__name__)


def _texts(items: EvalItems) -> set[str]:
    out = {norm(t) for it in items.paired for t in (it.prompt, *it.responses.values())}
    out |= {norm(s.text) for s in items.statements} | {norm(p) for p in items.reply_prompts}
    return out


def check_disjoint_splits(validation: EvalItems, test: EvalItems) -> None:
    shared = _texts(validation) & _texts(test)
    if shared:
        example = sorted(shared)[0][:80]
        raise RecipeError(
            f"tune.validation and eval share {len(shared)} text(s) (e.g. {example!r}); settings must be chosen "
            "on items that are not reported: point tune.validation at another split"
        )


def grid(recipe: Recipe) -> list[Recipe]:
    """The recipe at every point of its tune grid."""
    assert recipe.tune is not None
    points = []
    t = recipe.tune
    axes = (t.sparsity, t.steer, t.steer_layers, t.compensate, t.gamma, t.amplify)
    for s, alpha, depth, comp, gamma, amp in itertools.product(*axes):
        prune = with_sparsity(recipe.prune, "mlp", s)
        assert prune.mlp is not None
        mlp = prune.mlp.model_copy(update={"compensate": comp, "gamma": gamma, "amplify": amp})
        prune = prune.model_copy(update={"mlp": mlp})
        method = recipe.method.model_copy(update={"steer": alpha, "steer_layers": depth})
        points.append(recipe.model_copy(update={"prune": prune, "method": method}))
    return points


def _point_figures(evals: dict[str, dict[str, Any]], replies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    per = {}
    for p, ev in evals.items():
        row = next(r for r in ev["rows"] if r["condition"] == "mask-only")
        per[p] = {"shift": row["paired"]["shift"]["mean"], "perplexity_ratio": row["neutral"]["perplexity_ratio"]}
        if p in replies:
            conds = replies[p]["conditions"]
            repeated = conds["export"]["degeneration"]["repeated_4grams"]
            per[p] |= {
                "reply_score": conds["export"]["score"]["mean"],
                "repeated_4grams_over_dense": repeated - conds["dense"]["degeneration"]["repeated_4grams"],
            }
    figures: dict[str, Any] = {
        "personas": per,
        "min_shift": min(v["shift"] for v in per.values()),
        "max_perplexity_ratio": max(v["perplexity_ratio"] for v in per.values()),
    }
    if replies:
        first = next(iter(replies.values()))  # a pair's gap is the same from either side, up to its sign
        figures["reply_gap"] = first["gap"]["export"]["mean"]
        figures["prompt_only_reply_gap"] = first["gap"]["prompt_only"]["mean"]
        figures["max_repeated_4grams_over_dense"] = max(
            v["repeated_4grams_over_dense"] for v in per.values() if "repeated_4grams_over_dense" in v
        )
    return figures


def tune(recipe: Recipe, out: Path, *, overwrite: bool = False, reuse: Path | None = None) -> dict[str, Any]:
    spec = recipe.tune
    if spec is None or recipe.eval is None:
        raise RecipeError("tune: the recipe needs a 'tune' section (grid + validation items) and an 'eval' section")
    if spec.validation.paired is None or spec.validation.neutral is None:
        raise RecipeError("tune.validation: give 'paired' and 'neutral' (the shift and the perplexity it ranks by)")
    validate(recipe, reuse)  # what `persona-export validate` checks, before the model loads
    check_output(recipe, out, overwrite, TUNE_FOLDER)
    validation = tune_validation(spec)
    val_items, test_items = prepare(recipe, validation), prepare(recipe, recipe.eval)
    check_disjoint_splits(val_items, test_items)
    m = load_model(recipe)
    timer = Timer()
    stats = {p: persona_statistics(recipe, p, m, reuse, timer)[0] for p in recipe.personas}
    col_sq = column_norms(m)
    ev = Evaluator(m.model, m.tokenizer, m.adapter, validation, val_items)
    done = score_conditions(ev, {"dense": WeightCondition(None, 0)}, {})
    systems = {p: system_prompt(recipe, validation, p) for p in recipe.personas}
    opposite = {p: q for p in recipe.personas if (q := recipe.partner(p))}
    reply_cache: dict[str, Replies] = {}  # dense and prompt-only replies, generated once
    max_repeated = validation.acceptance.max_repeated_4grams_over_dense
    n_dense = dense_parameters(m.model)
    points: list[dict[str, Any]] = []
    candidates: list[tuple[Recipe, dict[str, PersonaMask]]] = []
    for r in grid(recipe):
        assert r.prune.mlp is not None
        mlp = r.prune.mlp
        setting: dict[str, Any] = {"sparsity": mlp.sparsity, "steer": r.method.steer}
        setting |= {"steer_layers": r.method.steer_layers, "compensate": mlp.compensate}
        setting |= {"gamma": mlp.gamma, "amplify": mlp.amplify}
        log.info("tune: %s", setting)
        try:
            masks = with_biases(r, compute_masks(r, stats, col_sq), stats, m.model, m.adapter, torch.float32)
        except MaskError as exc:
            points.append({"setting": setting, "error": str(exc)})
            continue
        raw = score_conditions(ev, conditions(ev, masks, {}), {}, done=done)
        evals = {p: persona_evaluation(r, validation, val_items, raw, p, masks[p], n_dense) for p in masks}
        replies = {}
        if validation.replies is not None and val_items.reply_prompts:
            args = (m.model, m.tokenizer, m.adapter, validation, val_items.reply_prompts, masks, systems, opposite)
            replies = evaluate_replies(*args, cache=reply_cache)
        figures = _point_figures(evals, replies)
        # every persona removes units (gamma > 0 keeps every unit)
        removes = figures["removes"] = all(mlp.fraction(p) > 0 for p in masks) and mlp.gamma == 0
        within = all(_within(v, spec.max_perplexity_ratio, max_repeated) for v in figures["personas"].values())
        figures["feasible"] = within and (removes or not spec.require_removal)
        log.info(
            "tune: %s weaker shift %+.3f, worst perplexity %.3fx%s%s",
            setting,
            figures["min_shift"],
            figures["max_perplexity_ratio"],
            f", reply gap {figures['reply_gap']:+.3f}, worst repeated 4-grams over dense "
            f"{figures['max_repeated_4grams_over_dense']:+.3f}"
            if replies
            else "",
            "" if removes else " (reference: removes nothing)",
        )
        points.append({"setting": setting, **figures})
        candidates.append((r, masks))
    scored = [p for p in points if "error" not in p]  # aligned with candidates
    if spec.per_persona:
        bounds = (spec.max_perplexity_ratio, max_repeated, spec.require_removal)
        for point, candidate in per_persona_settings(scored, candidates, *bounds):
            points.append(point)
            scored.append(point)
            candidates.append(candidate)
    feasible = [i for i, p in enumerate(scored) if p["feasible"]]
    report: dict[str, Any] = {
        "recipe": recipe.name,
        "selection": "largest paired shift of the weaker persona on the validation items, every persona's "
        f"perplexity <= {spec.max_perplexity_ratio}x dense"
        + (f" and its replies' repeated 4-grams <= dense + {max_repeated}" if validation.replies is not None else "")
        + (
            "; each persona's sparsity and steering (alpha, layers) chosen on its own (its largest shift within "
            "the bounds, the other settings equal)"
            if spec.per_persona
            else ""
        ),
        "max_perplexity_ratio": spec.max_perplexity_ratio,
        "max_repeated_4grams_over_dense": max_repeated if validation.replies is not None else None,
        "validation_splits": val_items.splits,
        "grid": points,
        "chosen": None,
        "test": None,
    }
    recipe_yaml = None
    if feasible:
        best = max(feasible, key=lambda i: scored[i]["min_shift"])
        scored[best]["chosen"] = True
        chosen, masks = candidates[best]
        log.info("tune: chosen %s; evaluating it on the test items", scored[best]["setting"])
        report["test"] = evaluate_masks(chosen, recipe.eval, test_items, m.model, m.tokenizer, m.adapter, masks)
        report["chosen"] = scored[best]["setting"]
        final = chosen.model_copy(update={"tune": None})
        recipe_yaml = f"# chosen by `persona-export tune` on the validation items: {report['chosen']}\n"
        recipe_yaml += yaml.safe_dump(final.model_dump(mode="json", exclude_none=True), sort_keys=False)
    # without a feasible point the grid's figures are still written: they tell the user where to search next
    with staged(out, overwrite, TUNE_FOLDER) as stage:
        write_json(stage / "report.json", report)
        if recipe_yaml is not None:
            (stage / "recipe.yaml").write_text(recipe_yaml)
        plot_pareto(scored, stage / "pareto.png", spec.max_perplexity_ratio)
        (stage / "report.md").write_text(tune_markdown(report))
    if not feasible:
        raise RecipeError(
            f"tune: no point of the grid keeps perplexity within {spec.max_perplexity_ratio}x dense"
            + (f" and repeated 4-grams within dense + {max_repeated}" if validation.replies is not None else "")
            + " on the validation items"
            + (" while removing units" if spec.require_removal else "")
            + f"; each point's figures are in {out}/report.md; add smaller sparsities or steering strengths"
        )
    return report


OWN = ("sparsity", "steer", "steer_layers")  # the settings a persona can take on its own


def _own(setting: dict[str, Any]) -> tuple[str, ...]:
    """The settings a persona takes on its own at this point: with amplify > 1 its export also depends on its
    partner's mask, so its sparsity stays common."""
    return OWN if setting["amplify"] == 1 else OWN[1:]


def _within(figures: dict[str, Any], max_ppl: float, max_repeated: float) -> bool:
    return figures["perplexity_ratio"] <= max_ppl and figures.get("repeated_4grams_over_dense", 0.0) <= max_repeated


def per_persona_settings(
    scored: list[dict[str, Any]],
    candidates: list[tuple[Recipe, dict[str, PersonaMask]]],
    max_ppl: float,
    max_repeated: float,
    require_removal: bool,
) -> list[tuple[dict[str, Any], tuple[Recipe, dict[str, PersonaMask]]]]:
    """Points whose sparsity and steering are chosen per persona. A persona's export depends only on its own
    sparsity (its mask scores its units against its partner's statistics, whatever the partner removes) and its
    own steering, so among grid points that differ only in single-number `sparsity` / `steer` / `steer_layers`,
    each persona takes the point of its largest shift within the bounds; the new point combines those exports
    (the three as mappings). With amplify > 1 a persona's export also depends on its partner's mask, so its
    sparsity stays common there."""
    groups: dict[str, list[int]] = {}
    for i, scored_point in enumerate(scored):
        setting = scored_point["setting"]
        if not any(isinstance(setting[k], dict) for k in OWN):
            rest = {k: v for k, v in setting.items() if k not in _own(setting)}
            groups.setdefault(repr(sorted(rest.items())), []).append(i)
    out = []
    for members in groups.values():
        personas = scored[members[0]]["personas"]
        pick = {}
        for p in personas:
            ok = [i for i in members if _within(scored[i]["personas"][p], max_ppl, max_repeated)]
            if ok:
                pick[p] = max(ok, key=lambda i: scored[i]["personas"][p]["shift"])
        if len(pick) != len(personas) or len(set(pick.values())) == 1:
            continue  # a persona has no point within the bounds, or one point already serves every persona
        first = scored[members[0]]
        own = _own(first["setting"])
        chosen = {k: {p: scored[i]["setting"][k] for p, i in pick.items()} for k in own}
        per = {p: scored[i]["personas"][p] for p, i in pick.items()}
        removes = all(scored[i]["removes"] for i in pick.values())
        point: dict[str, Any] = {
            "setting": first["setting"] | chosen,
            "combined": True,
            "personas": per,
            "min_shift": min(v["shift"] for v in per.values()),
            "max_perplexity_ratio": max(v["perplexity_ratio"] for v in per.values()),
            "removes": removes,
            "feasible": removes or not require_removal,  # within the bounds by construction
        }
        if all("reply_score" in v for v in per.values()):
            # each export's score is toward its own persona, so a pair's gap is the sum of the two (mean over
            # prompts: the per-prompt gap averaged)
            point["reply_gap"] = sum(v["reply_score"] for v in per.values())
            point["prompt_only_reply_gap"] = first["prompt_only_reply_gap"]
            point["max_repeated_4grams_over_dense"] = max(v["repeated_4grams_over_dense"] for v in per.values())
        recipe = candidates[members[0]][0]
        method = recipe.method.model_copy(update={k: chosen[k] for k in own if k != "sparsity"})
        prune = with_sparsity(recipe.prune, "mlp", chosen["sparsity"]) if "sparsity" in chosen else recipe.prune
        masks = {p: candidates[i][1][p] for p, i in pick.items()}
        out.append((point, (recipe.model_copy(update={"method": method, "prune": prune}), masks)))
    return out


def value_label(value: float | dict[str, float]) -> str:
    """A setting given once or per persona: 1.5, or 'introvert 1.5, extravert 1'."""
    return ", ".join(f"{p} {a:g}" for p, a in value.items()) if isinstance(value, dict) else f"{value:g}"


def _front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both shift (higher) and perplexity (lower)."""
    return [
        p
        for p in points
        if not any(
            q["min_shift"] >= p["min_shift"]
            and q["max_perplexity_ratio"] <= p["max_perplexity_ratio"]
            and (q["min_shift"], q["max_perplexity_ratio"]) != (p["min_shift"], p["max_perplexity_ratio"])
            for q in points
        )
    ]


def plot_pareto(points: list[dict[str, Any]], path: Path, bound: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.scatter([p["max_perplexity_ratio"] for p in points], [p["min_shift"] for p in points], c="grey", s=18)
    front = sorted(_front(points), key=lambda p: p["max_perplexity_ratio"])
    ax.plot([p["max_perplexity_ratio"] for p in front], [p["min_shift"] for p in front], "-o", label="Pareto front")
    for p in points:
        s = p["setting"]
        label = f"{value_label(s['sparsity'])}/{value_label(s['steer'])}"
        label += f" l{value_label(s['steer_layers'])}" if s.get("steer_layers", 1.0) != 1.0 else ""
        label += "".join(f" {k[0]}{s[k]:g}" for k, base in (("gamma", 0), ("amplify", 1)) if s.get(k, base) != base)
        ax.annotate(label, (p["max_perplexity_ratio"], p["min_shift"]), fontsize=7)
        if p.get("chosen"):
            ax.scatter([p["max_perplexity_ratio"]], [p["min_shift"]], marker="*", s=160, c="red", label="chosen")
    ax.axvline(bound, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("worst persona's perplexity / dense (validation)")
    ax.set_ylabel("weaker persona's paired shift (nats/token)")
    ax.set_title("tune grid (labels: sparsity/steer, l = steer layers, g = gamma, a = amplify)")
    ax.legend()
    save_png(fig, path)


def tune_markdown(report: dict[str, Any]) -> str:
    with_replies = any("reply_gap" in p for p in report["grid"])
    rows = []
    for p in report["grid"]:
        cells = _setting_cells(p["setting"])
        if "error" in p:
            rows.append([*cells, "–", "–", *(["–", "–"] if with_replies else []), p["error"][:60]])
            continue
        reasons = _outside(report, p["max_perplexity_ratio"], p.get("max_repeated_4grams_over_dense", 0.0))
        mark = "**chosen**" if p.get("chosen") else "; ".join(reasons)
        if not p["removes"] and not mark:
            mark = "reference (removes nothing)"
        figures = [f"{p['min_shift']:+.3f}", f"{p['max_perplexity_ratio']:.3f}"]
        if with_replies:
            figures += [f"{p['reply_gap']:+.3f}", f"{p['max_repeated_4grams_over_dense']:+.3f}"]
        rows.append([*cells, *figures, mark])
    header = [*SETTING_HEADER, "weaker shift (val)", "worst ppl ratio (val)"]
    if with_replies:
        header += ["reply gap (val)", "worst repeated 4-grams - dense (val)"]
    header.append("")
    lines = [f"# tune: {report['recipe']}", "", f"Selection: {report['selection']}.", "", md_table(header, rows), ""]
    if with_replies:
        first = next(p for p in report["grid"] if "prompt_only_reply_gap" in p)
        lines += [
            f"Prompt-only reply gap on the same prompts (dense model): {first['prompt_only_reply_gap']:+.3f}.",
            "",
        ]
    lines += _persona_tables(report)
    lines += ["![pareto](pareto.png)", ""]
    if report["chosen"] is None:
        lines.append("**No point is within the bounds**, so nothing was chosen or evaluated on the test items.")
        return "\n".join(lines) + "\n"
    lines += [f"## The chosen setting on the test items: {report['chosen']}", ""]
    for persona, ev in report["test"].items():
        acc = ev.get("acceptance") or {}
        checks = "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in acc.get("checks", {}).items())
        row = next((r for r in ev["rows"] if r["condition"] == "mask-only"), None)
        if row is not None and "paired" in row:
            lines.append(f"- {persona}: shift {row['paired']['shift']['mean']:+.3f} nats/token; {checks}")
    return "\n".join(lines) + "\n"


SETTING_HEADER = ["sparsity", "steer", "steer layers", "compensate", "gamma", "amplify"]


def _setting_cells(s: dict[str, Any]) -> list[str]:
    """A grid point's setting as the cells under SETTING_HEADER."""
    cells = [
        value_label(s["sparsity"]),
        value_label(s["steer"]),
        value_label(s.get("steer_layers", 1.0)),
        s["compensate"],
    ]
    return [*cells, f"{s.get('gamma', 0.0):g}", f"{s.get('amplify', 1.0):g}"]


def _outside(report: dict[str, Any], perplexity_ratio: float, repeated_over_dense: float) -> list[str]:
    """Which of the tune's bounds these figures break (the test `_within` applies when choosing)."""
    reasons = []
    if perplexity_ratio > report["max_perplexity_ratio"]:
        reasons.append("over the perplexity bound")
    bound = report.get("max_repeated_4grams_over_dense")
    if bound is not None and repeated_over_dense > bound:
        reasons.append("repeats itself more than the bound")
    return reasons


def _for_persona(setting: dict[str, Any], persona: str) -> dict[str, Any]:
    """The setting as one persona's export sees it: its own sparsity and steering (alpha, depth), by the recipe's
    rules for a persona left out of a per-persona mapping."""
    method = MethodSpec.model_construct(steer=setting["steer"], steer_layers=setting.get("steer_layers", 1.0))
    sparsity = per_persona(setting["sparsity"], persona, 0.0)
    return setting | {"sparsity": sparsity, "steer": method.alpha(persona), "steer_layers": method.depth(persona)}


def _persona_tables(report: dict[str, Any]) -> list[str]:
    """One table per persona: its own figures at every grid point, the point its export was taken from marked."""
    points = [p for p in report["grid"] if "error" not in p and not p.get("combined")]
    chosen = next((p for p in report["grid"] if p.get("chosen")), None)
    if not points:
        return []
    with_replies = all("reply_score" in v for p in points for v in p["personas"].values())
    lines = ["## Each persona at each grid point (validation)", ""]
    for persona in points[0]["personas"]:
        rows = []
        for p in points:
            v, s = p["personas"][persona], p["setting"]
            reasons = _outside(report, v["perplexity_ratio"], v.get("repeated_4grams_over_dense", 0.0))
            taken = chosen is not None and _for_persona(chosen["setting"], persona) == _for_persona(s, persona)
            cells = [*_setting_cells(s), f"{v['shift']:+.3f}", f"{v['perplexity_ratio']:.3f}"]
            if with_replies:
                cells += [f"{v['reply_score']:+.3f}", f"{v['repeated_4grams_over_dense']:+.3f}"]
            rows.append([*cells, "**chosen**" if taken else "; ".join(reasons)])
        header = [*SETTING_HEADER, "shift", "ppl ratio"]
        if with_replies:
            header += ["reply score", "repeated 4-grams - dense"]
        lines += [f"### {persona}", "", md_table([*header, ""], rows), ""]
    return lines
