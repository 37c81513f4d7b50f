"""Evaluation items: paired responses, unpaired answers, A/B choices, persona statements and neutral text read
from local files, plus the leak check against every persona's calibration samples.

A text leaks when, after lower-casing and collapsing whitespace, it equals a calibration prompt or response,
or (for texts of at least MIN_CONTAINED characters) one contains the other. `exclude_calibration` drops
leaking items before the seeded selection (a held-out split); whatever is selected is checked again, and
a leak then either stops the run (`on_leak: error`) or is recorded in the report (`on_leak: flag`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import CalibrationDataError, RecipeError
from exporter.masking.data import field_problem, read_records, read_samples, select_samples
from exporter.recipe.eval import (
    ChoicesSpec,
    EvalSpec,
    PairedSpec,
    RepliesSpec,
    StatementsSpec,
    UnpairedSpec,
    eval_problems,
    reply_cap,
    set_spec,
)
from exporter.recipe.formats import FORMATS
from exporter.recipe.schema import DataSpec, Recipe, infer_format

log = logging.getLogger(__name__)
MIN_CONTAINED = 40


class EvalDataError(CalibrationDataError):
    """An evaluation file is missing or malformed, holds too few items, or leaks calibration items."""


@dataclass(frozen=True)
class PairedItem:
    index: int  # record index in the file(s)
    prompt: str
    responses: dict[str, str]  # persona -> answer


@dataclass(frozen=True)
class Answer:
    """One persona's answer to its own instruction (unpaired items)."""

    index: int
    prompt: str
    response: str


@dataclass(frozen=True)
class Choice:
    """An A/B item: the question with its choices, and each persona's letter."""

    index: int
    question: str
    letters: dict[str, str]  # persona -> its letter, e.g. "(A)"


@dataclass(frozen=True)
class Statement:
    index: int
    text: str
    label: str


@dataclass
class EvalItems:
    paired: list[PairedItem] = field(default_factory=list)
    unpaired: dict[str, list[Answer]] = field(default_factory=dict)  # persona -> its answers
    choices: list[Choice] = field(default_factory=list)
    statements: list[Statement] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)  # paragraphs
    reply_prompts: list[str] = field(default_factory=list)  # everyday prompts for the reply metric
    splits: dict[str, Any] = field(default_factory=dict)  # per source: file, counts, selection
    leaks: list[dict[str, Any]] = field(default_factory=list)  # flagged (on_leak: flag) leaks
    sets: dict[str, EvalItems] = field(default_factory=dict)  # eval.sets: each set's items, by name


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class CalibrationIndex:
    """Normalised calibration prompts and responses of every persona, for the leak check."""

    def __init__(self, specs: dict[str, DataSpec]) -> None:
        self.texts: dict[str, str] = {}  # normalised text -> where it came from
        for name, spec in specs.items():
            for s in select_samples(spec):
                for kind, text in (("prompt", s.prompt), ("response", s.response)):
                    if text:
                        self.texts.setdefault(norm(text), f"personas.{name}.calibration {kind}")

    def find(self, text: str) -> str | None:
        """Where `text` occurs in the calibration set, or None."""
        t = norm(text)
        if t in self.texts:
            return self.texts[t]
        for c, where in self.texts.items():
            short, long = (t, c) if len(t) <= len(c) else (c, t)
            if len(short) >= MIN_CONTAINED and short in long:
                return where
        return None


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read(path: str, fmt: str | None, where: str) -> list[dict[str, Any]]:
    kind = fmt or infer_format(path)
    if kind not in ("json", "jsonl", "csv"):
        raise EvalDataError(f"{where}: cannot read {path!r} as records; set format to json, jsonl or csv")
    records = read_records(Path(path), kind, EvalDataError, where)  # the calibration reader's checks and messages
    if not all(isinstance(r, dict) for r in records):
        raise EvalDataError(f"{where}: {path!r} must hold one object per record")
    return records


def _text(rec: dict[str, Any], key: str, i: int, path: str) -> str:
    problem = field_problem(rec, key)
    if problem is not None:
        raise EvalDataError(f"{path}: record {i} {problem}")
    return str(rec[key]).strip()


