"""`persona-export tune RECIPE --out DIR`: choose a setting on validation items, report it on test items.

Calibrate once; for every point of the recipe's `tune` grid (MLP sparsity x steering alpha x steered layers x
compensation x soft-mask factor x amplification) compute the masks and biases and score them on
`tune.validation` (paired shift, neutral perplexity and, when given, the replies; no baselines). The chosen
point has the largest paired shift of its weaker persona among the points whose every persona stays within
`max_perplexity_ratio` x dense perplexity (and the replies' repetition bound). Only that point is evaluated on
the recipe's `eval` section, with every baseline, and the two sets of items must not share a prompt or an
answer: tune never reports on what it chose on. With `tune.mix_scale` the grid scales the composites' weights
instead, the composites are the personas scored, and a composite's shift is its weakest own axis's. With
`tune.per_persona` a persona with no setting within the bounds is left out of the chosen recipe, the others
still chosen. Writes report.json, report.md, pareto.png and the chosen recipe.yaml; when no point is within the
bounds, the grid's figures (report.json, report.md, pareto.png) and an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from exporter.errors import MaskError, RecipeError
from exporter.evaluation.items import EvalItems, check_disjoint_splits, prepare
from exporter.evaluation.scorer import MaskScorer
from exporter.io import TUNE_FOLDER, staged, write_json
from exporter.masking.collect import column_norms, persona_statistics
from exporter.masking.masks import PersonaMask, compute_masks
from exporter.masking.mix import composite_masks
from exporter.masking.steer import with_biases
from exporter.model.sources import Loaded, load_model
from exporter.recipe.eval import EvalSpec
from exporter.recipe.rules import tuned_composites
from exporter.recipe.schema import Recipe, TuneSpec
from exporter.recipe.tune import Setting, grid, tune_validation
from exporter.reports.evaluation import PersonaEvaluation, RepliesEvaluation, Splits
from exporter.reports.provenance import Timer
from exporter.reports.tune import (
    Bounds,
    FailedPoint,
    GridPoint,
    PersonaPoint,
    TuneCost,
    TuneReport,
    cost_line,
    plot_pareto,
    tune_markdown,
)
from exporter.stages.preflight import check_output, validate

log = logging.getLogger(__name__)
Candidate = tuple[Recipe, dict[str, PersonaMask]]  # a scored point's recipe and masks


@dataclass
class Spend:
    """The grid's cost as it accrues (TuneCost once done)."""

    seconds: dict[str, float]
    points: int = 0
    perplexity_scored: int = 0
    rejected_on_perplexity: int = 0
    shift_scored: int = 0
    replies_scored: int = 0

    def record(self) -> TuneCost:
        fields = {k: v for k, v in vars(self).items() if k != "seconds"}
        return TuneCost(seconds={k: round(v, 1) for k, v in self.seconds.items()}, **fields)


