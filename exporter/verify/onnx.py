"""ONNX parity: an export run by our onnxruntime loop against a torch causal LM (prefill logits, decode
steps through the KV cache, greedy continuations), and a quantized export against its fp32 source."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from exporter.io import shown_name
from exporter.model.encoding import position_ids
from exporter.quiet import progress
from exporter.recipe.formats import Format
from exporter.recipe.schema import VerifySpec
from exporter.reports.checks import Divergence, LogitThresholds, OnnxCheck, QuantizedCheck
from exporter.runtime.onnx import ONNX_FILE, OnnxCausalLM
from exporter.verify.hf import first_divergence
from exporter.verify.quality import Agreement, Pair, persona_shift

Batch = tuple[torch.Tensor, torch.Tensor]  # left-padded input_ids, attention_mask: (batch, seq)


@torch.inference_mode()
def reference_steps(
    reference: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Greedy through the reference's own cache: prefill logits (b, s, V), `steps` decode logits (b, V)
    each, and the `steps + 1` greedy tokens (b, steps + 1), positions as transformers' generate makes them."""
    mask = attention_mask.long()
    pos = position_ids(mask)
    out = reference(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    prefill = out.logits.float()
    token, cache = prefill[:, -1].argmax(-1), out.past_key_values
    step_logits, tokens = [], [token]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = position_ids(mask)[:, -1:]
        out = reference(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        )
        logits, cache = out.logits[:, -1].float(), out.past_key_values
        token = logits.argmax(-1)
        step_logits.append(logits.numpy())
        tokens.append(token)
    return prefill.numpy(), step_logits, torch.stack(tokens, dim=1).numpy()


def verify_onnx(
    reference: torch.nn.Module,
    onnx_dir: Path,
    batches: list[Batch],
    greedy_tokens: int = 32,
    decode_steps: int = 3,
    *,
    eos_token_id: int | None = None,
    thresholds: dict[str, float] | None = None,
) -> OnnxCheck:
    """Compare `reference` (fp32, eval) with the export in `onnx_dir`.

    Logit differences cover non-padding prefill positions and `decode_steps` cached steps fed the
    reference's argmax. A row whose greedy tokens diverge still passes when, at its first differing step,
    the reference ranks the two tokens within `max_abs_logit_diff` (a near tie that fp32 noise may flip);
    the margin is reported. The reference must be in eval mode; tensors on CPU.
    """
    limits = LogitThresholds(**{**VerifySpec().onnx_thresholds, **(thresholds or {})})
    model = OnnxCausalLM.from_dir(onnx_dir)
    worst, total, count = 0.0, 0.0, 0
    divergences: list[Divergence] = []  # first differing step of each row that differs
    bar = progress(len(batches), f"verify ONNX {shown_name(Path(onnx_dir).parent)}", "prompt")
    for index, (ids, mask) in enumerate(batches):
        steps = max(greedy_tokens - 1, decode_steps)
        ref_prefill, ref_steps, ref_tokens = reference_steps(reference, ids, mask, steps)
        diffs = [_prefill_diff(model, ids.numpy(), mask.numpy(), ref_prefill)]
        diffs += _decode_diffs(model, ids.numpy(), mask.numpy(), ref_tokens, ref_steps[:decode_steps])
        for diff in diffs:
            worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.size
        got = model.greedy(ids.numpy(), mask.numpy(), greedy_tokens, eos_token_id)
        for row, tokens in enumerate(got):
            want = _until_eos(ref_tokens[row, :greedy_tokens].tolist(), eos_token_id)
            step = first_divergence(tokens, want)
            if step is None:
                continue
            margin = None
            if step < min(len(tokens), len(want)):
                logits = ref_prefill[row, -1] if step == 0 else ref_steps[step - 1][row]
                margin = float(logits[want[step]] - logits[tokens[step]])
            divergences.append(Divergence(batch=index, row=row, step=step, reference_margin=margin))
        bar.update()
    bar.close()
    ties = [d.reference_margin is not None and d.reference_margin <= limits.max_abs_logit_diff for d in divergences]
    return OnnxCheck(
        max_abs_logit_diff=worst,
        mean_abs_logit_diff=total / max(count, 1),
        greedy_identical=not divergences,
        greedy_first_divergence=divergences[0] if divergences else None,
        greedy_rows_diverged=len(divergences),
        greedy_divergences_are_near_ties=bool(divergences) and all(ties),
        thresholds=limits,
        batches=len(batches),
        greedy_tokens=greedy_tokens,
        decode_steps=decode_steps,
    )


def compare_quantized(
    fmt: Format,
    fp32_dir: Path,
    quantized_dir: Path,
    batches: list[Batch],
    ppl_texts: list[str] | None = None,
    max_tokens: int = 256,
    pairs: list[Pair] | None = None,
) -> QuantizedCheck:
    """The quantized export `fmt` in `quantized_dir` against its fp32 source: top-1 next-token agreement and
    perplexity, and the change of the persona's paired margin on `pairs` when given, judged against the
    format's floor.

    Agreement and perplexity are measured on `ppl_texts` (neutral text, tokenized with the tokenizer in
    `fp32_dir`, at most `max_tokens` tokens each) when given, else on the non-padding positions of `batches`.
    """
    from transformers import AutoTokenizer

    assert fmt.quantization is not None, f"{fmt.name} is not quantized"
    fp32, quantized = OnnxCausalLM.from_dir(fp32_dir), OnnxCausalLM.from_dir(quantized_dir)
    tokenizer = AutoTokenizer.from_pretrained(fp32_dir)
    if ppl_texts:
        encoded = [torch.tensor([tokenizer(t)["input_ids"][:max_tokens]]) for t in ppl_texts]
        batches = [(ids, torch.ones_like(ids)) for ids in encoded if ids.shape[1] > 1]
    agreement = Agreement()
    for ids, mask in batches:
        a, b = fp32.forward(ids.numpy(), mask.numpy())[0], quantized.forward(ids.numpy(), mask.numpy())[0]
        agreement.add(a, b, ids.numpy(), mask.numpy())
    shift = persona_shift(_logits_of(fp32), _logits_of(quantized), tokenizer, pairs, max_tokens) if pairs else {}
    return QuantizedCheck(
        **QuantizedCheck.measured(agreement.quality(shift), fmt.quantization.floor),
        measured_on="neutral text" if ppl_texts else "verification prompts",
        mb_fp32=_megabytes(Path(fp32_dir)),
        mb_quantized=_megabytes(Path(quantized_dir)),
        folder=fmt.folder,
        bits=fmt.quantization.bits,
    )


def _logits_of(model: OnnxCausalLM) -> Callable[[list[int]], np.ndarray]:
    def logits(ids: list[int]) -> np.ndarray:
        x = np.asarray([ids], dtype=np.int64)
        return model.forward(x, np.ones_like(x))[0][0]

    return logits


def _prefill_diff(model: OnnxCausalLM, ids: np.ndarray, mask: np.ndarray, ref: np.ndarray) -> np.ndarray:
    logits = model.forward(ids, mask)[0]
    return np.abs(logits.astype(np.float64) - ref)[mask.astype(bool)]  # (non-padding positions, V)


def _decode_diffs(
    model: OnnxCausalLM,
    ids: np.ndarray,
    mask: np.ndarray,
    ref_tokens: np.ndarray,
    ref_steps: list[np.ndarray],
) -> list[np.ndarray]:
    """Feed the reference's greedy tokens through the ONNX cache; |diff| of each step's logits (b, V)."""
    _, past = model.forward(ids, mask)
    diffs = []
    for step, ref in enumerate(ref_steps):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        logits, past = model.forward(ref_tokens[:, step : step + 1], mask, past)
        diffs.append(np.abs(logits[:, -1].astype(np.float64) - ref))
    return diffs


def _until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def _megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(ONNX_FILE)) / 1e6
