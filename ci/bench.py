"""Benchmarks for the demo recipe, printed (not asserted): run with `bash ci/bench.sh`.

1. Time per stage of `persona-export run` (from run.json), statistics calibrated (not from the cache), summed by
   kind (load, calibration, masks, checkpoint export, verification, ONNX, evaluation), and the evaluation's time
   over calibration + HF verification of the same run (goal <= 1).
2. Calibration time / a plain forward pass over the same batches, measured in this process (goal <= 1.15).
3. The evaluation's floor: the tokens its answer scoring and neutral text must pass through the decoder and
   the LM head, at the speeds measured here (the decoder on the calibration batches), replies left out. No
   implementation of the same items and conditions takes less; compared with calibration + verification.
4. Parameters and bytes, dense vs each persona.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from exporter.evaluation.conditions import Evaluator, conditions, system_prompt
from exporter.evaluation.items import prepare
from exporter.masking.calibrate import batches, calibrate
from exporter.masking.data import select_samples, tokenize
from exporter.masking.masks import load_mask
from exporter.model.sources import load_model
from exporter.recipe.load import load_recipe
from exporter.recipe.schema import Recipe
from exporter.workflows.run import run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-introvert-extravert.yaml"


def calibration_overhead(
    recipe_path: Path,
    repeats: int = 3,
    overrides: list[str] | None = None,
    demo: tuple[Path, dict[str, float]] | None = None,
) -> None:
    """Calibration against a plain forward pass; with `demo` (a run of this recipe and its timings), the
    evaluation floor of that run at the decoder speed measured here."""
    recipe = load_recipe(recipe_path, overrides)
    m = load_model(recipe)
    name, persona = next(iter(recipe.personas.items()))
    samples = [tokenize(m.tokenizer, s, persona.calibration) for s in select_samples(persona.calibration)]
    pad, bs = m.tokenizer.pad_token_id, recipe.calibration.batch_size
    n_tokens = sum(len(s.input_ids) for s in samples)

    @torch.inference_mode()
    def plain() -> None:
        for ids, attn, _ in batches(samples, bs, pad, True):
            m.model(input_ids=ids, attention_mask=attn, use_cache=False)

    @torch.inference_mode()
    def decoder() -> None:
        for ids, attn, _ in batches(samples, bs, pad, True):
            m.model.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False)

    def calib() -> None:
        calibrate(m.model, m.adapter, samples, pad_id=pad, batch_size=bs, response_only=True, desc="bench")

    plain()  # warm-up
    t_plain: list[float] = []
    t_calib: list[float] = []
    t_decoder: list[float] = []
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all alike
        for fn, times in ((plain, t_plain), (calib, t_calib), (decoder, t_decoder)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    ratio = min(t_calib) / min(t_plain)
    print(
        f"\n## Calibration overhead ({name}: {len(samples)} samples, {n_tokens} tokens, batch {bs}, best of {repeats})"
    )
    print(f"plain forward (full model, logits): {min(t_plain):.2f} s   calibration: {min(t_calib):.2f} s")
    print(f"ratio calibration / plain forward: {ratio:.3f}   (goal <= 1.15)")
    padded = sum(ids.numel() for ids, _, _ in batches(samples, bs, pad, True))
    speed = padded / min(t_decoder)  # padding counted as work done: the speed is not understated
    print(f"decoder only (no LM head): {min(t_decoder):.2f} s for {padded} tokens with padding = {speed:.0f} tokens/s")
    if demo is not None:
        eval_floor(recipe, m, *demo, speed, head_speed(m.model, repeats))


@torch.inference_mode()
def head_speed(model: Any, repeats: int) -> float:
    """Rows per second through the LM head and a log-softmax, 2,048 rows at a time, best of `repeats`."""
    head = model.get_output_embeddings()
    hidden = torch.randn(2048, head.in_features)
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        t = time.perf_counter()
        torch.log_softmax(head(hidden), dim=-1)
        times.append(time.perf_counter() - t)
    return len(hidden) / min(times[1:])


def eval_floor(
    recipe: Recipe, m: Any, run_dir: Path, timings: dict[str, float], speed: float, head_rows: float
) -> None:
    """The least work of the run's evaluation, timed at the speeds measured here: a floor for any implementation
    of the same items and conditions. Answer scoring with every shared prompt run once and the head at every
    answer token; the neutral windows once per weight condition, the head at every position. Replies and their
    scoring are left out, as are Wanda's conditions: the floor only gets lower."""
    assert recipe.eval is not None
    ev = Evaluator(m.model, m.tokenizer, m.adapter, recipe.eval, prepare(recipe))
    masks = {p: load_mask(run_dir / p / "masks.safetensors") for p in recipe.personas}
    conds = conditions(ev, masks, {})
    tokens = rows = answer_runs = 0
    for cond in conds.values():
        for persona in [None, *cond.prompts]:
            t, r = ev.answer_work(None if persona is None else system_prompt(recipe, recipe.eval, persona))
            tokens, rows, answer_runs = tokens + t, rows + r, answer_runs + 1
    runs = 1 + sum(c.intervention is not None for c in conds.values())  # the dense pass serves "dense"
    neutral = runs * sum(len(w) - 1 for w in ev.windows)
    floor = (tokens + neutral) / speed + (rows + neutral) / head_rows
    base = sum(_stages(timings, "calibrate", "verify_hf"))
    print(f"\n## Evaluation floor (the run above: {answer_runs} answer conditions, {runs} neutral passes)")
    print(f"decoder: {tokens:,} answer and {neutral:,} neutral tokens at {speed:.0f} tokens/s")
    print(f"LM head + log-softmax: {rows:,} answer and {neutral:,} neutral rows at {head_rows:.0f} rows/s")
    print(
        f"floor {floor:.1f} s without the replies; the run's evaluation took {timings.get('eval', float('nan')):.1f} s"
    )
    print(
        f"floor / (calibrate + verify): {floor:.1f} / {base:.1f} = {floor / base:.2f}   (goal for the evaluation <= 1)"
    )


