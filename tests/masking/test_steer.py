"""Steering and bias compensation baked into down_proj biases: the math, exactness, stock loading, ONNX."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.cli import dispatch, main
from exporter.errors import UnsupportedModelError
from exporter.export.prune import prune_model
from exporter.masking.masks import compute_mask
from exporter.masking.scoring import column_sq_norms
from exporter.masking.steer import compensation_bias, compensation_mean, steering_bias, with_biases
from exporter.model.encoding import position_ids
from exporter.recipe.schema import MethodSpec, MlpPrune, PruneSpec
from exporter.verify.hf import masked
from tests.helpers import OpposedPair, assert_close, eval_section, opposed_stats, samples, tiny_model, write_recipe


def _mean_mlp_outputs(model, adapter, which: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Mean down_proj output of every layer over the counted tokens of sample set `which`: (layers, hidden)."""
    from exporter.masking.calibrate import batches

    sums: list[torch.Tensor] = [
        torch.zeros(model.config.hidden_size, dtype=torch.float64) for _ in adapter.layers(model)
    ]
    count = 0
    current: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(adapter.layers(model)):

        def hook(_m, _a, out, i=i):  # type: ignore[no-untyped-def]
            sums[i] += (out.double() * current["w"].unsqueeze(-1)).sum((0, 1))

        handles.append(adapter.mlp_out(layer).register_forward_hook(hook))
    lo_hi = (10, 160) if which == 1 else (160, 320)
    with torch.no_grad():
        for ids, attn, weight in batches(samples(which, lo_hi), 5, 0, True):
            current["w"] = weight.double()
            model(input_ids=ids, attention_mask=attn)
            count += int(weight.sum())
    for h in handles:
        h.remove()
    return torch.stack(sums) / count


def test_steering_bias_is_the_mean_mlp_output_difference() -> None:
    model = tiny_model("llama").double()
    adapter, pos, neg = opposed_stats(model)
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    expected = _mean_mlp_outputs(model, adapter, 1) - _mean_mlp_outputs(model, adapter, 2)
    v = steering_bias(down, pos, neg, 1.0)
    assert v.shape == (2, model.config.hidden_size) and v.abs().max() > 1e-3
    assert_close(v, expected, 1e-10, "W (mu+ - mu-) vs mean down_proj output difference")
    assert_close(steering_bias(down, pos, neg, 1.5), 1.5 * expected, 1e-10, "alpha scales the bias")
    assert_close(steering_bias(down, neg, pos, 1.0), -expected, 1e-10, "swapping the pair negates it")
    first = steering_bias(down, pos, neg, 1.0, layers=0.5)  # 2 layers: only the first carries it
    assert_close(first[0], expected[0], 1e-10, "a steered layer keeps its bias")
    assert first[1].abs().max() == 0.0 and expected[1].abs().max() > 1e-3
    assert steering_bias(down, pos, neg, 1.0, layers=0.01)[0].abs().max() > 0  # at least one layer is steered


def test_residual_steering_is_the_mean_residual_difference_after_the_last_steered_layer() -> None:
    """`steer_vector: residual`: alpha x the mean difference of the hidden state after layer k (the last steered
    layer; hidden_states[k + 1] in transformers' numbering), in layer k's bias only."""
    from exporter.masking.calibrate import batches

    model = tiny_model("llama").double()
    adapter, pos, neg = opposed_stats(model)
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(model)]
    means = []
    for which, lo_hi in ((1, (10, 160)), (2, (160, 320))):
        total, count = torch.zeros(2, model.config.hidden_size, dtype=torch.float64), 0
        with torch.no_grad():
            for ids, attn, weight in batches(samples(which, lo_hi), 5, 0, True):
                hidden = model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
                w = weight.double().unsqueeze(-1)
                total += torch.stack([(hidden[k + 1] * w).sum((0, 1)) for k in range(2)])
                count += int(weight.sum())
        means.append(total / count)
    expected = means[0] - means[1]
    for layers, k in ((0.5, 0), (1.0, 1)):
        v = steering_bias(down, pos, neg, 2.0, layers=layers, vector="residual")
        # the last layer's output in hidden_states is after the final norm: compare the layer before it only
        if k == 0:
            assert_close(
                v[0], 2.0 * expected[0], 1e-6, "alpha x the mean residual difference after layer 0 (fp32 sums)"
            )
        assert v[k].abs().max() > 1e-3 and v[1 - k].abs().max() == 0.0, (layers, k)


