"""A persona's evaluation as typed records (report.json's `evaluation`, the run's report.json): the items it
read, one row of figures per condition, the acceptance bar and the replies. Computed in exporter/evaluation/;
only read here and in the Markdown reports.
"""

from __future__ import annotations

from pydantic import Field, computed_field

from exporter.recipe.eval import Depth, EvalSpec
from exporter.reports.record import Record


class CI(Record):
    """A mean with its 95 % bootstrap interval."""

    mean: float
    ci95: list[float]


class FileRef(Record):
    path: str
    sha256: str


class PairedSplit(Record):
    files: dict[str, FileRef]
    records: int
    unique_prompts: int
    excluded_as_calibration: int
    held_out: bool
    selected: int
    seed: int
    record_indices: list[int]


class StatementsSplit(Record):
    file: FileRef
    records: int
    excluded_as_calibration: int
    held_out: bool
    selected_per_label: dict[str, int]
    seed: int
    record_indices: list[int]


class UnpairedPersonaSplit(Record):
    file: FileRef
    records: int
    unique_prompts: int
    excluded_as_calibration: int
    selected: int
    record_indices: list[int]


class UnpairedSplit(Record):
    held_out: bool
    seed: int
    personas: dict[str, UnpairedPersonaSplit]


class ChoicesSplit(Record):
    file: FileRef
    records: int
    unique_prompts: int
    excluded_as_calibration: int
    held_out: bool
    selected: int
    seed: int
    record_indices: list[int]
    letters_of_first: dict[str, int]  # how often each letter is the first persona's (balance of A and B)


class NeutralSplit(Record):
    file: FileRef
    paragraphs: int


class RepliesSplit(Record):
    file: FileRef
    total: int
    held_out: bool
    selected: int
    seed: int
    line_indices: list[int]
    full_depth: int | None = None  # how many the full depth selects (the verdict depth takes a subset)


class Splits(Record):
    """What each source of items held and what was selected from it."""

    paired: PairedSplit | None = None
    unpaired: UnpairedSplit | None = None
    choices: ChoicesSplit | None = None
    statements: StatementsSplit | None = None
    neutral: NeutralSplit | None = None
    replies: RepliesSplit | None = None
    sets: dict[str, Splits] | None = None


class Leak(Record):
    source: str
    index: int
    calibration: str


class PairedFigures(Record):
    margin: CI
    accuracy: CI
    shift: CI
    n: int


class StatementFigures(Record):
    margin: CI
    shift: CI
    n_matching: int
    n_other: int


class UnpairedFigures(Record):
    """Unpaired answers: `margin` = mean answer log-likelihood of the persona's answers minus that of its
    opposite's (different instructions, so not a shift); `shift` = the same contrast of each answer's change
    against the dense model (difference in differences), each pole resampled on its own."""

    margin: CI
    shift: CI
    n_own: int
    n_other: int


class ChoiceFigures(Record):
    """A/B items: `accuracy` = share of items whose persona letter has the higher log-likelihood (chance 0.5);
    `margin` = its letter's log-likelihood minus the other letter's; `shift` = margin minus the dense margin."""

    accuracy: CI
    margin: CI
    shift: CI
    n: int


class NeutralFigures(Record):
    perplexity: float
    perplexity_ratio: float
    kl: float


class PairedMeans(Record):
    """One random seed's paired figures: means only (per-seed intervals would be noise)."""

    margin: float
    accuracy: float
    shift: float
    n: int


class StatementMeans(Record):
    margin: float
    shift: float
    n_matching: int
    n_other: int


class UnpairedMeans(Record):
    margin: float
    shift: float
    n_own: int
    n_other: int


class ChoiceMeans(Record):
    accuracy: float
    margin: float
    shift: float
    n: int


class SeedRow(Record):
    condition: str
    parameters_removed: int
    fraction_removed: float
    paired: PairedMeans | None = None
    unpaired: UnpairedMeans | None = None
    choices: ChoiceMeans | None = None
    statements: StatementMeans | None = None
    neutral: NeutralFigures | None = None

    @property
    def shift(self) -> float | None:
        figures = self.paired or self.unpaired or self.choices
        return figures.shift if figures else None


