"""Running an export (or the run's dense base model) in the terminal: generation with streaming, on
onnxruntime, onnxruntime-genai or torch, CPU (exporter/runtime/decoders.py). Greedy by default; temperature /
top-p sampling, another repetition penalty and a seed on request (exporter/runtime/sampling.py). The
repetition penalty by default is the one the export ships (its generation_config.json or genai_config.json)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.errors import ExportFolderError
from exporter.folders.run_folder import PersonaFolder, RunFolder
from exporter.model.encoding import prompt_ids
from exporter.runtime.decoders import Decoder, TorchRows, generation_config, open_export, shipped_repetition_penalty
from exporter.runtime.exports import locate
from exporter.runtime.reply import Reply, end_ids
from exporter.runtime.sampling import Sampling

__all__ = ["Runner", "Sampling", "base_model_runner"]


def base_model_runner(run_dir: Path) -> Runner:
    """The run's dense base model as the run loaded it (a GGUF source de-quantized to fp32), on torch, with
    the tokenizer the exports ship."""
    from exporter.model.sources import load_model

    recipe = RunFolder(run_dir, ExportFolderError, "pass RUN_DIR/PERSONA of a `run`").recipe()
    m = load_model(recipe)
    return Runner.__new__(Runner)._start("torch", TorchRows(m.model), m.export_tokenizer)


class Runner:
    """Streams the reply to a chat, token by token, from any export `locate` finds (a persona folder, an export
    folder, a GGUF file, a Hub download); `backend` names the format (`torch`: the checkpoint), None the
    preferred one present."""

    truncated: bool = False  # the last reply was cut at max_new_tokens
    repetition_penalty: float = 1.0  # what the export ships (the base model, a GGUF file: none)

    def _start(
        self, backend: str, decoder: Decoder, tokenizer: Any, generation: dict[str, Any] | None = None
    ) -> Runner:
        self.backend, self.decoder, self.tokenizer = backend, decoder, tokenizer
        self.ends = end_ids(tokenizer, generation)
        return self

    def __init__(self, path: Path, backend: str | None = None) -> None:
        export = locate(path)
        if (Path(path) / "report.json").is_file():
            PersonaFolder(Path(path)).report()  # a persona folder's report must be one
        found = export.pick(backend)
        decoder, tokenizer = open_export(found)
        self._start(found.format, decoder, tokenizer, generation_config(found))
        self.name = export.name
        self.repetition_penalty = shipped_repetition_penalty(found)

    def next_tokens(self, ids: list[int], max_new_tokens: int, sampling: Sampling) -> Iterator[int]:
        """The `max_new_tokens` tokens after the prompt `ids`, one at a time (an end of turn does not stop them:
        `stream` does)."""
        choose = sampling.chooser()
        seen = list(ids)
        self.decoder.clear()  # one row: this reply's
        logits = self.decoder.add(ids, max_new_tokens)
        for step in range(max_new_tokens):
            token = choose(logits, seen)
            seen.append(token)
            yield token
            if step + 1 < max_new_tokens:
                logits = self.decoder.step([token])[0]

    def stream(
        self, messages: list[dict[str, str]], max_new_tokens: int = 128, sampling: Sampling | None = None
    ) -> Iterator[str]:
        """Text pieces of the reply, as they are decoded (greedy unless `sampling` says otherwise);
        afterwards `truncated` tells whether it was cut at `max_new_tokens`."""
        reply = Reply(self.tokenizer, self.ends, max_new_tokens)
        for token in self.next_tokens(prompt_ids(self.tokenizer, messages), max_new_tokens, sampling or Sampling()):
            piece = reply.add(token)
            if piece:
                yield piece
            if reply.finish:
                break
        self.truncated = reply.finish == "length"
