"""Running a persona export: greedy generation with streaming, on onnxruntime or torch, CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import ExportFolderError, OnnxModelError
from exporter.recipe.formats import FOLDERS
from exporter.reports.persona import read_report
from exporter.runtime.chat import prompt_ids


def _tokenizer(folder: Path, vocab_size: int) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ExportFolderError(f"cannot load the tokenizer in {folder}: {exc}") from None
    if len(tok) > vocab_size:
        raise ExportFolderError(
            f"the tokenizer in {folder} has {len(tok)} tokens but the model only {vocab_size}: they do not "
            "belong together; re-export the persona"
        )
    return tok


class Runner:
    """Streams the reply to a chat, token by token (greedy)."""

    def __init__(self, persona_dir: Path, backend: str = "onnx") -> None:
        read_report(persona_dir)
        self.backend = backend
        if backend != "torch":  # "onnx" or a quantized ONNX format
            from exporter.runtime.onnx import OnnxCausalLM, read_export

            folder = persona_dir / FOLDERS[backend]
            if not folder.is_dir():
                raise OnnxModelError(
                    f"{persona_dir} has no {FOLDERS[backend]}/ folder; add it with `persona-export export "
                    f"{persona_dir} --format {backend}`, or use --backend torch"
                )
            config, _ = read_export(folder)
            self.onnx = OnnxCausalLM.from_dir(folder)
            self.tokenizer = _tokenizer(folder, config["vocab_size"])
        else:
            from exporter.model.sources import load_exact

            folder = persona_dir / "hf"
            self.model = load_exact(folder, "the export", ExportFolderError, torch_dtype=torch.float32).eval()
            self.tokenizer = _tokenizer(folder, self.model.config.vocab_size)
        self.eos = self.tokenizer.eos_token_id

    def _next_tokens(self, ids: list[int], max_new_tokens: int) -> Iterator[int]:
        if self.backend != "torch":
            x = np.array([ids], dtype=np.int64)
            mask = np.ones_like(x)
            logits, past = self.onnx.forward(x, mask)
            for _ in range(max_new_tokens):
                token = int(logits[0, -1].argmax())
                yield token
                mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
                logits, past = self.onnx.forward(np.array([[token]], dtype=np.int64), mask, past)
            return
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(max_new_tokens):
                token = int(out.logits[0, -1].argmax())
                yield token
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    def stream(self, messages: list[dict[str, str]], max_new_tokens: int = 128) -> Iterator[str]:
        """Text pieces of the greedy reply, as they are decoded."""
        produced: list[int] = []
        shown = ""
        for token in self._next_tokens(prompt_ids(self.tokenizer, messages), max_new_tokens):
            if token == self.eos:
                break
            produced.append(token)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text
