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
from exporter.inputs import file_problem, path_kind
from exporter.model.encoding import encode_reply
from exporter.recipe.schema import DataSpec, infer_format


@dataclass(frozen=True)
class Sample:
    prompt: str | None
    response: str


@dataclass(frozen=True)
class TokenizedSample:
    input_ids: list[int]
    response_start: int  # index of the first response token


MAX_DATA_BYTES = 1 << 30  # read whole into memory: calibration and evaluation take a few thousand records


def read_records(
    path: Path, fmt: str, error: type[CalibrationDataError] = CalibrationDataError, where: str = ""
) -> list[Any]:
    """The records of a calibration or evaluation file: a json list (or the one list in a mapping), jsonl, csv or
    text paragraphs, not yet validated as samples; every reading problem raises `error` with the fix."""
    prefix = f"{where}: " if where else ""
    problem = file_problem(path)
    if problem is not None and path_kind(path) == "nothing":
        raise error(
            f"{prefix}file not found: {path}; check the path (a relative path is read from the recipe's folder)"
        )
    if problem is not None:
        raise error(f"{prefix}data file {problem}; check the 'path' in the recipe")
    if (size := path.stat().st_size) > MAX_DATA_BYTES:
        raise error(f"{prefix}{path} holds {size} bytes; data files are read whole, at most {MAX_DATA_BYTES} (1 GiB)")
    try:
        return _parse(path, path.read_text(encoding="utf-8-sig"), fmt)  # a spreadsheet's UTF-8 starts with a BOM
    except CalibrationDataError as exc:
        raise error(f"{prefix}{exc}") from None
    except UnicodeDecodeError:
        raise error(f"{prefix}{path}: not UTF-8 text; convert the file to UTF-8") from None
    except json.JSONDecodeError as exc:
        raise error(f"{prefix}{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{prefix}{path}: JSON nested too deeply to read; records are flat objects") from None
    except csv.Error as exc:
        raise error(f"{prefix}{path}: not valid CSV ({exc})") from None
    except OSError as exc:
        raise error(f"{prefix}cannot read {path} ({exc.strerror})") from None


def _parse(path: Path, text: str, fmt: str) -> list[Any]:
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
        rows = list(csv.DictReader(text.splitlines()))
        for n, row in enumerate(rows):
            if None in row:  # DictReader files surplus cells under the key None
                raise CalibrationDataError(
                    f"{path}: row {n + 1} (after the header) has {len(row) - 1 + len(row[None])} cells but the "
                    f"header names {len(row) - 1}; quote cells that contain commas, or fix the row"
                )
        return rows
    # text: one sample per paragraph (blank-line separated)
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def field_problem(rec: dict[str, Any], field: str) -> str | None:
    """Why `rec[field]` is not usable text: missing, null, not text, or blank; None when it is text."""
    if field not in rec:
        return f"has no text field {field!r} (fields: {sorted(map(str, rec))})"
    value = rec[field]
    if value is None:
        return f"has {field!r} set to null (or an empty CSV cell); give it text"
    if not isinstance(value, str):
        return f"has {field!r} as a {type(value).__name__} ({value!r}), expected text"
    if not value.strip():
        return f"has {field!r} blank; give it text"
    return None


def read_samples(spec: DataSpec, where: str = "") -> list[Sample]:
    """All records of a data file as samples, in file order. Raises CalibrationDataError with the fix, after
    `where` (the recipe key naming the file) when given."""
    path = Path(spec.path)
    fmt = spec.format or infer_format(spec.path)
    records = read_records(path, fmt or "text", where=where)
    prefix = f"{where}: " if where else ""
    if not records:
        raise CalibrationDataError(f"{prefix}{path}: the file holds no records; add samples or point to another file")
    samples = []
    for i, rec in enumerate(records):
        if fmt == "text":
            samples.append(Sample(None, rec))
            continue
        if not isinstance(rec, dict):
            raise CalibrationDataError(f"{prefix}{path}: record {i} is a {type(rec).__name__}, expected an object")
        fields = [f for f in (spec.prompt_field, spec.response_field) if f is not None]
        for field in fields:
            problem = field_problem(rec, field)
            if problem is not None:
                raise CalibrationDataError(
                    f"{prefix}{path}: record {i} {problem}; fix the record or set prompt_field/response_field in "
                    "the recipe"
                )
        prompt = rec[spec.prompt_field] if spec.prompt_field else None
        samples.append(Sample(prompt, rec[spec.response_field]))  # type: ignore[index]
    return samples


def select_samples(spec: DataSpec, where: str = "") -> list[Sample]:
    """`max_samples` samples chosen by a seeded shuffle (same seed, same file -> same samples); errors name
    `where`, the recipe key of the file, when given."""
    samples = read_samples(spec, where)
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