def tune(recipe: Recipe, out: Path, *, overwrite: bool = False, reuse: Path | None = None) -> TuneReport:
    spec, test = recipe.tune, recipe.eval
    if spec is None or test is None:
        raise RecipeError("tune: the recipe needs a 'tune' section (grid + validation items) and an 'eval' section")
    v = spec.validation
    if (v.paired is None and v.unpaired is None and v.choices is None) or v.neutral is None:
        raise RecipeError(
            "tune.validation: give 'neutral' and one of 'paired', 'unpaired' or 'choices' (the perplexity and the "
            "shift it ranks by)"
        )
    validate(recipe, reuse)  # what `persona-export validate` checks, before the model loads
    check_output(recipe, out, overwrite, TUNE_FOLDER)
    validation = tune_validation(spec)
    val_items, test_items = prepare(recipe, validation), prepare(recipe, test)
    check_disjoint_splits(val_items, test_items)
    m = load_model(recipe)
    replies = validation.replies is not None  # the repetition bound reads them
    bounds = Bounds(
        spec.max_perplexity_ratio, validation.acceptance.max_repeated_4grams_over_dense if replies else None
    )
    scorer = MaskScorer(recipe, validation, val_items, m.model, m.tokenizer, m.adapter)
    MaskScorer(recipe, test, test_items, m.model, m.tokenizer, m.adapter)  # test items that do not fit fail now
    stages = ("statistics", "masks", "perplexity", "shift", "replies", "test")
    cost = Spend(dict.fromkeys(stages, 0.0))
    points, candidates, evals = score_grid(recipe, scorer, m, reuse, bounds, cost)
    points = decode_replies(scorer, points, candidates, evals, bounds, cost)
    if spec.per_persona:
        scored = [p for p in points if isinstance(p, GridPoint)]  # aligned with candidates
        for point, candidate in per_persona_points(recipe, scored, candidates, bounds, spec.require_removal):
            points.append(point)
            candidates.append(candidate)
    report = TuneReport(
        recipe=recipe.name,
        selection=selection(spec, validation),
        max_perplexity_ratio=spec.max_perplexity_ratio,
        max_repeated_4grams_over_dense=bounds.max_repeated,
        validation_splits=Splits.model_validate(val_items.splits),
        grid=points,
        chosen=None,
        test=None,
    )
    t = time.perf_counter()
    report = chosen_on_test(report, candidates, test, test_items, m)
    cost.seconds["test"] = time.perf_counter() - t
    record = cost.record()
    report = report.model_copy(update={"cost": record})
    log.info("tune: %s", cost_line(record))
    write_tune(out, overwrite, report, candidates)
    if report.chosen is None:
        raise RecipeError(
            f"tune: no point of the grid keeps perplexity within {spec.max_perplexity_ratio}x dense"
            + (f" and repeated 4-grams within dense + {bounds.max_repeated}" if bounds.max_repeated is not None else "")
            + " on the validation items"
            + (" while removing units" if spec.require_removal else "")
            + f"; each point's figures are in {out}/report.md; add smaller sparsities or steering strengths"
        )
    if left := report.left_out:
        log.warning(
            "tune: no setting keeps %s within the bounds on the validation items: left out of the chosen recipe "
            "(their figures at every grid point are in %s/report.md)",
            ", ".join(left),
            out,
        )
    return report


def selection(spec: TuneSpec, validation: EvalSpec) -> str:
    """How the point is chosen, in words (report.md, report.json)."""
    max_repeated = validation.acceptance.max_repeated_4grams_over_dense
    mixed = spec.mix_scale is not None
    own = "its weights' factor" if mixed else "sparsity and steering (alpha, layers)"
    return (
        "largest shift (paired, else unpaired, else A/B letter margin) of the weaker persona on the validation items "
        + ("(a composite's shift: its weakest own axis's) " if mixed else "")
        + "(a tie: the larger sum of every persona's shift), every persona's "
        f"perplexity <= {spec.max_perplexity_ratio}x dense"
        + (f" and its replies' repeated 4-grams <= dense + {max_repeated}" if validation.replies is not None else "")
        + (
            f"; each persona's {own} chosen on its own (its largest shift within the bounds, the other settings "
            "equal), a persona with none within the bounds left out of the exports (only when no point keeps them all)"
            if spec.per_persona
            else ""
        )
    )


def score_grid(
    recipe: Recipe, scorer: MaskScorer, m: Loaded, reuse: Path | None, bounds: Bounds, cost: Spend
) -> tuple[list[GridPoint | FailedPoint], list[Candidate], list[dict[str, PersonaEvaluation]]]:
    """Every grid point's masks scored on the validation items, cheapest first: each persona's neutral
    perplexity, then its answers (the shift) only when that is within the bound; no replies yet
    (`decode_replies`). The dense model's scores once. Returns the candidates (recipe and masks) of the points
    scored and their evaluations, in their order; `cost` receives the seconds and counts."""
    assert recipe.tune is not None
    seconds = cost.seconds
    t = time.perf_counter()
    timer = Timer()
    # the poles: a composite follows from its parts' settings (tune.mix_scale scores the composites alone)
    stats = {p: persona_statistics(recipe, p, m, reuse, timer)[0] for p in recipe.poles}
    composites = tuned_composites(recipe) if recipe.tune.mix_scale is not None else []
    col_sq = column_norms(m)
    seconds["statistics"] = time.perf_counter() - t
    points: list[GridPoint | FailedPoint] = []
    candidates: list[Candidate] = []
    evaluations: list[dict[str, PersonaEvaluation]] = []
    for setting, r in grid(recipe):
        log.info("tune: %s", setting.model_dump())
        t = time.perf_counter()
        try:
            hard = composite_masks(r, stats, col_sq, composites) if composites else compute_masks(r, stats, col_sq)
            masks = with_biases(r, hard, stats, m.model, m.adapter, torch.float32)
        except MaskError as exc:
            points.append(FailedPoint(setting=setting, error=str(exc)))
            continue
        finally:
            seconds["masks"] += time.perf_counter() - t
        cost.points += 1
        mlp = r.prune.mlp
        assert mlp is not None
        if composites:
            removes = all(k.pruned_geometry() != k.geometry for k in masks.values())
        else:
            removes = all(mlp.fraction(p) > 0 for p in masks)
        removes = removes and mlp.gamma == 0  # gamma > 0 keeps every unit
        point, evals = score_point(scorer, setting, masks, bounds, cost)
        point = point.model_copy(
            update={"removes": removes, "feasible": point.feasible and (removes or not recipe.tune.require_removal)}
        )
        log.info(
            "tune: %s weaker shift %s, worst perplexity %.3fx%s",
            setting.model_dump(),
            f"{point.min_shift:+.3f}" if point.min_shift is not None else "not scored (a persona outside a bound)",
            point.max_perplexity_ratio,
            "" if removes else " (reference: removes nothing)",
        )
        points.append(point)
        candidates.append((r, masks))
        evaluations.append(evals)
    return points, candidates, evaluations


