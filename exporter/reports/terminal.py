"""What `run` and `export` print when they finish: a table of the personas' parameters and proofs, and one line
per measured quantized format."""

from __future__ import annotations

from exporter.reports.checks import CheckpointCheck, Measured, OnnxCheck
from exporter.reports.persona import PersonaReport


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(reports: dict[str, PersonaReport]) -> str:
    """Per persona: status, parameters and weights before and after, the float64 and fp32 proofs, ONNX's."""
    head = ["persona", "status", "params dense -> pruned", "weights MB", "fp64 max|dlogit|", "fp32 max|dlogit|"]
    rows = [[*head, "greedy", "onnx max|dlogit|"]]
    for name, r in reports.items():
        hf, onnx = r.check("hf", CheckpointCheck), r.check("onnx", OnnxCheck)
        assert hf is not None, "a report always holds its checkpoint's check"
        p, b = r.parameters, r.bytes
        rows.append(
            [
                name,
                r.status,
                f"{p.dense / 1e6:.1f}M -> {p.pruned / 1e6:.1f}M ({p.ratio:.3f})",
                f"{b.dense_weights / 1e6:.0f} -> {b.pruned_weights_on_disk / 1e6:.0f}",
                f"{hf.exact_max_abs:.1e}",  # proven layer by layer: the worst layer output
                f"{hf.fp32.max_abs_logit_diff:.1e}",
                "identical" if hf.exact_greedy_identical else "DIFFERENT",
                f"{onnx.max_abs_logit_diff:.1e}" if onnx else "-",
            ]
        )
    return _table(rows)


def quality_lines(report: PersonaReport) -> list[str]:
    """The measured quality of each quantized format in a report, one line each."""
    return [
        c.describe(n) for n, c in report.verification.items() if isinstance(c, Measured) and c.below_floor is not None
    ]
