"""`validate`: every check of a recipe that needs no model weights, run by `persona-export validate` and again
by `run`, `sweep` and `tune` before a model is loaded, so that a recipe that validates is not refused later for
its data or its model folder: the schema and its rules (push destinations included, see exporter/recipe/),
each persona's calibration data, the eval section with its data files, the model source without reading
weights (a `model.path` folder with a config.json object of a supported architecture), limits set by the
model's context length, what the requested export formats need of that config.json, and a `--reuse-stats`
folder with its statistics files. `export --format` checks a persona's hf/config.json the same way
(`format_problems`) before it loads a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import exporter
from exporter.errors import OutputError, RecipeError
from exporter.evaluation.conditions import prepare
from exporter.evaluation.items import EvalItems
from exporter.inputs import file_problem, folder_problem
from exporter.io import Product, check_target
from exporter.masking.data import select_samples
from exporter.recipe.eval import EvalSpec
from exporter.recipe.paths import data_files
from exporter.recipe.schema import Recipe, TuneSpec


@dataclass(frozen=True)
class Validated:
    samples: dict[str, int]  # persona -> calibration samples selected
    items: EvalItems | None  # the eval section's items, read and checked; None without an eval section
    tune_items: EvalItems | None = None  # the tune section's validation items, likewise


def item_lines(label: str, spec: EvalSpec, items: EvalItems) -> list[str]:
    """What an evaluation reads, one line per source: counts selected and the file they come from."""
    parts = [
        (spec.paired, len(items.paired), "paired items"),
        (spec.statements, len(items.statements), "statements"),
        (spec.replies, len(items.reply_prompts), "reply prompts"),
        (spec.neutral, len(items.neutral), "neutral paragraphs"),
    ]
    return [f"  {label}: {n} {what} from {source.path}" for source, n, what in parts if source is not None]


def validate(recipe: Recipe, reuse: Path | None = None) -> Validated:
    """Raise the project's error for the first kind of problem found; the recipe itself was checked when it
    loaded. Nothing is loaded or written."""
    from exporter.model import sources

    samples = {
        name: len(select_samples(p.calibration, f"personas.{name}.calibration.path"))
        for name, p in recipe.personas.items()
    }
    items = prepare(recipe) if recipe.eval else None
    tune_items = prepare(recipe, tune_validation(recipe.tune), "tune.validation") if recipe.tune else None
    if recipe.model.path is not None:
        sources.resolve(recipe.model)  # config.json, weights present, architecture: no weights are read
        config = sources.read_config(Path(recipe.model.path))
        check_limits(recipe, config)
        problems = format_problems(recipe.output.formats, config, Path(recipe.model.path) / "config.json", BASE_FIX)
        if problems:
            raise RecipeError("output.formats: " + "; ".join(problems))
    elif recipe.model.embedded is not None:
        sources.resolve(recipe.model)
    if reuse is not None:
        check_reuse(recipe, reuse)
    return Validated(samples, items, tune_items)


BASE_FIX = "leave 'gguf' out of output.formats (the onnx formats carry Linear biases)"


def format_problems(formats: Sequence[str], config: dict[str, Any], config_file: Path, fix: str) -> list[str]:
    """What the export `formats` cannot be made from, read from the config.json of the checkpoint they are
    made from (model.path for a run, a persona's hf/ for `export`): GGUF files are written for llama
    checkpoints without attention biases (exporter/export/gguf.py writes MLP biases only)."""
    if "gguf" not in formats:
        return []
    problems = []
    if config.get("model_type") != "llama":
        problems.append(
            f"GGUF export supports llama checkpoints; {config_file} is {config.get('model_type')!r}: "
            "leave 'gguf' out of output.formats"
        )
    if config.get("attention_bias"):
        problems.append(
            f"GGUF export: {config_file} has attention_bias true (biases on q/k/v/o_proj, which the GGUF export "
            f"does not write); {fix}"
        )
    return problems


def tune_validation(spec: TuneSpec) -> EvalSpec:
    """The tune section's validation items as an eval section: only what the grid is ranked by (paired shift,
    perplexity and, when given, the replies' persona scores and repetition)."""
    return spec.validation.model_copy(update={"baselines": [], "statements": None})


def limit_problems(recipe: Recipe, config: dict[str, Any], prompt_tokens: int = 0) -> list[str]:
    """Lengths the model cannot take: positions beyond `max_position_embeddings` are undefined (or hang)."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return []
    problems = []
    context = f"the model's context of {limit} positions (max_position_embeddings)"
    greedy = recipe.verify.greedy_tokens
    if greedy + max(prompt_tokens, 1) > limit:  # before loading the prompts' length is unknown: at least 1
        room = f"the longest verification prompt takes {prompt_tokens} tokens, " if prompt_tokens else ""
        problems.append(
            f"verify.greedy_tokens: {greedy} tokens do not fit {context[:-1]}; {room}the prompt needs some); "
            f"use at most {max(limit - max(prompt_tokens, 64), 1)}"
        )
    for name, persona in recipe.personas.items():
        if persona.calibration.max_tokens > limit:
            problems.append(
                f"personas.{name}.calibration.max_tokens: {persona.calibration.max_tokens} is more than {context}; "
                f"use at most {limit}"
            )
    spec = recipe.eval
    if spec is not None and spec.max_tokens > limit:
        problems.append(f"eval.max_tokens: {spec.max_tokens} is more than {context}; use at most {limit}")
    if spec is not None and spec.neutral is not None and spec.neutral.window > limit:
        problems.append(f"eval.neutral.window: {spec.neutral.window} is more than {context}; use at most {limit}")
    if spec is not None and spec.replies is not None and spec.replies.max_new_tokens >= limit:
        problems.append(
            f"eval.replies.max_new_tokens: {spec.replies.max_new_tokens} replies do not fit {context}; "
            f"use at most {max(limit - 64, 1)}"
        )
    return problems


def check_limits(recipe: Recipe, config: dict[str, Any], prompt_tokens: int = 0) -> None:
    problems = limit_problems(recipe, config, prompt_tokens)
    if problems:
        raise RecipeError(
            f"{len(problems)} problem(s) with the model's limits:\n" + "\n".join(f"  {p}" for p in problems)
        )


def check_reuse(recipe: Recipe, reuse: Path) -> None:
    """`--reuse-stats RUN_DIR`: a folder; each statistics file of a persona in it must be readable."""
    from exporter.masking.stats import UNREADABLE, Statistics

    problem = folder_problem(reuse)
    if problem is not None:
        raise OutputError(f"--reuse-stats: {problem}; pass the --out folder of an earlier run")
    for name in recipe.personas:
        saved = reuse / "stats" / f"{name}.safetensors"
        if saved.exists() or saved.is_symlink():
            for path in (saved, saved.with_suffix(".json")):
                if (problem := file_problem(path)) is not None:
                    raise OutputError(f"--reuse-stats: {problem}; remove it, or run without --reuse-stats")
            try:
                Statistics.load(saved)
            except UNREADABLE as exc:
                raise OutputError(
                    f"--reuse-stats: {saved} cannot be read ({type(exc).__name__}: {exc}); delete it (and its "
                    ".json) to recalibrate that persona, or run without --reuse-stats"
                ) from None


PACKAGE = Path(exporter.__file__).resolve().parent  # the project's own code
SHIPPED = PACKAGE.parent / "recipes"  # the shipped recipes and their data, in a source checkout


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(recipe: Recipe, out: Path, overwrite: bool, product: Product) -> None:
    """Before any work: `out` can be written (check_target), is not inside what a run reads or ships (the model
    folder, the project's code, the shipped recipes/), and, when --overwrite would replace it, holds none of
    the recipe's inputs (they would go with it)."""
    check_target(out, overwrite, product)
    where = out.absolute().resolve()  # the folder the output would be, links in its parents followed
    inputs = {"the project's code": PACKAGE, "the shipped recipes/": SHIPPED}
    if recipe.model.path is not None:
        inputs["the model folder (model.path)"] = Path(recipe.model.path).resolve()
    for what, folder in inputs.items():
        if _within(where, folder):
            raise OutputError(
                f"--out {str(out)!r} is inside {what} ({folder}); outputs are kept apart from what a run reads "
                "and from the project's files: choose a folder elsewhere, e.g. runs/NAME"
            )
    if not out.exists():
        return
    held = {"model.path": Path(recipe.model.path)} if recipe.model.path is not None else {}
    for key, path in {**held, **data_files(recipe)}.items():
        if _within(Path(path).resolve(), where):
            raise OutputError(
                f"--out {str(out)!r} holds {key} ({path}); --overwrite would delete it with the old output: "
                "move the file out of that folder or choose another --out"
            )
