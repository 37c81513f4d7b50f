"""4-bit ONNX from a matrix's own blocks (`onnx-q4`): exact Q4_1 / Q8_0 block recovery, MatMulNBits built on
those blocks against the fp32 product, and the format end to end on tiny llamas whose weights are made
Q4_1-exact here (so the recovery is exercised) and on one whose weights are not (HQQ blocks, measured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exporter.cli import main
from exporter.export.q4blocks import hqq_blocks, q4_1_blocks, q8_0_blocks, rtn_blocks
from exporter.export.q4onnx import pack_nibbles, quantize_matmuls, stored_weights, unpack_nibbles
from exporter.reports.checks import Q4Check
from tests.helpers import q4_check, tiny_model, tiny_tokenizer, write_recipe


def as_gguf(w: np.ndarray, kind: str) -> np.ndarray:
    """`w` (rows, K) rounded to the GGUF block type `kind` and de-quantized: a matrix that has exact blocks."""
    from gguf import GGMLQuantizationType, quants

    qtype = getattr(GGMLQuantizationType, kind)
    return quants.dequantize(quants.quantize(np.ascontiguousarray(w, np.float32), qtype), qtype)


def test_q4_1_blocks_are_recovered_exactly_and_only_when_they_exist() -> None:
    w = as_gguf(np.random.default_rng(0).normal(0, 0.05, (24, 96)), "Q4_1")
    blocks = q4_1_blocks(w)
    assert blocks is not None and blocks.method == "q4_1" and blocks.q.shape == (24, 3, 32)
    assert np.array_equal(blocks.dequantize(), w) and blocks.q.max() == 15 and blocks.q.min() == 0
    nudged = w.copy()
    nudged[3, 7] += 1e-4  # off the block's grid
    assert q4_1_blocks(nudged) is None and q4_1_blocks(w[:, :80]) is None  # 80 values: not whole blocks
    head = as_gguf(np.random.default_rng(1).normal(0, 0.05, (16, 64)), "Q8_0")
    assert q4_1_blocks(head) is None  # 8-bit values do not fit 16 levels
    int8 = q8_0_blocks(head)
    assert int8 is not None and np.array_equal(int8.dequantize(), head)


def test_nibbles_round_trip() -> None:
    q = np.random.default_rng(0).integers(0, 16, (5, 3, 32)).astype(np.uint8)
    assert np.array_equal(unpack_nibbles(pack_nibbles(q)), q)


def test_hqq_blocks_hold_a_matrix_that_has_no_exact_blocks() -> None:
    w = np.random.default_rng(0).normal(0, 0.05, (64, 128)).astype(np.float32)
    hqq, rtn = hqq_blocks(w), rtn_blocks(w)
    for blocks in (hqq, rtn):
        assert blocks.q.shape == (64, 4, 32) and blocks.q.max() <= 15
        err = np.abs(blocks.dequantize() - w)
        assert 0 < err.mean() < 0.1 * np.abs(w).mean() * 15 / 4, (blocks.method, err.mean())


def matmul_model(weights: dict[str, np.ndarray]) -> Any:
    """x (1, s, K) -> one output per weight (K, N_i), each a MatMul on an initializer sharing the input."""
    from onnx import TensorProto, helper, numpy_helper

    k = next(iter(weights.values())).shape[0]
    nodes = [helper.make_node("MatMul", ["x", name], [f"y.{name}"], name=name) for name in weights]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info(f"y.{n}", TensorProto.FLOAT, None) for n in weights],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


@pytest.mark.parametrize(("level", "head", "atol"), [(1, "split", 1e-5), (4, "int8", 5e-2)])
def test_matmulnbits_on_the_blocks_computes_the_fp32_product(level: int, head: str, atol: float) -> None:
    rng = np.random.default_rng(0)
    weights = {  # (K, N) as ONNX MatMul takes them; blocks run along K
        "q4": as_gguf(rng.normal(0, 0.05, (48, 96)), "Q4_1").T.copy(),
        "q8": as_gguf(rng.normal(0, 0.05, (40, 96)), "Q8_0").T.copy(),
        "other": rng.normal(0, 0.05, (96, 32)).astype(np.float32),  # no exact blocks: HQQ
    }
    x = rng.normal(0, 1, (1, 5, 96)).astype(np.float32)
    want = run(matmul_model(weights), x)
    model = matmul_model(weights)
    done = quantize_matmuls(model, level, head)
    assert done.blocks == {"q4": "q4_1", "q8": "q8_0", "other": "hqq"}
    ops = [n.op_type for n in model.graph.node]
    # q4 and other (4-bit, one input) run as one MatMulNBits and a Split; the blocks' offsets as a small product
    offsets = 2 if head == "split" else 1  # the 8-bit head in two 4-bit halves has offsets too
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1 and ops.count("MatMul") == offsets
    stored = stored_weights(model)
    for name in ("q4", "q8"):  # the source's weights bit for bit
        assert np.array_equal(stored[name], weights[name].T.astype(np.float64)), name
    assert not np.array_equal(stored["other"], weights["other"].T.astype(np.float64))
    got = run(model, x)
    for name, a, b in zip(weights, want, got, strict=True):
        expected = x.astype(np.float64) @ stored[name].T  # what the stored weights compute
        scale = np.abs(expected).max()
        assert np.abs(b - expected).max() <= atol * scale, (name, np.abs(b - expected).max(), scale)
        if name in ("q4", "q8"):
            assert np.abs(b - a).max() <= atol * scale, name  # = the fp32 graph's product


def q4_exact_llama(seed: int = 0) -> Any:
    """A tiny llama whose Linear weights are Q4_1-exact along their inputs and whose (tied) embedding is
    Q8_0-exact, as in SmolLM2's GGUF file."""
    model = tiny_model("llama", seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                kind = "Q8_0" if "embed" in name else "Q4_1"
                p.copy_(torch.from_numpy(as_gguf(p.numpy(), kind)))
    return model


@pytest.fixture(scope="module")
def q4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q4_1-exact llama, a quarter of the MLP neurons (72 of 96 kept: not whole blocks) and one of two KV
    groups removed, exported as `onnx-q4`."""
    tmp = tmp_path_factory.mktemp("q4-run")
    q4_exact_llama().save_pretrained(tmp / "tiny")
    tiny_tokenizer().save_pretrained(tmp / "tiny")
    recipe = write_recipe(tmp, tmp / "tiny", output={"formats": ["hf", "onnx-q4"], "q4_activations": "fp32"})
    assert main(["run", str(recipe), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.mark.parametrize("persona", ["introvert", "extravert"])
def test_q4_folder_of_a_q4_model_holds_its_blocks_and_is_proven(q4_run: Path, persona: str) -> None:
    report = json.loads((q4_run / persona / "report.json").read_text())
    q4 = report["verification"]["onnx-q4"]
    assert report["status"] == "passed" and q4["passed"] and q4["parity_target"], q4
    # q/k/v, gate/up and (widened) down_proj in Q4_1, the LM head in Q8_0; o_proj lost half its inputs with the
    # KV group (48 values: not whole blocks) and stays fp32
    assert q4["blocks"] == {"fp32": 2, "q4_1": 8, "q8_0": 1}, q4["blocks"]
    assert q4["weights_exact"] == q4["weights_quantized"] == 9 and q4["restored_neurons_per_layer"] == 24
    assert q4["activations"] == "fp32" and q4["accuracy_level"] == 1
    assert 0 < q4["max_abs_logit_diff"] <= 1e-2 and q4["greedy_identical"] and q4["top1_agreement"] == 1.0
    genai_config = json.loads((q4_run / persona / "q4-genai" / "genai_config.json").read_text())
    assert genai_config["model"]["decoder"]["num_key_value_heads"] == 1


def test_generate_runs_the_q4_folder_in_onnxruntime_genai(q4_run: Path, capsys: pytest.CaptureFixture) -> None:
    """`--backend onnx-q4` runs q4-genai/ through onnxruntime-genai's generator; holding the checkpoint's blocks
    with fp32 activations, its greedy reply is the checkpoint's."""
    texts = {}
    for backend in ("onnx-q4", "torch"):
        argv = ["generate", str(q4_run / "introvert"), "--prompt", "plan a trip", "--max-new-tokens", "12"]
        assert main([*argv, "--backend", backend]) == 0
        texts[backend] = capsys.readouterr().out
    assert texts["onnx-q4"].strip() and texts["onnx-q4"] == texts["torch"], texts


def test_q4_folder_of_a_model_without_blocks_holds_hqq_blocks_and_is_measured(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from exporter.export.genai import build_q4_genai
    from exporter.recipe.schema import VerifySpec
    from exporter.verify.genai import verify_genai
    from exporter.verify.hf import Probes, build_prompts

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    built = build_q4_genai(tmp_path / "hf", tmp_path / "q4")
    stored = built["stored"]
    assert stored["blocks"] == {"hqq": 11} and stored["weights_exact"] == 0, stored
    assert stored["restored_neurons_per_layer"] == 0 and stored["accuracy_level"] == 1, stored
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    probes = Probes(build_prompts(tokenizer), VerifySpec(greedy_tokens=4), tokenizer)
    check = verify_genai(model, tmp_path / "q4", "q4", "q4", built["eos_token_id"], probes, stored)
    assert isinstance(check, Q4Check) and check.activations == "fp32"
    # fp32 activations, but HQQ blocks: measured against the 4-bit floor, not a parity target
    assert check.passed and not check.parity_target and check.bits == 4 and check.thresholds is None
    assert check.max_abs_logit_diff > 1e-3  # 4-bit weights: measured, not exact
    assert check.top1_agreement is not None and check.top1_agreement >= 0.5, check
    assert check.ppl_ratio is not None and check.ppl_ratio < 1.5, check


def test_int8_activations_keep_the_exact_blocks(tmp_path: Path) -> None:
    """accuracy_level 4 (output.q4_activations: int8) changes the kernel's activations, not the stored blocks."""
    import onnx
    from onnx import helper

    from exporter.export.genai import build_q4_genai

    q4_exact_llama().save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    built = build_q4_genai(tmp_path / "hf", tmp_path / "q4", accuracy_level=4)
    stored = built["stored"]
    assert stored["blocks"] == {"q4_1": 10, "q8_0": 1} and stored["weights_exact"] == stored["weights_quantized"] == 11
    model = onnx.load(tmp_path / "q4" / "model.onnx")
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    levels = {helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    bits = sorted(helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits")
    assert levels == {4} and bits == [4] * 8 + [8]  # 2 layers: qkv, o, gate|up, down; the Q8_0 head at 8 bits


@pytest.mark.parametrize(
    ("stored", "level", "parity"),
    [
        ({"q4_1": 8, "q8_0": 1, "fp32": 2}, 1, True),  # exact blocks, fp32 activations: computes the checkpoint
        ({"q4_1": 8, "q8_0": 1, "fp32": 2}, 4, False),  # int8 activations
        ({"q4_1": 8, "hqq": 1}, 1, False),  # a matrix without exact blocks
    ],
)
def test_a_q4_check_is_a_parity_target_only_when_it_computes_the_checkpoint(
    stored: dict[str, int], level: int, parity: bool
) -> None:
    """report.json's onnx-q4 entry: parity target, activations and verdict computed from the stored figures
    (those written are not read back); a parity target outside the ONNX tolerances fails, a measured one does not."""
    figures = q4_check(stored, level) | {"parity_target": not parity, "passed": False}  # neither is read back
    check = Q4Check.model_validate(figures, strict=True)
    assert check.parity_target is parity and check.activations == ("fp32" if level == 1 else "int8")
    assert check.passed and check.below_floor is False
    far = Q4Check.model_validate(figures | {"max_abs_logit_diff": 0.5}, strict=True)
    assert far.passed is not parity  # only a parity target is held to the tolerances
    dumped = check.model_dump()
    assert dumped["parity_target"] is parity and dumped["passed"] and list(dumped)[-1] == "passed"


@pytest.mark.slow
def test_q4_folder_of_the_embedded_model_holds_its_source_blocks_and_is_proven(real_model: Any, tmp_path: Path) -> None:
    """SmolLM2-135M, whose weights are its GGUF file's Q4_1 / Q8_0 blocks de-quantized: every matrix is stored
    in its own blocks, read back bit for bit, and with fp32 activations the folder computes what the checkpoint
    computes (a parity target, proven as onnxruntime-genai runs it)."""
    from exporter.export.genai import build_q4_genai
    from exporter.recipe.schema import VerifySpec
    from exporter.verify.genai import verify_genai
    from exporter.verify.hf import Probes, build_prompts

    tok = real_model.export_tokenizer
    real_model.model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    built = build_q4_genai(tmp_path / "hf", tmp_path / "q4")
    stored = built["stored"]
    # 30 layers of qkv (one packed MatMul), o, gate, up, down in Q4_1 and the tied LM head in Q8_0
    assert stored["blocks"] == {"q4_1": 150, "q8_0": 1}, stored
    assert stored["weights_exact"] == stored["weights_quantized"] == 151, stored
    probes = Probes(build_prompts(tok), VerifySpec(greedy_tokens=8), tok)
    check = verify_genai(real_model.model, tmp_path / "q4", "q4-genai", "q4", built["eos_token_id"], probes, stored)
    assert check.parity_target and check.passed, check.failures()
    assert check.max_abs_logit_diff <= 1e-2 and check.below_floor is False, check
