"""From raw scores (exporter/evaluation/conditions.py) to one persona's evaluation: rows per condition, with
intervals, and the acceptance bar.

Paired margin of persona p over its opposite q, per item: mean per-token log-likelihood of p's answer minus
that of q's answer. Shift: the margin minus the dense model's margin on the same item. Unpaired answers (p's
answers and q's answers to different instructions): shift = mean change against the dense model of p's answers
minus that of q's answers, a difference in differences, each pole resampled on its own for the interval; a
per-item margin does not exist, since no instruction has both answers, and the raw contrast of the two poles'
log-likelihoods mixes the persona with how hard each pole's instructions are, which the per-item dense baseline
removes. A/B choices: per item, the log-likelihood of p's letter minus q's letter as the reply to the question;
accuracy = share of items where it is positive (chance 0.5). Statements: mean log-likelihood of statements
matching p minus that of the others. Random masks: per-item log-likelihoods averaged over the seeds, then the
same statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.evaluation.conditions import Raw, Scores
from exporter.evaluation.metrics import NeutralScore, contrast_ci, mean_ci, win_rate_ci
from exporter.recipe.eval import EvalSpec, set_spec
from exporter.reports.evaluation import (
    Acceptance,
    ChoiceFigures,
    ChoiceMeans,
    MaskVsPrompt,
    NeutralFigures,
    PairedFigures,
    PairedMeans,
    RepliesEvaluation,
    Row,
    SeedRow,
    SetEvaluation,
    SetRow,
    StatementFigures,
    StatementMeans,
    UnpairedFigures,
    UnpairedMeans,
    own_intervals,
)


def _mean_answers(entries: list[Scores]) -> dict[str, np.ndarray]:
    answers = [e.answers for e in entries if e.answers is not None]
    return {k: np.mean([a[k] for a in answers], axis=0) for k in answers[0]}


def _mean_neutral(entries: list[Scores]) -> NeutralScore | None:
    scores = [e.neutral for e in entries if e.neutral is not None]
    if not scores:
        return None
    mean = {k: float(np.mean([getattr(s, k) for s in scores])) for k in ("perplexity", "nll", "kl")}
    return NeutralScore(**mean, tokens=scores[0].tokens)


class PersonaView:
    """Statistics of one persona from raw condition scores."""

    def __init__(
        self, raw: Raw, persona: str, spec: EvalSpec, labels: list[str], dense_params: int, toward: str | None = None
    ):
        """`persona` names the conditions (its mask, its system prompt); the figures are toward `toward` (the
        persona itself unless given: an item set scores a persona toward a pole it does not name)."""
        self.raw, self.p, self.spec, self.dense_params = raw, persona, spec, dense_params
        self.t = toward or persona
        self.q = partner(spec, self.t)
        label = spec.statements.labels.get(persona) if spec.statements else None
        self.match = np.array([x == label for x in labels], dtype=bool) if label is not None else None
        self.boot = {"n": spec.bootstrap, "seed": spec.seed}

    @property
    def dense(self) -> dict[str, np.ndarray]:
        answers = self.raw["dense"].answers
        assert answers is not None, "the dense model's answers are scored first"
        return answers

    def margins(self, answers: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.q is None or f"paired:{self.t}" not in answers:
            return None
        return answers[f"paired:{self.t}"] - answers[f"paired:{self.q}"]

    def row(self, label: str, answers: dict[str, np.ndarray], neutral: NeutralScore | None, removed: int) -> Row:
        return Row(
            condition=label,
            parameters_removed=removed,
            fraction_removed=removed / self.dense_params,
            paired=self.paired(answers),
            unpaired=self.unpaired(answers),
            choices=self.choices(answers),
            statements=self.statements(answers),
            neutral=self.neutral(neutral),
        )

    def paired(self, answers: dict[str, np.ndarray]) -> PairedFigures | None:
        m, m0 = self.margins(answers), self.margins(self.dense)
        if m is None or m0 is None:
            return None
        boot = self.boot
        return PairedFigures(
            margin=mean_ci(m, **boot), accuracy=win_rate_ci(m, **boot), shift=mean_ci(m - m0, **boot), n=len(m)
        )

    def unpaired(self, answers: dict[str, np.ndarray]) -> UnpairedFigures | None:
        own, other = f"unpaired:{self.t}", f"unpaired:{self.q}"
        if own not in answers or other not in answers:
            return None
        d = {k: answers[k] - self.dense[k] for k in (own, other)}
        return UnpairedFigures(
            margin=contrast_ci(answers[own], answers[other], **self.boot),
            shift=contrast_ci(d[own], d[other], **self.boot),
            n_own=len(answers[own]),
            n_other=len(answers[other]),
        )

    def choices(self, answers: dict[str, np.ndarray]) -> ChoiceFigures | None:
        own, other = f"choices:{self.t}", f"choices:{self.q}"
        if own not in answers or other not in answers:
            return None
        m, m0 = answers[own] - answers[other], self.dense[own] - self.dense[other]
        return ChoiceFigures(
            accuracy=win_rate_ci(m, **self.boot),
            margin=mean_ci(m, **self.boot),
            shift=mean_ci(m - m0, **self.boot),
            n=len(m),
        )

    def statements(self, answers: dict[str, np.ndarray]) -> StatementFigures | None:
        match = self.match
        if match is None or "statements" not in answers or not match.any() or match.all():
            return None
        s, d = answers["statements"], answers["statements"] - self.dense["statements"]
        return StatementFigures(
            margin=contrast_ci(s[match], s[~match], **self.boot),
            shift=contrast_ci(d[match], d[~match], **self.boot),
            n_matching=int(match.sum()),
            n_other=int((~match).sum()),
        )

    def neutral(self, neutral: NeutralScore | None) -> NeutralFigures | None:
        base = self.raw["dense"].neutral
        if neutral is None or base is None:
            return None
        ratio = neutral.perplexity / base.perplexity
        return NeutralFigures(perplexity=neutral.perplexity, perplexity_ratio=ratio, kl=neutral.kl)

    def entry_row(self, label: str, key: str, weights: str) -> Row | None:
        if key not in self.raw or self.raw[key].answers is None:
            return None
        answers, w = self.raw[key].answers, self.raw[weights]
        assert answers is not None
        return self.row(label, answers, w.neutral, w.removed)

    def random_row(self, keys: list[str]) -> Row | None:
        keys = [k for k in keys if k in self.raw]
        entries = [self.raw[k] for k in keys]
        if not entries:
            return None
        row = self.row(
            f"random mask ({len(entries)} seed{'s' if len(entries) > 1 else ''})",
            _mean_answers(entries),
            _mean_neutral(entries),
            entries[0].removed,
        )
        seeds = []
        for k, e in zip(keys, entries, strict=True):
            assert e.answers is not None
            label = f"random seed {self.spec.seed + int(k.rsplit(':', 1)[1])}"
            seeds.append(seed_row(self.row(label, e.answers, e.neutral, e.removed)))
        return row.model_copy(update={"seeds": seeds})


def partner(spec: EvalSpec, persona: str) -> str | None:
    """The persona's opposite in the first item section that names it (paired, unpaired, choices)."""
    for section in spec.main_sections:
        if persona in section.responses:
            return next((n for n in section.responses if n != persona), None)
    return None


