"""Evaluation metrics (METHOD.md section 5): pure functions over a model, a tokenizer and items.

- Answer log-likelihood: mean per-token log-probability of the answer tokens only (chat template applied,
  the answer as the assistant turn; the template's end-of-turn tokens and padding are not counted).
- Neutral text: perplexity over every token of the corpus windows after the first, and the mean
  KL(P_dense || Q) of next-token distributions at the same positions.
- Seeded percentile-bootstrap 95 % intervals.
An `intervention` is a context-manager factory (mask hooks, zeroed weights) active during the forward pass.
Everything runs in inference mode; log-softmax in fp32, or in float64 for a float64 model (tests compare in
float64, where summation order cannot move the figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from exporter.errors import CalibrationDataError
from exporter.runtime.chat import encode_reply, position_ids

Intervention = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Scored:
    """A token sequence whose tokens [start, len) are scored."""

    ids: list[int]
    start: int


def encode_answer(
    tokenizer: Any, prompt: str | None, answer: str, *, system: str | None = None, max_tokens: int = 256
) -> Scored:
    """Prompt (+ system prompt) and answer as one chat; the answer's content tokens are scored (not the
    template's end-of-turn tokens)."""
    ids, n_prefix = encode_reply(tokenizer, prompt, answer, system, end_of_turn=False)
    start = max(n_prefix, 1)  # the first token of a sequence has no prediction
    ids = ids[:max_tokens]
    if len(ids) <= start:
        raise CalibrationDataError(
            f"a prompt fills all {max_tokens} tokens (eval.max_tokens), leaving no answer token; raise max_tokens"
        )
    return Scored(ids, start)


def _batches(seqs: list[Scored], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].ids), i))  # less padding
    for k in range(0, len(order), batch_size):
        yield order[k : k + batch_size]


def _wide(x: torch.Tensor) -> torch.Tensor:
    """fp32 at least (fp16 sums overflow); a float64 model stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _parts(model: Any) -> tuple[nn.Module, nn.Module]:
    """The decoder body (hidden states) and the LM head: logits are computed only where they are scored."""
    return model.get_decoder(), model.get_output_embeddings()


def _log_probs(
    model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Log-softmax (fp32) of the next-token distribution at positions (rows, cols): (n, vocab)."""
    decoder, head = _parts(model)
    hidden = decoder(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), use_cache=False)
    logits = head(hidden.last_hidden_state[rows, cols])
    return torch.log_softmax(_wide(logits), dim=-1)


def _plain(model: nn.Module, seqs: list[Scored], pad_id: int) -> np.ndarray:
    """One right-padded batch of whole sequences."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    score = torch.zeros((len(seqs), width), dtype=torch.bool)  # target tokens that count
    for r, s in enumerate(seqs):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        attn[r, : len(s.ids)] = 1
        score[r, s.start : len(s.ids)] = True
    rows, cols = score.nonzero(as_tuple=True)
    lp = _log_probs(model, ids, attn, rows, cols - 1)  # position t-1 predicts token t
    token_ll = lp.gather(1, ids[rows, cols].unsqueeze(1)).squeeze(1).double()
    sums = torch.zeros(len(seqs), dtype=torch.float64).index_add_(0, rows, token_ll)
    return (sums / score.sum(1).double()).numpy()


def _after_prefix(
    model: nn.Module, prefix: list[int], answers: list[list[int]], pad_id: int, batch_size: int
) -> np.ndarray:
    """Answers that share one prompt: the prompt runs once, its KV cache serves every answer batch."""
    decoder, head = _parts(model)
    first = decoder(input_ids=torch.tensor([prefix]), use_cache=True)
    legacy = first.past_key_values.to_legacy_cache()  # per layer (k, v): (1, kv_heads, P, head_dim)
    lp0 = torch.log_softmax(_wide(head(first.last_hidden_state[0, -1])), dim=-1)  # predicts answer token 0
    out = np.zeros(len(answers))
    n = len(prefix)
    for k in range(0, len(answers), batch_size):
        chunk = answers[k : k + batch_size]
        width = max(len(ans) for ans in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.ones((len(chunk), n + width), dtype=torch.long)
        for r, ans in enumerate(chunk):
            ids[r, : len(ans)] = torch.tensor(ans)
            attn[r, n + len(ans) :] = 0
        past: Any = tuple(
            (key.expand(len(chunk), -1, -1, -1), val.expand(len(chunk), -1, -1, -1)) for key, val in legacy
        )
        cache = DynamicCache.from_legacy_cache(past)
        hidden = decoder(
            input_ids=ids,
            attention_mask=attn,
            position_ids=(n + torch.arange(width)).expand(len(chunk), -1),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        score = attn[:, n + 1 :].bool()  # answer token t (t >= 1) predicted at answer position t - 1
        rows, cols = score.nonzero(as_tuple=True)
        lp = torch.log_softmax(_wide(head(hidden[rows, cols])), dim=-1)
        token_ll = lp.gather(1, ids[rows, cols + 1].unsqueeze(1)).squeeze(1).double()
        sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows, token_ll)
        sums += lp0[ids[:, 0]].double()
        out[k : k + len(chunk)] = (sums / torch.tensor([len(ans) for ans in chunk], dtype=torch.float64)).numpy()
    return out


@torch.inference_mode()
def sequence_logliks(
    model: nn.Module,
    seqs: list[Scored],
    *,
    pad_id: int,
    batch_size: int = 8,
    intervention: Intervention | None = None,
) -> np.ndarray:
    """Mean per-token log-likelihood of each sequence's scored tokens, (len(seqs),) float64.

    Sequences with the same prompt (the two answers of a pair, statements after one prompt) share one
    forward pass of the prompt through the KV cache; the others run as length-sorted padded batches.
    """
    out = np.zeros(len(seqs))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s.ids[: s.start]), []).append(i)
    single = [idx[0] for idx in groups.values() if len(idx) == 1]
    with (intervention or nullcontext)():
        for prefix, idx in groups.items():
            if len(idx) > 1:
                answers = [seqs[i].ids[seqs[i].start :] for i in idx]
                out[idx] = _after_prefix(model, list(prefix), answers, pad_id, batch_size)
        for batch in _batches([seqs[i] for i in single], batch_size):
            idx = [single[b] for b in batch]
            out[idx] = _plain(model, [seqs[i] for i in idx], pad_id)
    return out


def neutral_windows(
    tokenizer: Any, paragraphs: list[str], window: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Whole paragraphs packed into windows of at most `window` tokens (a longer paragraph is cut)."""
    windows: list[list[int]] = []
    texts: list[str] = []

    def flush() -> None:
        if texts:
            windows.append(list(tokenizer("\n\n".join(texts))["input_ids"])[:window])
            texts.clear()

    for para in paragraphs:
        if texts and len(tokenizer("\n\n".join([*texts, para]))["input_ids"]) > window:
            flush()
        texts.append(para)
    flush()
    if max_tokens is not None:
        kept, total = [], 0
        for w in windows:
            if total >= max_tokens:
                break
            kept.append(w[: max_tokens - total + 1])
            total += len(kept[-1]) - 1
        windows = kept
    return [w for w in windows if len(w) > 1]


