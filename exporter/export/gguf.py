"""GGUF export (`gguf` format): the proven `hf/` checkpoint as llama.cpp files, written with the `gguf`
package: F16 and Q8_0 weights, the tokenizer (GPT-2 style BPE: tokens, types, merges, special ids) and the
chat template in its metadata. Verification: exporter/verify/gguf.py.

Only `llama` checkpoints (SmolLM2 and its persona exports, with removed heads or neurons, soft-mask scaled
columns) without MLP biases are written: see `MLP_BIAS_FIX`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from exporter.errors import GgufExportError
from exporter.io import staged

log = logging.getLogger(__name__)

GGUF_TYPES = ("F16", "Q8_0")
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
}
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # absent when tied: llama.cpp then reads token_embd
}


# A llama GGUF has no metadata key saying that its Linear layers have biases. llama.cpp reads `ffn_*.bias`
# tensors as optional, but transformers' GGUF loader (the verification below, and `gguf_file=` for users)
# builds the model from the metadata and silently drops them: on a tiny steered llama the F16 file loaded with
# max |logit difference| 1.1 against the checkpoint (1e-4 with the biases in). Such a file cannot be proven.
MLP_BIAS_FIX = (
    "leave 'gguf' out of output.formats for this persona, or export it without a steering or compensation "
    "bias (method.steer: 0, prune.mlp.compensate: none); the onnx formats carry the biases"
)


def check_no_biases(config: dict[str, Any], hf_dir: Path) -> None:
    """Refuse a checkpoint with Linear biases (a persona's steering or compensation bias on down_proj)."""
    biased = [key for key in ("mlp_bias", "attention_bias") if config.get(key)]
    if biased:
        raise GgufExportError(
            f"GGUF export: {hf_dir} has {' and '.join(biased)} true (a steering or compensation bias on "
            f"down_proj), which a llama GGUF file cannot declare and transformers' GGUF loader drops; {MLP_BIAS_FIX}"
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


def export_gguf(hf_dir: Path, out_dir: Path, qtypes: tuple[str, ...] = GGUF_TYPES) -> dict[str, str]:
    """Write one GGUF file per type in `qtypes` into `out_dir` (must not exist); {type: file name}.

    A matrix whose rows do not split into Q8_0's 32-value blocks (e.g. down_proj after removing 30 of 1536
    neurons) is stored F16 in the Q8_0 file, as llama.cpp's own converter does.
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
    with staged(out_dir) as stage:
        for qtype in qtypes:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer = gguf.GGUFWriter(stage / file_name(qtype), "llama")
            writer.add_name(hf_dir.parent.name or "persona")
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0)
            writer.add_context_length(config["max_position_embeddings"])
            writer.add_embedding_length(config["hidden_size"])
            writer.add_block_count(config["num_hidden_layers"])
            writer.add_feed_forward_length(config["intermediate_size"])
            writer.add_head_count(heads)
            writer.add_head_count_kv(kv_heads)
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
            for name, value in weights.items():
                writer_name, data = _tensor(name, value.astype(np.float32), heads, kv_heads)
                if data.ndim == 1:  # norms stay F32
                    writer.add_tensor(writer_name, data)
                elif kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
                    writer.add_tensor(writer_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
                else:
                    writer.add_tensor(writer_name, data.astype(np.float16))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            written[qtype] = file_name(qtype)
    log.debug("wrote GGUF %s to %s", ", ".join(qtypes), out_dir)
    return written


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