def seed_row(row: Row) -> SeedRow:
    """One random seed's row: per-seed intervals are noise here, so only the means are kept."""
    paired = statements = unpaired = choices = None
    if row.paired is not None:
        p = row.paired
        paired = PairedMeans(margin=p.margin.mean, accuracy=p.accuracy.mean, shift=p.shift.mean, n=p.n)
    if row.unpaired is not None:
        u = row.unpaired
        unpaired = UnpairedMeans(margin=u.margin.mean, shift=u.shift.mean, n_own=u.n_own, n_other=u.n_other)
    if row.choices is not None:
        c = row.choices
        choices = ChoiceMeans(accuracy=c.accuracy.mean, margin=c.margin.mean, shift=c.shift.mean, n=c.n)
    if row.statements is not None:
        s = row.statements
        statements = StatementMeans(
            margin=s.margin.mean, shift=s.shift.mean, n_matching=s.n_matching, n_other=s.n_other
        )
    return SeedRow(
        condition=row.condition,
        parameters_removed=row.parameters_removed,
        fraction_removed=row.fraction_removed,
        paired=paired,
        unpaired=unpaired,
        choices=choices,
        statements=statements,
        neutral=row.neutral,
    )


def persona_rows(view: PersonaView, random_keys: list[str]) -> list[Row]:
    p = view.p
    rows = [
        view.entry_row("dense", "dense", "dense"),
        view.entry_row("prompt-only", f"dense+prompt:{p}", "dense"),
        view.entry_row("mask-only", f"mask:{p}", f"mask:{p}"),
        view.entry_row("mask+prompt", f"mask:{p}+prompt:{p}", f"mask:{p}"),
        view.entry_row("steering-only", f"steer:{p}", f"steer:{p}"),
        view.entry_row("removal-only", f"removal:{p}", f"removal:{p}"),
        view.random_row(random_keys),
        view.entry_row("wanda unstructured", f"wanda:{p}", f"wanda:{p}"),
    ]
    return [r for r in rows if r is not None]


