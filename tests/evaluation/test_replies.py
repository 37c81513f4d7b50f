"""The reply metric: greedy replies, their persona score by a dense scorer, and degeneration figures."""

from __future__ import annotations

import copy
import random
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch

from exporter.evaluation.replies import (
    Replies,
    condition_replies,
    degeneration,
    distinct,
    greedy_replies,
    persona_scores,
    repeated_ngrams,
)
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import adapter_for
from exporter.model.encoding import end_of_turn_id
from exporter.reports.evaluation import RepliesEvaluation
from exporter.verify.hf import masked
from tests.helpers import WORDS, tiny_model, tiny_tokenizer

SYSTEM_A, SYSTEM_B = "quiet calm alone", "loud crowd party"
A_WORDS, B_WORDS = WORDS[:14], WORDS[14:]


@pytest.fixture(scope="module")
def planted() -> tuple[Any, Any]:
    """A tiny Llama trained so that under SYSTEM_A it answers with A_WORDS, under SYSTEM_B with B_WORDS."""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    rng = random.Random(0)
    end = end_of_turn_id(tok)

    def example(system: str, words: list[str]) -> list[int]:
        prompt = " ".join(rng.choices(WORDS, k=4))
        head = tok.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": prompt}], add_generation_prompt=True
        )
        return [*head, *tok(" ".join(rng.choices(words, k=8)), add_special_tokens=False)["input_ids"], end]

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        rows = [example(SYSTEM_A, A_WORDS) for _ in range(8)] + [example(SYSTEM_B, B_WORDS) for _ in range(8)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def _share(replies: Replies, tok: Any, words: list[str]) -> float:
    text = " ".join(replies.texts(tok)).split()
    return sum(w in words for w in text) / max(len(text), 1)


def test_the_score_ranks_planted_personas(planted: tuple[Any, Any]) -> None:
    model, tok = planted
    prompts = [" ".join(random.Random(i).choices(WORDS, k=4)) for i in range(12)]
    a = greedy_replies(model, tok, prompts, system=SYSTEM_A, max_new_tokens=12, batch_size=5)
    b = greedy_replies(model, tok, prompts, system=SYSTEM_B, max_new_tokens=12, batch_size=5)
    # the planted behaviour is there: each system prompt makes the model speak its own words
    assert _share(a, tok, A_WORDS) > 0.6 and _share(b, tok, B_WORDS) > 0.6
    score_a = persona_scores(model, tok, a, SYSTEM_A, SYSTEM_B)
    score_b = persona_scores(model, tok, b, SYSTEM_A, SYSTEM_B)
    assert np.nanmean(score_a) > 0.5 > -0.5 > np.nanmean(score_b)
    # the score is antisymmetric in the two system prompts (float64: in fp32 the two orders batch the
    # sequences differently, which moves the figures by ~1e-7)
    wide = copy.deepcopy(model).double()
    np.testing.assert_allclose(
        persona_scores(wide, tok, a, SYSTEM_B, SYSTEM_A), -persona_scores(wide, tok, a, SYSTEM_A, SYSTEM_B), atol=1e-12
    )


def test_replies_stop_at_the_end_of_turn(planted: tuple[Any, Any]) -> None:
    model, tok = planted
    r = greedy_replies(model, tok, ["quiet book"], system=SYSTEM_A, max_new_tokens=40)
    assert r.cut == [False] and 0 < len(r.tokens[0]) < 40 and end_of_turn_id(tok) not in r.tokens[0]
    short = greedy_replies(model, tok, ["quiet book"], system=SYSTEM_A, max_new_tokens=2)
    assert short.cut == [True] and len(short.tokens[0]) == 2


def test_degeneration_figures() -> None:
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 - 4 / 9)
    assert repeated_ngrams([1, 2, 3, 4, 5, 6]) == 0.0 and repeated_ngrams([1, 2]) == 0.0
    assert distinct([1, 2, 1, 2, 1]) == pytest.approx(2 / 4) and distinct([5]) == 0.0
    figures = degeneration(Replies(["p", "q"], [[7, 7, 7, 7, 7], []], [True, False]))
    assert figures.model_dump() == {
        "repeated_4grams": pytest.approx(0.25),  # (1/2 + 0) / 2
        "distinct_2": pytest.approx(0.125),  # (1/4 + 0) / 2
        "cut_at_max_tokens": 0.5,
        "empty": 0.5,
    }