def score_point(
    scorer: MaskScorer, setting: Setting, masks: dict[str, PersonaMask], bounds: Bounds, cost: Spend
) -> tuple[GridPoint, dict[str, PersonaEvaluation]]:
    """One point, early rejection first: perplexity of every persona's mask, then (`tune.replies:
    before-shift`) the replies of those within the bound, then the answers of those within every bound.
    Returns the point's figures and the evaluations they came from."""
    t = time.perf_counter()
    known = scorer.perplexity(masks)
    ratios = scorer.perplexity_ratios(known)
    cost.seconds["perplexity"] += time.perf_counter() - t
    within = [p for p in masks if ratios[p] <= bounds.max_perplexity_ratio]
    cost.perplexity_scored += len(masks)
    cost.rejected_on_perplexity += len(masks) - len(within)
    answered = replies_before_shift(scorer, masks, within, cost)
    repeated = {p: r.repeated_over_dense for p, r in answered.items()}
    if answered:  # no reply figure (its opposite not exported) is outside the bound, as in the other modes
        within = [
            p
            for p in within
            if p in repeated
            and bounds.admit(
                PersonaPoint(shift=None, perplexity_ratio=ratios[p], repeated_4grams_over_dense=repeated[p])
            )
        ]
    cost.shift_scored += len(within)
    timings: dict[str, float] = {}
    evals = (
        scorer.evaluate({p: masks[p] for p in within}, replies=False, timings=timings, known=known) if within else {}
    )
    evals = {p: ev.model_copy(update={"replies": answered[p]}) if p in answered else ev for p, ev in evals.items()}
    cost.seconds["shift"] += timings.get("eval_scores", 0.0)
    point = grid_point(setting, evals, True, bounds, False)
    rejected = {
        p: PersonaPoint(shift=None, perplexity_ratio=ratios[p], repeated_4grams_over_dense=repeated.get(p))
        for p in masks
        if p not in within
    }
    if not rejected:
        return point, evals
    point = with_rejected(point, {p: rejected.get(p) or point.personas[p] for p in masks}, max(ratios.values()))
    if repeated:
        worst = max(repeated.values())
        point = point.model_copy(update={"max_repeated_4grams_over_dense": worst})
    return point, evals


def with_rejected(point: GridPoint, personas: dict[str, PersonaPoint], max_perplexity_ratio: float) -> GridPoint:
    """`point` (its scored personas' figures) with every persona's figures, some rejected before their answers
    were scored: no weaker shift, not feasible, and no pair gap (its personas are not one scored pair)."""
    return point.model_copy(
        update={
            "personas": personas,
            "min_shift": None,
            "max_perplexity_ratio": max_perplexity_ratio,
            "reply_gap": None,
            "prompt_only_reply_gap": None,
            "feasible": False,
        }
    )


def replies_before_shift(
    scorer: MaskScorer, masks: dict[str, PersonaMask], within: list[str], cost: Spend
) -> dict[str, RepliesEvaluation]:
    """With `tune.replies: before-shift`, the greedy validation replies of the personas within the perplexity
    bound, each beside its opposite (decoded for the gap even where that one is over the bound); else none."""
    spec = scorer.recipe.tune
    assert spec is not None
    if spec.replies != "before-shift" or not within or scorer.spec.replies is None or not scorer.items.reply_prompts:
        return {}
    opposite = scorer.replier.opposite
    want = set(within) | {q for p in within if (q := opposite.get(p)) in masks}
    t = time.perf_counter()
    answered = scorer.replies({p: m for p, m in masks.items() if p in want}, shipped=False)
    cost.seconds["replies"] += time.perf_counter() - t
    cost.replies_scored += 1
    return {p: r for p, r in answered.items() if p in within}


