"""`tune`'s report: its typed record (report.json: every grid point's figures on the validation items, the chosen
setting and its evaluation on the test items), report.md and the Pareto plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.recipe.tune import Setting
from exporter.reports.evaluation import PersonaEvaluation, Splits
from exporter.reports.markdown import md_table, save_png
from exporter.reports.record import Record


class PersonaPoint(Record):
    """One persona's export at a grid point (validation items)."""

    shift: float | None  # None: over the perplexity bound, so its shift was never scored (early rejection)
    perplexity_ratio: float
    reply_score: float | None = None
    repeated_4grams_over_dense: float | None = None


class GridPoint(Record):
    """A grid point scored on the validation items. `combined`: each persona's export taken from the point of
    its own best sparsity and steering (tune.per_persona); `left_out`: the personas a combined point has no
    export of, none of their settings being within the bounds (the others are still chosen)."""

    setting: Setting
    combined: bool | None = None
    left_out: list[str] | None = None
    personas: dict[str, PersonaPoint]
    min_shift: float | None  # the weaker persona's; None when a persona was rejected on perplexity alone
    max_perplexity_ratio: float  # the worst persona's
    reply_gap: float | None = None
    prompt_only_reply_gap: float | None = None
    max_repeated_4grams_over_dense: float | None = None
    removes: bool  # every persona removes units
    feasible: bool  # within the bounds, and removes units unless tune.require_removal is off
    chosen: bool | None = None


class FailedPoint(Record):
    """A grid point whose masks could not be made."""

    setting: Setting
    error: str


@dataclass(frozen=True)
class Bounds:
    """What a persona's export must stay within: perplexity over dense, and (replies scored) repeated 4-grams
    over the dense model's replies."""

    max_perplexity_ratio: float
    max_repeated: float | None

    def outside(self, perplexity_ratio: float, repeated_over_dense: float | None) -> list[str]:
        """Which bounds these figures break."""
        reasons = []
        if perplexity_ratio > self.max_perplexity_ratio:
            reasons.append("over the perplexity bound")
        if self.max_repeated is None or reasons:
            return reasons
        if repeated_over_dense is None:  # tune decodes replies best shift first, until one is within the bounds
            reasons.append("replies not decoded (a point of larger shift is within the bounds)")
        elif repeated_over_dense > self.max_repeated:
            reasons.append("repeats itself more than the bound")
        return reasons

    def admit(self, figures: PersonaPoint) -> bool:
        return not self.outside(figures.perplexity_ratio, figures.repeated_4grams_over_dense)


class TuneCost(Record):
    """What the grid cost: seconds per stage and how much each stage scored. Early rejection: each persona's
    neutral perplexity first (one pass over the neutral text per mask); only the personas within the bound have
    their validation answers scored; replies only where a persona is within the bound, best shift first until
    one is within every bound (tune.replies: best-first)."""

    seconds: dict[str, float]  # statistics, masks, perplexity, shift, replies, test (the chosen point's evaluation)
    points: int  # grid points with masks
    perplexity_scored: int  # persona exports whose neutral perplexity was scored
    rejected_on_perplexity: int  # of those, over the bound: never scored for shift or replies
    shift_scored: int  # persona exports whose validation answers were scored
    replies_scored: int  # grid points whose replies were generated and scored


class TuneReport(Record):
    recipe: str
    selection: str
    max_perplexity_ratio: float
    max_repeated_4grams_over_dense: float | None
    validation_splits: Splits
    grid: list[GridPoint | FailedPoint]
    chosen: Setting | None  # None (written as null) when no point is within the bounds
    test: dict[str, PersonaEvaluation] | None
    cost: TuneCost | None = None

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.max_perplexity_ratio, self.max_repeated_4grams_over_dense)

    @property
    def scored(self) -> list[GridPoint]:
        return [p for p in self.grid if isinstance(p, GridPoint)]

    @property
    def left_out(self) -> list[str]:
        """The personas the chosen point has no export of (none of their settings within the bounds)."""
        chosen = next((p for p in self.scored if p.chosen), None)
        return list(chosen.left_out or []) if chosen is not None else []


def value_label(value: float | dict[str, float]) -> str:
    """A setting given once or per persona: 1.5, or 'introvert 1.5, extravert 1'."""
    return ", ".join(f"{p} {a:g}" for p, a in value.items()) if isinstance(value, dict) else f"{value:g}"


