"""Readable reports: report.md per persona and per run, with PNG plots (matplotlib, imported when plotting).

Only figures present in the evaluation records are printed; nothing here computes a metric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.io import write_atomic, write_json
from exporter.reports.checks import CheckpointCheck
from exporter.reports.evaluation import CI, PersonaEvaluation, RepliesEvaluation, RepliesSplit, Row
from exporter.reports.persona import PersonaReport, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = [
    "condition",
    "params removed",
    "paired margin [95% CI]",
    "unpaired margin [95% CI]",
    "shift vs dense [95% CI]",
    "pair acc.",
    "A/B letter acc. [95% CI]",
    "A/B letter margin",
    "statements margin",
    "statements shift",
    "perplexity (x dense)",
    "KL",
]


def fmt_ci(x: CI | None, fmt: str = "+.3f") -> str:
    if x is None:
        return "–"
    return f"{x.mean:{fmt}} [{x.ci95[0]:{fmt}}, {x.ci95[1]:{fmt}}]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def condition_row(r: Row) -> list[str]:
    paired, st, neu, un, ch = r.paired, r.statements, r.neutral, r.unpaired, r.choices
    return [
        r.condition,
        f"{r.parameters_removed / 1e6:.2f}M ({100 * r.fraction_removed:.1f}%)",
        fmt_ci(paired.margin if paired else None),
        fmt_ci(un.margin if un else None),
        fmt_ci(r.shift_ci),
        fmt_ci(paired.accuracy, ".2f") if paired else "–",
        fmt_ci(ch.accuracy, ".2f") if ch else "–",
        fmt_ci(ch.margin if ch else None),
        fmt_ci(st.margin if st else None),
        fmt_ci(st.shift if st else None),
        f"{neu.perplexity:.2f} ({neu.perplexity_ratio:.2f}x)" if neu else "–",
        f"{neu.kl:.4f}" if neu else "–",
    ]


def condition_table(rows: list[Row]) -> str:
    """One line per condition; a column no row has a figure for is left out."""
    cells = [condition_row(r) for r in rows]
    keep = [i for i in range(len(COLUMNS)) if i < 2 or any(c[i] != "–" for c in cells)]
    return md_table([COLUMNS[i] for i in keep], [[c[i] for i in keep] for c in cells])


def splits_text(ev: PersonaEvaluation) -> list[str]:
    out = []
    sp = ev.splits
    if sp.paired is not None:
        p = sp.paired
        files = ", ".join(f"{n}: `{Path(f.path).name}`" for n, f in p.files.items())
        held = (
            f"held-out split: {p.excluded_as_calibration} of {p.unique_prompts} unique prompts excluded as "
            "calibration items"
            if p.held_out
            else "calibration overlap checked, none excluded"
        )
        out.append(
            f"- Paired responses: {p.selected} pairs ({files}; {p.records} records; {held}; "
            f"seeded selection, seed {p.seed})."
        )
    if sp.unpaired is not None:
        u = sp.unpaired
        per = ", ".join(
            f"{n}: {x.selected} of `{Path(x.file.path).name}` ({x.records} records, {x.excluded_as_calibration} "
            "excluded as calibration items)"
            for n, x in u.personas.items()
        )
        out.append(f"- Unpaired answers (each persona's own instructions): {per}; seed {u.seed}.")
    if sp.choices is not None:
        c = sp.choices
        balance = ", ".join(f"{letter} {n}" for letter, n in c.letters_of_first.items())
        out.append(
            f"- A/B choices: {c.selected} items of `{Path(c.file.path).name}` ({c.records} records, "
            f"{c.excluded_as_calibration} excluded as calibration items; the first persona's letter: {balance}; "
            f"seed {c.seed})."
        )
    if sp.statements is not None:
        s = sp.statements
        per = ", ".join(f"{n} '{lab}'" for lab, n in s.selected_per_label.items())
        out.append(
            f"- Statements: `{Path(s.file.path).name}`, {per} "
            f"(of {s.records}; seed {s.seed}), prompt {ev.statements_prompt!r}."
        )
    if sp.neutral is not None:
        n = sp.neutral
        out.append(f"- Neutral text: `{Path(n.file.path).name}`, {n.paragraphs} paragraphs.")
    return out


def sets_markdown(ev: PersonaEvaluation) -> list[str]:
    """Each item set: the shift toward the persona's pole (own axis) or toward the set's first persona
    (crosstalk), per condition; and whether every own axis moved."""
    conditions = [r.condition for r in ev.sets[0].rows]
    rows = []
    for s in ev.sets:
        by = {r.condition: r for r in s.rows}
        cells = [fmt_ci(by[c].shift) if c in by else "–" for c in conditions]
        kind = "own axis" if s.own else "crosstalk"
        rows.append([s.name, f"{s.toward} ({kind})", *cells])
    lines = [
        "Item sets: shift toward the named persona (nats/token, 95% CI); on a crosstalk set the persona names "
        "neither pole and the shift should stay near 0.",
        "",
        md_table(["items", "toward", *conditions], rows),
    ]
    if ev.switch_success is not None:
        lines += [
            "",
            f"Switch success (every own axis's export shift > 0 with 95% confidence): {_mark(ev.switch_success)}.",
        ]
    return lines


def depth_text(ev: PersonaEvaluation) -> str:
    """Which depth an evaluation holds, in words: what it scored and (verdict) what `--full` adds."""
    seeds = len(ev.random_seeds)
    rs = ev.splits.replies
    if ev.depth == "full":
        return (
            f"full (every baseline the eval section lists, {seeds} random seeds, every reply prompt, greedy and as "
            "the exports ship them)"
        )
    replies = f", greedy replies to {rs.selected} of {rs.full_depth or rs.selected} prompts" if rs else ""
    return (
        f"verdict (dense, prompt-only, the export, {seeds} random mask{'s' if seeds > 1 else ''} of its "
        f"size{replies}); `persona-export eval RUN_DIR --full` adds every ablation, the eval section's random "
        "seeds, every reply prompt and the replies as the exports ship them"
    )


def _movement(ev: PersonaEvaluation) -> str:
    """How the random mask's movement (the `x random` check) was taken, by the number of seeds."""
    n = len(ev.random_seeds)
    if n == 1:
        return "its one seed's |shift|"
    return f"the largest of the mean's |shift| and each of its {n} seeds' |shift|"


