"""GGUF export on a tiny seeded llama whose head_dim != hidden_size / num_heads (a head-pruned shape):
written with the `gguf` package, read back by transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.errors import GgufExportError
from exporter.export.gguf import export_gguf
from exporter.export.q4blocks import DenseMlp
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


@pytest.mark.parametrize(("qtype", "atol"), [("F16", 1e-2), ("Q8_0", 5e-2), ("Q4_1", 0.5)])
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


def test_quantized_files_are_smaller(written: tuple[torch.nn.Module, Path, Path]) -> None:
    _, _, out = written
    f16, q8, q4 = (out / f"model-{t}.gguf" for t in ("f16", "q8_0", "q4_1"))
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    assert q4.stat().st_size < 0.8 * q8.stat().st_size


def _q4_1_valued(model: torch.nn.Module) -> None:
    """Round every matrix to Q4_1 values, as a checkpoint de-quantized from a Q4_1 GGUF holds."""
    from gguf import GGMLQuantizationType, quants

    kind = GGMLQuantizationType.Q4_1
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                blocks = quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(quants.dequantize(blocks, kind)))


def test_q4_1_file_holds_q4_1_weights_exactly_and_requantizes_columns_cut_from_blocks(tmp_path: Path) -> None:
    """A checkpoint de-quantized from Q4_1 is written back as the same Q4_1 blocks (no matrix re-quantized, so
    its file is a parity target); once down_proj loses columns inside its blocks, that matrix alone is
    re-quantized (lossy), and a row length that no longer splits into blocks is stored F16."""
    from gguf import GGMLQuantizationType, GGUFReader, quants

    from exporter.verify.gguf import load_gguf

    model = tiny_model("llama")
    _q4_1_valued(model)
    tok = tiny_tokenizer()
    tok.bos_token = "<|system|>"
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    files = export_gguf(tmp_path / "hf", tmp_path / "gguf", ("Q4_1",))
    q4 = files["Q4_1"]
    assert q4.exact and q4.stored == {"Q4_1": 1 + 2 * 7}, q4  # the embedding (LM head tied), 2 layers x 7
    reader = GGUFReader(tmp_path / "gguf" / q4.name)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type == GGMLQuantizationType.Q4_1
    values = quants.dequantize(embedding.data, embedding.tensor_type)
    assert torch.equal(torch.from_numpy(values), model.model.embed_tokens.weight.detach())
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, load_gguf(tmp_path / "gguf" / q4.name)(ids).logits, atol=1e-5)

    # neurons removed (start, count): whole blocks of down_proj's columns / 32 inside blocks / 8 inside a block
    # (rows of 88 values: F16, which rounds Q4_1 values, so those two matrices are not held exactly either)
    for start, count, stored, lossy in (
        (0, 32, {"Q4_1": 15}, 0),
        (16, 32, {"Q4_1": 15}, 2),
        (4, 8, {"F16": 2, "Q4_1": 13}, 2),
    ):
        pruned = tiny_model("llama")
        _q4_1_valued(pruned)
        width = pruned.config.intermediate_size
        keep = torch.tensor([i for i in range(width) if not start <= i < start + count])
        with torch.no_grad():
            for layer in pruned.model.layers:
                for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                    lin.weight = torch.nn.Parameter(lin.weight[keep])
                layer.mlp.down_proj.weight = torch.nn.Parameter(layer.mlp.down_proj.weight[:, keep])
        pruned.config.intermediate_size = width - count
        folder = tmp_path / f"cut{start}-{count}"
        pruned.save_pretrained(folder / "hf")
        tok.save_pretrained(folder / "hf")
        q4 = export_gguf(folder / "hf", folder / "gguf", ("Q4_1",))["Q4_1"]
        assert (q4.stored, q4.lossy) == (stored, lossy), (start, count, q4)

    # 8 neurons removed inside a block, the dense down_proj given: the quantized files put them back as
    # zero-gated neurons, every block is the source's again, and the file computes what the pruned model does
    dense = DenseMlp(
        np.stack([keep.numpy()] * 2), [layer.mlp.down_proj.weight.detach().numpy() for layer in model.model.layers]
    )
    files = export_gguf(folder / "hf", tmp_path / "restored", ("F16", "Q4_1"), dense=dense)
    assert (files["Q4_1"].stored, files["Q4_1"].lossy, files["Q4_1"].restored) == ({"Q4_1": 15}, 0, 8)
    assert files["F16"].restored == 0  # F16 keeps the pruned width
    restored = load_gguf(tmp_path / "restored" / files["Q4_1"].name)
    assert restored.config.intermediate_size == 96
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, restored(ids).logits, atol=1e-5)


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    tiny_model("qwen3").save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    with pytest.raises(GgufExportError, match="supports llama checkpoints"):
        export_gguf(tmp_path / "hf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_mlp_biases_are_written_and_read_back(tmp_path: Path) -> None:
    """A steering or compensation bias (config.mlp_bias) is written as `ffn_*.bias` tensors, which llama.cpp
    adds; transformers' GGUF loader drops them, and `load_gguf` puts them back from the file."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from exporter.verify.gguf import load_gguf

    config = tiny_model("llama").config
    config.mlp_bias = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.bias.normal_(0, 0.5)
            layer.mlp.up_proj.bias.normal_(0, 0.5)
            layer.mlp.gate_proj.bias.zero_()  # zero biases are left out of the file
    model.save_pretrained(tmp_path / "hf")
    tok = tiny_tokenizer()
    tok.bos_token = "<|system|>"
    tok.save_pretrained(tmp_path / "hf")
    name = export_gguf(tmp_path / "hf", tmp_path / "gguf", ("F16",))["F16"].name
    biases = sorted(t.name for t in GGUFReader(tmp_path / "gguf" / name).tensors if t.name.endswith(".bias"))
    assert biases == [f"blk.{i}.{part}.bias" for i in range(2) for part in ("ffn_down", "ffn_up")]
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        restored = load_gguf(tmp_path / "gguf" / name)(ids).logits
        dropped = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name)(ids).logits
    assert (restored - expected).abs().max() <= 1e-2
    assert (dropped - expected).abs().max() > 0.1  # the biases matter, and the stock loader loses them


