"""Scale benchmark, printed (not asserted): `python ci/bench_scale.py --sizes 0.1b 0.5b 1b`.

For each size, a randomly initialised Llama-style model is written as sharded bf16 safetensors (tensor by
tensor, never whole in memory), then a fresh child process runs layer-by-layer calibration, wanda scoring
from the shards and the shard-by-shard pruned export, and reports its wall times and peak resident memory
(VmHWM, which includes the interpreter and libraries: the baseline after imports is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIZES: dict[str, dict[str, int]] = {  # Llama-style, tied embeddings, GQA
    "0.1b": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "0.5b": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 18, "num_attention_heads": 12},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32},
}
SHARD_BYTES = 256 * 1024**2
SAMPLES, SEQ = 8, 128
# glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed per-layer tensors stay in
# the heap and RSS grows with the model; a fixed threshold returns every buffer of >= 1 MiB to the system.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024**2)}


def peak_rss_bytes() -> int:
    """This process's resident high-water mark. VmHWM, not ru_maxrss: ru_maxrss survives exec and so
    includes the parent's memory at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so each stage's own peak can be read."""
    Path("/proc/self/clear_refs").write_text("5")


def write_random_model(folder: Path, size: str) -> int:
    """A random bf16 Llama in sharded safetensors; returns its weight bytes."""
    from transformers import LlamaConfig

    from exporter.model.layer_by_layer import empty_model

    config = LlamaConfig(
        **SIZES[size],
        num_key_value_heads=SIZES[size]["num_attention_heads"] // 4,
        vocab_size=32000,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    shapes = {k: v.shape for k, v in empty_model(config).state_dict().items() if k != "lm_head.weight"}
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, int] = {}
    used = total = 0
    names = sorted(shapes)
    for name in names:
        if "norm" in name:
            t = torch.ones(shapes[name], dtype=torch.bfloat16)
        else:
            t = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if used and used + nbytes > SHARD_BYTES:
            _flush(folder, shards, weight_map)
            used = 0
        shards[-1][name] = t
        used, total = used + nbytes, total + nbytes
    _flush(folder, shards, weight_map)
    n = len(shards) - 1
    final_map: dict[str, str] = {}
    for i in range(n):
        tmp, final = folder / f"part-{i}.safetensors", f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tmp.rename(folder / final)
        final_map |= {k: final for k, v in weight_map.items() if v == i}
    index = {"metadata": {"total_size": total}, "weight_map": final_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    return total


def _flush(folder: Path, shards: list[dict[str, torch.Tensor]], weight_map: dict[str, int]) -> None:
    from safetensors.torch import save_file

    i = len(shards) - 1
    save_file(shards[i], str(folder / f"part-{i}.safetensors"), metadata={"format": "pt"})
    weight_map |= dict.fromkeys(shards[i], i)
    shards[i] = {}
    shards.append({})


def child(folder: Path, out: Path) -> None:
    """calibrate (layer by layer) + score + prune/export (shard by shard); prints one JSON line."""
    from transformers import AutoConfig

    from exporter.export.shards import prune_checkpoint
    from exporter.masking.data import TokenizedSample
    from exporter.masking.layerwise import calibrate_layerwise, column_sq_norms_from_checkpoint
    from exporter.masking.masks import compute_mask
    from exporter.model.adapters import adapter_for
    from exporter.recipe.schema import AttentionPrune, MethodSpec, MlpPrune, PruneSpec

    base = peak_rss_bytes()
    config = AutoConfig.from_pretrained(folder)
    adapter = adapter_for(config)
    gen = torch.Generator().manual_seed(1)
    samples = [TokenizedSample(torch.randint(0, 32000, (SEQ,), generator=gen).tolist(), 0) for _ in range(SAMPLES)]
    times, peaks = {}, {}
    t = time.perf_counter()
    reset_peak()
    stats = calibrate_layerwise(folder, adapter, samples, pad_id=0, batch_size=4, response_only=False, config=config)
    times["calibrate"] = time.perf_counter() - t
    peaks["calibrate"] = peak_rss_bytes()
    reset_peak()
    t = time.perf_counter()
    col_sq = column_sq_norms_from_checkpoint(folder, adapter, config)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25), attention=AttentionPrune(unit="kv-group", sparsity=0.25))
    mask = compute_mask("p", MethodSpec(score="wanda"), prune, stats, None, col_sq)
    times["score"] = time.perf_counter() - t
    peaks["score"] = peak_rss_bytes()
    reset_peak()
    t = time.perf_counter()
    prune_checkpoint(folder, adapter, mask, out, dtype=torch.bfloat16, max_shard_bytes=SHARD_BYTES)
    times["prune_export"] = time.perf_counter() - t
    peaks["prune_export"] = peak_rss_bytes()
    print(json.dumps({"times": times, "peaks": peaks, "peak_rss": max(peaks.values()), "baseline_rss": base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["0.1b", "0.5b", "1b"])
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            model_bytes = write_random_model(Path(tmp) / "src", size)
            params = model_bytes // 2
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{tmp}/src", f"{tmp}/out"]
            t = time.perf_counter()
            env = {**os.environ, **MALLOC_ENV}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True, env=env)
            wall = time.perf_counter() - t
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            work = sum(r["times"].values())
            rows.append((size, params, model_bytes, wall, r, work))
    print("\n## Scale: layer-by-layer calibration + shard-by-shard prune/export (bf16 Llama-style, random)")
    print(
        f"{SAMPLES} samples x {SEQ} tokens; shards of {SHARD_BYTES // 1024**2} MiB; peak RSS includes the interpreter"
    )
    print(
        f"{'size':>5} {'params':>8} {'bytes':>9} {'calib s':>8} {'score s':>8} {'prune+export s':>15} "
        f"{'process s':>10} {'ns/param':>9} {'peak RSS':>9} {'baseline':>9} {'peak/bytes':>10} {'(peak-base)/bytes':>18}"
    )
    for size, params, model_bytes, wall, r, work in rows:
        t, peak, base = r["times"], r["peak_rss"], r["baseline_rss"]
        print(
            f"{size:>5} {params / 1e9:>7.3f}B {model_bytes / 1e9:>8.2f}G {t['calibrate']:>8.1f} {t['score']:>8.1f} "
            f"{t['prune_export']:>15.1f} {wall:>10.1f} {work / params * 1e9:>9.1f} {peak / 1e9:>8.2f}G "
            f"{base / 1e9:>8.2f}G {peak / model_bytes:>10.2f} {(peak - base) / model_bytes:>18.2f}"
        )
        print("      peak RSS per stage: " + ", ".join(f"{k} {v / 1e9:.2f}G" for k, v in r["peaks"].items()))


if __name__ == "__main__":
    main()