def test_empty_replies_are_not_scored(planted: tuple[Any, Any]) -> None:
    model, tok = planted
    replies = Replies(["a", "b"], [[], tok("quiet calm", add_special_tokens=False)["input_ids"]], [False, False])
    scores = persona_scores(model, tok, replies, SYSTEM_A, SYSTEM_B)
    assert np.isnan(scores[0]) and np.isfinite(scores[1])


def test_conditions_decoded_together_give_each_condition_s_own_replies(planted: tuple[Any, Any]) -> None:
    """Rows of several conditions in one batch (per-row masks and biases) reply as each condition alone does;
    a soft-scaled mask (its own weights) is decoded apart. float64, where the batch layout cannot move a token."""
    model, tok = planted
    model = copy.deepcopy(model).double()
    adapter = adapter_for(model.config)
    g = adapter.geometry(model.config)
    gen = torch.Generator().manual_seed(3)
    keep = torch.stack([torch.randperm(g.intermediate, generator=gen)[: g.intermediate // 2].sort().values
                        for _ in range(g.layers)])  # fmt: skip
    heads = torch.stack([torch.arange(1, g.heads) for _ in range(g.layers)])
    bias = 2.0 * torch.randn(g.layers, g.hidden, generator=gen, dtype=torch.float64)
    conditions = {
        "dense": (None, None),
        "prompt": (SYSTEM_B, None),
        "mask": (None, PersonaMask("a", g, keep, heads, None, mlp_bias=bias)),
        "steer": (SYSTEM_A, PersonaMask("b", g, None, None, None, mlp_bias=-bias)),
        "soft": (None, PersonaMask("c", g, keep, None, None, mlp_scale=torch.full((g.layers, g.intermediate), 0.5,
                                                                                   dtype=torch.float64))),
    }  # fmt: skip
    prompts = [" ".join(random.Random(i).choices(WORDS, k=2 + i % 4)) for i in range(7)]
    together = condition_replies(model, tok, adapter, prompts, conditions, max_new_tokens=10, batch_size=9)
    for key, (system, mask) in conditions.items():
        alone = greedy_replies(
            model,
            tok,
            prompts,
            system=system,
            intervention=None if mask is None else partial(masked, model, adapter, mask),
            max_new_tokens=10,
        )
        assert together[key] == alone, key
    # the conditions differ, so the test can tell one from another
    assert len({tuple(map(tuple, r.tokens)) for r in together.values()}) == len(conditions)


def test_side_by_side_replies_name_the_system_prompt_s_persona() -> None:
    from exporter.reports.markdown import replies_markdown

    ci = {"mean": 0.01, "ci95": [0.0, 0.02]}
    degenerate = {"repeated_4grams": 0.0, "distinct_2": 1.0, "cut_at_max_tokens": 0.0, "empty": 0.0}
    figures = {"score": ci, "degeneration": degenerate}
    example = {"prompt": "Plans?", "dense": "a", "prompt_only": "b", "export": "c", "opposite_export": "d"}
    r = {
        "prompts": 1,
        "max_new_tokens": 8,
        "opposite": "introvert",
        "gap": {"export": ci},
        "conditions": {"dense": figures},
        "examples": [example],
    }
    text = "\n".join(replies_markdown("extravert", RepliesEvaluation.model_validate(r)))
    assert "| dense + extravert system prompt | b |" in text and "| introvert's export | d |" in text
