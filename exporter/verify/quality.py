"""Quality of a quantized format against the export it was made from (measured, never a parity target):
top-1 next-token agreement and the perplexity ratio, judged against the format's floor."""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.recipe.formats import Floor


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

    def figures(self) -> dict[str, Any]:
        ppl = [float(np.exp(v / max(self.count, 1))) for v in self.nll]
        return {
            "top1_agreement": self.agree / max(self.positions, 1),
            "positions": self.positions,
            "ppl_fp32": ppl[0],
            "ppl_quantized": ppl[1],
            "ppl_ratio": ppl[1] / ppl[0],
        }


def judge(figures: dict[str, Any], floor: Floor) -> dict[str, Any]:
    """`figures` (top1_agreement, ppl_ratio) with the floor and whether it is met."""
    within = figures["top1_agreement"] >= floor.top1_agreement and figures["ppl_ratio"] <= floor.ppl_ratio
    return {
        **figures,
        "floor": {"top1_agreement": floor.top1_agreement, "ppl_ratio": floor.ppl_ratio},
        "below_floor": not within,
    }


def describe(name: str, figures: dict[str, Any]) -> str:
    """One line for the terminal: a quantized format's quality against fp32."""
    mark = "BELOW FLOOR (not pushed unless asked)" if figures["below_floor"] else "within floor"
    floor = figures["floor"]
    size = f", {figures['mb_quantized']:.0f} MB vs {figures['mb_fp32']:.0f} MB" if "mb_fp32" in figures else ""
    return (
        f"{name}: top-1 agreement {100 * figures['top1_agreement']:.1f} % (floor {100 * floor['top1_agreement']:.0f} %), "
        f"perplexity x{figures['ppl_ratio']:.3f} (floor x{floor['ppl_ratio']:.2f}){size}: {mark}"
    )
