"""Benchmarks for the demo recipe, printed (not asserted): run with `bash ci/bench.sh`.

1. Time per stage of `persona-export run` (from run.json), statistics calibrated (not from the cache), and the
   evaluation's time over calibration + HF verification of the same run (goal <= 1).
2. Calibration time / a plain forward pass over the same batches, measured in this process (goal <= 1.15).
3. Parameters and bytes, dense vs each persona.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from exporter.masking.calibrate import batches, calibrate
from exporter.masking.data import select_samples, tokenize
from exporter.model.sources import load_model
from exporter.recipe.load import load_recipe
from exporter.workflows.run import run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-introvert-extravert.yaml"


def calibration_overhead(recipe_path: Path, repeats: int = 3, overrides: list[str] | None = None) -> None:
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

    def calib() -> None:
        calibrate(m.model, m.adapter, samples, pad_id=pad, batch_size=bs, response_only=True, desc="bench")

    plain()  # warm-up
    t_plain, t_calib = [], []
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
        t = time.perf_counter()
        plain()
        t_plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        calib()
        t_calib.append(time.perf_counter() - t)
    ratio = min(t_calib) / min(t_plain)
    print(
        f"\n## Calibration overhead ({name}: {len(samples)} samples, {n_tokens} tokens, batch {bs}, best of {repeats})"
    )
    print(f"plain forward (full model, logits): {min(t_plain):.2f} s   calibration: {min(t_calib):.2f} s")
    print(f"ratio calibration / plain forward: {ratio:.3f}   (goal <= 1.15)")


def eval_ratio(timings: dict[str, float]) -> str:
    """Evaluation time over calibration + HF verification time of the same run (goal <= 1)."""
    part = lambda prefix: sum(v for k, v in timings.items() if k.split(".")[0] == prefix)  # noqa: E731
    base = part("calibrate") + part("verify_hf")
    if "eval" not in timings or base == 0:
        return "eval / (calibrate + verify): n/a (no eval stage, or statistics came from the cache)"
    return (
        f"eval / (calibrate + verify): {timings['eval']:.1f} / ({part('calibrate'):.1f} + {part('verify_hf'):.1f})"
        f" = {timings['eval'] / base:.2f}   (goal <= 1)"
    )


def demo_run(out: Path) -> None:
    t = time.perf_counter()
    summary = run(load_recipe(RECIPE), out, use_cache=False)  # calibration is timed, not reused
    wall = time.perf_counter() - t
    print(f"\n## persona-export run {RECIPE.name}: {wall:.1f} s wall")
    print(f"{'stage':32s} seconds")
    timings = summary["timings_s"]
    for stage, sec in timings.items():
        print(f"{stage:32s} {sec:8.2f}")
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


def main() -> int:
    print(f"# persona-export benchmark  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        demo_run(Path(tmp) / "demo")
    calibration_overhead(RECIPE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