def _choose(candidates: list[int], n: int, seed: int, where: str, total: int, excluded: int) -> list[int]:
    if n > len(candidates):
        raise EvalDataError(
            f"{where}: {n} items asked but only {len(candidates)} of {total} are available "
            f"({excluded} excluded as calibration items); lower the count or add data"
        )
    order = list(candidates)
    random.Random(seed).shuffle(order)
    return sorted(order[:n])


def read_paired(
    spec: PairedSpec, calib: CalibrationIndex, section: str = "eval"
) -> tuple[list[PairedItem], dict[str, Any]]:
    per_persona: dict[str, list[dict[str, Any]]] = {}
    paths: dict[str, str] = {}
    for name, src in spec.responses.items():
        paths[name] = src.path or spec.path or ""
        key = f"{section}.paired.responses.{name}.path" if src.path else f"{section}.paired.path"
        per_persona[name] = _read(paths[name], spec.format, key)
    sizes = {len(r) for r in per_persona.values()}
    if len(sizes) != 1:
        raise EvalDataError(f"eval.paired: the response files hold different numbers of records ({sizes})")
    first = next(iter(per_persona))
    items: list[PairedItem] = []
    seen: set[str] = set()
    for i in range(sizes.pop()):
        prompts = set()
        for name, recs in per_persona.items():
            prompt = _text(recs[i], spec.prompt_field, i, paths[name])
            extra = recs[i].get(spec.input_field, "") if spec.input_field else ""
            prompts.add(prompt + ("\n\n" + extra.strip() if isinstance(extra, str) and extra.strip() else ""))
        if len(prompts) != 1:
            raise EvalDataError(f"eval.paired: record {i} has a different prompt in each persona's file")
        prompt = prompts.pop()
        if norm(prompt) in seen:  # repeated prompts would count one item twice in the intervals
            continue
        seen.add(norm(prompt))
        answers = {n: _text(recs[i], spec.responses[n].field, i, paths[n]) for n, recs in per_persona.items()}
        items.append(PairedItem(i, prompt, answers))
    leaking = {it.index for it in items if _item_leak(it, calib)}
    candidates = [k for k, it in enumerate(items) if not (spec.exclude_calibration and it.index in leaking)]
    excluded = len(items) - len(candidates)
    chosen = [
        items[k] for k in _choose(candidates, spec.max_items, spec.seed, "eval.paired.max_items", len(items), excluded)
    ]
    split = {
        "files": {n: {"path": p, "sha256": file_sha256(p)} for n, p in paths.items()},
        "records": len(per_persona[first]),
        "unique_prompts": len(items),
        "excluded_as_calibration": excluded,
        "held_out": spec.exclude_calibration,
        "selected": len(chosen),
        "seed": spec.seed,
        "record_indices": [it.index for it in chosen],
    }
    return chosen, split


def _item_leak(item: PairedItem, calib: CalibrationIndex) -> str | None:
    for text in (item.prompt, *item.responses.values()):
        where = calib.find(text)
        if where:
            return where
    return None


