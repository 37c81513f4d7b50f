"""Scaling paths on tiny models: layer-by-layer calibration, shard-by-shard export, half-precision sources."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporter.masking.calibrate import calibrate
from exporter.masking.layerwise import calibrate_layerwise, column_sq_norms_from_checkpoint
from exporter.masking.scoring import column_sq_norms
from exporter.masking.statistics import KINDS, Statistics
from exporter.model.adapters import adapter_for
from tests.helpers import TINY_MODELS, contrastive_mask, samples, tiny_model


def assert_same_statistics(a: Statistics, b: Statistics) -> None:
    assert (a.n_samples, a.n_tokens, a.geometry) == (b.n_samples, b.n_tokens, b.geometry)
    for kind in KINDS:
        torch.testing.assert_close(a.sum[kind], b.sum[kind], rtol=1e-5, atol=1e-7, msg=f"sum.{kind}")
        torch.testing.assert_close(a.sumsq[kind], b.sumsq[kind], rtol=1e-5, atol=1e-7, msg=f"sumsq.{kind}")
    for part in ("mlp", "attn"):
        torch.testing.assert_close(a.chan_sq[part], b.chan_sq[part], rtol=1e-5, atol=1e-7, msg=f"chan_sq.{part}")
    for part in ("mlp", "resid"):  # the means steering reads
        torch.testing.assert_close(a.chan_sum[part], b.chan_sum[part], rtol=1e-5, atol=1e-6, msg=f"chan_sum.{part}")
    assert a.chan_sum["resid"].abs().max() > 0


@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_layerwise_calibration_equals_whole_model(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_model(model_type).save_pretrained(tmp_path / "src", max_shard_size="100KB")  # several shards
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    adapter = adapter_for(model.config)
    data = samples(1)
    whole = calibrate(model, adapter, data, pad_id=0, batch_size=6, response_only=True)
    layered = calibrate_layerwise(tmp_path / "src", adapter, data, pad_id=0, batch_size=6, response_only=True)
    assert_same_statistics(layered, whole)
    assert whole.sum["mlp"].abs().min() > 0  # every layer was really run
    from_shards = column_sq_norms_from_checkpoint(tmp_path / "src", adapter)
    for part, value in column_sq_norms(model, adapter).items():
        assert torch.equal(from_shards[part], value), part


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen2"])
def test_shard_by_shard_export_equals_in_memory_prune(model_type: str, tmp_path: Path) -> None:
    from exporter.export.prune import prune_model
    from exporter.export.shards import prune_checkpoint
    from exporter.model.checkpoint import SourceCheckpoint

    dense = tiny_model(model_type)
    dense.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    adapter, mask = contrastive_mask(dense, "query-head" if model_type == "phi3" else "kv-group")
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    pruned.save_pretrained(tmp_path / "memory")
    files = prune_checkpoint(
        tmp_path / "src", adapter, mask, tmp_path / "shards", dtype=torch.float32, max_shard_bytes=60_000
    )
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1

    expected = load_file(str(tmp_path / "memory" / "model.safetensors"))
    got = SourceCheckpoint(tmp_path / "shards")
    assert set(got.weight_map) == set(expected)
    for name, tensor in got.load(sorted(expected)).items():
        assert torch.equal(tensor, expected[name]), name

    from transformers import AutoConfig, AutoModelForCausalLM

    a, b = AutoConfig.from_pretrained(tmp_path / "memory"), AutoConfig.from_pretrained(tmp_path / "shards")
    for key in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(a, key) == getattr(b, key), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shards").eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_run_layerwise_with_auto_dtype_on_a_bf16_source(tmp_path: Path) -> None:
    import json

    from exporter.cli import main
    from tests.helpers import tiny_tokenizer, write_recipe

    src = tmp_path / "bf16-llama"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    recipe = write_recipe(tmp_path, src, calibration={"batch_size": 4, "layerwise": True}, output={"dtype": "auto"})
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    for persona in ("introvert", "extravert"):
        report = json.loads((tmp_path / "run" / persona / "report.json").read_text())
        assert report["status"] == "passed" and report["dtype"] == "bfloat16"
        hf = tmp_path / "run" / persona / "hf"
        assert json.loads((hf / "config.json").read_text())["dtype"] == "bfloat16"
        assert {t.dtype for t in load_file(str(hf / "model.safetensors")).values()} == {torch.bfloat16}


def test_run_with_layer_by_layer_verification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify.layerwise: no float64 whole-model copy; the verdict is the per-layer proof, fp32 end to end kept."""
    import json

    from exporter.cli import main
    from exporter.publish.modelcard import CardContext, render_card
    from exporter.reports.persona import read_report
    from tests.helpers import tiny_tokenizer, write_recipe

    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    recipe = write_recipe(
        tmp_path, src, calibration={"batch_size": 4, "layerwise": True}, verify={"layerwise": True, "greedy_tokens": 4}
    )
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    for persona in ("introvert", "extravert"):
        report = json.loads((tmp_path / "run" / persona / "report.json").read_text())
        hf = report["verification"]["hf"]
        assert report["status"] == "passed" and "fp64" not in hf and hf["fp32"]["max_abs_logit_diff"] < 1e-4
        layers = hf["fp64_layers"]
        assert layers["passed"] and len(layers["per_layer_max_abs"]) == report["geometry"]["dense"]["layers"]
        assert layers["max_abs_layer_output_diff"] <= 1e-6 and layers["outside_layers_differ"] == []
        card = render_card(read_report(tmp_path / "run" / persona), CardContext("org/x", "org/x", ())).text
        assert "| transformers, fp64, layer by layer |" in card  # the card's parity table
    assert table.count("passed") >= 2


