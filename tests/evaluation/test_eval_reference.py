"""The evaluation as it runs (batched, prompts shared through the KV cache, one dense neutral pass serving every
condition, replies generated in batches and scored together) against a straightforward reference: every
sequence, window and reply alone through the whole model, log-softmax of all logits, greedy decoding without a
cache, the shipped repetition penalty applied to every token of the reply's own context. In float64 both compute
the same figures to rounding (~1e-13), so any disagreement is a bug; in fp32 batch shapes alone move them by
~1e-7 (CPU-dependent), which is why the comparison is in float64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import exporter.evaluation.conditions as conditions_module
import exporter.evaluation.replies as replies_module
from exporter.evaluation.conditions import wanda_norms
from exporter.evaluation.items import prepare
from exporter.evaluation.metrics import Intervention, NeutralScore, Scored, scoring_work, sequence_logliks
from exporter.evaluation.replies import Condition, Replies
from exporter.evaluation.scorer import MaskScorer
from exporter.masking.calibrate import calibrate
from exporter.masking.data import select_samples, tokenize
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter, adapter_for
from exporter.model.encoding import end_of_turn_id, reply_prefix
from exporter.recipe.load import load_recipe
from exporter.verify.hf import masked
from tests.helpers import WORDS, eval_section, tiny_model, tiny_tokenizer, write_choices, write_recipe, write_unpaired

TOL = 1e-6  # the bar; float64 reaches ~1e-13


def _active(intervention: Intervention | None) -> Any:
    return intervention() if intervention is not None else nullcontext()


@torch.no_grad()
def reference_logliks(
    model: nn.Module, seqs: list[Scored], *, intervention: Intervention | None = None, **_: Any
) -> np.ndarray:
    out = []
    with _active(intervention):
        for s in seqs:
            lp = model(torch.tensor([s.ids])).logits[0].double().log_softmax(-1)
            target = torch.tensor(s.ids[s.start :])
            out.append(float(lp[s.start - 1 : -1].gather(1, target.unsqueeze(1)).mean()))
    return np.array(out)


@torch.no_grad()
def reference_neutral(
    model: nn.Module, windows: list[list[int]], interventions: dict[str, Intervention | None], *_: Any
) -> dict[str, NeutralScore]:
    out = {}
    for name, intervention in interventions.items():
        nll = kl = n = 0.0
        for w in windows:
            ids = torch.tensor([w])
            p = model(ids).logits[0, :-1].double().log_softmax(-1)
            with _active(intervention):
                q = model(ids).logits[0, :-1].double().log_softmax(-1)
            nll -= float(q.gather(1, ids[0, 1:].unsqueeze(1)).sum())
            kl += float((p.exp() * (p - q)).sum(-1).clamp_min(0.0).sum())
            n += len(w) - 1
        out[name] = NeutralScore(math.exp(nll / n), nll / n, kl / n, int(n))
    return out


@torch.no_grad()
def reference_greedy(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    system: str | None = None,
    intervention: Intervention | None = None,
    max_new_tokens: int = 64,
    repetition_penalty: float = 1.0,
    **_: Any,
) -> Replies:
    stop = end_of_turn_id(tokenizer)
    tokens, cut = [], []
    with _active(intervention):
        for prompt in prompts:
            ids = reply_prefix(tokenizer, prompt, system)
            new: list[int] = []
            while len(new) < max_new_tokens:
                logits = model(torch.tensor([ids + new])).logits[0, -1].tolist()
                for t in set(ids + new):  # CTRL's penalty on every token of the context so far
                    logits[t] = logits[t] * repetition_penalty if logits[t] < 0 else logits[t] / repetition_penalty
                token = max(range(len(logits)), key=logits.__getitem__)
                if token == stop:
                    break
                new.append(token)
            tokens.append(new)
            cut.append(len(new) == max_new_tokens)
    return Replies(list(prompts), tokens, cut)


def reference_condition_replies(
    model: nn.Module,
    tokenizer: Any,
    adapter: Adapter,
    prompts: list[str],
    conditions: dict[str, Condition],
    *,
    max_new_tokens: int = 64,
    repetition_penalty: float = 1.0,
    **_: Any,
) -> dict[str, Replies]:
    """Each condition on its own, through the export's reference (`masked`), one prompt at a time."""
    return {
        key: reference_greedy(
            model,
            tokenizer,
            prompts,
            system=system,
            intervention=None if mask is None else partial(masked, model, adapter, mask),
            max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty,
        )
        for key, (system, mask) in conditions.items()
    }