def front(points: list[GridPoint]) -> list[GridPoint]:
    """Points no other point beats on both shift (higher) and perplexity (lower)."""
    return [
        p
        for p in points
        if not any(
            q.min_shift >= p.min_shift  # type: ignore[operator]
            and q.max_perplexity_ratio <= p.max_perplexity_ratio
            and (q.min_shift, q.max_perplexity_ratio) != (p.min_shift, p.max_perplexity_ratio)
            for q in points
        )
    ]


def plot_pareto(points: list[GridPoint], path: Path, bound: float) -> None:
    from matplotlib.figure import Figure

    points = [p for p in points if p.min_shift is not None]  # rejected on perplexity: no shift to plot
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    ax.scatter([p.max_perplexity_ratio for p in points], [p.min_shift or 0.0 for p in points], c="grey", s=18)
    best = sorted(front(points), key=lambda p: p.max_perplexity_ratio)
    ax.plot([p.max_perplexity_ratio for p in best], [p.min_shift or 0.0 for p in best], "-o", label="Pareto front")
    for p in points:
        s = p.setting
        label = f"{value_label(s.sparsity)}/{value_label(s.steer)}"
        label += f" l{value_label(s.steer_layers)}" if s.steer_layers != 1.0 else ""
        label += "".join(
            f" {k[0]}{getattr(s, k):g}" for k, base in (("gamma", 0), ("amplify", 1)) if getattr(s, k) != base
        )
        label = label if s.mix_scale is None else f"x{value_label(s.mix_scale)}"
        ax.annotate(label, (p.max_perplexity_ratio, p.min_shift), fontsize=7)
        if p.chosen:
            ax.scatter([p.max_perplexity_ratio], [p.min_shift or 0.0], marker="*", s=160, c="red", label="chosen")
    ax.axvline(bound, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("worst persona's perplexity / dense (validation)")
    ax.set_ylabel("weaker persona's paired shift (nats/token)")
    ax.set_title("tune grid (labels: sparsity/steer, l = steer layers, g = gamma, a = amplify)")
    ax.legend()
    save_png(fig, path)


SETTING_HEADER = ["sparsity", "steer", "steer layers", "steer vector", "compensate", "gamma", "amplify"]


def setting_header(report: TuneReport) -> list[str]:
    """The setting's columns: SETTING_HEADER, then the composites' mix factor when the grid scales them."""
    scaled = any(p.setting.mix_scale is not None for p in report.grid)
    return [*SETTING_HEADER, "mix scale"] if scaled else SETTING_HEADER


def setting_cells(s: Setting) -> list[str]:
    """A grid point's setting as the cells under setting_header()."""
    vector = (
        s.steer_vector if isinstance(s.steer_vector, str) else ", ".join(f"{p}: {v}" for p, v in s.steer_vector.items())
    )
    cells = [value_label(s.sparsity), value_label(s.steer), value_label(s.steer_layers), vector, s.compensate]
    scale = [] if s.mix_scale is None else [value_label(s.mix_scale)]
    return [*cells, f"{s.gamma:g}", f"{s.amplify:g}", *scale]


def grid_table(report: TuneReport) -> list[str]:
    """Every grid point: its setting, the weaker persona's shift, the worst perplexity (and the replies' gap and
    repetition), and why it was not chosen."""
    with_replies = any(p.reply_gap is not None for p in report.scored)
    rows = []
    for p in report.grid:
        cells = setting_cells(p.setting)
        if isinstance(p, FailedPoint):
            rows.append([*cells, "–", "–", *(["–", "–"] if with_replies else []), p.error[:60]])
            continue
        reasons = report.bounds.outside(p.max_perplexity_ratio, p.max_repeated_4grams_over_dense)
        mark = "**chosen**" if p.chosen else "; ".join(reasons)
        if not p.removes and not mark:
            mark = "reference (removes nothing)"
        figures = [f"{p.min_shift:+.3f}" if p.min_shift is not None else "–", f"{p.max_perplexity_ratio:.3f}"]
        if with_replies:
            figures += [signed(p.reply_gap), signed(p.max_repeated_4grams_over_dense)]
        rows.append([*cells, *figures, mark])
    header = [*setting_header(report), "weaker shift (val)", "worst ppl ratio (val)"]
    if with_replies:
        header += ["reply gap (val)", "worst repeated 4-grams - dense (val)"]
    lines = [md_table([*header, ""], rows), ""]
    first = next((p for p in report.scored if p.prompt_only_reply_gap is not None), None)
    if with_replies and first is not None:
        lines += [f"Prompt-only reply gap on the same prompts (dense model): {first.prompt_only_reply_gap:+.3f}.", ""]
    return lines


def signed(value: float | None) -> str:
    """A figure with its sign, or a dash where it was not measured."""
    return "–" if value is None else f"{value:+.3f}"


def cost_line(cost: TuneCost) -> str:
    """The grid's cost in one sentence (report.md and the terminal)."""
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in cost.seconds.items())
    return (
        f"Cost: {seconds}; {cost.points} points, {cost.perplexity_scored} persona exports scored on perplexity, "
        f"{cost.rejected_on_perplexity} rejected there (never scored for shift or replies), {cost.shift_scored} "
        f"scored for shift, replies decoded at {cost.replies_scored} points."
    )


