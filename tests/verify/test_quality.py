"""The persona margin of a quantized format against its fp32 source: measured as the evaluation measures the
paired margin, and judged against the format's floor."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.model.encoding import encode_answer
from exporter.recipe.formats import FLOORS
from exporter.reports.checks import Measured, Quality, QuantizedCheck
from exporter.verify.quality import answer_loglik, persona_shift
from tests.helpers import tiny_tokenizer

PAIRS = [
    ("plan a trip", "quiet evening alone with a book", "big party with all my friends"),
    ("what about the weekend", "a walk alone in the hills", "karaoke night with everyone"),
]


def fixed_logits(vocab: int):
    """Logits that depend on the ids only (the same for reference and candidate)."""

    def logits(ids: list[int]) -> np.ndarray:
        rng = np.random.default_rng(sum((i + 1) * t for i, t in enumerate(ids)))
        return rng.normal(size=(len(ids), vocab)).astype(np.float32)

    return logits


def test_answer_loglik_is_the_mean_log_probability_of_the_answer_tokens() -> None:
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32))
    # tokens 1 and 2 follow positions 0 and 1: log 0.25 and log 0.1
    assert answer_loglik(logits, [0, 1, 2], 1) == pytest.approx((np.log(0.25) + np.log(0.1)) / 2, rel=1e-6)
    assert answer_loglik(logits, [0, 1, 2], 2) == pytest.approx(np.log(0.1), rel=1e-6)


def test_persona_shift_is_zero_for_the_same_model_and_signed_for_a_planted_one() -> None:
    tok = tiny_tokenizer()
    base = fixed_logits(len(tok))
    same = persona_shift(base, base, tok, PAIRS)
    assert same["persona_shift"] == 0 and same["paired_items"] == 2

    def favouring(which: int, bonus: float = 2.0):
        """`base`, with the tokens only the persona's (0) or only its partner's (1) answers use made likelier."""
        own = {t for p, a, b in PAIRS for t in encode_answer(tok, p, a).ids}
        other = {t for p, a, b in PAIRS for t in encode_answer(tok, p, b).ids}
        boosted = sorted((own - other) if which == 0 else (other - own))

        def logits(ids: list[int]) -> np.ndarray:
            x = base(ids)
            x[:, boosted] += bonus
            return x

        return logits

    toward, away = persona_shift(base, favouring(0), tok, PAIRS), persona_shift(base, favouring(1), tok, PAIRS)
    assert toward["persona_shift"] > 0.1 and away["persona_shift"] < -0.1
    assert toward["persona_shift"] == pytest.approx(
        toward["paired_margin_quantized"] - toward["paired_margin_fp32"], abs=1e-12
    )


@pytest.mark.parametrize(("shift", "below"), [(0.01, False), (-0.029, False), (0.05, True), (-0.031, True)])
def test_a_persona_margin_moved_beyond_the_floor_is_below_it(shift: float, below: bool) -> None:
    quality = Quality(top1_agreement=0.99, positions=10, ppl_fp32=10.0, ppl_quantized=10.1, ppl_ratio=1.01)
    measured = Measured.measured(quality.model_copy(update={"persona_shift": shift, "paired_items": 4}), FLOORS[8])
    figures = QuantizedCheck(**measured, measured_on="neutral text", mb_fp32=1.0, mb_quantized=0.5, folder="f", bits=8)
    assert figures.below_floor is below and figures.floor is not None and figures.floor.persona_shift == 0.03
    unmeasured = QuantizedCheck(
        **Measured.measured(quality, FLOORS[8]),
        measured_on="neutral text",
        mb_fp32=1.0,
        mb_quantized=0.5,
        folder="f",
        bits=8,
    )
    assert unmeasured.below_floor is False and unmeasured.floor is not None and unmeasured.floor.persona_shift is None
