"""From raw scores (exporter/evaluation/conditions.py) to one persona's evaluation: rows per condition, with intervals.

Paired margin of persona p over its opposite q, per item: mean per-token log-likelihood of p's answer minus
that of q's answer. Shift: the margin minus the dense model's margin on the same item. Statements: mean
log-likelihood of statements matching p minus that of the others. Random masks: per-item log-likelihoods
averaged over the seeds, then the same statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from exporter.evaluation.metrics import contrast_ci, mean_ci, win_rate_ci
from exporter.recipe.eval import EvalSpec

Row = dict[str, Any]


def _mean_answers(entries: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = entries[0]["answers"]
    return {k: np.mean([e["answers"][k] for e in entries], axis=0) for k in keys}


def _mean_neutral(entries: list[dict[str, Any]]) -> dict[str, float] | None:
    if "neutral" not in entries[0]:
        return None
    keys = ("perplexity", "nll", "kl")
    return {k: float(np.mean([e["neutral"][k] for e in entries])) for k in keys}


class PersonaView:
    """Statistics of one persona from raw condition scores."""

    def __init__(self, raw: dict[str, Any], persona: str, spec: EvalSpec, labels: list[str], dense_params: int):
        self.raw, self.p, self.spec, self.dense_params = raw, persona, spec, dense_params
        self.q = next((n for n in (spec.paired.responses if spec.paired else {}) if n != persona), None)
        label = spec.statements.labels.get(persona) if spec.statements else None
        self.match = np.array([x == label for x in labels], dtype=bool) if label is not None else None
        self.boot = {"n": spec.bootstrap, "seed": spec.seed}

    def margins(self, answers: dict[str, np.ndarray]) -> np.ndarray | None:
        if self.q is None or f"paired:{self.p}" not in answers:
            return None
        return answers[f"paired:{self.p}"] - answers[f"paired:{self.q}"]

    def row(self, label: str, answers: dict[str, np.ndarray], neutral: dict[str, float] | None, removed: int) -> Row:
        dense = self.raw["dense"]
        row: Row = {
            "condition": label,
            "parameters_removed": removed,
            "fraction_removed": removed / self.dense_params,
        }
        m, m0 = self.margins(answers), self.margins(dense["answers"])
        if m is not None and m0 is not None:
            row["paired"] = {
                "margin": mean_ci(m, **self.boot),
                "accuracy": win_rate_ci(m, **self.boot),
                "shift": mean_ci(m - m0, **self.boot),
                "n": len(m),
            }
        if self.match is not None and "statements" in answers and self.match.any() and (~self.match).any():
            s, d = answers["statements"], answers["statements"] - dense["answers"]["statements"]
            row["statements"] = {
                "margin": contrast_ci(s[self.match], s[~self.match], **self.boot),
                "shift": contrast_ci(d[self.match], d[~self.match], **self.boot),
                "n_matching": int(self.match.sum()),
                "n_other": int((~self.match).sum()),
            }
        if neutral is not None:
            base = dense["neutral"]
            row["neutral"] = {
                "perplexity": neutral["perplexity"],
                "perplexity_ratio": neutral["perplexity"] / base["perplexity"],
                "kl": neutral["kl"],
            }
        return row

    def entry_row(self, label: str, key: str, weights: str) -> Row | None:
        if key not in self.raw or "answers" not in self.raw[key]:
            return None
        w = self.raw[weights]
        return self.row(label, self.raw[key]["answers"], w.get("neutral"), w["removed"])

    def random_row(self, keys: list[str]) -> Row | None:
        keys = [k for k in keys if k in self.raw]
        entries = [self.raw[k] for k in keys]
        if not entries:
            return None
        row = self.row(
            f"random mask ({len(entries)} seeds)",
            _mean_answers(entries),
            _mean_neutral(entries),
            entries[0]["removed"],
        )
        row["seeds"] = [
            self.row(
                f"random seed {self.spec.seed + int(k.rsplit(':', 1)[1])}", e["answers"], e.get("neutral"), e["removed"]
            )
            for k, e in zip(keys, entries, strict=True)
        ]
        for seed_row in row["seeds"]:
            for part in ("paired", "statements"):
                if part in seed_row:  # per-seed intervals are noise here: keep the means
                    seed_row[part] = {k: v["mean"] if isinstance(v, dict) else v for k, v in seed_row[part].items()}
        return row


def persona_rows(view: PersonaView, random_keys: list[str]) -> list[Row]:
    p = view.p
    rows = [
        view.entry_row("dense", "dense", "dense"),
        view.entry_row("prompt-only", f"dense+prompt:{p}", "dense"),
        view.entry_row("mask-only", f"mask:{p}", f"mask:{p}"),
        view.entry_row("mask+prompt", f"mask:{p}+prompt:{p}", f"mask:{p}"),
        view.entry_row("steering-only", f"steer:{p}", f"steer:{p}"),
        view.entry_row("removal-only", f"removal:{p}", f"removal:{p}"),
        view.random_row(random_keys),
        view.entry_row("wanda unstructured", f"wanda:{p}", f"wanda:{p}"),
    ]
    return [r for r in rows if r is not None]


def _shift(rows: list[Row], condition: str) -> float | None:
    for r in rows:
        if r["condition"].startswith(condition) and "paired" in r:
            return float(r["paired"]["shift"]["mean"])
    return None


def _random_movement(rows: list[Row]) -> float | None:
    """The random mask's movement: the larger of |mean shift over seeds| and the mean of |shift| per seed."""
    row = next((r for r in rows if r["condition"].startswith("random mask") and "paired" in r), None)
    if row is None:
        return None
    per_seed = [abs(s["paired"]["shift"]) for s in row.get("seeds", []) if "paired" in s]
    return max([abs(float(row["paired"]["shift"]["mean"])), *per_seed])