def _stages(timings: dict[str, float], *names: str) -> list[float]:
    """Seconds of each named stage, its per-persona parts ("calibrate.introvert", ...) summed."""
    return [sum(v for k, v in timings.items() if k.split(".")[0] == name) for name in names]


def eval_ratio(timings: dict[str, float]) -> str:
    """Evaluation time over calibration + HF verification time of the same run (goal <= 1)."""
    calib, verify = _stages(timings, "calibrate", "verify_hf")
    if "eval" not in timings or calib + verify == 0:
        return "eval / (calibrate + verify): n/a (no eval stage, or statistics came from the cache)"
    return (
        f"eval / (calibrate + verify): {timings['eval']:.1f} / ({calib:.1f} + {verify:.1f})"
        f" = {timings['eval'] / (calib + verify):.2f}   (goal <= 1)"
    )


GROUPS = {  # where the first command's time goes: run.json's stages by kind
    "load": ("load",),
    "calibration": ("calibrate",),
    "masks": ("score",),
    "checkpoint (prune, write)": ("prune", "export_hf"),
    "verification": ("verify_hf",),
    "ONNX (export and check)": ("export_onnx", "verify_onnx", "onnx"),
    "evaluation": ("eval",),
}


def stage_groups(timings: dict[str, float]) -> dict[str, float]:
    """Seconds per kind of stage; the evaluation's own parts (eval_scores, ...) are inside `eval` already."""
    out = {name: sum(_stages(timings, *stages)) for name, stages in GROUPS.items()}
    known = {s for stages in GROUPS.values() for s in stages}
    out["other"] = sum(v for k, v in timings.items() if k.split(".")[0] not in known and not k.startswith("eval_"))
    return out


def demo_run(out: Path) -> dict[str, float]:
    load = os.getloadavg()
    t = time.perf_counter()
    summary = run(load_recipe(RECIPE), out, use_cache=False)  # calibration is timed, not reused
    wall = time.perf_counter() - t
    print(f"\n## persona-export run {RECIPE.name}: {wall:.1f} s wall (load average before: {load[0]:.1f})")
    print(f"{'stage':32s} seconds")
    timings = summary["timings_s"]
    for stage, sec in timings.items():
        print(f"{stage:32s} {sec:8.2f}")
    groups = stage_groups(timings)
    print(f"\n{'kind of stage':32s} seconds")
    for name, sec in groups.items():
        print(f"{name:32s} {sec:8.2f}")
    print(
        f"{'sum of stages':32s} {sum(groups.values()):8.2f}   (wall {wall:.1f} s; load average after: {os.getloadavg()[0]:.1f})"
    )
    print(eval_ratio(timings))
    print(
        f"\n{'persona':12s} {'params dense':>14s} {'params pruned':>14s} {'ratio':>7s} {'MB dense':>9s} {'MB pruned':>10s}"
    )
    for name, r in summary["reports"].items():
        p, b = r.parameters, r.bytes
        print(
            f"{name:12s} {p.dense:14,d} {p.pruned:14,d} {p.ratio:7.4f} "
            f"{b.dense_weights / 1e6:9.1f} {b.pruned_weights_on_disk / 1e6:10.1f}"
        )
    return timings


def main() -> int:
    print(f"# persona-export benchmark  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        timings = demo_run(out)
        calibration_overhead(RECIPE, demo=(out, timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