@torch.inference_mode()
def neutral_scores(
    model: nn.Module, windows: list[list[int]], interventions: dict[str, Intervention | None]
) -> dict[str, dict[str, float]]:
    """Per intervention: perplexity, mean NLL, mean KL(P_dense || Q) over every window token after the first.

    The dense forward runs once per window and serves as P for all interventions (window by window, so
    only one window's distributions are held in memory).
    """
    nll = dict.fromkeys(interventions, 0.0)
    kl = dict.fromkeys(interventions, 0.0)
    count = 0
    for w in windows:
        ids = torch.tensor([w])
        attn = torch.ones_like(ids)
        rows = torch.zeros(len(w) - 1, dtype=torch.long)
        cols = torch.arange(len(w) - 1)
        targets = ids[0, 1:].unsqueeze(1)
        dense = _log_probs(model, ids, attn, rows, cols)
        for name, intervention in interventions.items():
            if intervention is None:
                lq = dense
            else:
                with intervention():
                    lq = _log_probs(model, ids, attn, rows, cols)
            nll[name] -= float(lq.gather(1, targets).double().sum())
            kl[name] += float((dense.exp() * (dense - lq)).sum(-1).clamp_min(0.0).double().sum())
        count += len(w) - 1
    return {
        name: {
            "perplexity": float(np.exp(nll[name] / count)),
            "nll": nll[name] / count,
            "kl": kl[name] / count,
            "tokens": count,
        }
        for name in interventions
    }


def bootstrap(stat: Callable[[np.ndarray], float], n_items: int, *, n: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of `stat(indices)` over `n` seeded resamples of the item indices."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n_items, n_items)) for _ in range(n)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def mean_ci(x: np.ndarray, *, n: int, seed: int) -> dict[str, Any]:
    """Mean of per-item values with its bootstrap interval."""
    return {
        "mean": float(x.mean()),
        "ci95": list(bootstrap(lambda i: float(x[i].mean()), len(x), n=n, seed=seed)),
    }


def win_rate_ci(margins: np.ndarray, *, n: int, seed: int) -> dict[str, Any]:
    """Fraction of items with a positive margin (A/B accuracy) with its bootstrap interval."""
    return mean_ci((margins > 0).astype(np.float64), n=n, seed=seed)


def contrast_ci(match: np.ndarray, other: np.ndarray, *, n: int, seed: int) -> dict[str, Any]:
    """mean(match) - mean(other) for two independent groups; the interval resamples each group."""
    rng = np.random.default_rng(seed)
    values = [
        float(
            match[rng.integers(0, len(match), len(match))].mean()
            - other[rng.integers(0, len(other), len(other))].mean()
        )
        for _ in range(n)
    ]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return {"mean": float(match.mean() - other.mean()), "ci95": [float(lo), float(hi)]}