def reply_checks(replies: dict[str, Any], spec: EvalSpec) -> dict[str, bool]:
    """The bar on one persona's reply evaluation (exporter/evaluation/replies.py)."""
    gap, conds = replies["gap"], replies["conditions"]
    checks = {"reply gap > 0, interval excludes 0": gap["export"]["ci95"][0] > 0}
    if "prompt_only" in gap:
        checks["reply gap >= prompt-only gap"] = gap["export"]["mean"] >= gap["prompt_only"]["mean"]
    limit = spec.acceptance.max_repeated_4grams_over_dense
    dense = conds["dense"]["degeneration"]["repeated_4grams"]
    checks[f"repeated 4-grams <= dense + {limit}"] = conds["export"]["degeneration"]["repeated_4grams"] <= dense + limit
    return checks


def acceptance(rows: list[Row], spec: EvalSpec, replies: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The bar on the mask-only model's paired shift and neutral perplexity, and on its replies if scored."""
    a = spec.acceptance
    mask = _shift(rows, "mask-only")
    rnd = _random_movement(rows)
    ppl = next(
        (r["neutral"]["perplexity_ratio"] for r in rows if r["condition"] == "mask-only" and "neutral" in r),
        None,
    )
    if mask is None:
        return None
    checks: dict[str, bool] = {f"shift >= {a.min_shift}": mask >= a.min_shift}
    if rnd is not None:
        checks[f"shift >= {a.random_ratio} x random movement"] = mask >= a.random_ratio * rnd
    prompt = _shift(rows, "prompt-only")
    if prompt is not None:
        checks["shift >= prompt-only shift"] = mask >= prompt
    if ppl is not None:
        checks[f"perplexity <= {a.max_perplexity_ratio} x dense"] = ppl <= a.max_perplexity_ratio
    if replies is not None:
        checks |= reply_checks(replies, spec)
    return {
        "shift": mask,
        "random_shift": _shift(rows, "random mask"),
        "random_movement": rnd,
        "shift_over_random": mask / rnd if rnd else None,
        "perplexity_ratio": ppl,
        "checks": checks,
        "passed": all(checks.values()),
    }


def mask_vs_prompt(view: PersonaView) -> dict[str, Any] | None:
    """Mask-only minus prompt-only margin per item, with its interval (the paper: masks beat prompts)."""
    raw, p = view.raw, view.p
    if f"dense+prompt:{p}" not in raw or f"mask:{p}" not in raw:
        return None
    m_mask = view.margins(raw[f"mask:{p}"]["answers"])
    m_prompt = view.margins(raw[f"dense+prompt:{p}"]["answers"])
    if m_mask is None or m_prompt is None:
        return None
    return {"mask_minus_prompt": mean_ci(m_mask - m_prompt, **view.boot)}


def summarise(
    raw: dict[str, Any],
    persona: str,
    spec: EvalSpec,
    labels: list[str],
    random_keys: list[str],
    dense_params: int,
    replies: dict[str, Any] | None = None,
) -> dict[str, Any]:
    view = PersonaView(raw, persona, spec, labels, dense_params)
    rows = persona_rows(view, random_keys)
    out = {
        "opposite": view.q,
        "rows": rows,
        "acceptance": acceptance(rows, spec, replies),
        "mask_vs_prompt": mask_vs_prompt(view),
    }
    return out | ({"replies": replies} if replies is not None else {})
