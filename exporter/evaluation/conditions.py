"""The conditions an evaluation compares on the same items, and their raw scores.

Weight conditions (one neutral-corpus pass each): dense, each persona's mask, random masks of the same size
(`random_seeds` seeds), each persona's unstructured Wanda mask, and the ablations (steering only, removal
only). Answer conditions add an optional persona system prompt: prompt-only = dense + prompt, mask+prompt =
mask + prompt. A persona mask is applied to unit activations, which the verification stage proves equal to the
exported model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
from torch import nn

from exporter.evaluation import baselines
from exporter.evaluation.items import EvalItems
from exporter.evaluation.metrics import (
    Intervention,
    NeutralScore,
    neutral_scores,
    neutral_windows,
    scoring_work,
    sequence_logliks,
)
from exporter.masking.calibrate import batches
from exporter.masking.data import select_samples, tokenize
from exporter.masking.masks import PersonaMask
from exporter.masking.statistics import Statistics
from exporter.model.adapters import Adapter
from exporter.model.encoding import Scored, encode_answer
from exporter.quiet import progress
from exporter.recipe.eval import EvalSpec, set_spec
from exporter.recipe.schema import Recipe
from exporter.verify.hf import masked

log = logging.getLogger(__name__)


def system_prompt(recipe: Recipe, spec: EvalSpec, persona: str) -> str:
    desc = recipe.description(persona)
    return spec.system_prompts.get(persona) or f"Answer as a person with this personality: {desc}"


def item_sequences(spec: EvalSpec, items: EvalItems, enc: Callable[[str, str], Scored]) -> dict[str, list[Scored]]:
    """Every answer of `items` to score, encoded by `enc(prompt, answer)`, per answer set."""
    seqs: dict[str, list[Scored]] = {}
    if spec.paired is not None:
        for persona in spec.paired.responses:
            seqs[f"paired:{persona}"] = [enc(it.prompt, it.responses[persona]) for it in items.paired]
    for persona, answers in items.unpaired.items():
        seqs[f"unpaired:{persona}"] = [enc(a.prompt, a.response) for a in answers]
    if spec.choices is not None:
        for persona in spec.choices.responses:
            seqs[f"choices:{persona}"] = [enc(c.question, c.letters[persona]) for c in items.choices]
    if spec.statements is not None:
        seqs["statements"] = [enc(spec.statements.prompt, s.text) for s in items.statements]
    return seqs


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
            seqs = item_sequences(self.spec, self.items, enc)
            for item_set in self.spec.sets:
                sub = item_sequences(set_spec(item_set, self.spec), self.items.sets[item_set.name], enc)
                seqs |= {f"{item_set.name}/{key}": group for key, group in sub.items()}
            self._encoded[system] = seqs
        return self._encoded[system]

    def answers(
        self, intervention: Intervention | None, system: str | None, progress: Callable[[int], Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Mean per-token log-likelihood of every answer: {"paired:<persona>": (N,), "unpaired:<persona>": (N_p,),
        "choices:<persona>": (K,) (the persona's letter as the reply to each question), "statements": (M,)}, and
        each item set's as "<set name>/<key>".

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
    ) -> dict[str, NeutralScore]:
        return neutral_scores(self.model, self.windows, interventions, progress) if self.windows else {}


def mask_intervention(model: nn.Module, adapter: Adapter, mask: PersonaMask) -> Intervention:
    return partial(masked, model, adapter, mask)


def size_key(mask: PersonaMask) -> str:
    """Identifies the per-layer removal counts: random masks of equal counts and seed are identical."""
    counts = [[len(r) for r in mask.removed(k)] for k in ("mlp", "head", "group")]
    return hashlib.sha256(repr(counts).encode()).hexdigest()[:8]


def random_keys(spec: EvalSpec, mask: PersonaMask) -> list[str]:
    """The condition keys of the random masks of `mask`'s size (none without the random baseline)."""
    return [f"random:{size_key(mask)}:{s}" for s in range(spec.random_seeds)] if "random" in spec.baselines else []


@dataclass
class WeightCondition:
    intervention: Intervention | None
    removed: int  # parameters removed (or zeroed)
    prompts: list[str] = field(default_factory=list)  # personas whose system prompt is also evaluated


@dataclass
class Scores:
    """One condition's raw scores: per answer set, each answer's mean per-token log-likelihood; its weights'
    neutral-text figures (none for a condition that only adds a system prompt); the parameters it removes."""

    removed: int = 0
    answers: dict[str, np.ndarray] | None = None
    neutral: NeutralScore | None = None


Raw = dict[str, Scores]  # condition key ("dense", "mask:introvert", "mask:introvert+prompt:introvert", ...)


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
    cal = recipe.poles[persona].calibration
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
            steering = baselines.steering_only(mask)
            out[f"steer:{name}"] = WeightCondition(mask_intervention(model, adapter, steering), 0)
        if mask.mlp_bias is not None and "removal" in use:
            bare = replace(mask, mlp_bias=None, steering=None)
            out[f"removal:{name}"] = WeightCondition(mask_intervention(model, adapter, bare), sum(per_layer))
        for s, key in enumerate(random_keys(spec, mask)):
            rnd = baselines.random_mask(mask, spec.seed + s)
            out.setdefault(key, WeightCondition(mask_intervention(model, adapter, rnd), sum(per_layer)))
        if "wanda" in use and name in norms:
            removal = baselines.wanda_mask(model, adapter, norms[name], per_layer)
            out[f"wanda:{name}"] = WeightCondition(partial(baselines.zeroed, model, adapter, removal), sum(per_layer))
    return out


def score_conditions(
    ev: Evaluator,
    conds: dict[str, WeightCondition],
    system_prompts: dict[str, str],
    done: Raw | None = None,
) -> Raw:
    """Raw scores per condition key ("mask:introvert", "mask:introvert+prompt:introvert", ...).

    `done` holds raw scores from an earlier call (e.g. the dense model in a sweep); those are not recomputed.
    """
    raw: Raw = dict(done or {})
    todo = {k: c.intervention for k, c in conds.items() if k not in raw or raw[k].neutral is None}
    if todo and ev.windows:
        with progress(len(ev.windows), f"eval neutral text ({len(todo)} conditions)", "window") as bar:
            for key, figures in ev.neutral(todo, bar.update).items():
                raw.setdefault(key, Scores()).neutral = figures
    for key, cond in conds.items():
        for persona in [None, *cond.prompts]:
            name = key if persona is None else f"{key}+prompt:{persona}"
            if name in raw and raw[name].answers is not None:
                continue
            system = None if persona is None else system_prompts[persona]
            entry = raw.setdefault(name, Scores())
            with progress(ev.n_answers(system), f"eval {name}", "answer") as bar:
                entry.answers = ev.answers(cond.intervention, system, bar.update)
            entry.removed = cond.removed
    for key, cond in conds.items():
        raw[key].removed = cond.removed
    return raw
