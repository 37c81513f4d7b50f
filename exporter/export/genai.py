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
import time
from pathlib import Path
from typing import Any

from exporter.errors import OnnxExportError
from exporter.io import staged, write_json
from exporter.recipe.generation import decoding_fields, shipped_penalty

log = logging.getLogger(__name__)

PRECISIONS = ("int4", "int8", "fp32")
BITS = {"int4": 4, "int8": 8}
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
    where the chat template ends a turn, and its `search` section the checkpoint's shipped decoding (greedy,
    the repetition penalty of its generation_config.json).
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
        eos = _complete_config(stage, hf_dir)
        files = sorted(p.name for p in stage.iterdir() if p.is_file() and not p.name.startswith("."))
        mb = sum((stage / f).stat().st_size for f in files) / 1e6
    log.info("onnx-genai %s written in %.1f s (%.0f MB)", precision, time.perf_counter() - start, mb)
    return {"precision": precision, "files": files, "mb": mb, "eos_token_id": eos}


def _complete_config(folder: Path, hf_dir: Path) -> list[int]:
    """Add the checkpoint tokenizer's eos id to `genai_config.json`'s eos ids (and give it a pad id when the
    checkpoint declares none, which onnxruntime-genai refuses) and the checkpoint's decoding to its `search`
    section; the resulting eos ids."""
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
    config["search"] = {**config.get("search", {}), **decoding_fields(shipped_penalty(hf_dir))}
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