def evaluation_markdown(persona: str, ev: PersonaEvaluation, plot: str | None = None, export: str = "mask-only") -> str:
    """A persona's evaluation; `export` names the mask-only condition (the model cards name it for what the
    export is)."""
    if export != "mask-only":
        rename = {"mask-only": export, "mask+prompt": f"{export} + prompt"}
        rows = [r.model_copy(update={"condition": rename.get(r.condition, r.condition)}) for r in ev.rows]
        ev = ev.model_copy(update={"rows": rows})
    lines = [f"## Persona evaluation: {persona} (vs {ev.opposite})", "", f"- Depth: {depth_text(ev)}."]
    lines += splits_text(ev)
    lines.append(f"- Prompt-only system prompt: {ev.system_prompt!r}")
    if ev.leaks:
        lines += [
            "",
            f"**WARNING: {len(ev.leaks)} evaluation item(s) also occur in the calibration data; "
            "the numbers below include them (on_leak: flag).**",
        ]
    else:
        lines.append("- Leak check: no evaluation item occurs in the calibration data.")
    lines += ["", condition_table(ev.rows), ""]
    acc = ev.acceptance
    if acc:
        checks = "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in acc.checks.items())
        ratio = f"{acc.shift_over_random:.1f}" if acc.shift_over_random is not None else "–"
        rnd = f"{acc.random_movement:.3f}" if acc.random_movement is not None else "–"
        ppl = f"{acc.perplexity_ratio:.2f}x" if acc.perplexity_ratio is not None else "–"
        lines.append(
            f"**Acceptance: {'PASSED' if acc.passed else 'FAILED'}** — {export} shift "
            f"{acc.shift:+.3f} nats/token; random-mask movement {rnd} ({_movement(ev)}; ratio {ratio}); perplexity "
            f"{ppl} dense ({checks})."
        )
    if ev.mask_vs_prompt:
        lines.append(
            f"\nMask-only minus prompt-only margin: {fmt_ci(ev.mask_vs_prompt.mask_minus_prompt)} nats/token "
            "(positive: the mask moves the model further toward the persona than the system prompt does)."
        )
    if ev.sets:
        lines += ["", *sets_markdown(ev)]
    if ev.replies:
        lines += ["", *replies_markdown(persona, ev.replies, ev.splits.replies)]
    if plot:
        lines += ["", f"![evaluation]({plot})"]
    lines += ["", "Definitions:", *(f"- {k}: {v}" for k, v in ev.definitions.items())]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def fewer_prompts(split: RepliesSplit | None) -> str:
    """At the verdict depth: how many of the full depth's reply prompts were answered, and how much wider the
    intervals are for it (a mean's interval scales as 1 / sqrt(n) for the same spread)."""
    if split is None or split.full_depth is None or split.selected >= split.full_depth:
        return ""
    wider = (split.full_depth / split.selected) ** 0.5
    return (
        f" Verdict depth: {split.selected} of the {split.full_depth} prompts the full depth answers, so each "
        f"interval is about {wider:.2f} x as wide as with all {split.full_depth} for the same spread."
    )


