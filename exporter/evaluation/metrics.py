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

from exporter.model.encoding import Scored, position_ids
from exporter.reports.evaluation import CI

Intervention = Callable[[], AbstractContextManager[Any]]


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


def _token_ll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log P(target | hidden state) per row, float64: (n,) from hidden (n, d) and targets (n,)."""
    lp = torch.log_softmax(_wide(head(hidden)), dim=-1)
    return lp.gather(1, targets.unsqueeze(1)).squeeze(1).double()


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask), each (len(rows), longest)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
    return ids, attn


@dataclass(frozen=True)
class _Group:
    """Sequences that share a prompt: `prefix` runs once, each distinct answer continues from its KV cache."""

    prefix: list[int]
    answers: list[list[int]]  # distinct
    index: list[list[int]]  # per answer, the positions of the sequences in the caller's list that end with it


def _groups(seqs: list[Scored]) -> list[_Group]:
    """Sequences grouped by prompt, shortest first (less padding in a batch). An answer that occurs more than
    once after the same prompt (the same reply under two conditions) is scored once: equal sequences get
    equal figures whatever batch they would have landed in."""
    by_prefix: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i, s in enumerate(seqs):
        by_prefix.setdefault(tuple(s.ids[: s.start]), {}).setdefault(tuple(s.ids[s.start :]), []).append(i)
    groups = [_Group(list(p), [list(a) for a in d], list(d.values())) for p, d in by_prefix.items()]
    return sorted(groups, key=lambda g: (len(g.prefix) + max(map(len, g.answers)), g.index[0][0]))


def scoring_work(seqs: list[Scored]) -> tuple[int, int]:
    """The least work of scoring `seqs`: (tokens through the decoder, rows through the LM head). Each distinct
    prompt runs once (twice when split over two batches), each distinct answer after it once, and the head runs
    at every answer token."""
    groups = _groups(seqs)
    answers = sum(len(a) for g in groups for a in g.answers)
    return sum(len(g.prefix) for g in groups) + answers, answers


Chunk = list[tuple[_Group, list[int]]]  # (group, which of its answers): one batch


def _chunks(groups: list[_Group], batch_size: int) -> Iterator[Chunk]:
    """Batches of at most `batch_size` answers; a group's prompt runs once per batch it appears in."""
    batch: Chunk = []
    rows = 0
    for g in groups:
        todo = list(range(len(g.answers)))
        while todo:
            take = todo[: batch_size - rows]
            batch.append((g, take))
            rows += len(take)
            todo = todo[len(take) :]
            if rows == batch_size:
                yield batch
                batch, rows = [], 0
    if batch:
        yield batch


def _score_chunk(model: nn.Module, chunk: Chunk, pad_id: int) -> np.ndarray:
    """Mean log-likelihood of each answer in the chunk (in chunk order): the prompts run as one padded batch,
    then every answer as one padded batch continuing from its prompt's KV cache."""
    decoder, head = _parts(model)
    pre_ids, pre_attn = _padded([g.prefix for g, _ in chunk], pad_id)
    first = decoder(input_ids=pre_ids, attention_mask=pre_attn, position_ids=position_ids(pre_attn), use_cache=True)
    legacy = first.past_key_values.to_legacy_cache()  # per layer (k, v): (prompts, kv_heads, P, head_dim)
    pre_len = pre_attn.sum(1)
    last = first.last_hidden_state[torch.arange(len(chunk)), pre_len - 1]  # predicts each answer's first token
    owner = torch.tensor([c for c, (_, take) in enumerate(chunk) for _ in take])  # answer row -> its prompt
    ids, ans_attn = _padded([g.answers[a] for g, take in chunk for a in take], pad_id)
    past: Any = tuple((k[owner], v[owner]) for k, v in legacy)
    hidden = decoder(
        input_ids=ids,
        attention_mask=torch.cat([pre_attn[owner], ans_attn], 1),  # a prompt's padding sits before its answer
        position_ids=pre_len[owner].unsqueeze(1) + torch.arange(ids.shape[1]),
        past_key_values=DynamicCache.from_legacy_cache(past),
        use_cache=True,
    ).last_hidden_state
    rows, cols = ans_attn[:, 1:].nonzero(as_tuple=True)  # answer token t >= 1, predicted at position t - 1
    sums = torch.zeros(len(owner), dtype=torch.float64)
    sums.index_add_(0, rows, _token_ll(head, hidden[rows, cols], ids[rows, cols + 1]))
    sums += _token_ll(head, last[owner], ids[:, 0])
    return (sums / ans_attn.sum(1).double()).numpy()


