"""Decoders: sequences decoded together, each row with its own KV cache, over the three runtimes.

`Decoder.add` prefills a new row (it becomes the last), `step` feeds one token to every row and returns each
row's next-token logits, `remove` drops a row. The chat runner decodes one row; the server many.

- `OrtBatch`, the project's runner (exporter/runtime/onnx.py) over optimum's `model.onnx`: the rows are decoded
  in one session run. Caches of different lengths are left-padded to the longest, the attention mask zeroes
  the padding and the position ids count each row's own tokens (`position_ids`), so a row's logits do not
  depend on the others beyond fp32 rounding. A removed row's cache is dropped and padding that no row needs
  any more is cut.
- `GenaiRows` (onnxruntime-genai, one generator per row) and `TorchRows` (a checkpoint or GGUF file through
  transformers): rows are stepped one after another.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import ExportFolderError, OnnxModelError
from exporter.inputs import check_folder_files, read_json_object
from exporter.recipe.generation import shipped_penalty
from exporter.runtime.exports import GENAI, ORT, Found
from exporter.runtime.onnx import OnnxCausalLM, Past

DEFAULT_CONTEXT = 2048  # positions, when a config declares none


class Decoder(ABC):
    vocab_size: int
    context: int  # positions the model takes: prompt + reply

    @property
    @abstractmethod
    def rows(self) -> int: ...

    @abstractmethod
    def add(self, ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
        """Prefill a new row (the last one); its next-token logits, (vocab,)."""

    @abstractmethod
    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """One token per row, in row order; next-token logits, (rows, vocab)."""

    @abstractmethod
    def remove(self, row: int) -> None: ...

    def clear(self) -> None:
        while self.rows:
            self.remove(self.rows - 1)


def _left_pad(x: np.ndarray, width: int, axis: int) -> np.ndarray:
    if x.shape[axis] == width:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (width - x.shape[axis], 0)
    return np.pad(x, pad)


class OrtBatch(Decoder):
    """Rows of one onnxruntime session decoded in one run per step (see the module docstring)."""

    def __init__(self, model: OnnxCausalLM) -> None:
        self.model = model
        self.vocab_size = int(model.config["vocab_size"])
        self.context = int(model.config.get("max_position_embeddings") or DEFAULT_CONTEXT)
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (rows, past), 0 over left padding
        self.past: Past = model.empty_past(0)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def add(self, ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
        x = np.asarray([ids], dtype=np.int64)
        logits, past = self.model.forward(x, np.ones_like(x))
        width = max(self.mask.shape[1], x.shape[1])
        self.past = [
            np.concatenate([_left_pad(old, width, 2), _left_pad(new, width, 2)])
            for old, new in zip(self.past, past, strict=True)
        ]
        self.mask = np.concatenate([_left_pad(self.mask, width, 1), _left_pad(np.ones_like(x), width, 1)])
        return logits[0, -1]  # type: ignore[no-any-return]

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
        logits, self.past = self.model.forward(np.asarray(tokens, dtype=np.int64)[:, None], self.mask, self.past)
        return logits[:, -1]  # type: ignore[no-any-return]

    def remove(self, row: int) -> None:
        keep = np.arange(self.rows) != row
        self.mask = self.mask[keep]
        cut = int(self.mask.any(0).argmax()) if self.rows else self.mask.shape[1]  # padding no row needs
        self.mask = self.mask[:, cut:]
        self.past = [p[keep][:, :, cut:] for p in self.past]


class SerialRows(Decoder):
    """Rows stepped one after another, each by a single-sequence runtime."""

    def __init__(self) -> None:
        self.states: list[Any] = []

    @property
    def rows(self) -> int:
        return len(self.states)

    @abstractmethod
    def _start(self, ids: Sequence[int], max_new_tokens: int) -> tuple[Any, np.ndarray]: ...

    @abstractmethod
    def _next(self, state: Any, token: int) -> tuple[Any, np.ndarray]: ...

    def add(self, ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
        state, logits = self._start(ids, max_new_tokens)
        self.states.append(state)
        return logits

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        out = []
        for i, token in enumerate(tokens):
            self.states[i], logits = self._next(self.states[i], int(token))
            out.append(logits)
        return np.stack(out)

    def remove(self, row: int) -> None:
        del self.states[row]


class GenaiRows(SerialRows):
    """onnxruntime-genai: its generator keeps the cache (sized for prompt + reply); we choose the tokens."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        super().__init__()
        fix = "re-export it (`persona-export export PERSONA --format onnx-genai --overwrite`)"
        config = read_json_object(folder / "genai_config.json", OnnxModelError, fix).get("model")
        if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
            raise OnnxModelError(f"{folder / 'genai_config.json'} has no model.vocab_size; {fix}")
        settings = og.Config(str(folder))
        if threads:
            options = {"session_options": {"intra_op_num_threads": threads}}
            settings.overlay(json.dumps({"model": {"decoder": options}}))
        self.og, self.model = og, og.Model(settings)
        self.vocab_size = int(config["vocab_size"])
        self.context = int(config.get("context_length") or DEFAULT_CONTEXT)

    def _start(self, ids: Sequence[int], max_new_tokens: int) -> tuple[Any, np.ndarray]:
        params = self.og.GeneratorParams(self.model)
        # the caller's chooser applies any repetition penalty; genai_config.json's own is not applied twice
        params.set_search_options(
            max_length=min(len(ids) + max_new_tokens, self.context), do_sample=False, repetition_penalty=1.0
        )
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return generator, np.asarray(generator.get_logits())[0, -1]

    def _next(self, state: Any, token: int) -> tuple[Any, np.ndarray]:
        state.append_tokens(np.asarray([token], dtype=np.int32))
        return state, np.asarray(state.get_logits())[0, -1]


