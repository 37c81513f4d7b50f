"""The recipe's optional `eval:` section (see exporter/evaluation/metrics.py and exporter/evaluation/conditions.py).

Paired responses, unpaired answers (each persona's answers to its own instructions), A/B choices, persona
statements and a neutral corpus, all local files; relative paths are resolved
against the recipe's folder. Persona names used here are checked against `personas` when evaluation runs
(`eval_problems`), with their key paths.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Positive = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]  # what every random generator used here accepts
Baseline = Literal["prompt", "mask-prompt", "random", "wanda", "steering", "removal"]
# steering / removal: the export's steering bias alone, and its mask without any bias (only with method.steer
# or prune.mlp.compensate); they show what each part adds
BASELINES: tuple[Baseline, ...] = ("prompt", "mask-prompt", "random", "wanda", "steering", "removal")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResponseSource(_Strict):
    """One persona's answers: a field of `path` (or of the paired section's `path`)."""

    field: str
    path: str | None = None


class PairedSpec(_Strict):
    """The same prompts answered once per persona; records of the response files align by position."""

    path: str | None = None
    format: Literal["json", "jsonl", "csv"] | None = None
    prompt_field: str
    input_field: str | None = None  # Alpaca-style extra input, appended to the prompt when not blank
    responses: dict[str, ResponseSource]
    max_items: Positive
    seed: Seed = 0
    exclude_calibration: bool = False  # held-out split: drop items that occur in any calibration set


class UnpairedSource(_Strict):
    """One persona's own answers: `field` of each record of `path`, the answer to its `prompt_field`."""

    path: str
    format: Literal["json", "jsonl", "csv"] | None = None
    prompt_field: str = "prompt"
    field: str = "response"


class UnpairedSpec(_Strict):
    """Each persona's answers to different instructions (e.g. two poles sampled on their own); the metric is a
    difference in differences against the dense model (exporter/evaluation/summary.py)."""

    responses: dict[str, UnpairedSource]
    max_items: Positive  # per persona
    seed: int = 0
    exclude_calibration: bool = False


class LetterField(_Strict):
    field: str  # the record's field holding the persona's letter, e.g. "(A)"


class ChoicesSpec(_Strict):
    """A/B items: the question (choices inside) and, per persona, the field holding its letter; the model's
    choice is the letter with the higher log-likelihood as the assistant's reply to the question."""

    path: str
    format: Literal["json", "jsonl", "csv"] | None = None
    prompt_field: str = "question"
    responses: dict[str, LetterField]
    max_items: Positive
    seed: int = 0
    exclude_calibration: bool = False


class ItemSetSpec(_Strict):
    """One more pair's items in a recipe of several pairs: exactly one of paired, unpaired or choices, naming the
    pair's two personas. Every persona of the recipe is scored on every set: toward its own pole where the set
    names it, else toward the set's first persona (crosstalk, which should stay near 0)."""

    name: str
    paired: PairedSpec | None = None
    unpaired: UnpairedSpec | None = None
    choices: ChoicesSpec | None = None

    @property
    def section(self) -> PairedSpec | UnpairedSpec | ChoicesSpec:
        found = [s for s in (self.paired, self.unpaired, self.choices) if s is not None]
        assert len(found) == 1, "checked by eval_problems"
        return found[0]

    @property
    def personas(self) -> list[str]:
        return list(self.section.responses)


class StatementsSpec(_Strict):
    """Persona statements scored as the assistant's reply to `prompt`; `labels` maps persona -> label."""

    path: str
    format: Literal["json", "jsonl", "csv"] | None = None
    statement_field: str = "statement"
    label_field: str = "answer_matching_behavior"
    labels: dict[str, str]  # persona -> label value (whitespace-stripped) of the statements matching it
    prompt: str = "Tell me about yourself."
    max_per_label: Positive
    seed: Seed = 0
    exclude_calibration: bool = False


class NeutralSpec(_Strict):
    """Neutral text (paragraphs separated by blank lines) for perplexity and KL from the dense model."""

    path: str
    window: Annotated[int, Field(ge=16)] = 512  # whole paragraphs packed into windows of at most this many tokens
    max_tokens: Positive | None = None  # stop after this many scored tokens


class RepliesSpec(_Strict):
    """Everyday prompts (a text file, one per line) answered greedily under each condition; each reply is
    scored for persona by the dense model (exporter/evaluation/replies.py)."""

    path: str
    max_items: Positive | None = None  # a seeded selection; all prompts when unset
    seed: Seed = 0
    max_new_tokens: Annotated[int, Field(ge=1, le=512)] = 64
    batch_size: Positive = 64  # replies per batch, every condition together
    show: Annotated[int, Field(ge=0)] = 3  # prompts shown side by side in report.md
    exclude_calibration: bool = True


class AcceptanceSpec(_Strict):
    """The bar a persona export must clear; reported as pass/fail, never enforced."""

    min_shift: float = 0.2  # nats per token, toward the persona, relative to the dense model
    random_ratio: float = 3.0  # the shift must be at least this many times the random mask's |shift|
    max_perplexity_ratio: float = 1.15  # perplexity on the neutral corpus relative to the dense model
    max_repeated_4grams_over_dense: float = 0.05  # reply degeneration, over the dense model's replies


Depth = Literal["verdict", "full"]
VERDICT_BASELINES: tuple[Baseline, ...] = ("prompt", "random")  # the conditions the acceptance bar reads


class VerdictSpec(_Strict):
    """The verdict depth: the run's own evaluation, the conditions and items the verdict needs and no more."""

    random_seeds: Positive = 1  # random masks per export; the first seeds of the full depth's
    reply_prompts: Positive = 16  # a seeded subset of the full depth's reply prompts (all when fewer)


