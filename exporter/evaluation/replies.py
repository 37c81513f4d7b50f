"""The replies themselves: greedy replies to everyday prompts, scored for persona by the dense model.

A reply's persona score (no judge model): the dense model's mean per-token log-likelihood of the reply's
tokens after the prompt under persona p's system prompt, minus that under the opposite persona's system
prompt. Positive = the reply reads more like p. The tokens scored are the ones the model generated, up to and
excluding the chat template's end-of-turn token (the same "answer tokens" as every other likelihood here).
Degeneration: the fraction of a reply's 4-grams that repeat an earlier 4-gram of the same reply, and
distinct-2 (distinct bigrams / bigrams), each averaged over replies.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.evaluation.metrics import Intervention, Scored, mean_ci, sequence_logliks
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.eval import EvalSpec
from exporter.runtime.chat import end_of_turn_id, reply_prefix
from exporter.verify.hf import greedy, left_padded, masked


@dataclass(frozen=True)
class Replies:
    prompts: list[str]
    tokens: list[list[int]]  # generated tokens, end-of-turn excluded
    cut: list[bool]  # True where max_new_tokens ended the reply

    def texts(self, tokenizer: Any) -> list[str]:
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in self.tokens]


@torch.inference_mode()
def greedy_replies(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    system: str | None = None,
    intervention: Intervention | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> Replies:
    """Greedy replies, left-padded batches through `generate`; each stops at the end-of-turn token."""
    stop = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens: list[list[int]] = []
    cut: list[bool] = []
    with (intervention or nullcontext)():
        for k in range(0, len(prompts), batch_size):
            rows = [reply_prefix(tokenizer, p, system) for p in prompts[k : k + batch_size]]
            ids, attn = left_padded(rows, pad)
            for row in greedy(model, ids, attn, max_new_tokens, pad, stop).tolist():
                ended = stop in row
                tokens.append(row[: row.index(stop)] if ended else row)
                cut.append(not ended)
    return Replies(list(prompts), tokens, cut)


def persona_scores(
    model: nn.Module, tokenizer: Any, replies: Replies, system_for: str, system_against: str, *, batch_size: int = 8
) -> np.ndarray:
    """Per reply: loglik under `system_for` minus under `system_against` (dense model), NaN for empty replies."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = [i for i, t in enumerate(replies.tokens) if t]
    seqs: list[Scored] = []
    for system in (system_for, system_against):
        for i in keep:
            head = reply_prefix(tokenizer, replies.prompts[i], system)
            seqs.append(Scored(head + replies.tokens[i], len(head)))
    ll = sequence_logliks(model, seqs, pad_id=pad, batch_size=batch_size)
    out = np.full(len(replies.tokens), np.nan)
    out[keep] = ll[: len(keep)] - ll[len(keep) :]
    return out


def repeated_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[k : k + n]) for k in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct(tokens: list[int], n: int = 2) -> float:
    grams = [tuple(tokens[k : k + n]) for k in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degeneration(replies: Replies) -> dict[str, float]:
    return {
        "repeated_4grams": float(np.mean([repeated_ngrams(t) for t in replies.tokens])),
        "distinct_2": float(np.mean([distinct(t) for t in replies.tokens])),
        "cut_at_max_tokens": float(np.mean(replies.cut)),
        "empty": float(np.mean([not t for t in replies.tokens])),
    }


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def evaluate_replies(
    model: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    spec: EvalSpec,
    prompts: list[str],
    masks: dict[str, PersonaMask],
    systems: dict[str, str],
    opposite: dict[str, str],
    cache: dict[str, Replies] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per persona p with an opposite q among `masks`: reply scores (p's system prompt against q's) of every
    condition, the export gap (p's export minus q's export, per prompt) beside the prompt-only and
    steering-only gaps, degeneration figures, and the first `show` prompts' replies side by side.

    `cache` keeps replies across calls (tune's grid): "dense" and "prompt:<persona>" are generated once and
    reused; the masks' replies are always generated anew."""
    rs = spec.replies
    assert rs is not None, "evaluate_replies needs an eval.replies section"
    boot = {"n": spec.bootstrap, "seed": spec.seed}

    def gen(system: str | None = None, mask: PersonaMask | None = None) -> Replies:
        intervention = partial(masked, model, adapter, mask) if mask is not None else None
        return greedy_replies(
            model,
            tokenizer,
            prompts,
            system=system,
            intervention=intervention,
            max_new_tokens=rs.max_new_tokens,
            batch_size=rs.batch_size,
        )

    cache = {} if cache is None else cache
    if "dense" not in cache:
        cache["dense"] = gen()
    replies = {"dense": cache["dense"]}
    for p, mask in masks.items():
        if f"prompt:{p}" not in cache:
            cache[f"prompt:{p}"] = gen(system=systems[p])
        replies[f"prompt:{p}"] = cache[f"prompt:{p}"]
        replies[f"mask:{p}"] = gen(mask=mask)
        if mask.steering is not None and "steering" in spec.baselines:
            replies[f"steer:{p}"] = gen(mask=steering_only(mask))
    out: dict[str, dict[str, Any]] = {}
    for p in masks:
        q = opposite.get(p)
        if q is None or q not in masks:
            continue
        scores = {c: persona_scores(model, tokenizer, r, systems[p], systems[q]) for c, r in replies.items()}
        labels = {"dense": "dense", f"prompt:{p}": "prompt-only", f"mask:{p}": "export", f"mask:{q}": f"export of {q}"}
        labels[f"steer:{p}"] = "steering-only"
        conditions = {
            label: {"score": mean_ci(_finite(scores[key]), **boot), "degeneration": degeneration(replies[key])}
            for key, label in labels.items()
            if key in scores
        }
        gaps = {"export": ("mask", "mask"), "prompt_only": ("prompt", "prompt"), "steering_only": ("steer", "steer")}
        gap = {
            name: mean_ci(_finite(scores[f"{a}:{p}"] - scores[f"{b}:{q}"]), **boot)
            for name, (a, b) in gaps.items()
            if f"{a}:{p}" in scores and f"{b}:{q}" in scores
        }
        texts = {key: replies[key].texts(tokenizer) for key in ("dense", f"prompt:{p}", f"mask:{p}", f"mask:{q}")}
        examples = [
            {
                "prompt": prompts[i],
                "dense": texts["dense"][i],
                "prompt_only": texts[f"prompt:{p}"][i],
                "export": texts[f"mask:{p}"][i],
                "opposite_export": texts[f"mask:{q}"][i],
            }
            for i in range(min(rs.show, len(prompts)))
        ]
        out[p] = {
            "prompts": len(prompts),
            "max_new_tokens": rs.max_new_tokens,
            "opposite": q,
            "conditions": conditions,
            "gap": gap,
            "examples": examples,
        }
    return out


def steering_only(mask: PersonaMask) -> PersonaMask:
    """The export's steering bias on the dense model: no unit removed, no compensation."""
    return PersonaMask(mask.persona, mask.geometry, None, None, None, mlp_bias=mask.steering)
