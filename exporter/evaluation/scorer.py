"""One scorer of persona masks on one eval section's items, for the run's evaluation, `eval`, `sweep` and
`tune`: the dense model and its prompt-only conditions are scored (and replied) once and reused for every set
of masks evaluated after, then each set of masks gets its conditions, baselines and replies, summarised as each
persona's typed evaluation (exporter/reports/evaluation.py)."""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from exporter.evaluation.conditions import (
    Evaluator,
    Raw,
    Scores,
    conditions,
    random_keys,
    score_conditions,
    system_prompt,
    wanda_norms,
)
from exporter.evaluation.items import EvalItems
from exporter.evaluation.replies import Replier
from exporter.evaluation.summary import summarise
from exporter.export.prune import count_parameters
from exporter.masking.masks import PersonaMask
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.recipe.eval import EvalSpec, at_depth
from exporter.recipe.schema import Recipe
from exporter.reports.evaluation import Leak, PersonaEvaluation, RepliesEvaluation, Splits

log = logging.getLogger(__name__)

DEFINITIONS = {
    "answer_loglik": "mean per-token log-likelihood (nats) of the answer's content tokens, chat template "
    "applied, the answer as the assistant turn; end-of-turn tokens and padding not counted",
    "paired_margin": "answer_loglik(persona's answer) - answer_loglik(opposite persona's answer), same instruction",
    "accuracy": "fraction of pairs with a positive margin",
    "shift": "margin under the condition minus the dense model's margin, per item, then averaged",
    "unpaired_shift": "each persona answers its own instructions (no instruction has both answers): mean change "
    "of answer_loglik against the dense model over the persona's answers minus that over its opposite's answers "
    "(difference in differences; the per-item dense baseline removes how hard each instruction is, which a "
    "paired margin would cancel but two poles' different instructions do not); unpaired margin: the same "
    "contrast of the raw answer_logliks",
    "ab_accuracy": "share of A/B items whose persona letter ('(A)' or '(B)' as the assistant's whole reply to "
    "the question with its choices) has the higher answer_loglik; chance 0.5; letter margin: that difference",
    "statements_margin": "mean answer_loglik of statements matching the persona minus that of the others, "
    "each statement the assistant's reply to the statements prompt",
    "perplexity": "exp(mean NLL) over every token of the neutral corpus windows after the first; no system prompt",
    "kl": "mean KL(P_dense || Q_condition) of next-token distributions at the same positions",
    "ci95": "seeded percentile bootstrap over items (statements and unpaired answers: each group resampled separately)",
    "mask": "persona mask applied to unit activations, plus the export's down_proj bias (steering and/or "
    "compensation) when the recipe sets one: equal to the exported model (see verification)",
    "steering-only": "the export's steering bias added to the dense model, no unit removed",
    "removal-only": "the export's mask without its down_proj bias",
    "reply_score": "dense model: mean per-token log-likelihood of a greedy reply under the persona's system prompt "
    "minus under the opposite persona's; reply gap: the persona's export minus the opposite export, per prompt",
    "shipped_replies": "the same replies decoded as the exports ship (output.generation): greedy with a repetition "
    "penalty on every token already in the reply's context, prompt included; the acceptance bar reads the greedy "
    "replies (they measure the model; the penalty removes nearly all repetition from every condition)",
}