def _shift(rows: list[Row], condition: str) -> float | None:
    return next((r.shift for r in rows if r.condition.startswith(condition) and r.shift is not None), None)


def _random_movement(rows: list[Row]) -> float | None:
    """The random mask's movement: the larger of |mean shift over seeds| and the mean of |shift| per seed."""
    row = next((r for r in rows if r.condition.startswith("random mask") and r.shift is not None), None)
    if row is None or row.shift is None:
        return None
    per_seed = [abs(shift) for s in row.seeds or [] if (shift := s.shift) is not None]
    return max([abs(row.shift), *per_seed])


def reply_checks(replies: RepliesEvaluation, spec: EvalSpec) -> dict[str, bool]:
    """The bar on one persona's reply evaluation (exporter/evaluation/replies.py)."""
    gap = replies.gap
    checks = {"reply gap > 0, interval excludes 0": gap["export"].ci95[0] > 0}
    if "prompt_only" in gap:
        checks["reply gap >= prompt-only gap"] = gap["export"].mean >= gap["prompt_only"].mean
    limit = spec.acceptance.max_repeated_4grams_over_dense
    checks[f"repeated 4-grams <= dense + {limit}"] = replies.repeated_over_dense <= limit
    return checks


def acceptance(rows: list[Row], spec: EvalSpec, replies: RepliesEvaluation | None = None) -> Acceptance | None:
    """The bar on the mask-only model's paired shift and neutral perplexity, and on its replies if scored."""
    a = spec.acceptance
    mask = _shift(rows, "mask-only")
    rnd = _random_movement(rows)
    ppl = next((r.neutral.perplexity_ratio for r in rows if r.condition == "mask-only" and r.neutral), None)
    if mask is None:
        return None
    checks: dict[str, bool] = {f"shift >= {a.min_shift}": mask >= a.min_shift}
    if rnd is not None:
        checks[f"shift >= {a.random_ratio} x random movement"] = mask >= a.random_ratio * rnd
    prompt = _shift(rows, "prompt-only")
    if prompt is not None:
        checks["shift >= prompt-only shift"] = mask >= prompt
    if ppl is not None:
        checks[f"perplexity <= {a.max_perplexity_ratio} x dense"] = ppl <= a.max_perplexity_ratio
    if replies is not None:
        checks |= reply_checks(replies, spec)
    return Acceptance(
        shift=mask,
        random_shift=_shift(rows, "random mask"),
        random_movement=rnd,
        shift_over_random=mask / rnd if rnd else None,
        perplexity_ratio=ppl,
        checks=checks,
    )


def mask_vs_prompt(view: PersonaView) -> MaskVsPrompt | None:
    """Mask-only minus prompt-only margin per item, with its interval (the paper: masks beat prompts)."""
    raw, p = view.raw, view.p
    mask, prompt = raw.get(f"mask:{p}"), raw.get(f"dense+prompt:{p}")
    if mask is None or prompt is None or mask.answers is None or prompt.answers is None:
        return None
    m_mask, m_prompt = view.margins(mask.answers), view.margins(prompt.answers)
    if m_mask is None or m_prompt is None:
        return None
    return MaskVsPrompt(mask_minus_prompt=mean_ci(m_mask - m_prompt, **view.boot))


