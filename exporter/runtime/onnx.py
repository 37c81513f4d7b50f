"""CPU inference on an exported ONNX decoder (optimum `text-generation-with-past`, one `model.onnx`).

`OnnxCausalLM` is our own runner: a plain `onnxruntime.InferenceSession` and a greedy loop (prefill, then
one token per step through the KV cache). `load_ort_model` returns optimum's `ORTModelForCausalLM` with
the head-pruning fix below applied.

Head-pruned models and stock optimum. The export is right: for llama, mistral, qwen2 and qwen3 optimum's
dummy KV inputs (`MistralDummyPastKeyValuesGenerator` in optimum/utils/input_generators.py) read
`config.head_dim`, and the graph declares `past_key_values.N.key/value` as (batch, kv_heads, past, head_dim).
The runtime is not: optimum-onnx 0.1.0 `ORTModelForCausalLM.__init__`
(optimum/onnxruntime/modeling_decoder.py) sets `embed_size_per_head = hidden_size // num_attention_heads`
for every model type except gemma, gemma3, gemma3_text, gpt_oss and nemotron, and sizes the empty
first-step cache with it. Once heads are removed (SmolLM2: 576 / 6 = 96, head_dim 64) onnxruntime rejects
the input ("past_key_values.0.key ... Got: 96 Expected: 64").

No honest config.json field fixes that: optimum reads only `hidden_size` and `num_attention_heads` there,
and changing either would misdescribe the model to everything else that reads the config. A stock user
adds one line after loading (also right with `use_io_binding=True`, which sizes its output buffers from
the same attribute):

    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    model.embed_size_per_head = model.config.head_dim

It is not needed while `hidden_size / num_attention_heads == head_dim` (dense or MLP-only pruning).
Rejected: declaring the head_dim axis symbolic in the graph makes stock optimum run on onnxruntime 1.32
CPU, but only because its Concat kernel skips an empty past tensor whose last axis is wrong, which the
ONNX spec does not allow and other execution providers need not do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from exporter.errors import OnnxModelError
from exporter.inputs import check_folder_files
from exporter.model.encoding import position_ids

if TYPE_CHECKING:
    from optimum.onnxruntime import ORTModelForCausalLM


ONNX_FILE = "model.onnx"
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

Past = list[np.ndarray]  # per layer key then value, each (batch, kv_heads, past_len, head_dim)


@dataclass(frozen=True)
class KvLayout:
    """Shape of the KV cache, read from config.json."""

    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KvLayout:
        try:
            heads = int(config["num_attention_heads"])
            head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
            kv_heads = int(config.get("num_key_value_heads") or heads)
            return cls(int(config["num_hidden_layers"]), kv_heads, head_dim)
        except (KeyError, TypeError, ValueError) as e:
            raise OnnxModelError(f"config.json lacks a decoder field ({e!r}); re-export the model") from e

    def past_names(self) -> list[str]:
        return [f"past_key_values.{n}.{kv}" for n in range(self.num_layers) for kv in ("key", "value")]


def read_export(onnx_dir: Path) -> tuple[dict[str, Any], KvLayout]:
    """Check that `onnx_dir` looks like an export (config.json + model.onnx) and read its config."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise OnnxModelError(f"{str(onnx_dir)!r} is not a folder; pass the folder written by export_onnx")
    check_folder_files(onnx_dir, OnnxModelError, "re-export the model")
    config_path, model_path = onnx_dir / "config.json", onnx_dir / ONNX_FILE
    if not config_path.is_file():
        raise OnnxModelError(f"{str(onnx_dir)!r} has no config.json: not an ONNX export; run export_onnx")
    if not model_path.is_file():
        raise OnnxModelError(
            f"{str(onnx_dir)!r} has no {ONNX_FILE}: not an ONNX export (a Hugging Face checkpoint?); "
            "run export_onnx on it first"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise OnnxModelError(f"cannot read {str(config_path)!r}: {e}") from e
    return config, KvLayout.from_config(config)


def check_graph(session: ort.InferenceSession, layout: KvLayout, where: Path) -> None:
    """The graph must be a decoder with past whose declared cache shape agrees with config.json."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    needed = {"input_ids", "attention_mask", *layout.past_names()}
    missing = sorted(needed - set(inputs)) + sorted({"logits", "present.0.key"} - outputs)
    if missing:
        raise OnnxModelError(
            f"{str(where)!r} is not a text-generation-with-past decoder export (missing {missing[:4]}); "
            "re-export with export_onnx"
        )
    declared = inputs["past_key_values.0.key"].shape  # (batch, kv_heads, past_len, head_dim)
    for axis, name, want in ((1, "kv_heads", layout.kv_heads), (3, "head_dim", layout.head_dim)):
        if isinstance(declared[axis], int) and declared[axis] != want:
            raise OnnxModelError(
                f"{str(where)!r}: the graph's KV cache has {name}={declared[axis]} but config.json "
                f"says {want}; the config does not belong to this {ONNX_FILE}"
            )


def open_session(model_path: Path, threads: int | None = None, spin: bool = False) -> ort.InferenceSession:
    """A CPU session; a corrupt or unreadable file becomes OnnxModelError.

    Idle worker threads do not spin by default: on a shared 2-core machine spinning halved decode speed
    (5.6 vs 10.0 tok/s on SmolLM2); pass `spin=True` on a dedicated machine.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
        raise OnnxModelError(f"onnxruntime cannot load {str(model_path)!r}: {e}; re-export the model") from e


class OnnxCausalLM:
    """Greedy decoding with a KV cache on a plain InferenceSession; numpy in, numpy out."""

    def __init__(self, session: ort.InferenceSession, layout: KvLayout, config: dict[str, Any]) -> None:
        self.session, self.layout, self.config = session, layout, config
        names = {i.name: i for i in session.get_inputs()}
        self.past_names = layout.past_names()
        self.output_names = ["logits", *(n.replace("past_key_values", "present") for n in self.past_names)]
        self.uses_position_ids = "position_ids" in names
        self.cache_dtype = _FLOAT_TYPES.get(names[self.past_names[0]].type, np.float32)

    @classmethod
    def from_dir(cls, onnx_dir: Path, threads: int | None = None, spin: bool = False) -> OnnxCausalLM:
        config, layout = read_export(onnx_dir)
        session = open_session(Path(onnx_dir) / ONNX_FILE, threads, spin)
        check_graph(session, layout, Path(onnx_dir))
        return cls(session, layout, config)

    def empty_past(self, batch: int) -> Past:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Past | None = None
    ) -> tuple[np.ndarray, Past]:
        """One step. `attention_mask` covers past and new tokens, (batch, past_len + new_len)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        past = self.empty_past(ids.shape[0]) if past is None else past
        if mask.shape != (ids.shape[0], past[0].shape[2] + ids.shape[1]):
            raise ValueError(f"attention_mask {mask.shape} must be (batch, past + new) for ids {ids.shape}")
        feed = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.past_names, past, strict=True))}
        if self.uses_position_ids:
            feed["position_ids"] = position_ids(mask)[:, -ids.shape[1] :].astype(np.int64)
        logits, *present = self.session.run(self.output_names, feed)
        return logits, present

    def greedy(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """New tokens per row of a left-padded batch; a row stops after emitting `eos_token_id`."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        logits, past = self.forward(input_ids, mask)
        rows: list[list[int]] = [[] for _ in range(mask.shape[0])]
        done = np.zeros(mask.shape[0], dtype=bool)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)  # (batch,)
            for r in np.flatnonzero(~done):
                rows[r].append(int(token[r]))
            if eos_token_id is not None:
                done |= token == eos_token_id
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(token[:, None], mask, past)
        return rows


def load_ort_model(onnx_dir: Path, **kwargs: Any) -> ORTModelForCausalLM:
    """optimum's ORTModelForCausalLM on CPU, with the cache sized from `head_dim` (see module docstring)."""
    from optimum.onnxruntime import ORTModelForCausalLM

    _, layout = read_export(onnx_dir)
    try:
        model = ORTModelForCausalLM.from_pretrained(Path(onnx_dir), provider="CPUExecutionProvider", **kwargs)
    except Exception as e:
        raise OnnxModelError(f"optimum cannot load {str(onnx_dir)!r}: {e}; re-export the model") from e
    check_graph(model.session, layout, Path(onnx_dir))
    model.embed_size_per_head = layout.head_dim
    model.num_key_value_heads = layout.kv_heads
    return model