def decode_replies(
    scorer: MaskScorer,
    points: list[GridPoint | FailedPoint],
    candidates: list[Candidate],
    evals: list[dict[str, PersonaEvaluation]],
    bounds: Bounds,
    cost: Spend,
) -> list[GridPoint | FailedPoint]:
    """The points with their greedy validation replies decoded where they can decide the choice: the replies
    only bound the repetition, so a persona's replies at a point are needed only when no point of larger shift
    is already within every bound. Taken best shift first (ties in grid order), the search decodes until the
    first point within the bounds: with `tune.per_persona` for each persona in each group of points that
    differ only in its own settings, decoding that persona and its opposite only (the reply gap needs both; a
    composite's opposite is its mirror); without it, or where a combined point may remove nothing, for the
    whole point (the largest weaker shift). The choice is the one decoding every point would make (`tune.replies:
    every` does that, for a reply figure at every point), short of an exact tie between a combined point and a
    whole one. A persona is decoded where it is within the perplexity bound; one over it stays rejected."""
    spec = scorer.recipe.tune
    assert spec is not None
    if scorer.spec.replies is None or not scorer.items.reply_prompts or spec.replies == "before-shift":
        return points  # nothing to decode, or decoded already (score_point)
    out = list(points)
    where = [i for i, p in enumerate(out) if isinstance(p, GridPoint)]  # aligned with candidates and evals
    scored = [p for p in out if isinstance(p, GridPoint)]
    decoded: dict[int, set[str]] = {}
    opposite = scorer.replier.opposite  # a pole's partner, a composite's mirror

    def with_replies(k: int, who: list[str] | None = None) -> GridPoint:
        """Point k (an index into `scored`) with the replies of `who` (default: every persona there) and their
        opposites decoded, each once."""
        masks = candidates[k][1]
        want = set(masks) if who is None else set(who)
        want |= {q for p in want if (q := opposite.get(p)) in masks}
        todo = sorted(want - decoded.get(k, set()))
        if not todo:
            return scored[k]
        if k not in decoded:
            cost.replies_scored += 1
        decoded.setdefault(k, set()).update(todo)
        t = time.perf_counter()
        answered = scorer.replies({p: masks[p] for p in todo}, shipped=False)
        cost.seconds["replies"] += time.perf_counter() - t
        evals[k] = {
            p: ev.model_copy(update={"replies": answered[p]}) if p in answered else ev for p, ev in evals[k].items()
        }
        old = scored[k]
        new = grid_point(old.setting, evals[k], old.removes, bounds, spec.require_removal)
        if set(evals[k]) != set(old.personas):  # a persona over the perplexity bound keeps its rejection
            personas = {p: new.personas.get(p) or old.personas[p] for p in old.personas}
            new = with_rejected(new, personas, old.max_perplexity_ratio)
        scored[k] = new
        out[where[k]] = new
        log.info(
            "tune: %s replies of %s decoded: worst repeated 4-grams over dense %+.3f",
            old.setting.model_dump(),
            ", ".join(todo),
            new.max_repeated_4grams_over_dense or 0.0,
        )
        return scored[k]

    if spec.replies == "every":
        for k, point in enumerate(scored):
            if any(v.shift is not None for v in point.personas.values()):
                with_replies(k)
        return out
    if spec.per_persona:
        for members in groups(scored).values():
            for p in scored[members[0]].personas:
                within = [k for k in members if scored[k].personas[p].shift is not None]
                for k in sorted(within, key=lambda k: -(scored[k].personas[p].shift or 0.0)):
                    if bounds.admit(with_replies(k, [p]).personas[p]):
                        break
    # with per_persona, a point combining each persona's best already outranks every whole point, unless it may
    # not remove units (a reference point picked, removal required): then the whole points decide
    if not spec.per_persona or (spec.require_removal and not all(p.removes for p in scored)):
        whole = [k for k, p in enumerate(scored) if p.min_shift is not None]  # every persona within perplexity
        for k in sorted(
            (k for k in whole if scored[k].removes or not spec.require_removal),
            key=lambda k: rank(scored[k]),
            reverse=True,
        ):
            if with_replies(k).feasible:
                break
    return out


