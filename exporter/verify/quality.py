"""Quality of a quantized format against the export it was made from (measured, never a parity target):
top-1 next-token agreement, the perplexity ratio and the change of the persona's paired margin. The judgement
against the format's floor is the check's own (exporter/reports/checks.py `Measured`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from exporter.model.encoding import encode_answer
from exporter.reports.checks import Quality

Pair = tuple[str, str, str]  # (prompt, the persona's answer, its partner's answer)
Logits = Callable[[list[int]], np.ndarray]  # token ids -> their (s, V) logits


def nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over non-padding targets, and their count."""
    logits = logits[:, :-1].astype(np.float64)  # (b, s-1, V)
    top = logits.max(-1, keepdims=True)
    logprobs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    keep = (mask[:, :-1] * mask[:, 1:]).astype(bool)
    picked = np.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    return -float(picked[keep].sum()), int(keep.sum())


class Agreement:
    """Accumulates top-1 agreement and both perplexities over batches of (reference, candidate) logits."""

    def __init__(self) -> None:
        self.agree = self.positions = self.count = 0
        self.nll = [0.0, 0.0]

    def add(self, reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> None:
        """`reference`, `candidate`: (b, s, V) logits of the same left-padded `ids`, `mask` (b, s)."""
        keep = mask.astype(bool)
        self.agree += int((reference.argmax(-1) == candidate.argmax(-1))[keep].sum())
        self.positions += int(keep.sum())
        for i, logits in enumerate((reference, candidate)):
            total, n = nll(logits, ids, mask)
            self.nll[i] += total
        self.count += n

    def quality(self, shift: dict[str, Any] | None = None) -> Quality:
        """The figures so far, with the persona margin's change (`persona_shift`) when it was measured."""
        ppl = [float(np.exp(v / max(self.count, 1))) for v in self.nll]
        return Quality(
            top1_agreement=self.agree / max(self.positions, 1),
            positions=self.positions,
            ppl_fp32=ppl[0],
            ppl_quantized=ppl[1],
            ppl_ratio=ppl[1] / ppl[0],
            **(shift or {}),
        )


def answer_loglik(logits: np.ndarray, ids: list[int], start: int) -> float:
    """Mean log-probability per token of ids[start:] under `logits` (s, V) of `ids`."""
    x = logits[start - 1 : len(ids) - 1].astype(np.float64)
    top = x.max(-1, keepdims=True)
    logprobs = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    return float(logprobs[np.arange(len(x)), ids[start:]].mean())


def torch_logits(model: Any) -> Logits:
    """`model` (a torch causal LM in eval mode) as a Logits function, fp32 numpy out."""
    import torch

    @torch.inference_mode()
    def logits(ids: list[int]) -> np.ndarray:
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    return logits


def persona_shift(
    reference: Logits, candidate: Logits, tokenizer: Any, pairs: list[Pair], max_tokens: int = 256
) -> dict[str, Any]:
    """How far `candidate` moves the persona's paired margin (its answer's log-likelihood per token minus
    its partner's, the evaluation's measure) from `reference`'s, averaged over `pairs`."""
    margins = np.zeros((2, len(pairs)))
    for i, (prompt, own, other) in enumerate(pairs):
        answers = [encode_answer(tokenizer, prompt, a, max_tokens=max_tokens) for a in (own, other)]
        for k, logits in enumerate((reference, candidate)):
            own_ll, other_ll = (answer_loglik(logits(a.ids), a.ids, a.start) for a in answers)
            margins[k, i] = own_ll - other_ll
    return {
        "persona_shift": float((margins[1] - margins[0]).mean()),
        "paired_items": len(pairs),
        "paired_margin_fp32": float(margins[0].mean()),
        "paired_margin_quantized": float(margins[1].mean()),
    }
