"""Command line: `persona-export run|validate|...`. Parses arguments and hands typed values to the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from exporter.errors import PersonaExportError


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(reports: dict[str, dict[str, Any]]) -> str:
    rows = [["persona", "status", "params dense -> pruned", "weights MB", "fp64 max|dlogit|", "fp32 max|dlogit|", "greedy"]]
    for name, r in reports.items():
        hf = r["verification"]["hf"]
        p, b = r["parameters"], r["bytes"]
        rows.append(
            [
                name,
                r["status"],
                f"{p['dense'] / 1e6:.1f}M -> {p['pruned'] / 1e6:.1f}M ({p['ratio']:.3f})",
                f"{b['dense_weights'] / 1e6:.0f} -> {b['pruned_weights_on_disk'] / 1e6:.0f}",
                f"{hf['fp64']['max_abs_logit_diff']:.1e}",
                f"{hf['fp32']['max_abs_logit_diff']:.1e}",
                "identical" if hf["fp64"]["greedy_identical"] else "DIFFERENT",
            ]
        )
    return _table(rows)


def cmd_validate(args: argparse.Namespace) -> int:
    from exporter.data import select_samples
    from exporter.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    for name, persona in recipe.personas.items():
        n = len(select_samples(persona.calibration))
        print(f"  {name}: {n} calibration samples from {persona.calibration.path}")
    print(f"{args.recipe}: valid (recipe sha256 {recipe.digest()[:12]})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from exporter.data import select_samples
    from exporter.pipeline import run
    from exporter.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    for persona in recipe.personas.values():  # data problems surface before the model loads
        select_samples(persona.calibration)
    summary = run(recipe, Path(args.out), overwrite=args.overwrite, reuse=args.reuse_stats)
    print(summary_table(summary["reports"]))
    print(f"\nwritten: {args.out}  (per persona: hf/, masks.safetensors, report.json)")
    failed = [n for n, s in summary["personas"].items() if s != "passed"]
    if failed:
        print(f"error: verification failed for {', '.join(failed)}; see report.json", file=sys.stderr)
        return 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def overrides(p: argparse.ArgumentParser) -> None:
        p.add_argument("set", nargs="*", metavar="KEY.PATH=VALUE", help="recipe overrides, e.g. prune.mlp.sparsity=0.1")

    p = sub.add_parser("validate", help="check a recipe and its data files without loading a model")
    p.add_argument("recipe")
    overrides(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="calibrate, mask, prune, export and verify every persona of a recipe")
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="run folder to create (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--reuse-stats", type=Path, metavar="RUN_DIR", help="reuse still-valid statistics of an earlier run")
    overrides(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "optimum", "huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except PersonaExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: no partial output was left", file=sys.stderr)
        return 130
