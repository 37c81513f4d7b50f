"""The replies themselves: greedy replies to everyday prompts, scored for persona by the dense model.

A reply's persona score (no judge model): the dense model's mean per-token log-likelihood of the reply's
tokens after the prompt under persona p's system prompt, minus that under the opposite persona's system
prompt. Positive = the reply reads more like p. The tokens scored are the ones the model generated, up to and
excluding the chat template's end-of-turn token (the same "answer tokens" as every other likelihood here).
Degeneration: the fraction of a reply's 4-grams that repeat an earlier 4-gram of the same reply, and
distinct-2 (distinct bigrams / bigrams), each averaged over replies.
"""

from __future__ import annotations

from collections.abc import Callable
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
from exporter.quiet import progress
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
    progress: Callable[[int], Any] | None = None,
) -> Replies:
    """Greedy replies, left-padded batches through `generate`; each stops at the end-of-turn token.
    `progress(n)` is called after every batch with its number of replies."""
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
            if progress is not None:
                progress(len(rows))
    return Replies(list(prompts), tokens, cut)


def reply_logliks(
    model: nn.Module,
    tokenizer: Any,
    replies: dict[str, Replies],
    systems: list[str],
    *,
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """Dense mean per-token log-likelihood of every reply under every system prompt, {(key, system): (n,)},
    NaN for empty replies. One call: the replies of all conditions to one prompt share its prompt pass."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[Scored] = []
    where: list[tuple[str, str, int]] = []
    for system in systems:
        for key, r in replies.items():
            for i, tokens in enumerate(r.tokens):
                if tokens:
                    head = reply_prefix(tokenizer, r.prompts[i], system)
                    seqs.append(Scored(head + tokens, len(head)))
                    where.append((key, system, i))
    ll = sequence_logliks(model, seqs, pad_id=pad, batch_size=batch_size, progress=progress) if seqs else np.zeros(0)
    out = {(key, system): np.full(len(r.tokens), np.nan) for system in systems for key, r in replies.items()}
    for (key, system, i), value in zip(where, ll, strict=True):
        out[key, system][i] = value
    return out


def persona_scores(
    model: nn.Module, tokenizer: Any, replies: Replies, system_for: str, system_against: str, *, batch_size: int = 8
) -> np.ndarray:
    """Per reply: loglik under `system_for` minus under `system_against` (dense model), NaN for empty replies."""
    ll = reply_logliks(model, tokenizer, {"": replies}, [system_for, system_against], batch_size=batch_size)
    return ll["", system_for] - ll["", system_against]


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

    todo: dict[str, tuple[str | None, PersonaMask | None]] = {"dense": (None, None)}
    for p, mask in masks.items():
        todo[f"prompt:{p}"] = (systems[p], None)
        todo[f"mask:{p}"] = (None, mask)
        if mask.steering is not None and "steering" in spec.baselines:
            todo[f"steer:{p}"] = (None, steering_only(mask))
    cache = {} if cache is None else cache
    replies: dict[str, Replies] = {}
    for key, (system, condition) in todo.items():
        if key in cache:
            replies[key] = cache[key]
            continue
        with progress(len(prompts), f"eval replies {key}", "reply") as bar:
            replies[key] = greedy_replies(
                model,
                tokenizer,
                prompts,
                system=system,
                intervention=partial(masked, model, adapter, condition) if condition is not None else None,
                max_new_tokens=rs.max_new_tokens,
                batch_size=rs.batch_size,
                progress=bar.update,
            )
        if condition is None:  # dense, or dense with a system prompt: the same in every call
            cache[key] = replies[key]
    pairs = {p: q for p in masks if (q := opposite.get(p)) is not None and q in masks}
    scored = sorted({systems[p] for pair in pairs.items() for p in pair})
    ll = {}
    if pairs:
        total = len(scored) * sum(1 for r in replies.values() for t in r.tokens if t)
        with progress(total, "eval reply scores", "reply") as bar:
            ll = reply_logliks(model, tokenizer, replies, scored, progress=bar.update)
    out: dict[str, dict[str, Any]] = {}
    for p, q in pairs.items():
        scores = {c: ll[c, systems[p]] - ll[c, systems[q]] for c in replies}
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