def replies_markdown(persona: str, r: RepliesEvaluation, split: RepliesSplit | None = None) -> list[str]:
    """The reply metric: scores and degeneration per condition, the gaps, and replies side by side. With a
    shipped repetition penalty, its reply set follows the greedy one, and the replies shown are its own."""
    under = r.shipped
    lines = [
        f"### Replies ({r.prompts} everyday prompts, greedy, at most {r.max_new_tokens} tokens)",
        "",
        *_reply_figures(r, fewer_prompts(split)),
        "",
    ]
    if under is not None:
        lines += [
            f"### Replies as the exports ship them ({decoding(under.repetition_penalty)})",
            "",
            "The same prompts decoded with the penalty the exports carry (generation_config.json and the other "
            "formats' equivalents). The acceptance bar reads the greedy replies: they measure the model, while "
            "the penalty removes nearly all repetition from every condition, so under it the bar could not tell "
            "an export that loops from one that does not.",
            "",
            *_reply_figures(under),
            "",
        ]
    for ex in (under or r).examples:
        lines += [
            f"**{_quote(ex.prompt)}**",
            "",
            md_table(
                ["model", "reply"],
                [
                    ["dense", _quote(ex.dense)],
                    [f"dense + {persona} system prompt", _quote(ex.prompt_only)],
                    ["this persona's export", _quote(ex.export)],
                    [f"{r.opposite}'s export", _quote(ex.opposite_export)],
                ],
            ),
            "",
        ]
    return lines


def _reply_figures(r: RepliesEvaluation, note: str = "") -> list[str]:
    """One reply set's persona scores, degeneration and gaps (`note` follows the gaps)."""
    rows = [
        [
            label,
            fmt_ci(c.score),
            f"{c.degeneration.repeated_4grams:.3f}",
            f"{c.degeneration.distinct_2:.3f}",
            f"{c.degeneration.cut_at_max_tokens:.2f}",
        ]
        for label, c in r.conditions.items()
    ]
    header = ["replies of", "persona score", "repeated 4-grams", "distinct-2", "cut at max tokens"]
    gaps = "; ".join(f"{name.replace('_', '-')} {fmt_ci(g)}" for name, g in r.gap.items())
    return [
        f"Persona score: the dense model's log-likelihood of the reply under this persona's system prompt minus "
        f"under {r.opposite}'s (nats/token). Gap (this persona's model minus {r.opposite}'s, per prompt): "
        f"{gaps}.{note}",
        "",
        md_table(header, rows),
    ]


