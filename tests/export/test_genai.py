"""onnxruntime-genai folders (`onnx-genai`) on tiny llamas: built by onnxruntime-genai's model builder from
the proven checkpoint, run by onnxruntime-genai itself, against the masked reference (the fp32 folder of the
session's tiny run, exporter/stages/genai.py; every architecture through the builder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from exporter.errors import OnnxExportError
from exporter.export.genai import build_genai
from tests.helpers import tiny_model, tiny_tokenizer


@pytest.mark.parametrize("persona", ["introvert", "extravert"])
def test_fp32_genai_folder_is_proven_against_the_masked_model(tiny_run: Path, persona: str) -> None:
    folder = tiny_run / persona
    report = json.loads((folder / "report.json").read_text())
    genai = report["verification"]["onnx-genai"]
    assert report["status"] == "passed" and genai["passed"] and genai["parity_target"], genai
    assert genai["max_abs_logit_diff"] <= 1e-2 and genai["mean_abs_logit_diff"] <= 1e-3
    assert genai["max_abs_logit_diff"] > 0  # computed by another graph, not read back from the reference
    assert genai["greedy_identical"] and genai["tokenizer_ids_equal"] and genai["decode_round_trip"]
    hf_config = json.loads((folder / "hf" / "config.json").read_text())
    assert hf_config["mlp_bias"] is True and hf_config["num_key_value_heads"] < 2  # steered and head-pruned
    config = json.loads((folder / "genai" / "genai_config.json").read_text())["model"]
    assert config["decoder"]["num_key_value_heads"] == hf_config["num_key_value_heads"]
    assert config["decoder"]["head_size"] == 16 != hf_config["hidden_size"] // hf_config["num_attention_heads"]
    ends = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    assert 1 in genai["eos_token_id"] and genai["eos_token_id"] == ends  # the tokenizer's <|end|> among them
    assert report["timings_s"]["export_genai"] > 0 and report["timings_s"]["verify_genai"] > 0


def test_generation_stops_at_the_tokenizers_eos(tiny_run: Path, tmp_path: Path) -> None:
    """genai_config.json declares the shipped tokenizer's eos: a greedy reply that reaches it ends there, in
    onnxruntime-genai as in transformers."""
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "genai"
    shutil.copytree(tiny_run / "introvert" / "genai", folder)  # the run is shared: its config is edited below
    config_file = folder / "genai_config.json"
    config = json.loads(config_file.read_text())
    hf = AutoModelForCausalLM.from_pretrained(tiny_run / "introvert" / "hf").eval()
    prompt = [5, 60, 70, 80, 90, 100, 7]
    with torch.no_grad():
        first = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
    config["model"]["eos_token_id"] = [1, first]  # the first greedy token now ends the turn
    config_file.write_text(json.dumps(config))
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == [first]


def test_int4_and_int8_are_measured_against_their_floors(tiny_run: Path, tmp_path: Path) -> None:
    """`export --format onnx-genai --precision` rebuilds the folder with MatMulNBits weights; the quality is
    measured against the masked model, the steering bias kept."""
    import onnx

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # the run is shared: its recipe and genai/ are rewritten below
    folder = run / "extravert"
    recipe = json.loads((run / "recipe.json").read_text())
    pairs = {"path": recipe["personas"]["extravert"]["calibration"]["path"], "prompt_field": "prompt"}
    pairs |= {"responses": {p: {"field": p} for p in ("introvert", "extravert")}, "max_items": 8}
    recipe["eval"] = {"paired": pairs | {"exclude_calibration": True}}  # the persona margin is measured on these
    (run / "recipe.json").write_text(json.dumps(recipe))
    for precision, bits in (("int8", 8), ("int4", 4)):
        argv = ["export", str(folder), "--format", "onnx-genai", "--precision", precision, "--overwrite"]
        assert main(argv) == 0
        genai = json.loads((folder / "report.json").read_text())["verification"]["onnx-genai"]
        assert genai["passed"] and genai["bits"] == bits and not genai["parity_target"], genai
        assert genai["top1_agreement"] >= 0.5 and 0.5 < genai["ppl_ratio"] < 2, genai
        assert isinstance(genai["below_floor"], bool) and genai["floor"]["top1_agreement"] in (0.97, 0.90)
        assert genai["paired_items"] == 8 and 0 < abs(genai["persona_shift"]) < 1, genai
        assert genai["below_floor"] or abs(genai["persona_shift"]) <= genai["floor"]["persona_shift"]
        graph = onnx.load(folder / "genai" / "model.onnx", load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
        assert any("down_proj" in i.name and "bias" in i.name for i in graph.initializer)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_every_supported_architecture_builds_and_is_proven(tmp_path: Path, arch: str) -> None:
    """Each adapter's family through the builder, with head_dim != hidden_size / heads (the shape a head-pruned
    export has) and, for qwen2 / qwen3, q/k/v biases."""
    from exporter.recipe.schema import VerifySpec
    from exporter.verify.genai import verify_genai
    from exporter.verify.hf import Probes, build_prompts

    model, tok = tiny_model(arch), tiny_tokenizer()
    if arch == "phi3":  # the tiny config's 4096 would ask the builder for LongRoPE factors it does not have
        model.config.original_max_position_embeddings = model.config.max_position_embeddings
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    built = build_genai(tmp_path / "hf", tmp_path / "genai", "fp32")
    assert tok.eos_token_id in built["eos_token_id"]
    spec = VerifySpec(greedy_tokens=6)
    probes = Probes(build_prompts(tok), spec, tok)
    figures = verify_genai(model, tmp_path / "genai", "genai", "fp32", built["eos_token_id"], probes)
    assert figures.passed and figures.max_abs_logit_diff <= 1e-4, figures


def test_builder_failure_names_the_folder_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["NoSuch"]}))
    with pytest.raises(OnnxExportError, match=r"onnxruntime-genai's builder could not build .*hf"):
        build_genai(tmp_path / "hf", tmp_path / "genai", "fp32")
    assert not (tmp_path / "genai").exists() and list(tmp_path.iterdir()) == [tmp_path / "hf"]


def test_an_unknown_precision_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="precision 'int3' is not one of int4, int8, fp32"):
        build_genai(tmp_path, tmp_path / "genai", "int3")
