"""onnxruntime-genai folders (`onnx-genai`): onnxruntime-genai's model builder run on the proven `hf/`
checkpoint, written atomically. The builder makes its own graph (fused GroupQueryAttention, RoPE caches,
packed QKV) with `genai_config.json`, and weight-only `MatMulNBits` for int4 / int8; the folder loads with
`onnxruntime_genai.Model(folder)`.

onnxruntime-genai 0.15.2 is pinned: the builders of 0.16 to 0.18 import classes that only transformers 5 has
(`Qwen3_5ForConditionalGeneration`), and the project runs on transformers 4.57.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import OnnxExportError
from exporter.export.q4blocks import DenseMlp, q4_1_blocks, with_dense_width
from exporter.io import staged, write_json
from exporter.runtime.onnx import ONNX_FILE

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp32")
BITS = {"int4": 4, "int8": 8, "q4": 4}  # measured precisions (q4: onnx-q4) -> the floor that applies
CONFIG_FILE = "genai_config.json"
# 0.15.2 names a tied LM head's 8-bit weight `_Q4` when the embedding shares it (the model then fails to
# load): int8 keeps its own embedding. int4 shares one 4-bit matrix (GatherBlockQuantized) as the builder does.
EXTRA_OPTIONS = {"int8": ["shared_embeddings=false"]}
MAX_LOG = 2000  # characters of the builder's output kept in an error message


def build_genai(hf_dir: Path, out_dir: Path, precision: str = "int4") -> dict[str, Any]:
    """Run onnxruntime-genai's builder on `hf_dir` (a checkpoint folder with tokenizer) into `out_dir`,
    which must not exist; returns {"precision", "files", "mb", "eos_token_id"}.

    The builder runs in a child process (its prints and memory stay there, offline). `genai_config.json`'s
    end-of-turn ids get the shipped tokenizer's eos (`<|im_end|>` for SmolLM2), so that generation stops
    where the chat template ends a turn.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise OnnxExportError(f"onnx-genai precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if not (hf_dir / "config.json").is_file():
        raise OnnxExportError(f"{str(hf_dir)!r} has no config.json; pass a folder written by save_pretrained")
    start = time.perf_counter()
    with staged(out_dir) as stage:
        cache = stage / ".builder-cache"
        argv = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(stage)]
        argv += ["-p", precision, "-e", "cpu", "-c", str(cache)]
        if precision in EXTRA_OPTIONS:
            argv += ["--extra_options", *EXTRA_OPTIONS[precision]]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        shutil.rmtree(cache, ignore_errors=True)
        if done.returncode != 0 or not (stage / CONFIG_FILE).is_file():
            tail = (done.stderr or done.stdout)[-MAX_LOG:].strip()
            raise OnnxExportError(
                f"onnxruntime-genai's builder could not build {str(hf_dir)!r} at {precision} "
                f"(exit code {done.returncode}): {tail}"
            )
        eos = _end_ids(stage, hf_dir)
        files = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
        mb = sum((stage / f).stat().st_size for f in files) / 1e6
    log.info("onnx-genai %s written in %.1f s (%.0f MB)", precision, time.perf_counter() - start, mb)
    return {"precision": precision, "files": files, "mb": mb, "eos_token_id": eos}


