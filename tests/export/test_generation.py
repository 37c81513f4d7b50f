"""The decoding every export ships (output.generation): written into the checkpoint's generation_config.json,
read back by transformers' generate, carried into the GGUF metadata llama.cpp reads, and read by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from exporter.errors import ExportFolderError
from exporter.export.gguf import export_gguf
from exporter.export.hf import ship_generation
from exporter.recipe.generation import GenerationSpec, shipped_penalty
from tests.helpers import tiny_model, tiny_tokenizer


def checkpoint(folder: Path, source_generation: dict[str, object] | None) -> Path:
    """A tiny llama checkpoint whose source generation config samples (as many instruct models ship)."""
    from transformers import GenerationConfig

    model = tiny_model("llama")
    model.save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.bos_token = "<|system|>"  # transformers' GGUF tokenizer reader needs a BOS id in the file
    tok.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    if source_generation is not None:
        GenerationConfig(**source_generation).save_pretrained(folder)
    return folder


def test_the_checkpoint_ships_greedy_with_the_penalty_and_transformers_applies_it(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = {"bos_token_id": 4, "eos_token_id": 1, "max_length": 99, "do_sample": True, "temperature": 0.7}
    folder = checkpoint(tmp_path / "hf", source | {"top_k": 20, "no_repeat_ngram_size": 3})
    ship_generation(folder, GenerationSpec(repetition_penalty=2.0))  # the tiny model repeats its last token
    written = json.loads((folder / "generation_config.json").read_text())
    # the source's token ids and length stay; how tokens are chosen is the recipe's: greedy with the penalty
    assert {k: written[k] for k in ("bos_token_id", "eos_token_id", "max_length")} == {
        "bos_token_id": 4,
        "eos_token_id": 1,
        "max_length": 99,
    }
    assert written["repetition_penalty"] == 2.0 and not written.get("do_sample", False)
    assert not {"temperature", "top_k", "no_repeat_ngram_size"} & set(written)
    assert shipped_penalty(folder) == 2.0
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 60, 70, 80, 7]])
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 16, "min_new_tokens": 16}
    with torch.no_grad():
        shipped = model.generate(**kw, pad_token_id=0)  # what a user of the checkpoint gets
        penalised = model.generate(**kw, pad_token_id=0, repetition_penalty=2.0)
        plain = model.generate(**kw, pad_token_id=0, repetition_penalty=1.0)
    assert shipped.tolist() == penalised.tolist() != plain.tolist()


def test_plain_greedy_and_a_checkpoint_without_a_generation_config(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "hf", None)
    ship_generation(folder, GenerationSpec())
    written = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert written["eos_token_id"] == config["eos_token_id"] and "repetition_penalty" not in written
    assert shipped_penalty(folder) == 1.0 and shipped_penalty(tmp_path) == 1.0  # a folder that states none


def test_the_gguf_files_carry_the_decoding_llama_cpp_reads(tmp_path: Path) -> None:
    from gguf import GGUFReader

    folder = checkpoint(tmp_path / "hf", {"bos_token_id": 4, "eos_token_id": 1})
    ship_generation(folder, GenerationSpec(repetition_penalty=1.25))
    files = export_gguf(folder, tmp_path / "gguf", ("F16", "Q8_0"))
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    for written in files.values():
        fields = GGUFReader(tmp_path / "gguf" / written.name).fields
        read = {k: fields[f"general.sampling.{k}"].contents() for k in ("temp", "penalty_repeat", "penalty_last_n")}
        assert read == {"temp": 0.0, "penalty_repeat": pytest.approx(1.25), "penalty_last_n": context}


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("generation_config.json", {"repetition_penalty": "high"}),
        ("generation_config.json", {"repetition_penalty": 0}),
        ("genai_config.json", {"search": {"repetition_penalty": -1.1}}),
    ],
)
def test_a_bad_shipped_penalty_is_a_clear_error(tmp_path: Path, file: str, content: dict[str, object]) -> None:
    (tmp_path / file).write_text(json.dumps(content))
    with pytest.raises(ExportFolderError, match=f"{file}: repetition_penalty is .* not a positive number"):
        shipped_penalty(tmp_path)