def read_unpaired(spec: UnpairedSpec, calib: CalibrationIndex) -> tuple[dict[str, list[Answer]], dict[str, Any]]:
    """Each persona's own answers: unique prompts, held-out ones when asked, then `max_items` per persona."""
    chosen: dict[str, list[Answer]] = {}
    split: dict[str, Any] = {"held_out": spec.exclude_calibration, "seed": spec.seed, "personas": {}}
    for name, src in spec.responses.items():
        records = _read(src.path, src.format, f"eval.unpaired.responses.{name}")
        items: list[Answer] = []
        seen: set[str] = set()
        for i, rec in enumerate(records):
            prompt = _text(rec, src.prompt_field, i, src.path)
            if norm(prompt) not in seen:
                seen.add(norm(prompt))
                items.append(Answer(i, prompt, _text(rec, src.field, i, src.path)))
        candidates = [
            k
            for k, it in enumerate(items)
            if not (spec.exclude_calibration and (calib.find(it.prompt) or calib.find(it.response)))
        ]
        excluded = len(items) - len(candidates)
        where = f"eval.unpaired.max_items ({name})"
        chosen[name] = [items[k] for k in _choose(candidates, spec.max_items, spec.seed, where, len(items), excluded)]
        split["personas"][name] = {
            "file": {"path": src.path, "sha256": file_sha256(src.path)},
            "records": len(records),
            "unique_prompts": len(items),
            "excluded_as_calibration": excluded,
            "selected": len(chosen[name]),
            "record_indices": [it.index for it in chosen[name]],
        }
    shared = {norm(a.prompt) for a in chosen[next(iter(chosen))]}
    for name, answers in list(chosen.items())[1:]:
        if shared & {norm(a.prompt) for a in answers}:
            raise EvalDataError(
                f"eval.unpaired: personas answer a same instruction ({name}); unpaired items must answer different "
                "instructions (use eval.paired for answers to the same one)"
            )
    return chosen, split


def read_choices(spec: ChoicesSpec, calib: CalibrationIndex) -> tuple[list[Choice], dict[str, Any]]:
    """A/B items: each persona's letter must differ from the other's on every record."""
    records = _read(spec.path, spec.format, "eval.choices")
    items: list[Choice] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        question = _text(rec, spec.prompt_field, i, spec.path)
        letters = {n: _text(rec, f.field, i, spec.path) for n, f in spec.responses.items()}
        if len(set(letters.values())) != len(letters):
            raise EvalDataError(f"eval.choices: record {i} of {spec.path} gives the personas one letter ({letters})")
        if norm(question) not in seen:
            seen.add(norm(question))
            items.append(Choice(i, question, letters))
    candidates = [k for k, it in enumerate(items) if not (spec.exclude_calibration and calib.find(it.question))]
    excluded = len(items) - len(candidates)
    picks = _choose(candidates, spec.max_items, spec.seed, "eval.choices.max_items", len(items), excluded)
    chosen = [items[k] for k in picks]
    first = next(iter(spec.responses))
    split = {
        "file": {"path": spec.path, "sha256": file_sha256(spec.path)},
        "records": len(records),
        "unique_prompts": len(items),
        "excluded_as_calibration": excluded,
        "held_out": spec.exclude_calibration,
        "selected": len(chosen),
        "seed": spec.seed,
        "record_indices": [it.index for it in chosen],
        "letters_of_first": {
            letter: sum(c.letters[first] == letter for c in chosen)
            for letter in sorted({c.letters[first] for c in chosen})
        },
    }
    return chosen, split


def read_statements(
    spec: StatementsSpec, calib: CalibrationIndex, section: str = "eval"
) -> tuple[list[Statement], dict[str, Any]]:
    records = _read(spec.path, spec.format, f"{section}.statements.path")
    wanted = set(spec.labels.values())
    by_label: dict[str, list[Statement]] = {label: [] for label in wanted}
    excluded = 0
    for i, rec in enumerate(records):
        label = _text(rec, spec.label_field, i, spec.path)
        if label not in wanted:
            continue
        st = Statement(i, _text(rec, spec.statement_field, i, spec.path), label)
        if spec.exclude_calibration and calib.find(st.text):
            excluded += 1
            continue
        by_label[label].append(st)
    chosen: list[Statement] = []
    for label, pool in sorted(by_label.items()):
        picks = _choose(
            list(range(len(pool))),
            spec.max_per_label,
            spec.seed,
            f"eval.statements.max_per_label (label {label!r})",
            len(pool),
            excluded,
        )
        chosen += [pool[k] for k in picks]
    split = {
        "file": {"path": spec.path, "sha256": file_sha256(spec.path)},
        "records": len(records),
        "excluded_as_calibration": excluded,
        "held_out": spec.exclude_calibration,
        "selected_per_label": {label: spec.max_per_label for label in sorted(wanted)},
        "seed": spec.seed,
        "record_indices": sorted(s.index for s in chosen),
    }
    return chosen, split