def grid_point(
    setting: Setting, evals: dict[str, PersonaEvaluation], removes: bool, bounds: Bounds, require_removal: bool
) -> GridPoint:
    """A point's figures: each persona's mask-only shift and perplexity (and reply score and repetition over
    the dense model's replies), the weaker shift, the worst perplexity, and the pair's reply gaps."""
    per: dict[str, PersonaPoint] = {}
    for p, ev in evals.items():
        row, shifts = ev.row("mask-only"), ev.own_shifts()
        assert row is not None and shifts and row.neutral is not None
        # a composite's shift: its weakest own axis's (a pole has one axis)
        per[p] = PersonaPoint(shift=min(shifts), perplexity_ratio=row.neutral.perplexity_ratio)
        if ev.replies is not None:
            per[p] = per[p].model_copy(
                update={
                    "reply_score": ev.replies.conditions["export"].score.mean,
                    "repeated_4grams_over_dense": ev.replies.repeated_over_dense,
                }
            )
    replies = [ev.replies for ev in evals.values() if ev.replies is not None]
    # a pair's gap is the same from either side, up to its sign; more personas have no one gap
    first = replies[0] if replies and len(evals) == 2 and replies[0].opposite in evals else None
    shifts = [v.shift for v in per.values() if v.shift is not None]
    return GridPoint(
        setting=setting,
        personas=per,
        min_shift=min(shifts) if shifts else None,
        max_perplexity_ratio=max((v.perplexity_ratio for v in per.values()), default=0.0),
        reply_gap=first.gap["export"].mean if first else None,
        prompt_only_reply_gap=first.gap["prompt_only"].mean if first else None,
        max_repeated_4grams_over_dense=max(
            (v.repeated_4grams_over_dense for v in per.values() if v.repeated_4grams_over_dense is not None),
            default=None,
        ),
        removes=removes,
        feasible=all(bounds.admit(v) for v in per.values()) and (removes or not require_removal),
    )


def per_persona_points(
    recipe: Recipe, scored: list[GridPoint], candidates: list[Candidate], bounds: Bounds, require_removal: bool
) -> list[tuple[GridPoint, Candidate]]:
    """Points whose sparsity and steering are chosen per persona. A persona's export depends only on its own
    sparsity (its mask scores its units against its partner's statistics, whatever the partner removes) and its
    own steering, so among grid points that differ only in single-number `sparsity` / `steer` / `steer_layers`,
    each persona takes the point of its largest shift within the bounds; the new point combines those exports
    (the three as mappings). A persona with no point within the bounds is left out of the combined point (its
    export is not made; `GridPoint.left_out`), which ranks below every point that keeps all personas. With
    amplify > 1 a persona's export also depends on its partner's mask, so its sparsity stays common there."""
    out = []
    for members in groups(scored).values():
        personas = scored[members[0]].personas
        pick = {}
        for p in personas:
            ok = [i for i in members if bounds.admit(scored[i].personas[p])]
            if ok:
                pick[p] = max(ok, key=lambda i: scored[i].personas[p].shift or 0.0)  # admitted: scored
        if not pick or (len(pick) == len(personas) and len(set(pick.values())) == 1):
            continue  # no persona has a point within the bounds, or one point already serves every persona
        if len(pick) < len(personas) and not exported_without(recipe, [p for p in personas if p not in pick]):
            continue  # what is left out is all the run exports
        out.append(combined_point(recipe, scored, candidates, members[0], pick, require_removal))
    return out


def groups(scored: list[GridPoint]) -> dict[str, list[int]]:
    """The grid points (indices into `scored`) that differ only in the settings a persona takes on its own."""
    out: dict[str, list[int]] = {}
    for i, point in enumerate(scored):
        s = point.setting
        if not s.per_persona:
            rest = {k: v for k, v in s.model_dump().items() if k not in s.own()}
            out.setdefault(repr(sorted(rest.items())), []).append(i)
    return out