def set_raw(raw: Raw, name: str) -> Raw:
    """The raw scores of one item set, its answer keys without the set's prefix."""
    prefix = f"{name}/"
    out: Raw = {}
    for key, scores in raw.items():
        answers = scores.answers
        if answers is not None:
            answers = {k.removeprefix(prefix): v for k, v in answers.items() if k.startswith(prefix)}
        out[key] = Scores(scores.removed, answers, scores.neutral)
    return out


def set_rows(view: PersonaView, random_keys: list[str]) -> list[SetRow]:
    """A view's rows as one item set's: the shift (and A/B accuracy) per condition."""
    return [
        SetRow(condition=r.condition, shift=r.shift_ci, accuracy=r.choices.accuracy if r.choices else None)
        for r in persona_rows(view, random_keys)
    ]


def set_evaluations(
    raw: Raw, persona: str, parts: list[str], spec: EvalSpec, random_keys: list[str], dense_params: int
) -> list[SetEvaluation]:
    """The persona on every item set: toward its own pole (or its part's, for a persona made of parts) where the
    set names it, else toward the set's first persona (crosstalk)."""
    out = []
    for item_set in spec.sets:
        names = item_set.personas
        own = next((x for x in parts if x in names), None)
        toward = own or names[0]
        view = PersonaView(set_raw(raw, item_set.name), persona, set_spec(item_set, spec), [], dense_params, toward)
        rows = set_rows(view, random_keys)
        out.append(SetEvaluation(name=item_set.name, personas=names, toward=toward, own=own is not None, rows=rows))
    return out


def main_crosstalk(
    raw: Raw, persona: str, spec: EvalSpec, random_keys: list[str], dense_params: int
) -> list[SetEvaluation]:
    """The shift of a persona the main items do not name toward their first persona (empty without a pair)."""
    names = list(spec.main_sections[0].responses) if spec.main_sections else []
    if len(names) != 2:
        return []
    view = PersonaView(raw, persona, spec, [], dense_params, names[0])
    return [
        SetEvaluation(
            name="/".join(names), personas=names, toward=names[0], own=False, rows=set_rows(view, random_keys)
        )
    ]


def switch_success(rows: list[Row], own_main: bool, sets: list[SetEvaluation]) -> bool | None:
    """Every own axis's mask-only shift has its 95 % interval above 0; None without own items."""
    intervals = own_intervals(rows, own_main, sets)
    if not intervals or any(ci is None for ci in intervals):
        return None
    return all(ci is not None and ci.ci95[0] > 0 for ci in intervals)


def summarise(
    raw: Raw,
    persona: str,
    spec: EvalSpec,
    labels: list[str],
    random_keys: list[str],
    dense_params: int,
    replies: RepliesEvaluation | None = None,
    parts: list[str] | None = None,
) -> dict[str, Any]:
    """The persona's `opposite`, `rows`, `acceptance`, `mask_vs_prompt`, `replies`, `sets` and `switch_success`
    (PersonaEvaluation fields). `parts`: the poles a persona made of several stands for (itself by default)."""
    parts = parts or [persona]
    # the main items score the persona toward itself, or toward the part they name (a composite's)
    toward = next((p for p in parts if partner(spec, p) is not None), None)
    view = PersonaView(raw, persona, spec, labels, dense_params, toward)
    own_main = view.q is not None
    own_set = next((x for x in spec.sets if any(p in x.personas for p in parts)), None)
    if not own_main and own_set is not None:  # the persona's own axis is one of the sets: its rows and its bar
        toward = next(p for p in parts if p in own_set.personas)
        sub = set_spec(own_set, spec)
        view = PersonaView(set_raw(raw, own_set.name), persona, sub, [], dense_params, toward)
    rows = persona_rows(view, random_keys)
    sets = set_evaluations(raw, persona, parts, spec, random_keys, dense_params)
    if not own_main:  # a persona of another axis on the main items: its crosstalk there, as on every other set
        sets = main_crosstalk(raw, persona, spec, random_keys, dense_params) + sets
    return {
        "opposite": view.q,
        "rows": rows,
        "acceptance": acceptance(rows, spec, replies),
        "mask_vs_prompt": mask_vs_prompt(view),
        "replies": replies,
        "sets": sets,
        "switch_success": switch_success(rows, own_main, sets),
    }