class TorchRows(SerialRows):
    """A transformers model in memory (a checkpoint, a GGUF file de-quantized, or the run's base model)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.vocab_size = int(model.config.vocab_size)
        self.context = int(getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT)

    def _forward(self, ids: list[int], past: Any) -> tuple[Any, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[0, -1].float().numpy()

    def _start(self, ids: Sequence[int], max_new_tokens: int) -> tuple[Any, np.ndarray]:
        return self._forward(list(ids), None)

    def _next(self, state: Any, token: int) -> tuple[Any, np.ndarray]:
        return self._forward([token], state)


def load_tokenizer(folder: Path, vocab_size: int) -> Any:
    """The tokenizer in `folder`, refused when it has more tokens than the model."""
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


def _torch_model(found: Found) -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint folder or a GGUF file (with the tokenizer rebuilt from its metadata)."""
    import torch

    from exporter.model.sources import ResolvedModel, load, load_exact
    from exporter.model.tokenizer import export_tokenizer

    if found.format == "gguf":
        resolved = ResolvedModel(found.path.parent, found.path.name, found.path.stem, None, (found.path,))
        model, converted = load(resolved)
        return model, export_tokenizer(found.path.parent, found.path.name, converted)
    model = load_exact(found.path, "the export", ExportFolderError, dtype=torch.float32).eval()
    return model, load_tokenizer(found.path, model.config.vocab_size)


def generation_config(found: Found) -> dict[str, Any]:
    """The format's generation_config.json (for a genai/ folder, its persona's hf/ one); {} without one."""
    for path in (found.path / "generation_config.json", found.path.parent / "hf" / "generation_config.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ExportFolderError(f"cannot read {path}: {exc}; re-export the model") from None
            return data if isinstance(data, dict) else {}
    return {}


def shipped_repetition_penalty(found: Found) -> float:
    """The repetition penalty the format ships (its generation_config.json, genai_config.json's `search` in an
    onnxruntime-genai folder); 1.0 for a GGUF file, whose metadata llama.cpp reads itself."""
    return shipped_penalty(found.path) if found.path.is_dir() else 1.0


def open_export(found: Found, threads: int | None = None) -> tuple[Decoder, Any]:
    """(decoder, tokenizer) of one format."""
    decoder: Decoder
    if found.runtime == ORT:
        decoder = OrtBatch(OnnxCausalLM.from_dir(found.path, threads))
    elif found.runtime == GENAI:
        decoder = GenaiRows(found.path, threads)
    else:
        model, tokenizer = _torch_model(found)
        return TorchRows(model), tokenizer
    return decoder, load_tokenizer(found.path, decoder.vocab_size)
