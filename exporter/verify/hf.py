"""Verification: an export, reloaded from disk, must compute what the dense model with the persona mask
applied to unit activations computes. Proven in float64 (removal is exact); fp32 figures are reported."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.errors import ExportFolderError
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.model.encoding import messages, position_ids, prompt_ids
from exporter.model.hooks import ChannelMasks, apply_channel_masks
from exporter.model.sources import Loaded
from exporter.quiet import progress
from exporter.recipe.schema import VerifySpec
from exporter.reports.checks import CheckpointCheck, CheckpointThresholds, Parity
from exporter.verify.quality import Pair

DEFAULT_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Describe your ideal weekend in a few sentences.",
    "Write a short note to a colleague explaining that the quarterly report will be one day late, "
    "and suggest a time to go through the numbers together next week.",
    "List three practical tips for someone who is learning to cook at home, and explain briefly why "
    "each one matters. Then finish with one sentence of encouragement.",
]


@dataclass(frozen=True)
class PromptSet:
    """Single prompts (no padding) and one left-padded batch of all of them."""

    singles: list[tuple[torch.Tensor, torch.Tensor]]
    batch: tuple[torch.Tensor, torch.Tensor]

    def all(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [*self.singles, self.batch]


@dataclass(frozen=True)
class Probes:
    """What an export is checked on: the verification prompts and bounds, the tokenizer the exports ship, and,
    for a quantized copy, the neutral text and held-out pairs its quality and persona margin are measured on
    (the prompts when there is no neutral text)."""

    prompts: PromptSet
    spec: VerifySpec
    tokenizer: Any
    neutral: list[str] | None = None
    pairs: list[Pair] | None = None


def build_prompts(tokenizer: Any, prompts: list[str] | None = None) -> PromptSet:
    rows = [prompt_ids(tokenizer, messages(text)) for text in prompts or DEFAULT_PROMPTS]
    singles = [(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PromptSet(singles, left_padded(rows, pad))


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one left-padded batch: (ids, attention_mask), both (len(rows), longest row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
    return ids, attn


@contextmanager
def masked(model: nn.Module, adapter: Adapter, mask: PersonaMask | None) -> Iterator[None]:
    """The persona's reference model: `model` with the mask applied to unit activations, the mask's
    `mlp_bias` (steering, compensation) added to every down_proj output and its soft-mask column scales."""
    if mask is None:
        with nullcontext():
            yield
        return
    mlp, attn = mask.channel_masks()
    scales = (mask.mlp_scale, mask.attn_scale)
    with apply_channel_masks(model, adapter, ChannelMasks(mlp, attn, mask.mlp_bias), scales, mask.scale_storage):
        yield


@torch.inference_mode()
def logit_difference(
    reference: nn.Module, candidate: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    """(max, mean) |logit difference| over non-padding positions."""
    worst, total, count = 0.0, 0.0, 0
    for ids, attn in batches:
        kw = {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids(attn)}
        a = reference(**kw).logits.to(torch.float64)
        b = candidate(**kw).logits.to(torch.float64)
        diff = (a - b).abs()[attn.bool()]
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        count += diff.numel()
    return worst, total / max(count, 1)


@torch.inference_mode()
def greedy(
    model: Any, ids: torch.Tensor, attn: torch.Tensor, n: int, pad_id: int, stop: int | None = None
) -> torch.Tensor:
    """Greedy tokens after each row, (batch, <= n): exactly n when `stop` is None (EOS does not end a row),
    else up to n, a row ending at `stop` (then padded with pad_id)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=n,
        min_new_tokens=n if stop is None else None,
        eos_token_id=stop,
        do_sample=False,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[:, ids.shape[1] :]


def first_divergence(got: Sequence[int], want: Sequence[int]) -> int | None:
    """The first step at which two token sequences differ (the shorter's length when one is a prefix of the
    other), or None when they are equal."""
    for step, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return step
    return None if len(got) == len(want) else min(len(got), len(want))


def reference_copy(dense: nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> nn.Module:
    """The dense model's parameters rounded to the export's storage dtype, computed in `compute_dtype`.

    Buffers (e.g. the rotary `inv_freq`) are not rounded: they are not stored in the export, and
    from_pretrained recomputes them in fp32 whatever the weights' dtype.
    """
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(storage_dtype).to(compute_dtype)
        for b in ref.buffers():
            b.data = b.data.to(compute_dtype)
    return ref.eval()


def references(m: Loaded, storage_dtype: torch.dtype, exact: bool) -> dict[torch.dtype, nn.Module]:
    """The dense references an export is checked against: fp32, and float64 when `exact` (else the proof is
    layer by layer). A model placed within a memory budget is its own fp32 reference (weights as stored)."""
    if m.bounded:
        return {torch.float32: m.model}
    dtypes = (torch.float64, torch.float32) if exact else (torch.float32,)
    return {d: reference_copy(m.model, storage_dtype, d) for d in dtypes}


def verify_export(
    references: dict[torch.dtype, nn.Module],
    adapter: Adapter,
    mask: PersonaMask,
    export_dir: Path,
    prompts: PromptSet,
    *,
    pad_id: int,
    greedy_tokens: int,
    fp64_max_abs: float,
    load_kwargs: dict[str, Any] | None = None,
) -> CheckpointCheck:
    """The checkpoint in `export_dir` against the masked references (float64 and/or float32 copies of the dense
    model). Without a float64 reference (`verify.layerwise`) the proof is added layer by layer by the caller."""
    from exporter.model.sources import load_exact

    checks = [(d, n) for d, n in ((torch.float64, "fp64"), (torch.float32, "fp32")) if d in references]
    parity: dict[str, Parity] = {}
    bar = progress(4 * len(checks), f"verify {Path(export_dir).parent.name}")  # load, logits, 2 greedy runs per dtype
    for dtype, name in checks:
        export = load_exact(export_dir, "the export", ExportFolderError, dtype=dtype, **(load_kwargs or {})).eval()
        bar.update()
        ref = references[dtype]
        with masked(ref, adapter, mask):
            worst, mean = logit_difference(ref, export, prompts.all())
            bar.update()
            ref_tokens = greedy(ref, *prompts.batch, greedy_tokens, pad_id)
            bar.update()
        exp_tokens = greedy(export, *prompts.batch, greedy_tokens, pad_id)
        bar.update()
        rows = zip(ref_tokens.tolist(), exp_tokens.tolist(), strict=True)  # (batch, n) each
        div = min((d for a, b in rows if (d := first_divergence(a, b)) is not None), default=None)
        parity[name] = Parity(
            max_abs_logit_diff=worst,
            mean_abs_logit_diff=mean,
            greedy_identical=div is None,
            greedy_first_divergence=div,
        )
        del export
    bar.close()
    thresholds = CheckpointThresholds(fp64_max_abs=fp64_max_abs, greedy_tokens=greedy_tokens)
    return CheckpointCheck(thresholds=thresholds, fp64=parity.get("fp64"), fp32=parity["fp32"])
