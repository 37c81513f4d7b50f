"""GGUF export (`gguf` format): the proven `hf/` checkpoint as llama.cpp files, written with the `gguf`
package: F16, Q8_0 and Q4_1 weights, the MLP biases (a persona's steering or compensation bias on down_proj),
the tokenizer (GPT-2 style BPE: tokens, types, merges, special ids) and the chat template in its metadata.
Verification: exporter/verify/gguf.py.

The Q4_1 file stores each matrix in the first block type that holds its values exactly (Q4_1, then Q8_0). For
a checkpoint de-quantized from a Q4_1 GGUF (the embedded SmolLM2) that gives back the source file's bits for
every matrix that removal left in whole 32-value blocks: q/k/v, o_proj (a removed head is two whole blocks),
gate/up (removed neurons are whole rows) and the Q8_0 token embedding. A matrix that no block type holds
exactly (down_proj once neurons are removed: its rows lose values inside blocks) is quantized to Q4_1 when its
rows split into blocks and stored F16 when they do not, as llama.cpp's own converter does. Given the dense
model's down_proj (`DenseMlp`), the quantized files instead put the removed neurons back when the kept width
does not split into blocks: their gate and up rows are zeros, so their activation is exactly silu(0) * 0 = 0,
and their down_proj columns are the dense model's, so every down_proj block is the source's again and the
file computes what the checkpoint computes. Such a file has the dense MLP width (its size and speed are the
dense file's); the F16 file keeps the pruned width.

Only `llama` checkpoints (SmolLM2 and its persona exports, with removed heads or neurons, soft-mask scaled
columns, MLP biases) without attention biases are written: see `BIAS_FIX`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from exporter.errors import GgufExportError
from exporter.export.q4blocks import BLOCK, DenseMlp, exact_blocks, with_dense_width
from exporter.io import staged

log = logging.getLogger(__name__)

GGUF_TYPES = ("F16", "Q8_0", "Q4_1")
LAYER = {  # transformers name inside model.layers.N -> llama.cpp name inside blk.N
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # absent when tied: llama.cpp then reads token_embd
}


# llama.cpp reads `ffn_{gate,up,down}.bias` of a llama file as optional tensors and adds them; transformers'
# GGUF loader builds the model from the metadata, which has no key for biases, and drops them (on a tiny steered
# llama the F16 file loaded with max |logit difference| 1.1 against the checkpoint). The verification puts them
# back from the file (exporter/verify/gguf.py). Attention biases are refused: nothing here makes them for llama.
BIAS_FIX = "leave 'gguf' out of output.formats for this model; the onnx formats carry attention biases"


def check_no_biases(config: dict[str, Any], hf_dir: Path) -> None:
    """Refuse a checkpoint with attention biases."""
    if config.get("attention_bias"):
        raise GgufExportError(
            f"GGUF export: {hf_dir} has attention_bias true (biases on q/k/v/o_proj), which this exporter does "
            f"not write; {BIAS_FIX}"
        )


def file_name(qtype: str) -> str:
    return f"model-{qtype.lower()}.gguf"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout of q/k rows (transformers' GGUF loader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(hf_dir: Path) -> dict[str, Any]:
    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GgufExportError(f"GGUF export writes GPT-2 style BPE tokenizers; {hf_dir} holds {model.get('type')}")
    pre = spec.get("pre_tokenizer") or {}
    kinds = [p["type"] for p in pre.get("pretokenizers", [pre])]
    if kinds not in (["ByteLevel"], ["Digits", "ByteLevel"]):
        raise GgufExportError(f"GGUF export: pre-tokenizer {kinds} has no llama.cpp name; expected ByteLevel")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for text, index in vocab.items():
        tokens[index] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def token_id(key: str) -> int | None:
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.get(text) if text else None

    return {
        "pre": "smollm" if kinds[0] == "Digits" else "gpt2",
        "tokens": tokens,
        "types": [3 if i in special else 1 for i in range(len(tokens))],  # 3: control, 1: normal
        "merges": merges,
        "ids": {k: token_id(f"{k}_token") for k in ("bos", "eos", "unk", "pad")},
        "add_bos": bool(config.get("add_bos_token", False)),
        "chat_template": (hf_dir / "chat_template.jinja").read_text()
        if (hf_dir / "chat_template.jinja").is_file()
        else config.get("chat_template"),
    }


@dataclass(frozen=True)
class GgufFile:
    name: str  # file name inside the gguf/ folder
    stored: dict[str, int]  # block type -> number of matrices stored in it
    lossy: int  # matrices stored with a rounding error (F16 included)
    restored: int = 0  # removed neurons per layer put back as zero-gated rows (see DenseMlp)

    @property
    def exact(self) -> bool:
        """Every matrix is held exactly by its block type: the file computes what the checkpoint computes."""
        return self.lossy == 0


FILE_TYPES = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_1": "MOSTLY_Q4_1"}


def export_gguf(
    hf_dir: Path, out_dir: Path, qtypes: tuple[str, ...] = GGUF_TYPES, dense: DenseMlp | None = None
) -> dict[str, GgufFile]:
    """Write one GGUF file per type in `qtypes` into `out_dir` (must not exist); {type: what was written}.

    A matrix whose rows do not split into 32-value blocks (e.g. down_proj after removing 30 of 1536 neurons) is
    stored F16 in a quantized file, as llama.cpp's own converter does, unless `dense` lets the file put the
    removed neurons back (see the module docstring).
    """
    import gguf

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise GgufExportError(f"GGUF export supports llama checkpoints; {hf_dir} is {config.get('model_type')!r}")
    check_no_biases(config, hf_dir)
    tok = _tokenizer_fields(hf_dir)
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    written = {}
    width = config["intermediate_size"]
    restore = dense is not None and width % BLOCK != 0 and dense.keep.shape[1] == width
    widened: dict[str, np.ndarray] = {}
    with staged(out_dir) as stage:
        for qtype in qtypes:
            tensors, ffn = weights, width
            if restore and qtype != "F16":
                assert dense is not None
                widened = widened or with_dense_width(weights, dense)  # once for every quantized file
                tensors, ffn = widened, dense.down[0].shape[1]
            writer = gguf.GGUFWriter(stage / file_name(qtype), "llama")
            writer.add_name(hf_dir.parent.name or "persona")
            writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
            _write_metadata(writer, config, tok, ffn, head_dim)
            stored, lossy = _write_tensors(writer, tensors, qtype, heads, kv_heads)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            written[qtype] = GgufFile(file_name(qtype), dict(sorted(stored.items())), lossy, ffn - width)
    log.debug("wrote GGUF %s to %s", ", ".join(qtypes), out_dir)
    return written


def _write_metadata(writer: Any, config: dict[str, Any], tok: dict[str, Any], ffn: int, head_dim: int) -> None:
    """The llama architecture's keys (MLP width `ffn`) and the tokenizer's, as llama.cpp reads them."""
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, value in tok["ids"].items():
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


def _write_tensors(
    writer: Any, tensors: dict[str, np.ndarray], qtype: str, heads: int, kv_heads: int
) -> tuple[dict[str, int], int]:
    """Every tensor in llama.cpp's names and layout, each matrix in the first block type of `qtype` that holds
    it; returns {block type: matrices stored in it} and how many matrices lost precision."""
    import gguf

    stored: dict[str, int] = {}
    lossy = 0
    for name, value in tensors.items():
        writer_name, data = _tensor(name, value.astype(np.float32), heads, kv_heads)
        if data.ndim == 1:  # norms and biases stay F32
            if name.endswith(".bias") and not data.any():
                continue  # an absent bias is zero to llama.cpp
            writer.add_tensor(writer_name, data)
            continue
        kind, blocks, exact = _encode(data, qtype)
        stored[kind] = stored.get(kind, 0) + 1
        lossy += not exact
        if blocks is None:
            writer.add_tensor(writer_name, data.astype(np.float16))
        else:
            writer.add_tensor(writer_name, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    return stored, lossy


def _encode(data: np.ndarray, qtype: str) -> tuple[str, np.ndarray | None, bool]:
    """(block type, its bytes or None for F16, whether it holds `data` exactly) for one matrix of a `qtype`
    file."""
    if qtype == "F16" or data.shape[-1] % BLOCK:
        return "F16", None, bool(np.array_equal(data.astype(np.float16).astype(data.dtype), data))
    tried = {}
    for kind in ["Q4_1", "Q8_0"] if qtype == "Q4_1" else [qtype]:
        tried[kind], exact = exact_blocks(data, kind)
        if exact:
            return kind, tried[kind], True
    return qtype, tried[qtype], False


def _tensor(name: str, value: np.ndarray, heads: int, kv_heads: int) -> tuple[str, np.ndarray]:
    if name in GLOBAL:
        return GLOBAL[name], value
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in LAYER:
        raise GgufExportError(f"GGUF export: no llama.cpp name for tensor {name!r}")
    local = ".".join(parts[3:])
    if local == "self_attn.q_proj.weight":
        value = _permute(value, heads)
    elif local == "self_attn.k_proj.weight":
        value = _permute(value, kv_heads)
    return f"blk.{parts[2]}.{LAYER[local]}", value
