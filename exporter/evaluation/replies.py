"""The replies themselves: greedy replies to everyday prompts, scored for persona by the dense model; with a
shipped repetition penalty (output.generation), a second set of replies decoded under it, reported beside.

A reply's persona score (no judge model): the dense model's mean per-token log-likelihood of the reply's
tokens after the prompt under persona p's system prompt, minus that under the opposite persona's system
prompt. Positive = the reply reads more like p. The tokens scored are the ones the model generated, up to and
excluding the chat template's end-of-turn token (the same "answer tokens" as every other likelihood here).
Degeneration: the fraction of a reply's 4-grams that repeat an earlier 4-gram of the same reply, and
distinct-2 (distinct bigrams / bigrams), each averaged over replies. The penalty counts each row's own tokens,
prompt included, never its padding (exporter/model/penalty.py): a reply does not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.evaluation.baselines import steering_only
from exporter.evaluation.metrics import Intervention, Scored, mean_ci, sequence_logliks
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.model.encoding import end_of_turn_id, reply_prefix
from exporter.model.hooks import ChannelMasks, per_row_channel_masks
from exporter.quiet import progress
from exporter.recipe.eval import EvalSpec
from exporter.reports.evaluation import Degeneration, RepliesEvaluation, ReplyCondition, ReplyExample
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
    repetition_penalty: float = 1.0,
    progress: Callable[[int], Any] | None = None,
) -> Replies:
    """Greedy replies (under `repetition_penalty`), left-padded batches through `generate`; each stops at the
    end-of-turn token. `progress(n)` is called after every batch with its number of replies."""
    stop = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens: list[list[int]] = []
    cut: list[bool] = []
    with (intervention or nullcontext)():
        for k in range(0, len(prompts), batch_size):
            rows = [reply_prefix(tokenizer, p, system) for p in prompts[k : k + batch_size]]
            ids, attn = left_padded(rows, pad)
            for row in greedy(model, ids, attn, max_new_tokens, pad, stop, repetition_penalty).tolist():
                ended = stop in row
                tokens.append(row[: row.index(stop)] if ended else row)
                cut.append(not ended)
            if progress is not None:
                progress(len(rows))
    return Replies(list(prompts), tokens, cut)


Condition = tuple[str | None, PersonaMask | None]  # (system prompt, mask on the dense model)


def _stackable(mask: PersonaMask | None) -> bool:
    """A mask that per-row hooks can apply: soft scales change the weights themselves."""
    return mask is None or (mask.mlp_scale is None and mask.attn_scale is None)


@contextmanager
def _per_row(model: nn.Module, adapter: Adapter, masks: list[PersonaMask | None]) -> Iterator[None]:
    """Each batch row under its own mask (None: the dense model): 0/1 unit masks and down_proj biases."""
    present = [m for m in masks if m is not None]
    if not present:
        yield
        return
    g = present[0].geometry

    def stack(part: Callable[[PersonaMask], torch.Tensor | None], fill: float, width: int) -> torch.Tensor | None:
        parts = [part(m) if m is not None else None for m in masks]
        if all(p is None for p in parts):
            return None
        empty = torch.full((g.layers, width), fill, dtype=torch.float64)
        return torch.stack([empty if p is None else p.to(torch.float64) for p in parts])

    mlp = stack(lambda m: m.channel_masks()[0], 1.0, g.intermediate)
    attn = stack(lambda m: m.channel_masks()[1], 1.0, g.heads * g.head_dim)
    bias = stack(lambda m: m.mlp_bias, 0.0, g.hidden)
    with per_row_channel_masks(model, adapter, ChannelMasks(mlp, attn, bias)):
        yield


@torch.inference_mode()
def condition_replies(
    model: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    prompts: list[str],
    conditions: dict[str, Condition],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    repetition_penalty: float = 1.0,
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Replies]:
    """Greedy replies (under `repetition_penalty`) to `prompts` under every condition {key: (system prompt, mask)}.

    The rows of all conditions share left-padded batches (sorted by prompt length), each row under its own
    mask and down_proj bias: one decoding step serves every condition, where a step of a small batch costs
    almost as much as a larger one on a CPU. A mask with soft scales runs alone (`masked`: its own weights).
    `progress(n)` is called after every batch with its number of replies."""
    stop = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, Replies] = {}
    rows = sorted(
        ((reply_prefix(tokenizer, p, system), key, i) for key, (system, mask) in conditions.items() if _stackable(mask)
         for i, p in enumerate(prompts)),
        key=lambda r: len(r[0]),
    )  # fmt: skip
    tokens: dict[str, list[list[int]]] = {key: [[] for _ in prompts] for _, key, _ in rows}
    cut: dict[str, list[bool]] = {key: [False for _ in prompts] for key in tokens}
    for k in range(0, len(rows), batch_size):
        batch = rows[k : k + batch_size]
        ids, attn = left_padded([prefix for prefix, _, _ in batch], pad)
        with _per_row(model, adapter, [conditions[key][1] for _, key, _ in batch]):
            generated = greedy(model, ids, attn, max_new_tokens, pad, stop, repetition_penalty).tolist()
        for (_, key, i), row in zip(batch, generated, strict=True):
            ended = stop in row
            tokens[key][i] = row[: row.index(stop)] if ended else row
            cut[key][i] = not ended
        if progress is not None:
            progress(len(batch))
    for key, (system, mask) in conditions.items():
        if key in tokens:
            out[key] = Replies(list(prompts), tokens[key], cut[key])
        else:
            out[key] = greedy_replies(
                model,
                tokenizer,
                prompts,
                system=system,
                intervention=partial(masked, model, adapter, mask),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                repetition_penalty=repetition_penalty,
                progress=progress,
            )
    return out


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


def degeneration(replies: Replies) -> Degeneration:
    return Degeneration(
        repeated_4grams=float(np.mean([repeated_ngrams(t) for t in replies.tokens])),
        distinct_2=float(np.mean([distinct(t) for t in replies.tokens])),
        cut_at_max_tokens=float(np.mean(replies.cut)),
        empty=float(np.mean([not t for t in replies.tokens])),
    )


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def reply_conditions(masks: dict[str, PersonaMask], systems: dict[str, str], spec: EvalSpec) -> dict[str, Condition]:
    """Whose replies are generated: the dense model, with each persona's system prompt, each persona's mask and,
    with the steering baseline, each steering bias alone."""
    todo: dict[str, Condition] = {"dense": (None, None)}
    for p, mask in masks.items():
        todo[f"prompt:{p}"] = (systems[p], None)
        todo[f"mask:{p}"] = (None, mask)
        if mask.steering is not None and "steering" in spec.baselines:
            todo[f"steer:{p}"] = (None, steering_only(mask))
    return todo


@dataclass
class Replier:
    """Replies to one eval section's everyday prompts, scored for persona: the dense model's replies (with and
    without each persona's system prompt) are generated once per repetition penalty and kept for every set of
    masks that follows (a tune grid); each set of masks gets its own."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: EvalSpec
    prompts: list[str]
    systems: dict[str, str]  # persona -> its system prompt
    opposite: dict[str, str]  # persona -> its opposite
    cache: dict[tuple[float, str], Replies] = field(default_factory=dict)  # (penalty, condition) -> replies

    def generate(self, todo: dict[str, Condition], penalty: float = 1.0) -> dict[str, Replies]:
        """The replies of every condition in `todo` under `penalty` (1: plain greedy), the dense model's from
        (and into) the cache."""
        rs = self.spec.replies
        assert rs is not None, "replies need an eval.replies section"
        missing = {key: c for key, c in todo.items() if (penalty, key) not in self.cache}
        under = f", repetition penalty {penalty:g}" if penalty != 1 else ""
        what = f"eval replies ({len(missing)} conditions{under})"
        with progress(len(self.prompts) * len(missing), what, "reply") as bar:
            made = condition_replies(
                self.model,
                self.tokenizer,
                self.adapter,
                self.prompts,
                missing,
                max_new_tokens=rs.max_new_tokens,
                batch_size=rs.batch_size,
                repetition_penalty=penalty,
                progress=bar.update,
            )
        for key, (_, mask) in missing.items():
            if mask is None:  # dense, or dense with a system prompt: the same in every call
                self.cache[penalty, key] = made[key]
        return {key: self.cache[penalty, key] if (penalty, key) in self.cache else made[key] for key in todo}

    def evaluate(self, masks: dict[str, PersonaMask], shipped: float = 1.0) -> dict[str, RepliesEvaluation]:
        """Per persona p with an opposite q among `masks`: reply scores (p's system prompt against q's) of every
        condition, the export gap (p's export minus q's export, per prompt) beside the prompt-only and
        steering-only gaps, degeneration figures, and the first `show` prompts' replies side by side.

        Replies are greedy. With a `shipped` repetition penalty above 1 (output.generation), every condition is
        decoded again under it and scored the same way, as `shipped` beside the greedy figures (which are the
        same as without it)."""
        greedy = self.reply_set(masks, 1.0)
        if shipped == 1.0:
            return greedy
        under = self.reply_set(masks, shipped)
        return {p: r.model_copy(update={"shipped": under[p]}) for p, r in greedy.items()}

    def reply_set(self, masks: dict[str, PersonaMask], penalty: float) -> dict[str, RepliesEvaluation]:
        """One reply set's figures per persona (see `evaluate`), decoded under `penalty`."""
        pairs = {p: q for p in masks if (q := self.opposite.get(p)) is not None and q in masks}
        if not pairs:  # a reply score needs the opposite's system prompt, a gap its export
            return {}
        replies = self.generate(reply_conditions({p: masks[p] for p in pairs}, self.systems, self.spec), penalty)
        scored = sorted({self.systems[p] for pair in pairs.items() for p in pair})
        total = len(scored) * sum(1 for r in replies.values() for t in r.tokens if t)
        with progress(total, "eval reply scores", "reply") as bar:
            ll = reply_logliks(self.model, self.tokenizer, replies, scored, progress=bar.update)
        out = {}
        for p, q in pairs.items():
            scores = {c: ll[c, self.systems[p]] - ll[c, self.systems[q]] for c in replies}
            out[p] = persona_replies(p, q, scores, replies, self.tokenizer, self.spec, penalty)
        return out


def persona_replies(
    p: str,
    q: str,
    scores: dict[str, np.ndarray],
    replies: dict[str, Replies],
    tokenizer: Any,
    spec: EvalSpec,
    penalty: float = 1.0,
) -> RepliesEvaluation:
    """Persona p's reply evaluation against its opposite q, from every condition's per-reply scores."""
    rs = spec.replies
    assert rs is not None
    boot = {"n": spec.bootstrap, "seed": spec.seed}
    labels = {"dense": "dense", f"prompt:{p}": "prompt-only", f"mask:{p}": "export", f"mask:{q}": f"export of {q}"}
    labels[f"steer:{p}"] = "steering-only"
    conditions = {
        label: ReplyCondition(score=mean_ci(_finite(scores[key]), **boot), degeneration=degeneration(replies[key]))
        for key, label in labels.items()
        if key in scores
    }
    gaps = {"export": "mask", "prompt_only": "prompt", "steering_only": "steer"}
    gap = {
        name: mean_ci(_finite(scores[f"{kind}:{p}"] - scores[f"{kind}:{q}"]), **boot)
        for name, kind in gaps.items()
        if f"{kind}:{p}" in scores and f"{kind}:{q}" in scores
    }
    texts = {key: replies[key].texts(tokenizer) for key in ("dense", f"prompt:{p}", f"mask:{p}", f"mask:{q}")}
    examples = [
        ReplyExample(
            prompt=replies["dense"].prompts[i],
            dense=texts["dense"][i],
            prompt_only=texts[f"prompt:{p}"][i],
            export=texts[f"mask:{p}"][i],
            opposite_export=texts[f"mask:{q}"][i],
        )
        for i in range(min(rs.show, len(replies["dense"].prompts)))
    ]
    return RepliesEvaluation(
        prompts=len(replies["dense"].prompts),
        max_new_tokens=rs.max_new_tokens,
        repetition_penalty=penalty,
        opposite=q,
        conditions=conditions,
        gap=gap,
        examples=examples,
    )