def test_a_checkpoint_with_attention_biases_is_refused_naming_the_fix(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    config = tiny_model("llama").config
    config.attention_bias = True
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    with pytest.raises(GgufExportError, match=r"attention_bias true.*leave 'gguf' out"):
        export_gguf(tmp_path / "hf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_gguf_read_once_parses_a_file_once_for_config_weights_and_tokenizer(
    written: tuple[torch.nn.Module, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers parses a GGUF file again for the config, the weights and the tokenizer; within
    `gguf_read_once` every reader of the file is the first one, and what loads is the same."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter.model.sources import gguf_read_once

    _, _, out = written
    name = "model-q8_0.gguf"
    parsed: list[str] = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path: str, *args: object) -> None:
            parsed.append(str(path))
            super().__init__(path, *args)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    real_map = gguf.get_tensor_name_map

    def load() -> tuple[dict[str, torch.Tensor], list[int], dict]:
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(out, gguf_file=name)
        return model.state_dict(), tok("quiet party 42")["input_ids"], gguf_metadata(out / name)

    plain = load()
    assert len(parsed) >= 4  # config, weights, tokenizer, metadata
    parsed.clear()
    with gguf_read_once():
        once = load()
    assert len(parsed) == 1
    assert plain[0].keys() == once[0].keys() and all(torch.equal(plain[0][k], once[0][k]) for k in plain[0])
    assert plain[1:] == once[1:]
    with pytest.raises(RuntimeError), gguf_read_once():
        raise RuntimeError("a load that fails")
    assert gguf.GGUFReader is Counting and gguf.get_tensor_name_map is real_map  # restored, also after an error
