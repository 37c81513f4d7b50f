"""GGUF parity: each file of a `gguf/` folder loaded back by transformers' GGUF loader (`gguf_file=`) against
the masked fp32 reference. F16 is a parity target with the ONNX tolerances (logits, greedy continuations);
Q8_0 is measured (top-1 agreement, perplexity ratio) and judged against the 8-bit floor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.recipe.formats import QUANT_FORMATS
from exporter.recipe.schema import VerifySpec
from exporter.verify.hf import PromptSet, first_divergence, greedy, logit_difference, masked
from exporter.verify.quality import Agreement, Pair, judge, persona_shift, torch_logits

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: (batch, seq)


def verify_gguf(
    reference_fp32: nn.Module,
    adapter: Adapter,
    mask: PersonaMask,
    out_dir: Path,
    files: dict[str, str],
    prompts: PromptSet,
    spec: VerifySpec,
    tokenizer: Any,
    neutral: list[str] | None,
    pairs: list[Pair] | None = None,
) -> dict[str, Any]:
    """{qtype: figures} for `files` ({qtype: file name} in `out_dir`); quality on `neutral`, else the prompts,
    and a quantized file's persona margin on `pairs`."""
    from transformers import AutoModelForCausalLM

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [torch.tensor([tokenizer(t)["input_ids"][:256]]) for t in neutral or []]
    quality_batches = [(ids, torch.ones_like(ids)) for ids in texts if ids.shape[1] > 1] or prompts.all()
    ids, attn = prompts.batch  # left-padded (batch, seq)
    limits = spec.onnx_thresholds
    results: dict[str, Any] = {}
    for qtype, name in files.items():
        model = AutoModelForCausalLM.from_pretrained(out_dir, gguf_file=name, dtype=torch.float32).eval()
        with masked(reference_fp32, adapter, mask):
            worst, mean = logit_difference(reference_fp32, model, prompts.all())
            ref_tokens = greedy(reference_fp32, ids, attn, spec.greedy_tokens, pad_id)
            quality = agreement(reference_fp32, model, quality_batches)
            if pairs and qtype != "F16":
                quality |= persona_shift(torch_logits(reference_fp32), torch_logits(model), tokenizer, pairs)
        rows = zip(ref_tokens.tolist(), greedy(model, ids, attn, spec.greedy_tokens, pad_id).tolist(), strict=True)
        div = min((d for a, b in rows if (d := first_divergence(a, b)) is not None), default=None)  # first step
        figures: dict[str, Any] = {
            "file": name,
            "max_abs_logit_diff": worst,
            "mean_abs_logit_diff": mean,
            "greedy_identical": div is None,
            "greedy_first_divergence": div,
            "mb": (out_dir / name).stat().st_size / 1e6,
        }
        if qtype == "F16":
            figures["thresholds"] = limits
            within = worst <= limits["max_abs_logit_diff"] and mean <= limits["mean_abs_logit_diff"]
            figures["passed"] = bool(within and div is None)
        else:
            figures |= judge(quality, QUANT_FORMATS["onnx-int8"].floor)
            figures["passed"] = True  # measured, not a parity target
        results[qtype] = figures
        del model
    return results


@torch.inference_mode()
def agreement(reference: nn.Module, model: nn.Module, batches: list[Batch]) -> dict[str, Any]:
    """Top-1 agreement and perplexity ratio of `model` against `reference` (torch, fp32)."""
    quality = Agreement()
    for ids, attn in batches:
        a = reference(input_ids=ids, attention_mask=attn).logits.float().numpy()
        b = model(input_ids=ids, attention_mask=attn).logits.float().numpy()
        quality.add(a, b, ids.numpy(), attn.numpy())
    return quality.figures()
