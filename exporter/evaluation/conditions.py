"""Evaluation of persona masks against baselines on the same items: the conditions, their raw scores.

Weight conditions (one neutral-corpus pass each): dense, each persona's mask, random masks of the same size
(`random_seeds` seeds), each persona's unstructured Wanda mask. Answer conditions add an optional persona
system prompt: prompt-only = dense + prompt, mask+prompt = mask + prompt. A persona mask is applied to unit
activations, which the verification stage proves equal to the exported model.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from exporter.errors import RecipeError
from exporter.evaluation import baselines
from exporter.evaluation.items import EvalItems, load_items
from exporter.evaluation.metrics import (
    Intervention,
    Scored,
    neutral_scores,
    neutral_windows,
    scoring_work,
    sequence_logliks,
)
from exporter.evaluation.replies import evaluate_replies, steering_only
from exporter.evaluation.summary import summarise
from exporter.export.prune import count_parameters
from exporter.masking.calibrate import batches
from exporter.masking.data import select_samples, tokenize
from exporter.masking.masks import PersonaMask
from exporter.masking.stats import Statistics
from exporter.model.adapters import Adapter
from exporter.quiet import progress
from exporter.recipe.eval import EvalSpec, eval_problems
from exporter.recipe.schema import Recipe
from exporter.reports.markdown import write_run_reports
from exporter.reports.persona import PersonaReport
from exporter.runtime.chat import encode_answer
from exporter.verify.hf import masked

log = logging.getLogger(__name__)


def check_spec(recipe: Recipe, spec: EvalSpec) -> None:
    problems = eval_problems(spec, list(recipe.personas))
    if problems:
        raise RecipeError(f"{len(problems)} problem(s) in the eval section:\n" + "\n".join(f"  {p}" for p in problems))


def prepare(recipe: Recipe, spec: EvalSpec | None = None, section: str = "eval") -> EvalItems:
    """Validate the eval section and read its items (before any model is loaded: problems surface early);
    `section` is where the recipe holds `spec` (eval, or tune.validation), as errors name its files."""
    spec = spec or recipe.eval
    assert spec is not None, "prepare() needs an eval section"
    check_spec(recipe, spec)
    return load_items(recipe, spec, section)


def system_prompt(recipe: Recipe, spec: EvalSpec, persona: str) -> str:
    desc = recipe.personas[persona].description
    return spec.system_prompts.get(persona) or f"Answer as a person with this personality: {desc}"


@dataclass
class Evaluator:
    """Items encoded for one model and tokenizer; scores them under interventions and system prompts."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: EvalSpec
    items: EvalItems
    _encoded: dict[str | None, dict[str, list[Scored]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.spec.neutral
        self.windows = neutral_windows(self.tokenizer, self.items.neutral, n.window, n.max_tokens) if n else []
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _sequences(self, system: str | None) -> dict[str, list[Scored]]:
        if system not in self._encoded:
            enc = partial(encode_answer, self.tokenizer, system=system, max_tokens=self.spec.max_tokens)
            seqs: dict[str, list[Scored]] = {}
            if self.spec.paired is not None:
                for persona in self.spec.paired.responses:
                    seqs[f"paired:{persona}"] = [enc(it.prompt, it.responses[persona]) for it in self.items.paired]
            if self.spec.statements is not None:
                seqs["statements"] = [enc(self.spec.statements.prompt, s.text) for s in self.items.statements]
            self._encoded[system] = seqs
        return self._encoded[system]

    def answers(
        self, intervention: Intervention | None, system: str | None, progress: Callable[[int], Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Mean per-token log-likelihood of every answer: {"paired:<persona>": (N,), "statements": (M,)}.

        All answers are scored in one call, so the answers of a pair share their prompt's forward pass."""
        seqs = self._sequences(system)
        scores = sequence_logliks(
            self.model,
            [s for group in seqs.values() for s in group],
            pad_id=self.pad_id,
            batch_size=self.spec.batch_size,
            intervention=intervention,
            progress=progress,
        )
        out, at = {}, 0
        for key, group in seqs.items():
            out[key] = scores[at : at + len(group)]
            at += len(group)
        return out

    def n_answers(self, system: str | None) -> int:
        return sum(len(v) for v in self._sequences(system).values())

    def answer_work(self, system: str | None) -> tuple[int, int]:
        """The least work of scoring every answer: (tokens through the decoder, rows through the LM head)."""
        return scoring_work([s for group in self._sequences(system).values() for s in group])

    def neutral(
        self, interventions: dict[str, Intervention | None], progress: Callable[[int], Any] | None = None
    ) -> dict[str, dict[str, float]]:
        return neutral_scores(self.model, self.windows, interventions, progress) if self.windows else {}


def mask_intervention(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> Intervention:
    return partial(masked, model, adapter, mask)


def size_key(mask: PersonaMask) -> str:
    """Identifies the per-layer removal counts: random masks of equal counts and seed are identical."""
    counts = [[len(r) for r in mask.removed(k)] for k in ("mlp", "head", "group")]
    return hashlib.sha256(repr(counts).encode()).hexdigest()[:8]


@dataclass
class WeightCondition:
    intervention: Intervention | None
    removed: int  # parameters removed (or zeroed)
    prompts: list[str] = field(default_factory=list)  # personas whose system prompt is also evaluated


def wanda_norms(
    recipe: Recipe,
    model: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    persona: str,
    stats: Statistics | None = None,
) -> list[dict[str, Any]]:
    """Wanda's activation norms over the persona's calibration samples: from its calibration statistics when
    they hold them (`in_sq`, the same sums over the same batches), else from a calibration pass."""
    linears = baselines.decoder_linears(model, adapter)
    if stats is not None and stats.in_sq and all(n in stats.in_sq for n in linears[0]):
        return [{n: stats.in_sq[n][i].sqrt() for n in d} for i, d in enumerate(linears)]
    log.info("%s: a calibration pass for the Wanda baseline's norms (the statistics do not hold them)", persona)
    cal = recipe.personas[persona].calibration
    samples = [tokenize(tokenizer, s, cal) for s in select_samples(cal)]
    work = batches(
        samples, recipe.calibration.batch_size, tokenizer.pad_token_id, recipe.calibration.tokens == "response"
    )
    return baselines.input_norms(model, adapter, work)


def conditions(
    ev: Evaluator,
    masks: dict[str, PersonaMask],
    norms: dict[str, list[dict[str, Any]]],
) -> dict[str, WeightCondition]:
    """Every weight condition for these masks; `norms` holds Wanda activation norms per persona."""
    model, adapter, spec = ev.model, ev.adapter, ev.spec
    use = set(spec.baselines)
    out = {"dense": WeightCondition(None, 0, sorted(masks) if "prompt" in use else [])}
    for name, mask in masks.items():
        per_layer = baselines.removed_parameters(model, adapter, mask)
        prompts = [name] if "mask-prompt" in use else []
        out[f"mask:{name}"] = WeightCondition(mask_intervention(model, adapter, mask), sum(per_layer), prompts)
        if mask.steering is not None and "steering" in use:
            out[f"steer:{name}"] = WeightCondition(mask_intervention(model, adapter, steering_only(mask)), 0)
        if mask.mlp_bias is not None and "removal" in use:
            bare = replace(mask, mlp_bias=None, steering=None)
            out[f"removal:{name}"] = WeightCondition(mask_intervention(model, adapter, bare), sum(per_layer))
        if "random" in use:
            for s in range(spec.random_seeds):
                rnd = baselines.random_mask(mask, spec.seed + s)
                key = f"random:{size_key(mask)}:{s}"
                out.setdefault(key, WeightCondition(mask_intervention(model, adapter, rnd), sum(per_layer)))
        if "wanda" in use and name in norms:
            removal = baselines.wanda_mask(model, adapter, norms[name], per_layer)
            out[f"wanda:{name}"] = WeightCondition(partial(baselines.zeroed, model, adapter, removal), sum(per_layer))
    return out


def score_conditions(
    ev: Evaluator,
    conds: dict[str, WeightCondition],
    system_prompts: dict[str, str],
    done: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Raw scores per condition key ("mask:introvert", "mask:introvert+prompt:introvert", ...).

    `done` holds raw scores from an earlier call (e.g. the dense model in a sweep); those are not recomputed.
    """
    raw: dict[str, Any] = dict(done or {})
    todo = {k: c.intervention for k, c in conds.items() if "neutral" not in raw.get(k, {})}
    if todo and ev.windows:
        with progress(len(ev.windows), f"eval neutral text ({len(todo)} conditions)", "window") as bar:
            for key, figures in ev.neutral(todo, bar.update).items():
                raw.setdefault(key, {})["neutral"] = figures
    for key, cond in conds.items():
        for persona in [None, *cond.prompts]:
            name = key if persona is None else f"{key}+prompt:{persona}"
            if "answers" in raw.get(name, {}):
                continue
            system = None if persona is None else system_prompts[persona]
            entry = raw.setdefault(name, {})
            with progress(ev.n_answers(system), f"eval {name}", "answer") as bar:
                entry["answers"] = ev.answers(cond.intervention, system, bar.update)
            entry["removed"] = cond.removed
    for key, cond in conds.items():
        raw[key]["removed"] = cond.removed
    return raw


def dense_parameters(model: nn.Module) -> int:
    return count_parameters(model)


DEFINITIONS = {
    "answer_loglik": "mean per-token log-likelihood (nats) of the answer's content tokens, chat template "
    "applied, the answer as the assistant turn; end-of-turn tokens and padding not counted",
    "paired_margin": "answer_loglik(persona's answer) - answer_loglik(opposite persona's answer), same instruction",
    "accuracy": "fraction of pairs with a positive margin",
    "shift": "margin under the condition minus the dense model's margin, per item, then averaged",
    "statements_margin": "mean answer_loglik of statements matching the persona minus that of the others, "
    "each statement the assistant's reply to the statements prompt",
    "perplexity": "exp(mean NLL) over every token of the neutral corpus windows after the first; no system prompt",
    "kl": "mean KL(P_dense || Q_condition) of next-token distributions at the same positions",
    "ci95": "seeded percentile bootstrap over items (statements: each group resampled separately)",
    "mask": "persona mask applied to unit activations, plus the export's down_proj bias (steering and/or "
    "compensation) when the recipe sets one: equal to the exported model (see verification)",
    "steering-only": "the export's steering bias added to the dense model, no unit removed",
    "removal-only": "the export's mask without its down_proj bias",
    "reply_score": "dense model: mean per-token log-likelihood of a greedy reply under the persona's system prompt "
    "minus under the opposite persona's; reply gap: the persona's export minus the opposite export, per prompt",
}


def evaluate_masks(
    recipe: Recipe,
    spec: EvalSpec,
    items: EvalItems,
    model: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    masks: dict[str, PersonaMask],
    stats: dict[str, Statistics] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every persona's evaluation (its report.json `evaluation`), baselines on the same items. `stats`: the
    personas' calibration statistics, which spare the Wanda baseline a second pass over the calibration data.
    `timings` receives the seconds of each part (baselines, scores, replies)."""
    seconds = timings if timings is not None else {}
    t = time.perf_counter()
    ev = Evaluator(model, tokenizer, adapter, spec, items)
    norms = {}
    if "wanda" in spec.baselines:
        norms = {p: wanda_norms(recipe, model, tokenizer, adapter, p, (stats or {}).get(p)) for p in masks}
    conds = conditions(ev, masks, norms)
    seconds["eval_baselines"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    prompts = {p: system_prompt(recipe, spec, p) for p in recipe.personas}
    raw = score_conditions(ev, conds, prompts)
    seconds["eval_scores"] = round(time.perf_counter() - t, 3)
    replies: dict[str, dict[str, Any]] = {}
    if spec.replies is not None and items.reply_prompts:
        t = time.perf_counter()
        opposite = {p: q for p in masks if (q := recipe.partner(p))}
        replies = evaluate_replies(model, tokenizer, adapter, spec, items.reply_prompts, masks, prompts, opposite)
        seconds["eval_replies"] = round(time.perf_counter() - t, 3)
    n_dense = dense_parameters(model)
    return {p: persona_evaluation(recipe, spec, items, raw, p, masks[p], n_dense, replies.get(p)) for p in masks}


def persona_evaluation(
    recipe: Recipe,
    spec: EvalSpec,
    items: EvalItems,
    raw: dict[str, Any],
    persona: str,
    mask: PersonaMask,
    dense_params: int,
    replies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    labels = [s.label for s in items.statements]
    random_keys = (
        [f"random:{size_key(mask)}:{s}" for s in range(spec.random_seeds)] if "random" in spec.baselines else []
    )
    return {
        "splits": items.splits,
        "leaks": items.leaks,
        "system_prompt": system_prompt(recipe, spec, persona),
        "statements_prompt": spec.statements.prompt if spec.statements else None,
        "random_seeds": [spec.seed + s for s in range(spec.random_seeds)],
        "dense_parameters": dense_params,
        "definitions": DEFINITIONS,
        "eval_spec": spec.model_dump(mode="json"),
        **summarise(raw, persona, spec, labels, random_keys, dense_params, replies),
    }


def evaluate_into(
    folder: Path,
    recipe: Recipe,
    items: EvalItems,
    m: Any,
    masks: dict[str, PersonaMask],
    reports: dict[str, PersonaReport],
    stats: dict[str, Statistics] | None = None,
    timings: dict[str, float] | None = None,
) -> None:
    """The run's eval stage: evaluate every persona of the loaded model `m`, write reports into `folder`."""
    assert recipe.eval is not None
    evaluations = evaluate_masks(recipe, recipe.eval, items, m.model, m.tokenizer, m.adapter, masks, stats, timings)
    write_run_reports(folder, recipe.name, evaluations, reports)