STEERED = {
    "score": "contrastive-wanda",
    "steer": {"introvert": 1.5, "extravert": 2.0},
    "steer_vector": {"extravert": "residual"},  # the introvert's is an MLP-output vector
    "steer_layers": {"extravert": 0.5},
}
BOUNDED_CASES = {  # recipe sections beside model and verify, and the personas exported
    "removal": ({}, ("introvert", "extravert")),
    # steering (both vector kinds), compensation and a soft MLP mask: down_proj biases and scaled columns
    "steered-soft": (
        {
            "method": STEERED,
            "prune": {
                "mlp": {"sparsity": 0.25, "compensate": "personas", "gamma": 0.5},
                "attention": {"unit": "kv-group", "sparsity": 0.5},
            },
        },
        ("introvert", "extravert"),
    ),
    # composites of two pairs, steered with both vector kinds, exported beside one pole
    "composite": (
        {
            "method": {**STEERED, "steer": {**STEERED["steer"], "thinking": 1.0}, "steer_orthogonal": True},
            "output": {"personas": ["IT", "mostly-E", "extravert"]},
        },
        ("IT", "mostly-E", "extravert"),
    ),
}


@pytest.mark.parametrize("case", sorted(BOUNDED_CASES))
def test_bounded_memory_run_equals_the_whole_model_run(case: str, tmp_path: Path) -> None:
    """model.max_memory: accelerate keeps the decoder layers on disk; calibration, scoring, pruning and the
    float64 proof read the checkpoint; the exports are bit-identical to those of a run with the model whole,
    with steering biases, compensation, soft masks and composites too."""
    import json

    from safetensors import safe_open

    from exporter.cli import main
    from tests.helpers import tiny_tokenizer, write_mix_recipe, write_recipe

    sections, personas = BOUNDED_CASES[case]
    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(src)
    runs = {}
    for kind, model in (("whole", {"path": str(src)}), ("bounded", {"path": str(src), "max_memory": 300_000})):
        (tmp_path / kind).mkdir()
        write = write_mix_recipe if case == "composite" else write_recipe
        recipe = write(tmp_path / kind, src, model=model, verify={"greedy_tokens": 4}, **sections)
        assert main(["run", str(recipe), "--out", str(tmp_path / kind / "run"), "--no-cache"]) == 0
        runs[kind] = tmp_path / kind / "run"
    assert sorted(p.parent.name for p in runs["bounded"].glob("*/report.json")) == sorted(personas)
    for persona in personas:
        whole, bounded = (json.loads((runs[k] / persona / "report.json").read_text()) for k in ("whole", "bounded"))
        assert bounded["status"] == "passed" and bounded["loading"]["device_map"].get("disk", 0) >= 1
        assert bounded["verification"]["hf"]["fp64_layers"]["passed"] and "fp64" not in bounded["verification"]["hf"]
        assert bounded["verification"]["hf"]["fp32"]["greedy_identical"]
        assert bounded["removed_per_layer"] == whole["removed_per_layer"]
        assert bounded["parameters"] == whole["parameters"]
        assert whole["base_model"]["weights"] == "safetensors" and whole["loading"] == {"whole": True}
        a = load_file(str(runs["whole"] / persona / "hf" / "model.safetensors"))
        with safe_open(str(runs["bounded"] / persona / "hf" / "model.safetensors"), framework="pt") as f:
            assert sorted(f.keys()) == sorted(a)
            for name in a:
                assert torch.equal(f.get_tensor(name), a[name]), name
        configs = [json.loads((runs[k] / persona / "hf" / "config.json").read_text()) for k in ("whole", "bounded")]
        assert configs[0] == configs[1]
        if case != "removal":  # the settings under test are in the export
            assert configs[1]["mlp_bias"] is True and "model.layers.0.mlp.gate_proj.bias" in a
    recipe_json = json.loads((runs["bounded"] / "recipe.json").read_text())
    assert recipe_json["calibration"]["layerwise"] and recipe_json["verify"]["layerwise"]


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ({"embedded": "smollm2-135m-instruct", "max_memory": "1GiB"}, {}, "embedded model is a GGUF"),
        ({"path": "x", "max_memory": "lots"}, {}, "is not a size"),
        ({"path": "x", "max_memory": "1GiB"}, {"eval": {"neutral": {"path": "n.txt"}}}, "evaluation needs the whole"),
    ],
)
def test_bounded_memory_recipe_errors(tmp_path: Path, model: dict, extra: dict, message: str) -> None:
    from exporter.errors import RecipeError
    from exporter.recipe.load import load_recipe
    from tests.helpers import write_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(str(write_recipe(tmp_path, tmp_path, model=model, **extra)))
