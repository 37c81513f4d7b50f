"""Running a persona export (or the run's dense base model): generation with streaming, on onnxruntime,
onnxruntime-genai or torch, CPU. Greedy by default; sampling as `Sampling` (exporter/runtime/sampling.py) says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.errors import ExportFolderError, OnnxModelError
from exporter.folders.run_folder import PersonaFolder, RunFolder
from exporter.inputs import check_folder_files, read_json_object
from exporter.model.encoding import prompt_ids
from exporter.recipe.formats import FORMATS
from exporter.runtime.sampling import Sampling


def _tokenizer(folder: Path, vocab_size: int) -> Any:
    from transformers import AutoTokenizer

    check_folder_files(folder, ExportFolderError, "re-export the persona")
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


def _format_folder(persona_dir: Path, backend: str) -> Path:
    folder = persona_dir / FORMATS[backend].folder
    if not folder.is_dir():
        raise OnnxModelError(
            f"{persona_dir} has no {FORMATS[backend].folder}/ folder; add it with `persona-export export "
            f"{persona_dir} --format {backend}`, or use --backend torch"
        )
    return folder


def base_model_runner(run_dir: Path) -> Runner:
    """The run's dense base model as the run loaded it (a GGUF source de-quantized to fp32), on torch, with
    the tokenizer the exports ship."""
    from exporter.model.sources import load_model

    recipe = RunFolder(run_dir, ExportFolderError, "pass RUN_DIR/PERSONA of a `run`").recipe()
    m = load_model(recipe)
    return Runner.__new__(Runner)._torch(m.model, m.export_tokenizer)


class Runner:
    """Streams the reply to a chat, token by token."""

    backend: str
    truncated: bool = False  # the last reply was cut at max_new_tokens
    genai_loop: bool = False  # an onnxruntime-genai folder (its generator and KV cache)

    def _torch(self, model: Any, tokenizer: Any) -> Runner:
        self.backend, self.model, self.tokenizer, self.eos = "torch", model, tokenizer, tokenizer.eos_token_id
        return self

    def __init__(self, persona_dir: Path, backend: str = "onnx") -> None:
        PersonaFolder(persona_dir).report()  # a persona export, or a clear refusal
        self.backend = backend
        self.genai_loop = backend != "torch" and FORMATS[backend].family == "onnxruntime-genai"
        if self.genai_loop:
            import onnxruntime_genai as og

            folder = _format_folder(persona_dir, backend)
            fix = f"re-export it: persona-export export {persona_dir} --format onnx-genai --overwrite"
            config = read_json_object(folder / "genai_config.json", OnnxModelError, fix).get("model")
            if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
                raise OnnxModelError(f"{folder / 'genai_config.json'} has no model.vocab_size; {fix}")
            self.og, self.genai = og, og.Model(str(folder))
            self.tokenizer = _tokenizer(folder, config["vocab_size"])
        elif backend != "torch":  # "onnx" or a quantized ONNX format
            from exporter.runtime.onnx import OnnxCausalLM, read_export

            folder = _format_folder(persona_dir, backend)
            config, _ = read_export(folder)
            self.onnx = OnnxCausalLM.from_dir(folder)
            self.tokenizer = _tokenizer(folder, config["vocab_size"])
        else:
            from exporter.model.sources import load_exact

            folder = persona_dir / "hf"
            self.model = load_exact(folder, "the export", ExportFolderError, dtype=torch.float32).eval()
            self.tokenizer = _tokenizer(folder, self.model.config.vocab_size)
        self.eos = self.tokenizer.eos_token_id

    def next_tokens(self, ids: list[int], max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        """The `max_new_tokens` tokens after the prompt `ids`, one at a time (an end of turn does not stop them:
        `stream` does)."""
        choose = sampling.chooser()
        seen = list(ids)
        if self.genai_loop:  # onnxruntime-genai's cache; our choice of the next token
            params = self.og.GeneratorParams(self.genai)
            params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
            generator = self.og.Generator(self.genai, params)
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
            for step in range(max_new_tokens):
                token = choose(np.asarray(generator.get_logits())[0, -1], seen)
                seen.append(token)
                yield token
                if step + 1 < max_new_tokens:
                    generator.append_tokens(np.asarray([token], dtype=np.int32))
            return
        if self.backend != "torch":
            x = np.array([ids], dtype=np.int64)
            mask = np.ones_like(x)
            logits, past = self.onnx.forward(x, mask)
            for _ in range(max_new_tokens):
                token = choose(logits[0, -1], seen)
                seen.append(token)
                yield token
                mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
                logits, past = self.onnx.forward(np.array([[token]], dtype=np.int64), mask, past)
            return
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(max_new_tokens):
                token = choose(out.logits[0, -1].float().numpy(), seen)
                seen.append(token)
                yield token
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    def stream(
        self, messages: list[dict[str, str]], max_new_tokens: int = 128, sampling: Sampling | None = None
    ) -> Iterator[str]:
        """Text pieces of the reply, as they are decoded (greedy unless `sampling` says otherwise);
        afterwards `truncated` tells whether it was cut at `max_new_tokens`."""
        produced: list[int] = []
        shown = ""
        self.truncated = True
        ids = prompt_ids(self.tokenizer, messages)
        for token in self.next_tokens(ids, max_new_tokens, sampling or Sampling()):
            if token == self.eos:
                self.truncated = False
                break
            produced.append(token)
            text = self.tokenizer.decode(produced, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text
