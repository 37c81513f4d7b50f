"""Calibration data: reading local files into (prompt, response) samples and tokenizing them.

Tokenized samples carry a `weight_mask` that marks the tokens whose activations count: the persona
response only (default), or every token.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporter.errors import CalibrationDataError
from exporter.recipe.schema import DataSpec, infer_format
from exporter.runtime.chat import encode_reply


@dataclass(frozen=True)
class Sample:
    prompt: str | None
    response: str


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    response_start: int  # index of the first response token


def read_records(path: Path, fmt: str) -> list[Any]:
    """The records of a json (a list, or the one list in a mapping), jsonl, csv or text file, unvalidated."""
    text = path.read_text(encoding="utf-8")
    if fmt == "json":
        data = json.loads(text)
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise CalibrationDataError(
                    f"{path}: a JSON file must hold a list of records (or an object with exactly one list)"
                )
            data = lists[0]
        if not isinstance(data, list):
            raise CalibrationDataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return data
    if fmt == "jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CalibrationDataError(f"{path}:{n}: not valid JSON ({exc.msg}); one object per line") from None
        return out
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines()))
    # text: one sample per paragraph (blank-line separated)
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def read_samples(spec: DataSpec) -> list[Sample]:
    """All records of a data file as samples, in file order. Raises CalibrationDataError with the fix."""
    path = Path(spec.path)
    fmt = spec.format or infer_format(spec.path)
    if not path.is_file():
        raise CalibrationDataError(f"data file {str(path)!r} does not exist; check the 'path' in the recipe")
    try:
        records = read_records(path, fmt or "text")
    except UnicodeDecodeError:
        raise CalibrationDataError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
    except json.JSONDecodeError as exc:
        raise CalibrationDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except csv.Error as exc:
        raise CalibrationDataError(f"{path}: not valid CSV ({exc})") from None
    if not records:
        raise CalibrationDataError(f"{path}: the file holds no records; add samples or point to another file")
    samples = []
    for i, rec in enumerate(records):
        if fmt == "text":
            samples.append(Sample(None, rec))
            continue
        if not isinstance(rec, dict):
            raise CalibrationDataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
        fields = [f for f in (spec.prompt_field, spec.response_field) if f is not None]
        for field in fields:
            value = rec.get(field)
            if not isinstance(value, str) or not value.strip():
                raise CalibrationDataError(
                    f"{path}: record {i} has no text field {field!r} (fields: {sorted(rec)}); "
                    "fix the record or set prompt_field/response_field in the recipe"
                )
        prompt = rec[spec.prompt_field] if spec.prompt_field else None
        samples.append(Sample(prompt, rec[spec.response_field]))  # type: ignore[index]
    return samples


def select_samples(spec: DataSpec) -> list[Sample]:
    """`max_samples` samples chosen by a seeded shuffle (same seed, same file -> same samples)."""
    samples = read_samples(spec)
    if spec.max_samples > len(samples):
        raise CalibrationDataError(
            f"{spec.path}: max_samples is {spec.max_samples} but the file holds {len(samples)} records; "
            "lower max_samples or add data"
        )
    order = list(range(len(samples)))
    random.Random(spec.seed).shuffle(order)
    return [samples[i] for i in sorted(order[: spec.max_samples])]


def samples_digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.prompt, s.response]).encode())
    return h.hexdigest()


def tokenize(tokenizer: Any, sample: Sample, spec: DataSpec) -> TokenizedSample:
    """Token ids of prompt + response; `response_start` splits them. Chat template when asked and present;
    the template's end-of-turn tokens after the response count as response tokens."""
    full, start = encode_reply(
        tokenizer, sample.prompt, sample.response, spec.system_prompt, end_of_turn=True, template=spec.chat_template
    )
    full = full[: spec.max_tokens]
    if len(full) <= start:
        raise CalibrationDataError(
            f"{spec.path}: a prompt fills all {spec.max_tokens} tokens (max_tokens), leaving no response "
            "token; raise max_tokens or shorten the prompt"
        )
    return TokenizedSample(full, start)


def collate(
    batch: list[TokenizedSample], pad_id: int, response_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, weight_mask), each (batch, max_len)."""
    width = max(len(s.input_ids) for s in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    weight = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, s in enumerate(batch):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        attn[i, :n] = 1
        weight[i, (s.response_start if response_only else 0) : n] = True
    return ids, attn, weight
