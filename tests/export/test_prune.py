"""Physical removal equals masking, for every registered architecture, on tiny seeded models."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from exporter.errors import UnsupportedModelError
from exporter.export.prune import count_parameters, prune_model
from exporter.model.adapters import REGISTRY, adapter_for
from exporter.model.encoding import position_ids
from exporter.verify.hf import masked
from tests.helpers import TINY_MODELS, assert_close, contrastive_mask, tiny_model


def test_every_registered_adapter_has_a_tiny_model() -> None:
    assert set(REGISTRY) == set(TINY_MODELS), "register a tiny model in tests/helpers.py for every adapter"


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported; supported: llama, mistral"):
        adapter_for(GPT2Config())


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 320, (3, 14), generator=torch.Generator().manual_seed(7))
    attn = torch.ones_like(ids)
    attn[1, :5] = 0  # a left-padded row
    attn[2, :9] = 0
    return {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids(attn)}


@pytest.mark.parametrize("unit", ["kv-group", "query-head"])
@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_pruned_equals_masked_and_reloads(model_type: str, unit: str, tmp_path: Path) -> None:
    dense = tiny_model(model_type).double()
    adapter, mask = contrastive_mask(dense, unit)
    kw = _inputs()
    with torch.no_grad(), masked(dense, adapter, mask):
        reference = dense(**kw).logits
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    g = mask.pruned_geometry()
    assert (pruned.config.intermediate_size, pruned.config.num_attention_heads) == (g.intermediate, g.heads)
    assert pruned.config.num_key_value_heads == g.kv_heads and pruned.config.head_dim == 16
    assert count_parameters(pruned) < count_parameters(dense)
    with torch.no_grad():
        out = pruned(**kw).logits
    valid = kw["attention_mask"].bool()
    assert_close(out[valid], reference[valid], 1e-10, f"{model_type}/{unit} pruned vs masked (fp64)")
    # a masked model really differs from the dense one: the check above is not vacuous
    with torch.no_grad():
        assert (dense(**kw).logits[valid] - reference[valid]).abs().max() > 1e-3

    pruned.save_pretrained(tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    with torch.no_grad():
        again = reloaded(**kw).logits
    # 1e-12, not bit-equal: from_pretrained keeps the rotary inv_freq buffer in fp32, .double() does not
    assert_close(again, out, 1e-12, "reload vs in memory")
    assert reloaded.get_input_embeddings().weight.data_ptr() == reloaded.get_output_embeddings().weight.data_ptr()


@pytest.mark.subprocess
def test_export_loads_in_a_fresh_process_with_stock_transformers(tmp_path: Path) -> None:
    dense = tiny_model("qwen2")
    adapter, mask = contrastive_mask(dense, "kv-group")
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    pruned.save_pretrained(tmp_path / "hf")
    ids = _inputs()["input_ids"][:1]
    with torch.no_grad():
        expected = pruned(input_ids=ids).logits[0, -1].tolist()
    code = (
        "import json,sys,torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(json.dumps(m(input_ids=ids).logits[0, -1].tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    assert_close(got, torch.tensor(expected), 1e-5, "fresh process vs in memory")