def persona_markdown(report: PersonaReport, plot: str | None = None) -> str:
    p, hf = report.parameters, report.check("hf", CheckpointCheck)
    assert hf is not None, "a report always holds its checkpoint's check"
    head = [
        f"# {report.persona} — {report.recipe.name}",
        "",
        f"{report.description}",
        "",
        f"- Base model: {report.base_model.name}; method {report.method.score}; "
        f"prune {json.dumps(report.prune.model_dump(mode='json'))}.",
        f"- Parameters: {p.dense / 1e6:.2f}M -> {p.pruned / 1e6:.2f}M ({p.ratio:.3f}){_added(report)}.",
        f"- Verification: {report.status} (fp64 max |dlogit| {hf.exact_max_abs:.1e}).",
        f"- Decoding the exports ship: {decoding(report.generation.repetition_penalty)}.",
        "",
    ]
    ev = report.evaluation
    return "\n".join(head) + (evaluation_markdown(report.persona, ev, plot) if ev else "No evaluation.\n")


def decoding(penalty: float) -> str:
    """How replies are decoded under `penalty`, in words."""
    return "greedy" + (f", repetition penalty {penalty:g}" if penalty != 1 else " (no repetition penalty)")


def removed_and_added(report: PersonaReport) -> tuple[int, int] | None:
    """Parameters the export removes (the evaluation table's count) and adds (MLP biases that carry a steering
    or compensation bias), so that the size squares with the table; None without an evaluation."""
    row = report.evaluation.row("mask-only") if report.evaluation else None
    if row is None:
        return None
    p, removed = report.parameters, row.parameters_removed
    return removed, p.pruned - (p.dense - removed)


def _added(report: PersonaReport) -> str:
    parts = removed_and_added(report)
    if parts is None or parts[1] <= 0:
        return ""
    return f": {parts[0] / 1e6:.2f}M removed, {parts[1] / 1e6:.2f}M of MLP biases added"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def verdict(reports: dict[str, PersonaReport], where: Path | None = None) -> list[str]:
    """One line per persona: exports proven exact, persona effect against the acceptance bar (the checks it
    misses), the cost in size and perplexity, and (given the run folder) where its report is."""
    lines = []
    for name, r in reports.items():
        acc = r.evaluation.acceptance if r.evaluation else None
        if acc:
            missed = [k for k, ok in acc.checks.items() if not ok]
            effect = f"{_mark(acc.passed)} (shift {acc.shift:+.3f} nats/token"
            effect += f"; misses: {', '.join(missed)})" if missed else "; every check of the bar met)"
        else:
            effect = "not evaluated"
        cost = f"parameters x{r.parameters.ratio:.3f}"
        if acc and acc.perplexity_ratio:
            cost += f", perplexity x{acc.perplexity_ratio:.2f}"
        line = f"{name}: exports proven exact {_mark(r.passed)} | persona effect {effect} | {cost}"
        if where is not None:
            report = where / name / ("report.md" if (where / name / "report.md").is_file() else "report.json")
            line += f" | report: {report}"
        lines.append(line)
    return lines


SHIFTS = {
    "mask-only": "mask-only shift",
    "prompt-only": "prompt-only shift",
    "mask+prompt": "mask+prompt shift",
    "random mask": "random shift",
    "wanda unstructured": "wanda shift",
}