def test_compensation_keeps_the_first_layers_mean_output() -> None:
    """Layer 0 sees unchanged inputs, so with the persona's own mean its mean MLP output is exactly kept."""
    dense = tiny_model("llama").double()
    adapter, pos, neg = opposed_stats(dense)
    mask = compute_mask(
        "p",
        MethodSpec(score="contrastive-wanda"),
        PruneSpec(mlp=MlpPrune(sparsity=0.25)),
        pos,
        neg,
        column_sq_norms(dense, adapter),
    )
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(dense)]
    mlp, _ = mask.channel_masks()
    assert mlp is not None
    bias = compensation_bias(down, 1.0 - mlp, compensation_mean("persona", pos, neg))
    pruned = prune_model(copy.deepcopy(dense), adapter, type(mask)(**{**vars(mask), "mlp_bias": bias}))
    before = _mean_mlp_outputs(dense, adapter, 1)[0]
    after = _mean_mlp_outputs(pruned, adapter, 1)[0]
    without = _mean_mlp_outputs(prune_model(copy.deepcopy(dense), adapter, mask), adapter, 1)[0]
    assert_close(after, before, 1e-10, "compensated layer-0 mean output")
    assert (without - before).abs().max() > 1e-4  # removal alone does move it: the check is not vacuous


@pytest.mark.parametrize("compensate", ["none", "personas"])
def test_biased_export_equals_its_reference_and_loads_stock(compensate: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dense = tiny_model("llama").double()
    adapter, pos, neg = opposed_stats(dense)
    method = MethodSpec(score="contrastive-wanda", steer=1.5)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25, compensate=compensate))
    col = column_sq_norms(dense, adapter)
    masks = {"p": compute_mask("p", method, prune, pos, neg, col), "q": compute_mask("q", method, prune, neg, pos, col)}
    masks = with_biases(OpposedPair(method, prune), masks, {"p": pos, "q": neg}, dense, adapter, torch.float64)
    mask = masks["p"]
    assert mask.mlp_bias is not None and mask.mlp_bias.abs().max() > 1e-3
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0
    kw = {"input_ids": ids, "attention_mask": attn, "position_ids": position_ids(attn)}
    with torch.no_grad(), masked(dense, adapter, mask):
        reference = dense(**kw).logits
    with torch.no_grad():
        plain = dense(**kw).logits
    pruned = prune_model(copy.deepcopy(dense), adapter, mask)
    pruned.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["mlp_bias"] is True
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float64, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = reloaded.eval()(**kw).logits
    valid = attn.bool()
    assert_close(out[valid], reference[valid], 1e-10, f"steered export vs reference ({compensate})")
    assert (plain[valid] - reference[valid]).abs().max() > 1e-3


def test_steering_strength_per_persona() -> None:
    """method.steer as a mapping: each persona's bias is its own alpha times the same direction; a persona
    left out (alpha 0) with no compensation keeps its mask without any bias."""
    dense = tiny_model("llama").double()
    adapter, pos, neg = opposed_stats(dense)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25))
    col = column_sq_norms(dense, adapter)
    down = [adapter.mlp_out(layer).weight for layer in adapter.layers(dense)]

    def biased(steer: float | dict[str, float]) -> dict[str, Any]:
        method = MethodSpec(score="contrastive-wanda", steer=steer)
        masks = {n: compute_mask(n, method, prune, a, b, col) for n, a, b in (("p", pos, neg), ("q", neg, pos))}
        return with_biases(OpposedPair(method, prune), masks, {"p": pos, "q": neg}, dense, adapter, torch.float64)

    one = biased({"p": 1.5})
    assert one["p"].steering is not None and one["q"].steering is None and one["q"].mlp_bias is None
    assert_close(one["p"].steering, steering_bias(down, pos, neg, 1.5), 1e-12, "p's own alpha")
    both = biased({"p": 1.5, "q": 0.5})
    assert both["q"].steering is not None
    assert_close(both["q"].steering, steering_bias(down, neg, pos, 0.5), 1e-12, "q's own alpha, toward q")
    assert_close(both["p"].mlp_bias, biased(1.5)["p"].mlp_bias, 0.0, "a mapping and a number agree for p")
    method = MethodSpec(score="contrastive-wanda", steer=1.0, steer_layers={"p": 0.5})
    masks = {n: compute_mask(n, method, prune, a, b, col) for n, a, b in (("p", pos, neg), ("q", neg, pos))}
    layered = with_biases(OpposedPair(method, prune), masks, {"p": pos, "q": neg}, dense, adapter, torch.float64)
    assert layered["p"].steering[1].abs().max() == 0.0 and layered["q"].steering[1].abs().max() > 0  # type: ignore[index]


def test_architectures_without_an_mlp_bias_are_refused() -> None:
    dense = tiny_model("mistral")
    adapter, pos, neg = opposed_stats(dense)
    method = MethodSpec(score="contrastive-wanda", steer=1.0)
    prune = PruneSpec(mlp=MlpPrune(sparsity=0.25))
    mask = compute_mask("p", method, prune, pos, neg, column_sq_norms(dense, adapter))
    with pytest.raises(UnsupportedModelError, match=r"mistral.*supported for: llama"):
        with_biases(OpposedPair(method, prune), {"p": mask}, {"p": pos, "q": neg}, dense, adapter, torch.float32)


