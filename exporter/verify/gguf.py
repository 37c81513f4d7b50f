"""GGUF parity: each file of a `gguf/` folder loaded back by transformers' GGUF loader (`gguf_file=`) against
the masked fp32 reference. The loader drops Linear biases (a llama GGUF has no metadata key for them), so the
file's `ffn_*.bias` tensors are read with the `gguf` package and put back, as llama.cpp adds them.

A file whose every matrix its block type holds exactly (exporter/export/gguf.py: the Q4_1 file of a model
de-quantized from Q4_1, an F16 file of fp16-valued weights) is a parity target with the ONNX tolerances
(logits, greedy continuations); any other file is measured (top-1 agreement, perplexity ratio, persona margin)
against the 8-bit floor (F16, Q8_0) or the 4-bit floor (Q4_1). On the embedded SmolLM2 the F16 file rounds the
de-quantized Q4_1 values (max |logit difference| 0.04 on the demo's extravert, above the fp32 tolerance 0.01),
so it is measured; its Q4_1 file computes the checkpoint's logits exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.export.gguf import LAYER, GgufFile
from exporter.masking.masks import PersonaMask
from exporter.model.adapters import Adapter
from exporter.model.sources import gguf_read_once
from exporter.recipe.formats import FLOORS
from exporter.reports.checks import GgufCheck, GgufFileCheck, LogitThresholds, Quality
from exporter.verify.hf import Probes, first_divergence, greedy, logit_difference, masked
from exporter.verify.quality import Agreement, Logits, persona_shift, torch_logits

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, attention_mask: (batch, seq)


def verify_gguf(
    reference_fp32: nn.Module,
    adapter: Adapter,
    mask: PersonaMask,
    out_dir: Path,
    files: dict[str, GgufFile],
    probes: Probes,
) -> GgufCheck:
    """Each of `files` (in `out_dir`) against the masked reference; quality on the probes' neutral text, else
    their prompts, and a quantized file's persona margin on their pairs."""
    prompts, spec, tokenizer, neutral, pairs = (
        probes.prompts,
        probes.spec,
        probes.tokenizer,
        probes.neutral,
        probes.pairs,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    texts = [torch.tensor([tokenizer(t)["input_ids"][:256]]) for t in neutral or []]
    quality_batches = [(ids, torch.ones_like(ids)) for ids in texts if ids.shape[1] > 1] or prompts.all()
    ids, attn = prompts.batch  # left-padded (batch, seq)
    limits = LogitThresholds(**spec.onnx_thresholds)
    results: dict[str, GgufFileCheck] = {}
    with torch.inference_mode(), masked(reference_fp32, adapter, mask):  # the reference's outputs, once for all files
        ref_tokens = greedy(reference_fp32, ids, attn, spec.greedy_tokens, pad_id)
        ref_quality = [reference_fp32(input_ids=i, attention_mask=a).logits.float().numpy() for i, a in quality_batches]
    ref_logits = remembered(torch_logits(reference_fp32))
    for qtype, file in files.items():
        model = load_gguf(out_dir / file.name)
        with masked(reference_fp32, adapter, mask):
            worst, mean = logit_difference(reference_fp32, model, prompts.all())
            shift = persona_shift(ref_logits, torch_logits(model), tokenizer, pairs) if pairs and not file.exact else {}
        quality = agreement(ref_quality, model, quality_batches, shift)
        rows = zip(ref_tokens.tolist(), greedy(model, ids, attn, spec.greedy_tokens, pad_id).tolist(), strict=True)
        div = min((d for a, b in rows if (d := first_divergence(a, b)) is not None), default=None)  # first step
        results[qtype] = GgufFileCheck(
            file=file.name,
            stored=file.stored,
            restored_neurons_per_layer=file.restored,
            parity_target=file.exact,
            max_abs_logit_diff=worst,
            mean_abs_logit_diff=mean,
            greedy_identical=div is None,
            greedy_first_divergence=div,
            mb=(out_dir / file.name).stat().st_size / 1e6,
            **GgufFileCheck.measured(quality, FLOORS[4 if qtype == "Q4_1" else 8]),
            thresholds=limits if file.exact else None,  # a parity target; the others are measured
        )
        del model
    return GgufCheck(files=results)


def load_gguf(path: Path) -> nn.Module:
    """A GGUF file as transformers reads it, with the MLP biases it drops put back from the file."""
    import gguf
    from transformers import AutoModelForCausalLM

    with gguf_read_once():  # one parse of the file for transformers' config, weights and the biases below
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        tensors = gguf.GGUFReader(path).tensors
    names = {f"blk.{i}.{LAYER[f'mlp.{part}.bias']}": (i, part) for i in range(model.config.num_hidden_layers)
             for part in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    for tensor in tensors:
        if tensor.name in names:
            i, part = names[tensor.name]
            linear = getattr(model.model.layers[i].mlp, part)
            linear.bias = nn.Parameter(torch.from_numpy(np.array(tensor.data, dtype=np.float32)), requires_grad=False)
    return model


@torch.inference_mode()
def agreement(
    reference: list[np.ndarray], model: nn.Module, batches: list[Batch], shift: dict[str, Any] | None = None
) -> Quality:
    """Top-1 agreement and perplexity ratio of `model` against the reference's logits on `batches`."""
    quality = Agreement()
    for a, (ids, attn) in zip(reference, batches, strict=True):
        b = model(input_ids=ids, attention_mask=attn).logits.float().numpy()
        quality.add(a, b, ids.numpy(), attn.numpy())
    return quality.quality(shift)


def remembered(logits: Logits) -> Logits:
    """`logits` computed once per token sequence (the reference's, shared by every file)."""
    seen: dict[tuple[int, ...], np.ndarray] = {}

    def cached(ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if key not in seen:
            seen[key] = logits(ids)
        return seen[key]

    return cached
