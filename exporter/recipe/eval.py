"""The recipe's optional `eval:` section (see exporter/evaluation/metrics.py and exporter/evaluation/conditions.py).

Paired responses, persona statements and a neutral corpus, all local files; relative paths are resolved
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
    statements: StatementsSpec | None = None
    neutral: NeutralSpec | None = None
    replies: RepliesSpec | None = None
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


def eval_problems(spec: EvalSpec, personas: list[str]) -> list[str]:
    """Cross-section problems: persona names that are not in the recipe, missing data sections."""
    problems: list[str] = []
    known = sorted(personas)

    def check(names: list[str], where: str) -> None:
        for n in names:
            if n not in personas:
                problems.append(f"{where}.{n}: unknown persona {n!r}; known personas: {known}")

    if spec.paired is None and spec.statements is None and spec.neutral is None and spec.replies is None:
        problems.append("eval: give at least one of 'paired', 'statements', 'neutral', 'replies'")
    if spec.paired is not None:
        check(list(spec.paired.responses), "eval.paired.responses")
        if len(spec.paired.responses) != 2:
            problems.append(
                f"eval.paired.responses: name exactly two opposing personas (got {sorted(spec.paired.responses)})"
            )
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