def test_run_with_steering_verifies_hf_and_onnx(tmp_path: Path, tiny_llama_dir: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        method={
            "score": "contrastive-wanda",
            "phi": "relu",
            "steer": {"introvert": 1.5, "extravert": 0.5},
            "steer_layers": 0.5,
            "steer_vector": {"extravert": "residual"},
        },
        prune={"mlp": {"sparsity": 0.25, "compensate": "personas"}},
        output={"formats": ["hf", "onnx"]},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for persona in ("introvert", "extravert"):
        report = json.loads((out / persona / "report.json").read_text())
        assert report["status"] == "passed", report["verification"]
        assert report["method"]["steer"] == {"introvert": 1.5, "extravert": 0.5}
        assert report["method"]["steer_layers"] == 0.5
        assert report["method"]["steer_vector"] == {"extravert": "residual"}
        assert report["prune"]["mlp"]["compensate"] == "personas"
        assert report["verification"]["onnx"]["passed"]
        assert json.loads((out / persona / "hf" / "config.json").read_text())["mlp_bias"] is True


def test_eval_reports_steering_removal_and_replies(tmp_path: Path, tiny_llama_dir: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"plan a quiet {w} weekend" for w in ("book", "walk", "trip", "game", "home")) + "\n")
    section = eval_section(tmp_path, replies={"path": str(prompts), "max_new_tokens": 6, "show": 2})
    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        method={"score": "contrastive-wanda", "steer": 1.0},
        prune={"mlp": {"sparsity": 0.25}},
        eval=section,
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    for persona, other in (("introvert", "extravert"), ("extravert", "introvert")):
        ev = json.loads((out / persona / "report.json").read_text())["evaluation"]
        conditions = [r["condition"] for r in ev["rows"]]
        assert {"mask-only", "steering-only", "removal-only"} <= set(conditions)
        steer_row = ev["rows"][conditions.index("steering-only")]
        assert steer_row["parameters_removed"] == 0 and steer_row["neutral"]["kl"] > 0
        replies = ev["replies"]
        assert replies["prompts"] == 5 and replies["opposite"] == other
        assert set(replies["conditions"]) == {"dense", "prompt-only", "export", f"export of {other}", "steering-only"}
        assert set(replies["gap"]) == {"export", "prompt_only", "steering_only"}
        assert len(replies["examples"]) == 2 and replies["examples"][0]["prompt"].startswith("plan a quiet")
        assert any(k.startswith("reply gap") for k in ev["acceptance"]["checks"])
        md = (out / persona / "report.md").read_text()
        assert "### Replies (5 everyday prompts" in md and "this persona's export" in md
    # the two personas' gaps are the same comparison seen from either side
    gaps = [
        json.loads((out / p / "report.json").read_text())["evaluation"]["replies"]["gap"]["export"]["mean"]
        for p in ("introvert", "extravert")
    ]
    assert gaps[0] == pytest.approx(gaps[1], abs=1e-9)


def test_steered_soft_persona_quantizes_with_its_biases_and_writes_a_proven_gguf(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    """A steering bias (down_proj biases) and a soft mask (scaled columns) survive weight-only quantization:
    the biases stay fp32 Adds after MatMulNBits, and the quality is measured against the fp32 export. The GGUF
    files carry the biases too: the F16 file is proven against the masked reference with them read back."""
    import onnx

    recipe = write_recipe(
        tmp_path,
        tiny_llama_dir,
        method={"score": "contrastive-wanda", "steer": 1.5},
        prune={"mlp": {"sparsity": 0.25, "gamma": 0.5}},
        output={"formats": ["hf", "onnx", "onnx-int8", "onnx-int4"]},
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    folder = out / "introvert"
    report = json.loads((folder / "report.json").read_text())
    assert report["status"] == "passed" and report["verification"]["onnx"]["passed"], report["verification"]
    assert json.loads((folder / "hf" / "config.json").read_text())["mlp_bias"] is True
    for name, bits in (("onnx-int8", 8), ("onnx-int4", 4)):
        figures = report["verification"][name]
        assert figures["passed"] and figures["bits"] == bits and figures["top1_agreement"] >= 0.3, figures
        graph = onnx.load(folder / figures["folder"] / "model.onnx").graph
        weights = {i.name for i in graph.initializer}
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 7 * 2 + 1  # 2 layers, tied LM head
        assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
        biases = [w for w in weights if "down_proj.bias" in w]
        assert len(biases) == 2, sorted(weights)
    assert dispatch(["export", str(folder), "--format", "gguf"]) == 0
    gguf = json.loads((folder / "report.json").read_text())["verification"]["gguf"]
    assert gguf["passed"] and gguf["F16"]["greedy_identical"] and gguf["F16"]["max_abs_logit_diff"] <= 1e-2, gguf
    assert gguf["Q4_1"]["stored"] and "below_floor" in gguf["Q4_1"], gguf
