"""How the next token is chosen: greedy, or temperature / top-p sampling with a repetition penalty and a seed;
and the valid range of each setting, which `generate` and `chat` check their options against."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported when a reply is sampled: the command line reads RANGES without it
    import numpy as np

# setting -> (lowest, whether the lowest itself is valid, highest or None, the range in words)
RANGES = {
    "temperature": (0.0, True, None, "0 (greedy) or more, e.g. 0.7"),
    "top_p": (0.0, False, 1.0, "above 0 and at most 1, e.g. 0.9 (1 keeps every token)"),
    "repetition_penalty": (0.0, False, None, "above 0: 1 is none, above 1 discourages repeats, e.g. 1.1"),
    "seed": (0, True, None, "a whole number, 0 or more"),
}


def setting_problem(name: str, value: float) -> str | None:
    """Why `value` is not valid for the sampling setting `name` (the range in words), or None."""
    low, closed, high, valid = RANGES[name]
    ok = math.isfinite(value) and (value >= low if closed else value > low) and (high is None or value <= high)
    return None if ok else f"{value:g} is outside the valid range: {valid}"


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; repetition_penalty as in transformers (>1 discourages tokens already present)."""

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = [f"{n}: {p}" for n in RANGES if (p := setting_problem(n, getattr(self, n)))]
        if problems:
            raise ValueError("; ".join(problems))

    def chooser(self) -> Callable[[np.ndarray, list[int]], int]:
        """choose(logits (vocab,), tokens so far) -> the next token; seeded once per reply."""
        import numpy as np

        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray, seen: list[int]) -> int:
            x = logits.astype(np.float64)
            if self.repetition_penalty != 1.0 and seen:
                idx = np.unique(seen)
                x[idx] = np.where(x[idx] > 0, x[idx] / self.repetition_penalty, x[idx] * self.repetition_penalty)
            if self.temperature <= 0:
                return int(x.argmax())
            p = np.exp((x - x.max()) / self.temperature)
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1]  # smallest set >= top_p
            return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

        return choose
