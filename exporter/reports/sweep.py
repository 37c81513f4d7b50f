"""The sweep's report: its typed record (report.json), a table per sparsity and persona, and a PNG of persona
shift and perplexity against the parameters removed (one line per persona and condition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.recipe.schema import MethodSpec, PruneSpec
from exporter.reports.evaluation import PersonaEvaluation, Row
from exporter.reports.markdown import fmt_ci, md_table, save_png, splits_text, two_panels
from exporter.reports.record import Record


class SweepPoint(Record):
    """One sparsity: each persona's evaluation, or why no mask could be made."""

    sparsity: float
    unit: str | None = None
    prune: PruneSpec | None = None
    personas: dict[str, PersonaEvaluation] | None = None
    error: str | None = None


class SweepReport(Record):
    recipe: str
    recipe_sha256: str
    unit: str
    method: MethodSpec
    points: list[SweepPoint]


def _shift(row: Row | None) -> str:
    return fmt_ci(row.shift_ci if row else None)


def _ppl(row: Row | None) -> str:
    return f"{row.neutral.perplexity_ratio:.2f}x" if row and row.neutral else "–"


def sweep_markdown(name: str, points: list[SweepPoint], plot: str | None) -> str:
    lines = [
        f"# {name}: sparsity sweep",
        "",
        "Paired-margin shift toward the persona relative to the dense model (nats/token, 95% CI) and "
        "neutral-corpus perplexity relative to the dense model. Masks applied in memory (equal to the "
        "exported models by construction; the `run` command proves it per export).",
        "",
    ]
    header = ["sparsity", "persona", "params removed", "mask shift", "ppl (mask)", "random shift", "ppl (random)"]
    header += ["wanda shift", "ppl (wanda)", "mask+prompt shift", "acceptance"]
    rows = []
    for pt in points:
        if pt.personas is None:
            rows.append([f"{pt.sparsity:g}", "–", "–", pt.error or "", *["–"] * 7])
            continue
        for persona, ev in pt.personas.items():
            m, r, w, mp = (ev.row(c) for c in ("mask-only", "random mask", "wanda", "mask+prompt"))
            acc = ev.acceptance
            rows.append(
                [
                    f"{pt.sparsity:g}",
                    persona,
                    f"{100 * (m.fraction_removed if m else 0):.2f}%",
                    _shift(m),
                    _ppl(m),
                    _shift(r),
                    _ppl(r),
                    _shift(w),
                    _ppl(w),
                    _shift(mp),
                    ("passed" if acc.passed else "failed") if acc else "–",
                ]
            )
    lines += [md_table(header, rows), ""]
    first = next((pt.personas for pt in points if pt.personas), None)
    if first:
        prompt_only = ", ".join(f"{p} {_shift(ev.row('prompt-only'))}" for p, ev in first.items())
        lines.append(f"Prompt-only shift (no parameters removed): {prompt_only}.")
        lines += ["", *splits_text(next(iter(first.values())))]
    if plot:
        lines += ["", f"![sweep]({plot})"]
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[SweepPoint], path: Path) -> None:
    """Paired shift and perplexity against the share of parameters removed: a colour per persona, a line
    style per condition (mask solid, random dashed, Wanda dotted); every line starts at the dense model."""
    styles = {"mask-only": "-o", "random mask": "--s", "wanda": ":^"}
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    prompt: dict[str, float] = {}
    for pt in points:
        for persona, ev in (pt.personas or {}).items():
            dense = ev.row("dense")
            for cond in styles:
                r = ev.row(cond)
                if r and r.shift is not None and r.neutral and dense and dense.neutral:
                    line = series.setdefault((persona, cond), [(0.0, 0.0, dense.neutral.perplexity)])
                    line.append((100 * r.fraction_removed, r.shift, r.neutral.perplexity))
            if (shift := getattr(ev.row("prompt-only"), "shift", None)) is not None:
                prompt[persona] = shift
    personas = sorted({p for p, _ in series} | set(prompt))
    colour = {p: f"C{k}" for k, p in enumerate(personas)}
    fig, axes = two_panels()
    for (persona, cond), pts in series.items():
        pts.sort()
        kw: dict[str, Any] = {"color": colour[persona], "label": f"{persona}: {cond.replace('-only', '')}"}
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], styles[cond], **kw)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], styles[cond], **kw)
    for persona, value in prompt.items():
        axes[0].axhline(value, linestyle="-.", linewidth=1, color=colour[persona], alpha=0.6)
        axes[0].annotate(
            f"{persona}: prompt-only",
            (0.01, value),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color=colour[persona],
            va="bottom",
        )
    axes[0].axhline(0, color="black", linewidth=0.8)
    axes[0].set_title("paired margin shift toward persona (nats/token)")
    axes[1].set_title("neutral perplexity")
    for ax in axes:
        ax.set_xlabel("parameters removed (% of the dense model)")
        ax.legend(fontsize=8)
    save_png(fig, path)