def combined_point(
    recipe: Recipe,
    scored: list[GridPoint],
    candidates: list[Candidate],
    first: int,
    pick: dict[str, int],
    require_removal: bool,
) -> tuple[GridPoint, Candidate]:
    """The point that takes each persona's export from the grid point `pick[persona]`; its recipe is `recipe`
    (the tuned one, before any point's setting) with the combined setting, exporting only the personas picked."""
    setting = scored[first].setting
    left_out = [p for p in scored[first].personas if p not in pick]
    chosen = {k: {p: getattr(scored[i].setting, k) for p, i in pick.items()} for k in setting.own()}
    per = {p: scored[i].personas[p] for p, i in pick.items()}
    removes = all(scored[i].removes for i in pick.values())
    # each export's score is toward its own persona, so a pair's gap is the sum of the two (mean over prompts:
    # the per-prompt gap averaged)
    scores = [v.reply_score for v in per.values()]
    repeated = [v.repeated_4grams_over_dense for v in per.values()]
    replied = all(s is not None for s in scores)
    pair = replied and len(per) == 2 and not left_out  # a pair's gap; more personas have no one gap
    # the dense model's prompt-only gap is the same at every point of the pair (a point with one persona
    # rejected has none)
    prompt_only = next((q.prompt_only_reply_gap for q in scored if q.prompt_only_reply_gap is not None), None)
    point = GridPoint(
        setting=setting.model_copy(update=chosen),
        combined=True,
        left_out=left_out or None,
        personas=per,
        min_shift=min(v.shift or 0.0 for v in per.values()),  # each admitted, so scored
        max_perplexity_ratio=max(v.perplexity_ratio for v in per.values()),
        reply_gap=sum(s for s in scores if s is not None) if pair else None,
        prompt_only_reply_gap=prompt_only if pair else None,
        max_repeated_4grams_over_dense=max(r for r in repeated if r is not None) if replied else None,
        removes=removes,
        feasible=removes or not require_removal,  # within the bounds by construction
    )
    masks = {p: candidates[i][1][p] for p, i in pick.items()}
    applied = point.setting.applied(recipe)
    if left_out:
        output = applied.output.model_copy(update={"personas": exported_without(recipe, left_out)})
        applied = applied.model_copy(update={"output": output})
    return point, (applied, masks)


def exported_without(recipe: Recipe, left_out: list[str]) -> list[str]:
    """The personas the recipe exports, less those left out and the composites that mix a left-out pole."""
    dropped = set(left_out) | {c for c, spec in recipe.composites.items() if set(spec.mix) & set(left_out)}
    return [p for p in recipe.exported if p not in dropped]


def rank(point: GridPoint) -> tuple[int, float, float]:
    """What the choice maximises: the personas kept (a point that leaves some out, for want of any setting
    within the bounds, only where no point keeps them all), the weaker persona's shift, then (a tie, e.g. a
    per-persona point that keeps the weaker persona's export and strengthens the other's) the sum of every
    persona's shift. Only points whose every persona was scored are ranked (feasible, or within the perplexity
    bound)."""
    shifts = [v.shift or 0.0 for v in point.personas.values()]
    return (-len(point.left_out or []), point.min_shift or 0.0, sum(shifts))


def chosen_on_test(
    report: TuneReport, candidates: list[Candidate], test: EvalSpec, items: EvalItems, m: Loaded
) -> TuneReport:
    """The report with its best feasible point marked and evaluated on the test items (unchanged without one)."""
    scored = report.scored  # aligned with candidates
    feasible = [i for i, p in enumerate(scored) if p.feasible]
    if not feasible:
        return report
    best = max(feasible, key=lambda i: rank(scored[i]))
    chosen, masks = candidates[best]
    log.info("tune: chosen %s; evaluating it on the test items", scored[best].setting.model_dump())
    evaluations = MaskScorer(chosen, test, items, m.model, m.tokenizer, m.adapter).evaluate(masks)
    grid = [p.model_copy(update={"chosen": True}) if p is scored[best] else p for p in report.grid]
    return report.model_copy(update={"grid": grid, "chosen": scored[best].setting, "test": evaluations})


def write_tune(out: Path, overwrite: bool, report: TuneReport, candidates: list[Candidate]) -> None:
    """report.json, report.md, pareto.png and, when a point was chosen, its recipe.yaml; without one the grid's
    figures are still written: they tell the user where to search next."""
    with staged(out, overwrite, TUNE_FOLDER) as stage:
        write_json(stage / "report.json", report.model_dump())
        if report.chosen is not None:
            best = next(i for i, p in enumerate(report.scored) if p.chosen)
            final = candidates[best][0].model_copy(update={"tune": None})
            recipe_yaml = f"# chosen by `persona-export tune` on the validation items: {report.chosen.model_dump()}\n"
            if report.left_out:
                recipe_yaml += f"# left out (no setting within the bounds): {', '.join(report.left_out)}\n"
            recipe_yaml += yaml.safe_dump(final.model_dump(mode="json", exclude_none=True), sort_keys=False)
            (stage / "recipe.yaml").write_text(recipe_yaml)
        plot_pareto(report.scored, stage / "pareto.png", report.max_perplexity_ratio)
        (stage / "report.md").write_text(tune_markdown(report))