def read_neutral(path: str, section: str = "eval") -> list[str]:
    spec = DataSpec(path=path, format="text", max_samples=1)
    try:
        return [s.response for s in read_samples(spec, f"{section}.neutral.path")]
    except CalibrationDataError as exc:
        raise EvalDataError(str(exc)) from None


def read_reply_prompts(
    spec: RepliesSpec, calib: CalibrationIndex, section: str = "eval", cap: int | None = None
) -> tuple[list[str], dict[str, Any]]:
    """One prompt per non-blank line; calibration prompts are dropped when held out, then a seeded selection.
    `cap` (the verdict depth) keeps at most that many: the first of the same seeded order, so a subset of the
    prompts the full depth selects."""
    try:
        samples = read_samples(DataSpec(path=spec.path, format="text", max_samples=1), f"{section}.replies.path")
    except CalibrationDataError as exc:
        raise EvalDataError(str(exc)) from None
    lines = [t.strip() for s in samples for t in s.response.splitlines() if t.strip()]
    candidates = [i for i, t in enumerate(lines) if not (spec.exclude_calibration and calib.find(t))]
    n = spec.max_items or len(candidates)
    excluded = len(lines) - len(candidates)
    chosen = _choose(candidates, n, spec.seed, "eval.replies", len(lines), excluded)
    if cap is not None and cap < n:
        chosen = _choose(candidates, cap, spec.seed, "eval.replies", len(lines), excluded)
    split = {
        "file": {"path": spec.path, "sha256": file_sha256(spec.path)},
        "total": len(lines),
        "held_out": spec.exclude_calibration,
        "selected": len(chosen),
        "full_depth": n,
        "seed": spec.seed,
        "line_indices": chosen,
    }
    return [lines[i] for i in chosen], split


def prepare(recipe: Recipe, spec: EvalSpec | None = None, section: str = "eval") -> EvalItems:
    """Check the eval section `spec` (the recipe's by default) against the recipe and read its items, before any
    model is loaded: problems surface early. `section` is where the recipe holds `spec` (eval, or tune.validation),
    as errors name its files by their keys."""
    spec = spec or recipe.eval
    assert spec is not None, "prepare() needs an eval section"
    problems = eval_problems(spec, list(recipe.personas))
    if problems:
        raise RecipeError(f"{len(problems)} problem(s) in the eval section:\n" + "\n".join(f"  {p}" for p in problems))
    return load_items(recipe, spec, section)


def load_items(recipe: Recipe, spec: EvalSpec, section: str = "eval") -> EvalItems:
    """Read and select every evaluation item, then check them against the calibration samples; errors name the
    files by their keys under `section` (eval, or tune.validation)."""
    calib = CalibrationIndex({n: p.calibration for n, p in recipe.poles.items()})
    items = EvalItems()
    if spec.paired is not None:
        items.paired, items.splits["paired"] = read_paired(spec.paired, calib, section)
    if spec.unpaired is not None:
        items.unpaired, items.splits["unpaired"] = read_unpaired(spec.unpaired, calib)
    if spec.choices is not None:
        items.choices, items.splits["choices"] = read_choices(spec.choices, calib)
    if spec.statements is not None:
        items.statements, items.splits["statements"] = read_statements(spec.statements, calib, section)
    if spec.neutral is not None:
        items.neutral = read_neutral(spec.neutral.path, section)
        items.splits["neutral"] = {
            "file": {"path": spec.neutral.path, "sha256": file_sha256(spec.neutral.path)},
            "paragraphs": len(items.neutral),
        }
    if spec.replies is not None:
        items.reply_prompts, items.splits["replies"] = read_reply_prompts(spec.replies, calib, section, reply_cap(spec))
    for item_set in spec.sets:
        sub = load_items(recipe, set_spec(item_set, spec), f"{section}.sets.{item_set.name}")
        items.sets[item_set.name] = sub
        items.splits.setdefault("sets", {})[item_set.name] = sub.splits
        items.leaks += [leak | {"source": f"{item_set.name}/{leak['source']}"} for leak in sub.leaks]
    items.leaks += find_leaks(items, calib)
    if items.leaks:
        shown = "; ".join(f"{x['source']} #{x['index']} = {x['calibration']}" for x in items.leaks[:5])
        msg = f"{len(items.leaks)} evaluation item(s) also occur in the calibration data: {shown}"
        if spec.on_leak == "error":
            raise EvalDataError(
                f"{msg}. Use a held-out split (exclude_calibration: true), other data, or on_leak: flag"
            )
        log.error("LEAK: %s (on_leak: flag; the report marks these numbers)", msg)
    return items