class MaskScorer:
    """Scores sets of persona masks of `recipe`'s personas on the items of `spec`, under the conditions of its
    depth (`at_depth`). `stats`: the personas' calibration statistics, which spare the Wanda baseline a second
    pass over the calibration data."""

    def __init__(
        self,
        recipe: Recipe,
        spec: EvalSpec,
        items: EvalItems,
        model: nn.Module,
        tokenizer: Any,
        adapter: Adapter,
        stats: dict[str, Statistics] | None = None,
    ) -> None:
        self.recipe, self.written, self.items = recipe, spec, items
        self.spec = spec = at_depth(spec)
        self.ev = Evaluator(model, tokenizer, adapter, spec, items)
        self.systems = {p: system_prompt(recipe, spec, p) for p in recipe.personas}
        self.stats = stats or {}
        self.norms: dict[str, list[dict[str, Any]]] = {}  # Wanda activation norms, per persona
        self.dense: Raw = {}  # the dense model and its prompt-only conditions, scored once
        opposite = {p: q for p in recipe.personas if (q := recipe.opposite(p))}
        self.replier = Replier(model, tokenizer, adapter, spec, items.reply_prompts, self.systems, opposite)
        self.dense_params = count_parameters(model)
        for system in {None, *self.systems.values()}:  # every answer encoded now: one that does not fit fails here
            self.ev.n_answers(system)

    def wanda(self, personas: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The Wanda baseline's activation norms of `personas` (computed once each); none without the baseline.
        A composite has no calibration data of its own, so no Wanda mask of its data either."""
        if "wanda" not in self.spec.baselines:
            return {}
        ev = self.ev
        personas = [p for p in personas if p in self.recipe.poles]
        for p in personas:
            if p not in self.norms:
                self.norms[p] = wanda_norms(self.recipe, ev.model, ev.tokenizer, ev.adapter, p, self.stats.get(p))
        return {p: self.norms[p] for p in personas}

    def score(self, masks: dict[str, PersonaMask], known: Raw | None = None) -> Raw:
        """Raw scores of every condition of `masks`; the dense model's (and its prompt-only conditions') are
        scored once and reused for the next set; `known` holds figures already scored (e.g. perplexity)."""
        conds = conditions(self.ev, masks, self.wanda(list(masks)))
        raw = score_conditions(self.ev, conds, self.systems, self.dense | (known or {}))
        self.dense |= {k: v for k, v in raw.items() if k == "dense" or k.startswith("dense+")}
        return raw

    def perplexity(self, masks: dict[str, PersonaMask]) -> Raw:
        """Only the neutral-text figures of each persona's mask (and, once, the dense model's): the cheap first
        stage of tune's early rejection. Pass the result to `evaluate(known=...)` so it is not scored again."""
        conds = {k: c for k, c in conditions(self.ev, masks, {}).items() if k == "dense" or k.startswith("mask:")}
        todo = {k: c.intervention for k, c in conds.items() if k not in self.dense or self.dense[k].neutral is None}
        raw: Raw = {}
        for key, figures in self.ev.neutral(todo).items():
            raw[key] = Scores(conds[key].removed, None, figures)
        if "dense" in raw:
            self.dense["dense"] = raw.pop("dense")
        return raw

    def perplexity_ratios(self, known: Raw) -> dict[str, float]:
        """Each persona's neutral perplexity over the dense model's, from `perplexity()`'s figures."""
        base = self.dense["dense"].neutral
        assert base is not None, "perplexity() scores the dense model first"
        return {
            k.removeprefix("mask:"): s.neutral.perplexity / base.perplexity
            for k, s in known.items()
            if s.neutral is not None
        }

    def evaluate(
        self,
        masks: dict[str, PersonaMask],
        *,
        replies: bool = True,
        shipped: bool = True,
        timings: dict[str, float] | None = None,
        known: Raw | None = None,
    ) -> dict[str, PersonaEvaluation]:
        """Every persona's evaluation for `masks`, baselines on the same items; with `shipped` at the full depth,
        the replies are also decoded as the exports ship them (the recipe's output.generation). `timings` receives
        the seconds of each part (baselines, scores, replies); `known`: figures already scored (`perplexity()`)."""
        seconds = timings if timings is not None else {}
        t = time.perf_counter()
        self.wanda(list(masks))
        seconds["eval_baselines"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        raw = self.score(masks, known)
        seconds["eval_scores"] = round(time.perf_counter() - t, 3)
        answered: dict[str, RepliesEvaluation] = {}
        if replies and self.spec.replies is not None and self.items.reply_prompts:
            t = time.perf_counter()
            answered = self.replies(masks, shipped=shipped)
            seconds["eval_replies"] = round(time.perf_counter() - t, 3)
            for p in sorted(set(masks) - set(answered)):
                q = self.replier.opposite.get(p)
                log.info("eval: no replies for %s: %s", p, f"{q} is not evaluated beside it" if q else "no opposite")
        return {p: self.summary(raw, p, masks[p], answered.get(p)) for p in masks}

    def replies(self, masks: dict[str, PersonaMask], *, shipped: bool) -> dict[str, RepliesEvaluation]:
        """Each persona's replies to the reply prompts: greedy, and with `shipped` at the full depth also as the
        exports ship them (the verdict reads the greedy replies only, so its depth decodes no second set)."""
        full = self.spec.depth == "full"
        penalty = self.recipe.output.generation.repetition_penalty if shipped and full else 1.0
        return self.replier.evaluate(masks, penalty)

    def summary(
        self, raw: Raw, persona: str, mask: PersonaMask, replies: RepliesEvaluation | None = None
    ) -> PersonaEvaluation:
        spec, items = self.spec, self.items
        labels = [s.label for s in items.statements]
        mix = self.recipe.composites.get(persona)
        parts = list(mix.mix) if mix is not None else None  # a composite is scored toward its parts' poles
        figures = summarise(raw, persona, spec, labels, random_keys(spec, mask), self.dense_params, replies, parts)
        return PersonaEvaluation(
            depth=spec.depth,
            splits=Splits.model_validate(items.splits),
            leaks=[Leak.model_validate(leak) for leak in items.leaks],
            system_prompt=self.systems[persona],
            statements_prompt=spec.statements.prompt if spec.statements else None,
            random_seeds=[spec.seed + s for s in range(spec.random_seeds)],
            dense_parameters=self.dense_params,
            definitions=DEFINITIONS,
            eval_spec=self.written,
            **figures,
        )