def leaves(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def assert_same_figures(fast: Any, slow: Any) -> int:
    """Every number within TOL (relative above 1), everything else equal; returns how many numbers."""
    a, b = dict(leaves(fast)), dict(leaves(slow))
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    numbers = 0
    for key, want in b.items():
        got = a[key]
        if isinstance(want, float) and not isinstance(want, bool):
            numbers += 1
            if math.isnan(want):
                assert math.isnan(got), f"{key}: {got} vs NaN"
            else:
                assert abs(got - want) <= TOL * max(1.0, abs(want)), f"{key}: {got} vs {want}"
        else:
            assert got == want, f"{key}: {got!r} vs {want!r}"
    return numbers


def shared_figures(ev: dict[str, Any]) -> dict[str, Any]:
    """What the verdict depth scores on the same items and conditions as the full depth: the dense, prompt-only
    and export rows and the first random seed's figures."""
    rows = {r["condition"]: r for r in ev["rows"]}
    random = next(r for c, r in rows.items() if c.startswith("random mask"))
    seed = {k: v for k, v in random["seeds"][0].items() if k != "condition"}
    return {"rows": [rows[c] for c in ("dense", "prompt-only", "mask-only")], "seed": seed}


@pytest.mark.parametrize("depth", ["full", "verdict"])
def test_fast_evaluation_equals_the_reference_on_a_tiny_model(
    depth: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tiny_tokenizer()
    model = tiny_model("llama").double()
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"statement": f"I like {w} a lot", "answer_matching_behavior": " Yes"} for w in WORDS[:5]]
    rows += [{"statement": f"I avoid {w}", "answer_matching_behavior": " No"} for w in WORDS[12:17]]
    (tmp_path / "st.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "everyday.txt").write_text("\n".join(" ".join(WORDS[i : i + 3]) for i in range(0, 21, 3)))
    statements = {"path": "st.jsonl", "labels": {"extravert": "Yes", "introvert": "No"}, "max_per_label": 5}
    replies = {"path": "everyday.txt", "max_new_tokens": 6, "batch_size": 4, "show": 2, "exclude_calibration": False}
    unpaired, choices = write_unpaired(tmp_path, n=5), write_choices(tmp_path, n=6)
    section = eval_section(
        tmp_path, statements=statements, replies=replies, unpaired=unpaired, choices=choices, batch_size=3, depth=depth
    )
    section["verdict"] = {"reply_prompts": 4}  # the verdict depth answers 4 of the 7 prompts
    section["paired"]["max_items"] = 5
    output = {"generation": {"repetition_penalty": 1.5}}  # replies also decoded as the exports ship them
    recipe = load_recipe(write_recipe(tmp_path, folder, eval=section, output=output))
    assert recipe.eval is not None
    adapter = adapter_for(model.config)
    g = adapter.geometry(model.config)
    gen = torch.Generator().manual_seed(0)

    def mask(persona: str) -> PersonaMask:
        keep = torch.stack([torch.randperm(g.intermediate, generator=gen)[:80].sort().values for _ in range(g.layers)])
        steer = 0.3 * torch.randn(g.layers, g.hidden, generator=gen, dtype=torch.float64)
        bias = steer + 0.1 * torch.randn(g.layers, g.hidden, generator=gen, dtype=torch.float64)
        return PersonaMask(persona, g, keep, None, None, mlp_bias=bias, steering=steer)

    masks = {p: mask(p) for p in ("introvert", "extravert")}
    items = prepare(recipe)
    prompts = 7 if depth == "full" else 4
    assert len(items.statements) == 10 and len(items.paired) == 5 and len(items.reply_prompts) == prompts
    assert len(items.choices) == 6 and [len(a) for a in items.unpaired.values()] == [4, 4]

    fast = {
        p: ev.model_dump()
        for p, ev in MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(masks).items()
    }
    if depth == "verdict":  # the same figures as the full depth where items and conditions are the same
        full_spec = recipe.eval.model_copy(update={"depth": "full"})
        full_items = prepare(recipe, full_spec)
        assert set(items.reply_prompts) < set(full_items.reply_prompts)
        full = MaskScorer(recipe, full_spec, full_items, model, tok, adapter).evaluate(masks)
        for p, ev in full.items():
            assert_same_figures(
                shared_figures(fast[p]) | {"dense": None}, shared_figures(ev.model_dump()) | {"dense": None}
            )
            assert fast[p]["depth"] == "verdict" and len(fast[p]["random_seeds"]) == 1
            assert {r["condition"] for r in fast[p]["rows"]} == {
                "dense",
                "prompt-only",
                "mask-only",
                "random mask (1 seed)",
            }
    for module, name, reference in (
        (conditions_module, "sequence_logliks", reference_logliks),
        (replies_module, "sequence_logliks", reference_logliks),
        (conditions_module, "neutral_scores", reference_neutral),
        (replies_module, "condition_replies", reference_condition_replies),
    ):
        monkeypatch.setattr(module, name, reference)
    slow = {
        p: ev.model_dump()
        for p, ev in MaskScorer(recipe, recipe.eval, items, model, tok, adapter).evaluate(masks).items()
    }
    numbers = assert_same_figures(fast, slow)
    assert numbers > (300 if depth == "full" else 150), numbers
    for p in masks:
        row = next(r for r in fast[p]["rows"] if r["condition"] == "mask-only")
        assert row["unpaired"]["shift"]["mean"] != 0 and row["choices"]["margin"]["mean"] != 0
    reply = fast["introvert"]["replies"]
    assert {"export", "prompt-only"} <= set(reply["conditions"]) and reply["gap"]
    assert ("steering-only" in reply["conditions"]) == (depth == "full")  # an ablation: the full depth's
    assert reply["repetition_penalty"] == 1.0
    if depth == "verdict":  # the verdict reads the greedy replies: its depth decodes no second set
        assert reply.get("shipped") is None
        return
    # both reply sets, and the penalty changed some reply: the reference's penalty was compared, not skipped
    shipped = reply["shipped"]
    assert shipped["repetition_penalty"] == 1.5
    assert set(shipped["conditions"]) == set(reply["conditions"]) and shipped["examples"] != reply["examples"]


def test_wanda_norms_from_calibration_equal_a_separate_pass(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model("qwen2")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    recipe = load_recipe(write_recipe(tmp_path, folder, eval=eval_section(tmp_path, baselines=["wanda"])))
    adapter = adapter_for(model.config)
    for p in recipe.personas:
        cal = recipe.personas[p].calibration
        samples = [tokenize(tok, s, cal) for s in select_samples(cal)]
        stats = calibrate(model, adapter, samples, pad_id=tok.pad_token_id, batch_size=4, response_only=True)
        kept = wanda_norms(recipe, model, tok, adapter, p, stats)
        again = wanda_norms(recipe, model, tok, adapter, p)
        assert all(torch.equal(a[n], b[n]) for a, b in zip(kept, again, strict=True) for n in a)


def test_scoring_work_counts_what_the_scoring_passes_through_the_model() -> None:
    """Two prompts, each with two answers of equal length (no padding), one answer repeated: the decoder sees
    each prompt once and each distinct answer once, the head one row per distinct answer token."""
    model = tiny_model("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    answers = [[20, 21, 22], [23, 24, 25]]
    seqs = [Scored(p + a, len(p)) for p in prompts for a in answers]
    seqs.append(seqs[0])  # scored once
    seen = {"decoder": 0, "head": 0}

    def count(part: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids") if part == "decoder" else args[0]
        seen[part] += int(x.numel() if part == "decoder" else x.shape[0])

    hooks = [
        model.get_decoder().register_forward_pre_hook(partial(count, "decoder"), with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(partial(count, "head"), with_kwargs=True),
    ]
    try:
        sequence_logliks(model, seqs, pad_id=0, batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert scoring_work(seqs) == (seen["decoder"], seen["head"]) == (8 + 12, 12)
