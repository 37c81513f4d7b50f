"""The tokenizer an export ships: for a GGUF source, one rebuilt from the GGUF's own metadata so that it is
faithful to the original checkpoint's tokenizer rather than transformers' GGUF conversion.

transformers 4.57 turns a GGUF `gpt2` BPE vocabulary (SmolLM2's) into a `LlamaTokenizerFast` whose
eos is the BOS token (`<|im_start|>` for SmolLM2, while chat turns end with `<|im_end|>`), which prepends
BOS to plain text although the file says `tokenizer.ggml.add_bos_token = false`, and whose decoder mixes
sentencepiece steps (ByteFallback, `▁` replacement) into byte-level decoding. onnxruntime-genai and
transformers 5 read that `tokenizer.json` differently and print `ĠWhatĠis`.

The rebuilt tokenizer keeps the vocabulary, merges and added tokens (so ids are unchanged apart from the
plain-text BOS) and declares what a GPT-2 style byte-level BPE is: `GPT2TokenizerFast`, a ByteLevel
pre-tokenizer (preceded by single-digit splitting where llama.cpp's pre-tokenizer name says so), a ByteLevel
decoder and post-processor, the GGUF's special token ids and chat template.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# llama.cpp `tokenizer.ggml.pre` names -> does the regex split digits one by one (`\p{N}` before the GPT-2
# pattern). Names not listed here keep transformers' own conversion.
GPT2_PRE = {"smollm": True, "starcoder": True, "refact": True, "gpt-2": False, "gpt2": False, "default": False}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar `tokenizer.*` fields of a GGUF file and its context length (no arrays, no tensors)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key.endswith(".context_length")) or not field.data:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        meta[key] = bytes(value).decode() if field.types[0] == GGUFValueType.STRING else value.tolist()[0]
    return meta


def faithful_tokenizer(converted: Any, meta: dict[str, Any]) -> Any:
    """A `GPT2TokenizerFast` with `converted`'s vocabulary, merges and added tokens, configured from the
    GGUF metadata `meta`; `converted` itself when the GGUF is not a GPT-2 style BPE we know."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    pre = meta.get("tokenizer.ggml.pre", "default")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in GPT2_PRE:
        log.info("GGUF tokenizer %s/%s: keeping transformers' conversion", meta.get("tokenizer.ggml.model"), pre)
        return converted
    spec = json.loads(converted.backend_tokenizer.to_str())
    spec["model"].update({"byte_fallback": False, "fuse_unk": False, "unk_token": None})
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.normalizer = None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if GPT2_PRE[pre]:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None else backend.id_to_token(int(index))

    # the added tokens (all control tokens of the GGUF) come along in `spec`; bos and eos are also listed
    # as additional special tokens, as in SmolLM2's own tokenizer_config.json
    ends = list(dict.fromkeys(t for t in (token("bos"), token("eos")) if t is not None))
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding") or token("eos"),
        additional_special_tokens=ends,
        add_prefix_space=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        model_max_length=int(next((v for k, v in meta.items() if k.endswith(".context_length")), 2048)),
        chat_template=meta.get("tokenizer.chat_template") or converted.chat_template,
    )


def export_tokenizer(folder: Path, gguf_file: str | None, converted: Any) -> Any:
    """The tokenizer written into every export of the model at `folder` (`gguf_file` when a GGUF source)."""
    if gguf_file is None:
        return converted
    return faithful_tokenizer(converted, gguf_metadata(folder / gguf_file))