class Row(Record):
    """One condition's figures; the random masks' row also holds each seed's."""

    condition: str
    parameters_removed: int
    fraction_removed: float
    paired: PairedFigures | None = None
    unpaired: UnpairedFigures | None = None
    choices: ChoiceFigures | None = None
    statements: StatementFigures | None = None
    neutral: NeutralFigures | None = None
    seeds: list[SeedRow] | None = None

    @property
    def shift_ci(self) -> CI | None:
        """The shift toward the persona on its own items: paired answers first, else unpaired answers, else the
        A/B choices' letter margin."""
        figures = self.paired or self.unpaired or self.choices
        return figures.shift if figures else None

    @property
    def shift(self) -> float | None:
        ci = self.shift_ci
        return ci.mean if ci else None


class Acceptance(Record):
    """The bar on the mask-only model; `passed` when every check holds."""

    shift: float
    random_shift: float | None
    random_movement: float | None
    shift_over_random: float | None
    perplexity_ratio: float | None
    checks: dict[str, bool]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(self.checks.values())


class MaskVsPrompt(Record):
    mask_minus_prompt: CI


class Degeneration(Record):
    repeated_4grams: float
    distinct_2: float
    cut_at_max_tokens: float
    empty: float


class ReplyCondition(Record):
    score: CI
    degeneration: Degeneration


class ReplyExample(Record):
    prompt: str
    dense: str
    prompt_only: str
    export: str
    opposite_export: str


class RepliesEvaluation(Record):
    """Reply scores per condition (keyed by label: dense, prompt-only, export, ...), the gaps between the
    persona's and its opposite's models, and replies side by side. Greedy replies; `shipped`: the same figures
    of the replies decoded as the exports ship them (output.generation's repetition penalty), when that is not
    plain greedy."""

    prompts: int
    max_new_tokens: int
    repetition_penalty: float = 1.0  # the decoding of these replies: greedy with this penalty (1: none)
    opposite: str
    conditions: dict[str, ReplyCondition]
    gap: dict[str, CI]
    examples: list[ReplyExample]
    shipped: RepliesEvaluation | None = None

    @property
    def repeated_over_dense(self) -> float:
        """The export's repeated 4-grams over the dense model's (the repetition bound reads this)."""
        c = self.conditions
        return c["export"].degeneration.repeated_4grams - c["dense"].degeneration.repeated_4grams


class SetRow(Record):
    """One condition on an item set: the shift toward `toward` (and the A/B letter accuracy for choices)."""

    condition: str
    shift: CI | None
    accuracy: CI | None = None


class SetEvaluation(Record):
    """The persona on one item set of the recipe (eval.sets): `own` when the set names the persona (its own
    axis), else crosstalk, the shift toward the set's first persona, which should stay near 0."""

    name: str
    personas: list[str]
    toward: str
    own: bool
    rows: list[SetRow]


class PersonaEvaluation(Record):
    depth: Depth = "full"  # reports written before the two depths held the full one's conditions
    splits: Splits
    leaks: list[Leak]
    system_prompt: str
    statements_prompt: str | None
    random_seeds: list[int]
    dense_parameters: int
    definitions: dict[str, str]
    eval_spec: EvalSpec
    opposite: str | None
    rows: list[Row]
    acceptance: Acceptance | None
    mask_vs_prompt: MaskVsPrompt | None
    replies: RepliesEvaluation | None = None
    sets: list[SetEvaluation] = Field(default_factory=list)
    # every axis the persona names moves toward it: the export's (mask-only) shift has a 95 % interval above 0 on
    # each of its own item sets (the main items and eval.sets naming it); None without such items
    switch_success: bool | None = None

    def row(self, condition: str) -> Row | None:
        """The first row whose condition starts with `condition` ("random mask" matches "random mask (3 seeds)")."""
        return next((r for r in self.rows if r.condition.startswith(condition)), None)

    def own_shifts(self) -> list[float]:
        """The export's (mask-only) mean shift on each of the persona's own axes (`own_intervals`); rows scored
        on an own set's items (a persona the main items do not name) are that set's, so counted once."""
        own_main = not any(s.own and self.opposite in s.personas for s in self.sets)
        return [ci.mean for ci in own_intervals(self.rows, own_main, self.sets) if ci is not None]


def own_intervals(rows: list[Row], own_main: bool, sets: list[SetEvaluation]) -> list[CI | None]:
    """The export's (mask-only) shift on each of a persona's own axes: the main items' when they name it
    (`own_main`), then every item set that names it or (a composite) one of its parts; None where not scored."""
    intervals = [r.shift_ci for r in rows if r.condition == "mask-only"] if own_main else []
    for s in sets:
        if s.own:
            intervals += [r.shift for r in s.rows if r.condition == "mask-only"]
    return intervals