def _end_ids(folder: Path, hf_dir: Path) -> list[int]:
    """Add the checkpoint tokenizer's eos id to `genai_config.json`'s eos ids (and give it a pad id when the
    checkpoint declares none, which onnxruntime-genai refuses); the resulting eos ids."""
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    declared = config["model"].get("eos_token_id")
    ids = list(declared) if isinstance(declared, list) else [] if declared is None else [declared]
    ids = [i for i in ids if 0 <= i < config["model"]["vocab_size"]]  # onnxruntime-genai refuses others
    tokenizer_config = hf_dir / "tokenizer_config.json"
    special = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    eos = _token_id(special, "eos_token", hf_dir)
    if eos is not None and eos not in ids:
        ids.append(eos)
    config["model"]["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if config["model"].get("pad_token_id") is None:
        pad = _token_id(special, "pad_token", hf_dir)
        config["model"]["pad_token_id"] = pad if pad is not None else ids[0] if ids else 0
    write_json(path, config)
    return ids


def _token_id(tokenizer_config: dict[str, Any], key: str, hf_dir: Path) -> int | None:
    """The id of the tokenizer's `key` token (eos_token, pad_token), read from its files (no tokenizer is
    loaded)."""
    token = tokenizer_config.get(key)
    token = token.get("content") if isinstance(token, dict) else token
    if not isinstance(token, str):
        return None
    for index, added in tokenizer_config.get("added_tokens_decoder", {}).items():
        if isinstance(added, dict) and added.get("content") == token:
            return int(index)
    tokenizer_json = hf_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        vocab = json.loads(tokenizer_json.read_text()).get("model", {}).get("vocab", {})
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    return None


def build_q4_genai(
    hf_dir: Path, out_dir: Path, dense: DenseMlp | None = None, accuracy_level: int = 1, fallback: str | None = "hqq"
) -> dict[str, Any]:
    """An onnxruntime-genai folder (`onnx-q4`) whose MatMuls run on 4-bit blocks: onnxruntime-genai's fp32 graph
    of `hf_dir`, each weight stored in its own exact Q4_1 / Q8_0 blocks when it has them, else in `fallback`
    4-bit blocks (exporter/export/q4onnx.py). `out_dir` must not exist.

    With `dense` (the dense model's MLP) and exact Q4_1 blocks in every dense down_proj, the removed neurons
    are put back as zero-gated neurons, as the GGUF writer does, so that every down_proj block is the source's;
    the folder then has the dense MLP width. Returns {"files", "mb", "eos_token_id", "stored"}: "stored" holds how
    the matrices are stored, as exporter/reports/checks.py `Q4Check` reports it.
    """
    import onnx
    from onnx import numpy_helper

    from exporter.export.q4onnx import quantize_matmuls, stored_weights

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".q4-", dir=out_dir.parent) as tmp:
        source, restored = hf_dir, 0
        if dense is not None and restores_blocks(dense, hf_dir):
            source = Path(tmp) / "hf"
            restored = write_dense_width(hf_dir, source, dense)
        built = build_genai(source, Path(tmp) / "fp32", "fp32")
        model = onnx.load(Path(tmp) / "fp32" / ONNX_FILE)
        fp32 = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if len(i.dims) == 2}
        done = quantize_matmuls(model, accuracy_level, "split" if accuracy_level == 1 else "int8", fallback)
        stored = stored_weights(model)  # read back from the written initializers
        exact = sum(np.array_equal(w, fp32[name].T.astype(np.float64)) for name, w in stored.items())
        with staged(out_dir) as stage:
            for name in built["files"]:
                if not name.startswith(ONNX_FILE):
                    shutil.copy2(Path(tmp) / "fp32" / name, stage / name)
            onnx.save_model(model, stage / ONNX_FILE, save_as_external_data=True, location=f"{ONNX_FILE}.data")
            files = sorted(p.name for p in stage.iterdir() if p.is_file())
            mb = sum((stage / f).stat().st_size for f in files) / 1e6
    log.info("onnx-q4 written in %.1f s (%.0f MB, %s)", time.perf_counter() - start, mb, done.count())
    return {
        "files": files,
        "mb": mb,
        "eos_token_id": built["eos_token_id"],
        "stored": {
            "blocks": done.count(),
            "weights_exact": int(exact),  # matrices whose stored blocks give the checkpoint's weights bit for bit
            "weights_quantized": len(stored),
            "restored_neurons_per_layer": restored,
            "accuracy_level": accuracy_level,
        },
    }


def restores_blocks(dense: DenseMlp, hf_dir: Path) -> bool:
    """Whether putting removed neurons back makes the down_proj blocks the source's: neurons were removed and
    every dense down_proj has exact Q4_1 blocks."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    if dense.keep.shape[1] == dense.down[0].shape[1] or dense.keep.shape[1] != config["intermediate_size"]:
        return False
    return all(q4_1_blocks(down) is not None for down in dense.down)


def write_dense_width(hf_dir: Path, out: Path, dense: DenseMlp) -> int:
    """`hf_dir` with its MLP at the dense width (exporter/export/q4blocks.py `with_dense_width`) as a
    checkpoint folder `out`; returns how many neurons per layer were put back."""
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True)
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update(load_file(shard))
    save_file(with_dense_width(weights, dense), out / "model.safetensors", metadata={"format": "pt"})
    for item in Path(hf_dir).iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(item, out / item.name)
    config = json.loads((out / "config.json").read_text())
    width = dense.down[0].shape[1]
    restored = width - config["intermediate_size"]
    write_json(out / "config.json", {**config, "intermediate_size": width})
    return restored