def find_leaks(items: EvalItems, calib: CalibrationIndex) -> list[dict[str, Any]]:
    leaks = []
    for it in items.paired:
        where = _item_leak(it, calib)
        if where:
            leaks.append({"source": "paired", "index": it.index, "calibration": where})
    for name, answers in items.unpaired.items():
        for a in answers:
            where = calib.find(a.prompt) or calib.find(a.response)
            if where:
                leaks.append({"source": f"unpaired:{name}", "index": a.index, "calibration": where})
    for c in items.choices:
        where = calib.find(c.question)
        if where:
            leaks.append({"source": "choices", "index": c.index, "calibration": where})
    for st in items.statements:
        where = calib.find(st.text)
        if where:
            leaks.append({"source": "statements", "index": st.index, "calibration": where})
    for k, prompt in enumerate(items.reply_prompts):
        where = calib.find(prompt)
        if where:
            leaks.append({"source": "replies", "index": k, "calibration": where})
    for k, para in enumerate(items.neutral):
        where = calib.find(para)
        if where:
            leaks.append({"source": "neutral", "index": k, "calibration": where})
    return leaks


def item_texts(items: EvalItems) -> set[str]:
    """Every prompt, answer, question, statement and reply prompt of `items` (and of its sets), normalised."""
    out = {norm(t) for it in items.paired for t in (it.prompt, *it.responses.values())}
    out |= {norm(t) for answers in items.unpaired.values() for a in answers for t in (a.prompt, a.response)}
    out |= {norm(c.question) for c in items.choices}
    out |= {norm(s.text) for s in items.statements} | {norm(p) for p in items.reply_prompts}
    for sub in items.sets.values():
        out |= item_texts(sub)
    return out


def check_disjoint_splits(validation: EvalItems, test: EvalItems) -> None:
    """Tune never chooses on what is reported: the validation and test items share no text."""
    shared = item_texts(validation) & item_texts(test)
    if shared:
        example = sorted(shared)[0][:80]
        raise RecipeError(
            f"tune.validation and eval share {len(shared)} text(s) (e.g. {example!r}); settings must be chosen "
            "on items that are not reported: point tune.validation at another split"
        )


def persona_pairs(recipe: Recipe, persona: str) -> list[tuple[str, str, str]]:
    """(prompt, the persona's answer, its partner's answer) for each held-out pair the evaluation scores
    (`eval.paired`, the same selection); empty without paired items, a partner or both personas' answers."""
    spec = recipe.eval.paired if recipe.eval else None
    partner = recipe.partner(persona)
    if spec is None or partner is None or not {persona, partner} <= set(spec.responses):
        return []
    items, _ = read_paired(spec, CalibrationIndex({n: p.calibration for n, p in recipe.poles.items()}))
    return [(it.prompt, it.responses[persona], it.responses[partner]) for it in items]


def quality_texts(
    recipe: Recipe, persona: str, formats: Iterable[str]
) -> tuple[list[str] | None, list[tuple[str, str, str]] | None]:
    """What a quantized format's quality is measured on: the evaluation's neutral text (None without one) and the
    persona's held-out pairs, read only when one of `formats` is measured (else None)."""
    neutral = read_neutral(recipe.eval.neutral.path) if recipe.eval and recipe.eval.neutral else None
    pairs = persona_pairs(recipe, persona) if any(FORMATS[f].measured for f in formats) else None
    return neutral, pairs
