"""The repetition penalty as the exports ship it (exporter/recipe/generation.py): the logit of every token already
in the context, the prompt included, divided by the penalty when positive and multiplied by it when negative,
as transformers' `RepetitionPenaltyLogitsProcessor` does for one unpadded sequence.

In a left-padded batch only each row's own tokens count. transformers' processor also penalises the pad token in
every padded row, so a reply could change with the rows it happens to be decoded beside; `RowRepetitionPenalty`
gives each row what it gets alone.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def penalise(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """`scores` (rows, vocab) with `penalty` applied where `seen` (rows, vocab; bool) is set."""
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


class RowRepetitionPenalty(LogitsProcessor):
    """For `generate` on a left-padded batch: penalises the tokens of each row (prompt and reply so far),
    never its padding. `attention_mask` is the prompt's, (rows, prompt length)."""

    def __init__(self, penalty: float, attention_mask: torch.Tensor) -> None:
        self.penalty = penalty
        assert bool((attention_mask.diff(dim=-1) >= 0).all()), "RowRepetitionPenalty needs left padding"
        self.start = (attention_mask == 0).sum(-1)  # (rows,) each row's first real position

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        real = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= self.start[:, None]
        counts = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
        counts.scatter_add_(1, input_ids, real.to(torch.int32))  # a token counts when one real position holds it
        return penalise(scores, counts > 0, self.penalty)  # type: ignore[return-value]
