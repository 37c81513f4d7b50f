"""ONNX CPU inference benchmark (printed, not asserted): dense vs persona exports, measured in one run.

For each model: greedy decode tokens/s (64 new tokens after a warm-up, median of interleaved repeats) with
our loop on a plain InferenceSession and with optimum's `generate`; prefill latency; multiply-adds per token
from the config (linear layers incl. the LM head; attention scores left out); the measured speed-up divided by
the reduction in multiply-adds (goal >= 0.9); peak resident memory of a fresh process that loads the model
and decodes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exporter.export.onnx import export_onnx
from exporter.model.sources import load_model
from exporter.recipe.load import load_recipe
from exporter.runtime.onnx import OnnxCausalLM, load_ort_model
from exporter.workflows.run import run

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-introvert-extravert.yaml"
PROMPT = "Describe your ideal weekend, and say what makes it restful or exciting for you, in a few sentences."
NEW_TOKENS = 64
VARIANTS = {  # name -> overrides of the demo recipe
    "5% MLP": ["prune.mlp.sparsity=0.05"],
    "25% MLP + 1 of 3 KV groups": ["prune.mlp.sparsity=0.25", "prune.attention={unit: kv-group, sparsity: 0.34}"],
}
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report the (large) parent's peak
MEMORY_CHILD = """
import sys, numpy as np
from pathlib import Path
from exporter.runtime.onnx import OnnxCausalLM
m = OnnxCausalLM.from_dir(sys.argv[1])
ids = np.array([[int(t) for t in sys.argv[2].split(',')]], dtype=np.int64)
m.greedy(ids, np.ones_like(ids), 64)
print(next(int(x.split()[1]) for x in Path('/proc/self/status').read_text().splitlines() if x.startswith('VmHWM:')))
"""


def macs_per_token(config: dict) -> int:
    h, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return layers * (2 * h * q + 2 * h * kv + 3 * h * inter) + h * config["vocab_size"]


def decode_rate(model: OnnxCausalLM, ids: np.ndarray) -> tuple[float, float]:
    mask = np.ones_like(ids)
    t = time.perf_counter()
    model.forward(ids, mask)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.greedy(ids, mask, NEW_TOKENS)
    return NEW_TOKENS / (time.perf_counter() - t), prefill


def optimum_rate(model: object, ids: np.ndarray) -> float:
    import torch

    x = torch.from_numpy(ids)
    t = time.perf_counter()
    model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )  # type: ignore[attr-defined]
    return NEW_TOKENS / (time.perf_counter() - t)


def build(tmp: Path) -> dict[str, Path]:
    """Dense ONNX plus each variant's persona ONNX exports, all made here."""
    dirs: dict[str, Path] = {}
    recipe = load_recipe(RECIPE, ["eval=null"])
    m = load_model(recipe)
    m.model.save_pretrained(tmp / "dense-hf")
    m.export_tokenizer.save_pretrained(tmp / "dense-hf")
    dirs["dense"] = export_onnx(tmp / "dense-hf", tmp / "dense-onnx")
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        out = tmp / f"run{i}"
        run(load_recipe(RECIPE, ["eval=null", "output.formats=[hf, onnx]", *overrides]), out)
        for persona in ("introvert", "extravert"):
            dirs[f"{persona} | {name}"] = out / persona / "onnx"
    return dirs


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        dirs = build(tmp)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(dirs["dense"])
        ids = np.array([tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)])
        ours = {k: OnnxCausalLM.from_dir(d) for k, d in dirs.items()}
        stock = {k: load_ort_model(d) for k, d in dirs.items()}
        rates: dict[str, list[float]] = {k: [] for k in dirs}
        prefills: dict[str, list[float]] = {k: [] for k in dirs}
        optimum: dict[str, list[float]] = {k: [] for k in dirs}
        for k in dirs:  # warm-up
            decode_rate(ours[k], ids)
            optimum_rate(stock[k], ids)
        for _ in range(3):  # interleaved, so drift on a noisy machine hits every model alike
            for k in dirs:
                rate, prefill = decode_rate(ours[k], ids)
                rates[k].append(rate)
                prefills[k].append(prefill)
                optimum[k].append(optimum_rate(stock[k], ids))
        memory = {}
        for k, d in dirs.items():
            child = [sys.executable, "-c", MEMORY_CHILD, str(d), ",".join(map(str, ids[0]))]
            memory[k] = int(subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()[-1]) / 1024

        dense_macs = macs_per_token(json.loads((dirs["dense"] / "config.json").read_text()))
        dense_rate = statistics.median(rates["dense"])
        print(
            f"\n## ONNX greedy decode, fp32, CPU ({ids.shape[1]}-token chat prompt, {NEW_TOKENS} new tokens, median of 3)"
        )
        head = f"{'model':44s} {'tok/s ours':>10s} {'tok/s optimum':>13s} {'prefill ms':>10s} {'MACs/tok':>9s} {'speed-up':>8s} {'MAC cut':>7s} {'ratio':>6s} {'peak MB':>8s}"
        print(head)
        for k in dirs:
            macs = macs_per_token(json.loads((dirs[k] / "config.json").read_text()))
            rate = statistics.median(rates[k])
            speed, cut = rate / dense_rate, dense_macs / macs
            ratio = speed / cut
            print(
                f"{k:44s} {rate:10.1f} {statistics.median(optimum[k]):13.1f} {1000 * statistics.median(prefills[k]):10.1f} "
                f"{macs / 1e6:8.1f}M {speed:8.3f} {cut:7.3f} {ratio:6.2f} {memory[k]:8.0f}"
            )
        print("ratio = measured speed-up / reduction in multiply-adds per token (goal >= 0.9), both against dense.")
        print("peak MB: VmHWM of a fresh process that loads the model and decodes 64 tokens.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