class EvalSpec(_Strict):
    """An eval section. Its settings are the full depth's (every baseline listed, `random_seeds` seeds, every
    reply prompt); at `depth: verdict` (the default) `at_depth` narrows them to `verdict`."""

    depth: Depth = "verdict"
    verdict: VerdictSpec = VerdictSpec()
    paired: PairedSpec | None = None
    unpaired: UnpairedSpec | None = None
    choices: ChoicesSpec | None = None
    statements: StatementsSpec | None = None
    neutral: NeutralSpec | None = None
    replies: RepliesSpec | None = None
    sets: list[ItemSetSpec] = []  # the other pairs' items (a recipe of several pairs): shift and crosstalk per set
    system_prompts: dict[str, str] = {}  # persona -> prompt-only baseline prompt (default: from description)
    baselines: list[Baseline] = list(BASELINES)  # or "all"; the verdict needs only prompt and random
    random_seeds: Annotated[int, Field(ge=3, le=100)] = 3  # each is one more evaluated condition
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = 1000  # resamples held in memory at once
    seed: Seed = 0
    batch_size: Positive = 8
    max_tokens: Annotated[int, Field(ge=16)] = 256  # per scored sequence (prompt + answer)
    on_leak: Literal["error", "flag"] = "error"
    acceptance: AcceptanceSpec = AcceptanceSpec()

    @field_validator("baselines", mode="before")
    @classmethod
    def _all(cls, value: object) -> object:
        if isinstance(value, str):
            if value != "all":
                raise ValueError(f"expected 'all' or a list of {list(BASELINES)} (or []), got {value!r}")
            return list(BASELINES)
        return value

    @property
    def main_sections(self) -> list[PairedSpec | UnpairedSpec | ChoicesSpec]:
        """The main items' sections that are set, in the order the reports read them (paired, unpaired, choices)."""
        return [s for s in (self.paired, self.unpaired, self.choices) if s is not None]


def at_depth(spec: EvalSpec) -> EvalSpec:
    """The settings scored at `spec.depth`: as written at the full depth; at the verdict depth only the verdict's
    baselines, `verdict.random_seeds` random seeds and (`reply_cap`) at most `verdict.reply_prompts` prompts."""
    if spec.depth == "full":
        return spec
    baselines = [b for b in spec.baselines if b in VERDICT_BASELINES]
    seeds = min(spec.verdict.random_seeds, spec.random_seeds)
    return spec.model_copy(update={"baselines": baselines, "random_seeds": seeds})


def reply_cap(spec: EvalSpec) -> int | None:
    """How many reply prompts the depth takes at most (None: every prompt the replies section selects)."""
    return spec.verdict.reply_prompts if spec.depth == "verdict" else None


def set_spec(item_set: ItemSetSpec, parent: EvalSpec) -> EvalSpec:
    """An item set as an eval section of its own: its items, the parent's bootstrap, seeds and limits."""
    update = {"paired": item_set.paired, "unpaired": item_set.unpaired, "choices": item_set.choices}
    return parent.model_copy(update=update | {"statements": None, "neutral": None, "replies": None, "sets": []})


def eval_problems(spec: EvalSpec, personas: list[str]) -> list[str]:
    """Cross-section problems: persona names that are not in the recipe, missing data sections."""
    problems: list[str] = []
    known = sorted(personas)

    def check(names: list[str], where: str) -> None:
        for n in names:
            if n not in personas:
                problems.append(f"{where}.{n}: unknown persona {n!r}; known personas: {known}")

    sections = (spec.paired, spec.unpaired, spec.choices, spec.statements, spec.neutral, spec.replies)
    if all(s is None for s in sections):
        problems.append(
            "eval: give at least one of 'paired', 'unpaired', 'choices', 'statements', 'neutral', 'replies'"
        )
    for key, section in (("paired", spec.paired), ("unpaired", spec.unpaired), ("choices", spec.choices)):
        if section is None:
            continue
        check(list(section.responses), f"eval.{key}.responses")
        if len(section.responses) != 2:
            problems.append(
                f"eval.{key}.responses: name exactly two opposing personas (got {sorted(section.responses)})"
            )
    names = [s.name for s in spec.sets]
    if len(set(names)) != len(names):
        problems.append(f"eval.sets: two sets share a name ({names})")
    for i, item_set in enumerate(spec.sets):
        given = [k for k in ("paired", "unpaired", "choices") if getattr(item_set, k) is not None]
        if len(given) != 1:
            problems.append(f"eval.sets.{i}: give exactly one of 'paired', 'unpaired', 'choices' (got {given})")
            continue
        check(item_set.personas, f"eval.sets.{i}.{given[0]}.responses")
        if len(item_set.personas) != 2:
            problems.append(f"eval.sets.{i}.{given[0]}.responses: name exactly two opposing personas")
    if spec.paired is not None:
        for name, src in spec.paired.responses.items():
            if src.path is None and spec.paired.path is None:
                problems.append(f"eval.paired.responses.{name}.path: required when eval.paired.path is not set")
    if spec.statements is not None:
        check(list(spec.statements.labels), "eval.statements.labels")
        if len(set(spec.statements.labels.values())) != len(spec.statements.labels):
            problems.append("eval.statements.labels: two personas share one label")
    check(list(spec.system_prompts), "eval.system_prompts")
    if len(set(spec.baselines)) != len(spec.baselines):
        problems.append(f"eval.baselines: duplicates in {spec.baselines}")
    return problems
