"""The sweep's report: a table per sparsity and persona, and a PNG of persona shift and perplexity against
the parameters removed (one line per persona and condition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.reports.markdown import fmt_ci, md_table, save_png, splits_text, two_panels


def _row(ev: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next((r for r in ev["rows"] if r["condition"].startswith(prefix)), {})


def sweep_markdown(name: str, points: list[dict[str, Any]], plot: str | None) -> str:
    lines = [
        f"# {name}: sparsity sweep",
        "",
        "Paired-margin shift toward the persona relative to the dense model (nats/token, 95% CI) and "
        "neutral-corpus perplexity relative to the dense model. Masks applied in memory (equal to the "
        "exported models by construction; the `run` command proves it per export).",
        "",
    ]
    header = [
        "sparsity",
        "persona",
        "params removed",
        "mask shift",
        "ppl (mask)",
        "random shift",
        "ppl (random)",
        "wanda shift",
        "ppl (wanda)",
        "mask+prompt shift",
        "acceptance",
    ]
    rows = []
    for pt in points:
        if "error" in pt:
            rows.append([f"{pt['sparsity']:g}", "–", "–", pt["error"], *["–"] * 7])
            continue
        for persona, ev in pt["personas"].items():
            m, r, w, mp = (_row(ev, c) for c in ("mask-only", "random mask", "wanda", "mask+prompt"))
            ppl = lambda x: f"{x['neutral']['perplexity_ratio']:.2f}x" if "neutral" in x else "–"  # noqa: E731
            acc = ev.get("acceptance")
            rows.append(
                [
                    f"{pt['sparsity']:g}",
                    persona,
                    f"{100 * m.get('fraction_removed', 0):.2f}%",
                    fmt_ci(m.get("paired", {}).get("shift")),
                    ppl(m),
                    fmt_ci(r.get("paired", {}).get("shift")),
                    ppl(r),
                    fmt_ci(w.get("paired", {}).get("shift")),
                    ppl(w),
                    fmt_ci(mp.get("paired", {}).get("shift")),
                    ("passed" if acc["passed"] else "failed") if acc else "–",
                ]
            )
    lines += [md_table(header, rows), ""]
    first = next((pt for pt in points if "personas" in pt), None)
    if first:
        lines.append(
            "Prompt-only shift (no parameters removed): "
            + ", ".join(
                f"{p} {fmt_ci(_row(ev, 'prompt-only').get('paired', {}).get('shift'))}"
                for p, ev in first["personas"].items()
            )
            + "."
        )
        lines += ["", *splits_text(next(iter(first["personas"].values())))]
    if plot:
        lines += ["", f"![sweep]({plot})"]
    return "\n".join(lines) + "\n"


def plot_sweep(points: list[dict[str, Any]], path: Path) -> None:
    """Paired shift and perplexity against the share of parameters removed: a colour per persona, a line
    style per condition (mask solid, random dashed, Wanda dotted); every line starts at the dense model."""
    styles = {"mask-only": "-o", "random mask": "--s", "wanda": ":^"}
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    prompt: dict[str, float] = {}
    for pt in points:
        for persona, ev in pt.get("personas", {}).items():
            dense = _row(ev, "dense")
            for cond in styles:
                r = _row(ev, cond)
                if "paired" in r and "neutral" in r:
                    line = series.setdefault((persona, cond), [(0.0, 0.0, dense["neutral"]["perplexity"])])
                    shift, ppl = r["paired"]["shift"]["mean"], r["neutral"]["perplexity"]
                    line.append((100 * r["fraction_removed"], shift, ppl))
            if "paired" in _row(ev, "prompt-only"):
                prompt[persona] = _row(ev, "prompt-only")["paired"]["shift"]["mean"]
    personas = sorted({p for p, _ in series} | set(prompt))
    colour = {p: f"C{k}" for k, p in enumerate(personas)}
    fig, axes = two_panels()
    for (persona, cond), pts in series.items():
        pts.sort()
        kw = {"color": colour[persona], "label": f"{persona}: {cond.replace('-only', '')}"}
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
