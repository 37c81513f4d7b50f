"""GGUF export on a tiny seeded llama whose head_dim != hidden_size / num_heads (a head-pruned shape):
written with the `gguf` package, read back by transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exporter.errors import GgufExportError
from exporter.export.gguf import export_gguf
from exporter.model.tokenizer import faithful_tokenizer, gguf_metadata
from tests.helpers import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama")
    model.save_pretrained(root / "hf")
    tok = tiny_tokenizer()
    tok.bos_token = "<|system|>"  # transformers' GGUF tokenizer reader needs a BOS id in the file
    tok.save_pretrained(root / "hf")
    return model, root / "hf", Path(export_gguf(root / "hf", root / "gguf") and root / "gguf")


@pytest.mark.parametrize(("qtype", "atol"), [("F16", 1e-2), ("Q8_0", 5e-2)])
def test_gguf_reads_back_as_the_same_model(
    written: tuple[torch.nn.Module, Path, Path], qtype: str, atol: float
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, hf_dir, out = written
    name = f"model-{qtype.lower()}.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (6, 2, 16, 96)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(ids).logits - loaded(ids).logits).abs()
    assert diff.max() <= atol, f"{qtype}: max |dlogit| {diff.max():.2e} (mean {diff.mean():.2e})"
    assert diff.max() > 0  # really read from the file, rounded
    tok, ours = AutoTokenizer.from_pretrained(out, gguf_file=name), AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "quiet party 42"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == ours.apply_chat_template(
        messages, add_generation_prompt=True
    )
    # transformers' reader takes eos from the BOS id (its GGUF tokenizer conversion); the file has the right
    # ids, and exporter.tokenizer rebuilds the exported tokenizer from them
    meta = gguf_metadata(out / name)
    assert meta["tokenizer.ggml.eos_token_id"] == ours.eos_token_id and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == ours.chat_template
    rebuilt = faithful_tokenizer(tok, meta)
    assert (
        rebuilt.eos_token == "<|end|>" and rebuilt("quiet party 42")["input_ids"] == ours("quiet party 42")["input_ids"]
    )


def test_q8_0_file_is_smaller(written: tuple[torch.nn.Module, Path, Path]) -> None:
    _, _, out = written
    assert (out / "model-q8_0.gguf").stat().st_size < 0.7 * (out / "model-f16.gguf").stat().st_size


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    tiny_model("qwen3").save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    with pytest.raises(GgufExportError, match="supports llama checkpoints"):
        export_gguf(tmp_path / "hf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_a_checkpoint_with_mlp_biases_is_refused_naming_the_fix(tmp_path: Path) -> None:
    """A steering or compensation bias (config.mlp_bias) has no key in a llama GGUF and transformers' GGUF
    loader drops it, so such a file could not be proven: refused before anything is written."""
    from transformers import LlamaForCausalLM

    dense = tiny_model("llama")
    config = dense.config
    config.mlp_bias = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    with pytest.raises(GgufExportError, match=r"mlp_bias true.*leave 'gguf' out.*method\.steer: 0"):
        export_gguf(tmp_path / "hf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