def tune_markdown(report: TuneReport) -> str:
    lines = [f"# tune: {report.recipe}", "", f"Selection: {report.selection}.", "", *grid_table(report)]
    if report.cost is not None:
        lines += [cost_line(report.cost), ""]
    lines += persona_tables(report)
    lines += ["![pareto](pareto.png)", ""]
    if report.chosen is None or report.test is None:
        lines.append("**No point is within the bounds**, so nothing was chosen or evaluated on the test items.")
        return "\n".join(lines) + "\n"
    lines += [f"## The chosen setting on the test items: {report.chosen.model_dump()}", ""]
    if report.left_out:
        lines += [
            f"**Left out: {', '.join(report.left_out)}.** No setting of the grid keeps "
            + ("it" if len(report.left_out) == 1 else "them")
            + " within the bounds on the validation items (figures at every point above), so the chosen recipe "
            "does not export " + ("it" if len(report.left_out) == 1 else "them") + "; the others are chosen as usual.",
            "",
        ]
    for persona, ev in report.test.items():
        checks = "; ".join(
            f"{k}: {'yes' if v else 'NO'}" for k, v in (ev.acceptance.checks if ev.acceptance else {}).items()
        )
        shifts = ev.own_shifts()
        if len(shifts) > 1:  # a composite: each own axis, and whether every one moved
            success = {None: "", True: "; switch success: yes", False: "; switch success: NO"}[ev.switch_success]
            lines.append(f"- {persona}: own axes' shifts {' / '.join(f'{x:+.3f}' for x in shifts)} nats/token{success}")
        elif shifts:
            lines.append(f"- {persona}: shift {shifts[0]:+.3f} nats/token; {checks}")
    return "\n".join(lines) + "\n"


def persona_tables(report: TuneReport) -> list[str]:
    """One table per persona: its own figures at every grid point, the point its export was taken from marked."""
    points = [p for p in report.scored if not p.combined]
    chosen = next((p for p in report.scored if p.chosen), None)
    if not points:
        return []
    with_replies = any(v.reply_score is not None for p in points for v in p.personas.values())
    lines = ["## Each persona at each grid point (validation)", ""]
    for persona in points[0].personas:
        rows = []
        for p in points:
            v, s = p.personas[persona], p.setting
            reasons = report.bounds.outside(v.perplexity_ratio, v.repeated_4grams_over_dense)
            taken = (
                chosen is not None
                and persona in chosen.personas
                and chosen.setting.for_persona(persona) == s.for_persona(persona)
            )
            shift = f"{v.shift:+.3f}" if v.shift is not None else "– (not scored)"
            cells = [*setting_cells(s), shift, f"{v.perplexity_ratio:.3f}"]
            if with_replies:
                cells += [signed(v.reply_score), signed(v.repeated_4grams_over_dense)]
            rows.append([*cells, "**chosen**" if taken else "; ".join(reasons)])
        header = [*setting_header(report), "shift", "ppl ratio"]
        if with_replies:
            header += ["reply score", "repeated 4-grams - dense"]
        lines += [f"### {persona}", "", md_table([*header, ""], rows), ""]
        if chosen is not None and persona in (chosen.left_out or []):
            lines += ["**Left out** of the chosen recipe: no point above is within the bounds.", ""]
    return lines