def run_markdown(
    name: str,
    evaluations: dict[str, PersonaEvaluation],
    plot: str | None,
    reports: dict[str, PersonaReport] | None = None,
) -> str:
    lines = [f"# {name}: persona evaluation", ""]
    if reports:
        lines += ["## Verdict", "", *(f"- {v}" for v in verdict(reports)), ""]
    first = next(iter(evaluations.values()), None)
    if first is not None:
        lines += [f"Depth: {depth_text(first)}.", ""]
    shifts = {persona: {r.condition.split(" (")[0]: r.shift_ci for r in ev.rows} for persona, ev in evaluations.items()}
    # a baseline the recipe's eval.baselines left out has no column (eval.baselines=all adds every one)
    shown = [c for c in SHIFTS if any(by.get(c) is not None for by in shifts.values())]
    rows = []
    for persona, ev in evaluations.items():
        acc = ev.acceptance
        mvp = ev.mask_vs_prompt.mask_minus_prompt if ev.mask_vs_prompt else None
        rows.append(
            [
                persona,
                *(fmt_ci(shifts[persona].get(c)) for c in shown),
                fmt_ci(mvp),
                f"{acc.perplexity_ratio:.2f}x" if acc and acc.perplexity_ratio else "–",
                ("PASSED" if acc.passed else "FAILED") if acc else "–",
            ]
        )
    header = ["persona", *(SHIFTS[c] for c in shown), "mask - prompt", "perplexity (mask)", "acceptance"]
    lines += [
        "Shift toward each persona relative to the dense model on its own items (paired margin, else unpaired "
        "difference in differences, else A/B letter margin; nats/token, 95% CI).",
        "",
        md_table(header, rows),
        "",
    ]
    if plot:
        lines += [f"![evaluation]({plot})", ""]
    lines += [f"Per persona: {', '.join(f'[{p}]({p}/report.md)' for p in evaluations)}."]
    return "\n".join(lines) + "\n"


def two_panels() -> tuple[Figure, Any]:
    """A figure with two plots side by side. No pyplot: the user's matplotlib backend is left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    return fig, fig.subplots(1, 2)


def save_png(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_run(evaluations: dict[str, PersonaEvaluation], path: Path) -> None:
    """Bars: paired shift (with 95% CI) and perplexity per condition, one group per persona."""
    fig, axes = two_panels()
    width = 0.8 / max(len(evaluations), 1)
    for k, (persona, ev) in enumerate(evaluations.items()):
        rows = [r for r in ev.rows if r.shift_ci]
        xs = [i + k * width for i in range(len(rows))]
        shifts = [ci for r in rows if (ci := r.shift_ci)]
        err = [[s.mean - s.ci95[0] for s in shifts], [s.ci95[1] - s.mean for s in shifts]]
        axes[0].bar(xs, [s.mean for s in shifts], width, yerr=err, label=persona, capsize=3)
        ppl = [r.neutral.perplexity if r.neutral else float("nan") for r in rows]
        axes[1].bar(xs, ppl, width, label=persona)
        names = [r.condition for r in rows]
    for ax, title in zip(axes, ["shift toward persona (nats/token)", "neutral perplexity"], strict=True):
        ax.set_xticks(
            [i + width * (len(evaluations) - 1) / 2 for i in range(len(names))],
            names,
            rotation=30,
            ha="right",
        )
        ax.set_title(title)
        ax.legend()
    axes[0].axhline(0, color="black", linewidth=0.8)
    save_png(fig, path)


def write_run_reports(
    folder: Path, name: str, evaluations: dict[str, PersonaEvaluation], reports: dict[str, PersonaReport]
) -> dict[str, PersonaReport]:
    """Each persona's report.json (`evaluation` added), report.md and eval.png; the run's report.{md,json}.
    Returns the reports with their evaluation."""
    reports = {p: r.model_copy(update={"evaluation": evaluations.get(p, r.evaluation)}) for p, r in reports.items()}
    for persona, ev in evaluations.items():
        write_report(folder / persona, reports[persona])
        plot_run({persona: ev}, folder / persona / "eval.png")
        write_atomic(folder / persona / "report.md", persona_markdown(reports[persona], "eval.png"))
    plot_run(evaluations, folder / "eval.png")
    run_report = {"recipe": name, "evaluation": {p: ev.model_dump() for p, ev in evaluations.items()}}
    write_json(folder / "report.json", run_report)
    write_atomic(folder / "report.md", run_markdown(name, evaluations, "eval.png", reports))
    return reports
