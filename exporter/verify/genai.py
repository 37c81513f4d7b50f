"""onnxruntime-genai parity: a `genai/` folder run by onnxruntime-genai itself (its tokenizer, its generator
and KV cache) against the masked fp32 reference.

fp32 is a parity target with the ONNX tolerances: prefill logits of every verification prompt, the logits of
each greedy step while the tokens agree, and greedy continuations (a divergence passes only at a near tie of
the reference, as for ONNX). int4 / int8 are measured (top-1 agreement, perplexity ratio on the neutral text)
and judged against the floor of their bit width. An `onnx-q4` folder is measured against the 4-bit floor, and is
a parity target as well when it holds the checkpoint's weights exactly with fp32 activations. Every precision must tokenize the prompts as the shipped
tokenizer does, decode them back, and declare the tokenizer's eos as an end of generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.export.genai import BITS
from exporter.io import shown_name
from exporter.quiet import progress
from exporter.recipe.formats import FLOORS
from exporter.reports.checks import Divergence, GenaiCheck, LogitThresholds, Q4Check, Quality
from exporter.verify.hf import Probes, PromptSet, first_divergence
from exporter.verify.onnx import reference_steps
from exporter.verify.quality import Agreement, persona_shift, torch_logits


class GenaiModel:
    """One onnxruntime-genai model: prefill logits and greedy decoding of single unpadded sequences."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.tokenizer = og.Tokenizer(self.model)

    def run(self, ids: list[int], new_tokens: int) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
        """Prefill logits (s, V), the logits before each generated token, and the greedy tokens (at most
        `new_tokens`; generation ends early at an eos of genai_config.json)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max(new_tokens, 1), do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        prefill = np.array(generator.get_output("logits"))[0]
        steps: list[np.ndarray] = []
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < new_tokens:
            steps.append(np.array(generator.get_logits())[0, -1])
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return prefill, steps, tokens


def verify_genai(
    reference_fp32: torch.nn.Module,
    out_dir: Path,
    folder: str,
    precision: str,
    eos_ids: list[int],
    probes: Probes,
    stored: dict[str, Any] | None = None,
) -> GenaiCheck:
    """The genai folder `out_dir` (the format's `folder`) against `reference_fp32` (already masked, eval
    mode). `eos_ids`: the ids genai_config.json ends generation at; a quantized folder's persona margin is
    measured on the probes' pairs. `stored`: an `onnx-q4` folder's block figures (Q4Check fields), which decide
    whether it is a parity target too."""
    prompts, spec, tokenizer = probes.prompts, probes.spec, probes.tokenizer
    model = GenaiModel(out_dir)
    limits = LogitThresholds(**spec.onnx_thresholds)
    worst, total, count = 0.0, 0.0, 0
    divergences: list[Divergence] = []
    bar = progress(len(prompts.singles), f"verify onnx-genai {shown_name(Path(out_dir).parent)}", "prompt")
    for index, (ids, attn) in enumerate(prompts.singles):
        ref_prefill, ref_steps, ref_tokens = reference_steps(reference_fp32, ids, attn, spec.greedy_tokens - 1)
        prefill, steps, tokens = model.run(ids[0].tolist(), spec.greedy_tokens)
        want = _until(ref_tokens[0].tolist(), eos_ids)
        step = first_divergence(tokens, want)
        agreed = len(want) if step is None else step
        diffs = [np.abs(prefill - ref_prefill[0]).ravel()]
        diffs += [np.abs(steps[k] - ref_steps[k - 1][0]) for k in range(1, min(agreed + 1, len(steps)))]
        for diff in diffs:
            worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
        if step is not None:
            margin = None
            if step < min(len(tokens), len(want)):
                logits = ref_prefill[0, -1] if step == 0 else ref_steps[step - 1][0]
                margin = float(logits[want[step]] - logits[tokens[step]])
            divergences.append(Divergence(prompt=index, step=step, reference_margin=margin))
        bar.update()
    bar.close()
    figures: dict[str, Any] = {
        "precision": precision,
        **_tokenizer_checks(model, tokenizer, eos_ids),
        "max_abs_logit_diff": worst,
        "mean_abs_logit_diff": total / max(count, 1),
        "greedy_identical": not divergences,
        "greedy_first_divergence": divergences[0] if divergences else None,
        "greedy_rows_diverged": len(divergences),
        "mb": sum(f.stat().st_size for f in Path(out_dir).iterdir() if f.is_file()) / 1e6,
        "folder": folder,
    }
    if precision in BITS:  # quantized: measured against the floor of its bit width
        quality = _agreement(reference_fp32, model, tokenizer, probes.neutral, prompts)
        if probes.pairs:
            logits = torch_logits(reference_fp32)
            quality = quality.model_copy(
                update=persona_shift(logits, lambda ids: model.run(ids, 0)[0], tokenizer, probes.pairs)
            )
        figures |= {**GenaiCheck.measured(quality, FLOORS[BITS[precision]]), "bits": BITS[precision]}
    check = GenaiCheck(**figures) if stored is None else Q4Check(**figures, **stored)
    if not check.parity_target:
        return check
    ties = [d.reference_margin is not None and d.reference_margin <= limits.max_abs_logit_diff for d in divergences]
    return check.model_copy(
        update={"thresholds": limits, "greedy_divergences_are_near_ties": bool(divergences) and all(ties)}
    )


def _tokenizer_checks(model: GenaiModel, tokenizer: Any, eos_ids: list[int]) -> dict[str, Any]:  # GenaiCheck fields
    """onnxruntime-genai's tokenizer against the shipped one on chat-formatted and plain text."""
    from exporter.verify.hf import DEFAULT_PROMPTS

    texts = [*DEFAULT_PROMPTS, "Numbers 2026, 3.14 and café: naïve ✓"]
    if getattr(tokenizer, "chat_template", None):
        texts += [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in DEFAULT_PROMPTS
        ]
    equal = round_trip = True
    for text in texts:
        want = tokenizer(text)["input_ids"]
        got = [int(i) for i in model.tokenizer.encode(text)]
        equal &= got == want
        # onnxruntime-genai decodes without special tokens: plain text comes back as it was
        round_trip &= model.tokenizer.decode(np.asarray(got, dtype=np.int32)) == tokenizer.decode(
            want, skip_special_tokens=True
        )
    eos = tokenizer.eos_token_id
    return {
        "tokenizer_ids_equal": bool(equal),
        "decode_round_trip": bool(round_trip),
        "eos_token_id": eos_ids,
        "eos_declared": eos is None or eos in eos_ids,
    }


def _until(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """`tokens` up to and including the first eos (generation stops there)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


@torch.inference_mode()
def _agreement(
    reference: torch.nn.Module, model: GenaiModel, tokenizer: Any, neutral: list[str] | None, prompts: PromptSet
) -> Quality:
    """Top-1 agreement and perplexity ratio of the genai model's prefill logits against the reference's."""
    rows = [tokenizer(t)["input_ids"][:256] for t in neutral or []]
    rows = [r for r in rows if len(r) > 1] or [ids[0].tolist() for ids, _ in prompts.singles]
    quality = Agreement()
    for row in rows:
        ids = torch.tensor([row])
        a = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().numpy()
        b = model.run(row, 0)[0][None]
        quality.add(a, b, ids.numpy(), np.ones_like(ids.numpy()))
    return quality.quality()