@torch.inference_mode()
def sequence_logliks(
    model: nn.Module,
    seqs: list[Scored],
    *,
    pad_id: int,
    batch_size: int = 8,
    intervention: Intervention | None = None,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Mean per-token log-likelihood of each sequence's scored tokens, (len(seqs),) float64.

    Sequences with the same prompt (the two answers of a pair, statements after one prompt, replies to one
    prompt) share one forward pass of the prompt through the KV cache, and equal sequences are scored once;
    batches of `batch_size` distinct answers, length-sorted. `progress(n)` is called after every batch with the number of sequences it scored.
    """
    out = np.zeros(len(seqs))
    with (intervention or nullcontext)():
        for chunk in _chunks(_groups(seqs), batch_size):
            where = [g.index[a] for g, take in chunk for a in take]
            for positions, value in zip(where, _score_chunk(model, chunk, pad_id), strict=True):
                out[positions] = value
            if progress is not None:
                progress(sum(map(len, where)))
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
    model: nn.Module,
    windows: list[list[int]],
    interventions: dict[str, Intervention | None],
    progress: Callable[[int], Any] | None = None,
) -> dict[str, NeutralScore]:
    """Per intervention: perplexity, mean NLL, mean KL(P_dense || Q) over every window token after the first.

    The dense forward runs once per window and serves as P for all interventions (window by window, so
    only one window's distributions are held in memory). `progress(1)` is called after every window.
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
        dense = _log_probs(model, ids, attn, rows, cols)  # (tokens, vocab)
        p = dense.exp()
        for name, intervention in interventions.items():
            if intervention is None:
                lq = dense
            else:
                with intervention():
                    lq = _log_probs(model, ids, attn, rows, cols)
            nll[name] -= float(lq.gather(1, targets).double().sum())
            kl[name] += float((p * (dense - lq)).sum(-1).clamp_min(0.0).double().sum())
        count += len(w) - 1
        if progress is not None:
            progress(1)
    return {
        name: NeutralScore(float(np.exp(nll[name] / count)), nll[name] / count, kl[name] / count, count)
        for name in interventions
    }


@dataclass(frozen=True)
class NeutralScore:
    """A condition on the neutral text: perplexity, mean NLL and mean KL(P_dense || Q) per token, and the tokens
    scored."""

    perplexity: float
    nll: float
    kl: float
    tokens: int


def bootstrap(stat: Callable[[np.ndarray], float], n_items: int, *, n: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of `stat(indices)` over `n` seeded resamples of the item indices."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n_items, n_items)) for _ in range(n)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def mean_ci(x: np.ndarray, *, n: int, seed: int) -> CI:
    """Mean of per-item values with its bootstrap interval."""
    return CI(mean=float(x.mean()), ci95=list(bootstrap(lambda i: float(x[i].mean()), len(x), n=n, seed=seed)))


def win_rate_ci(margins: np.ndarray, *, n: int, seed: int) -> CI:
    """Fraction of items with a positive margin (A/B accuracy) with its bootstrap interval."""
    return mean_ci((margins > 0).astype(np.float64), n=n, seed=seed)


def contrast_ci(match: np.ndarray, other: np.ndarray, *, n: int, seed: int) -> CI:
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
    return CI(mean=float(match.mean() - other.mean()), ci95=[float(lo), float(hi)])
