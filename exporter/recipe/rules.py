"""The recipe's rules that span fields (`semantic_problems`, one function per concern, every problem reported
with its key path) and what a model's context length allows (`limit_problems`). The schema itself, one field
at a time: exporter/recipe/schema.py; what the export formats need of a checkpoint: exporter/recipe/formats.py.
"""

from __future__ import annotations

import math
from typing import Any

from exporter.errors import RecipeError
from exporter.recipe.eval import eval_problems
from exporter.recipe.formats import FORMATS
from exporter.recipe.schema import (
    COMMIT_SHA,
    EMBEDDED_MODELS,
    SAFE_NAME,
    Recipe,
    infer_format,
    memory_bytes,
)


def semantic_problems(r: Recipe) -> list[str]:
    """Every problem of a schema-valid recipe, in the order of its sections."""
    paired = paired_personas(r)
    return [
        *model_problems(r),
        *persona_problems(r),
        *pair_problems(r),
        *contrastive_problems(r, paired),
        *mapping_problems(r),
        *steering_problems(r, paired),
        *prune_problems(r),
        *composite_problems(r),
        *output_persona_problems(r),
        *eval_section_problems(r),
        *format_list_problems(r),
    ]


def paired_personas(r: Recipe) -> dict[str, int]:
    """persona -> the index of the first pair that names it."""
    seen: dict[str, int] = {}
    for i, pair in enumerate(r.pairs):
        for name in pair:
            if name in r.personas:
                seen.setdefault(name, i)
    return seen


def model_problems(r: Recipe) -> list[str]:
    """One model source, pinned when it is on the Hub; a memory budget only where it can be kept."""
    problems: list[str] = []
    sources = [k for k in ("embedded", "path", "hub") if getattr(r.model, k) is not None]
    if len(sources) != 1:
        problems.append(
            f"model: give exactly one of 'embedded', 'path', 'hub' (got {sources or 'none'}); "
            f"e.g. 'embedded: {EMBEDDED_MODELS[0]}'"
        )
    if r.model.hub is not None and not COMMIT_SHA.fullmatch(r.model.hub.revision):
        problems.append(
            f"model.hub.revision: {r.model.hub.revision!r} is not a 40-character commit sha; pin the exact "
            "commit so that runs are reproducible"
        )
    if r.model.max_memory is None:
        return problems
    if memory_bytes(r.model.max_memory) is None:
        problems.append(
            f"model.max_memory: {r.model.max_memory!r} is not a size; write e.g. '8GiB', '500MB' or a byte count"
        )
    if r.model.embedded is not None:
        problems.append(
            "model.max_memory: the embedded model is a GGUF file and is loaded whole; a bounded-memory run "
            "needs a safetensors checkpoint (model.path or model.hub), or remove max_memory"
        )
    if r.eval is not None:
        problems.append(
            "model.max_memory: evaluation needs the whole model in memory; remove the eval section and run "
            "`persona-export eval RUN_DIR --recipe ...` where the model fits, or remove max_memory"
        )
    return problems


def persona_problems(r: Recipe) -> list[str]:
    """At least one persona, each a safe folder name (also on case-insensitive file systems); each pole's
    calibration data of a known format."""
    problems: list[str] = []
    if not r.personas:
        problems.append("personas: at least one persona is required")
    folded: dict[str, str] = {}
    for name in r.personas:
        if not SAFE_NAME.fullmatch(name):
            problems.append(
                f"personas.{name}: {name!r} is not a safe folder name; use letters, digits, '-' or '_' "
                "(at most 64 characters, starting with a letter or digit)"
            )
        elif (other := folded.setdefault(name.lower(), name)) != name:
            problems.append(
                f"personas.{name}: {name!r} and {other!r} differ only in case, so their folders would be one on "
                "case-insensitive file systems; rename one"
            )
    for name, p in r.poles.items():
        where = f"personas.{name}"
        cal = p.calibration
        fmt = cal.format or infer_format(cal.path)
        if fmt is None:
            problems.append(
                f"{where}.calibration.format: cannot infer the format of {cal.path!r}; "
                "set format to one of json, jsonl, csv, text"
            )
        elif fmt != "text" and cal.response_field is None:
            problems.append(f"{where}.calibration.response_field: required for {fmt} data")
        if fmt == "text" and cal.prompt_field is not None:
            problems.append(f"{where}.calibration.prompt_field: text data has no fields; remove it")
    return problems


def pair_problems(r: Recipe) -> list[str]:
    """Pairs of two known, different personas, each persona in one pair."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, (a, b) in enumerate(r.pairs):
        for name in (a, b):
            if name not in r.personas:
                problems.append(f"pairs.{i}: unknown persona {name!r}; known personas: {sorted(r.personas)}")
            elif name in seen and seen[name] != i:
                problems.append(f"pairs.{i}: persona {name!r} is already in pairs.{seen[name]}")
            seen.setdefault(name, i)
        if a == b:
            problems.append(f"pairs.{i}: a persona cannot oppose itself ({a!r})")
    return problems


def contrastive_problems(r: Recipe, paired: dict[str, int]) -> list[str]:
    """A contrastive score needs every persona's opposite."""
    if not r.method.contrastive:
        return []
    return [
        f"personas.{name}: method.score {r.method.score!r} needs every persona in an opposing "
        "pair; add it to 'pairs' or use 'wanda'/'sparse'"
        for name in r.poles
        if name not in paired
    ]


def per_persona_settings(r: Recipe) -> list[tuple[str, Any]]:
    """(key path, value) of every setting that may be given as a mapping per persona."""
    out: list[tuple[str, Any]] = [("method.steer", r.method.steer), ("method.steer_layers", r.method.steer_layers)]
    out += [("method.steer_vector", r.method.steer_vector)]
    out += [
        (f"prune.{k}.sparsity", u.sparsity) for k, u in (("mlp", r.prune.mlp), ("attention", r.prune.attention)) if u
    ]
    if r.tune is not None:
        out += [(f"tune.sparsity.{i}", v) for i, v in enumerate(r.tune.sparsity or [])]
        out += [(f"tune.steer.{i}", v) for i, v in enumerate(r.tune.steer)]
        out += [(f"tune.steer_layers.{i}", v) for i, v in enumerate(r.tune.steer_layers)]
    return out


def mapping_problems(r: Recipe) -> list[str]:
    """A mapping per persona names only the recipe's poles (a composite takes each part's own setting)."""
    problems = []
    for where, value in per_persona_settings(r):
        if isinstance(value, dict) and (unknown := sorted(set(value) - set(r.personas))):
            problems.append(f"{where}: unknown persona(s) {unknown}; known personas: {sorted(r.personas)}")
        if isinstance(value, dict) and (mixed := sorted(set(value) & set(r.composites))):
            problems.append(
                f"{where}: {mixed} are composites, which take each part's own setting; set it on their parts"
            )
    return problems


def steering_problems(r: Recipe, paired: dict[str, int]) -> list[str]:
    """Steering (method.steer and the tune grid's values) moves a persona away from its opposite: it needs one."""
    steers = [("method.steer", r.method)]
    steers += [
        (w, r.method.model_copy(update={"steer": v})) for w, v in per_persona_settings(r) if w.startswith("tune.steer.")
    ]
    return [
        f"personas.{name}: {where} steers toward a persona and away from its opposite; add {name!r} to "
        f"'pairs' or set its {where} to 0"
        for where, method in steers
        for name in r.poles
        if method.alpha(name) > 0 and name not in paired
    ]


def prune_problems(r: Recipe) -> list[str]:
    """Amplification needs a contrastive score; something changes."""
    problems = []
    units = {"mlp": r.prune.mlp, "attention": r.prune.attention}
    for kind, spec in units.items():
        if spec is not None and spec.amplify > 1 and not r.method.contrastive:
            problems.append(
                f"prune.{kind}.amplify: a persona's own units are those its partner's contrastive mask selects; "
                "use a contrastive-* method.score or set amplify to 1"
            )
    if r.prune.mlp is None and r.prune.attention is None:
        problems.append("prune: name at least one unit kind to prune ('mlp' and/or 'attention')")
    elif not r.method.steers and not any(p.prunes for p in (r.prune.mlp, r.prune.attention) if p is not None):
        problems.append(
            "prune: every sparsity is 0 and method.steer is 0, so each persona export would be the unpruned "
            "model; give 'prune.mlp.sparsity' (or attention) a value above 0, or set method.steer"
        )
    return problems


def composite_problems(r: Recipe) -> list[str]:
    """Every problem of the recipe's composites, with key paths: unknown parts, composites of composites, parts
    without a pair, non-positive weights, both poles of one pair, composites in `pairs`, settings that a
    composite cannot take."""
    problems: list[str] = []
    poles, composites = r.poles, r.composites
    pair_of = {name: i for i, pair in enumerate(r.pairs) for name in pair}
    for i, pair in enumerate(r.pairs):
        problems += [
            f"pairs.{i}: {name!r} is a composite (personas.{name}.mix); a pair opposes two personas calibrated on "
            "their own data"
            for name in pair
            if name in composites
        ]
    for name, spec in composites.items():
        where = f"personas.{name}.mix"
        if not spec.mix:
            problems.append(f"{where}: name at least one persona to mix, e.g. {{introvert: 1, thinking: 1}}")
        for part, weight in spec.mix.items():
            if part in composites:
                inner = ", ".join(f"{p}: {w:g}" for p, w in composites[part].mix.items())
                problems.append(
                    f"{where}.{part}: {part!r} is itself a composite; mix poles only (e.g. its parts {{{inner}}})"
                )
            elif part not in poles:
                problems.append(f"{where}.{part}: unknown persona {part!r}; known personas: {sorted(poles)}")
            elif part not in pair_of:
                problems.append(
                    f"{where}.{part}: {part!r} is in no pair; a part's units are scored and its steering taken "
                    "against its opposite pole: add it to 'pairs'"
                )
            if not (math.isfinite(weight) and weight > 0):
                problems.append(
                    f"{where}.{part}: the weight {weight!r} is not a positive number; give e.g. 1 (as much removal "
                    f"and steering as the {part} export alone) or 0.5 (half)"
                )
        by_pair: dict[int, list[str]] = {}
        for part in spec.mix:
            if part in pair_of and part in poles:
                by_pair.setdefault(pair_of[part], []).append(part)
        for i, both in sorted(by_pair.items()):
            if len(both) > 1:
                problems.append(
                    f"{where}: names {both[0]!r} and {both[1]!r}, the two poles of pairs.{i}; their steering "
                    "cancels and each removes the units the other keeps: keep one of them"
                )
    if composites:
        units = {"mlp": r.prune.mlp, "attention": r.prune.attention}
        problems += [
            f"prune.{kind}.amplify: a composite has no opposite whose mask names its own units to amplify; set "
            f"amplify to 1, or remove the composites ({sorted(composites)})"
            for kind, spec in units.items()
            if spec is not None and spec.amplify > 1
        ]
        if r.tune is not None and any(a > 1 for a in r.tune.amplify):
            problems.append(
                "tune.amplify: a composite has no opposite whose mask names its own units to amplify; keep the "
                "values at 1, or remove the composites"
            )
    if r.tune is not None and r.tune.mix_scale is not None and not tuned_composites(r):
        problems.append(
            "tune.mix_scale: scales composite personas' weights, but the run exports none"
            + (" (output.personas)" if composites else "")
            + "; declare one (e.g. personas.IT: {mix: {introvert: 1, thinking: 1}}) and export it, or remove "
            "tune.mix_scale"
        )
    if r.tune is not None and r.tune.mix_scale is not None and r.tune.validation.replies is not None:
        tuned = tuned_composites(r)
        problems += [mirror_problem(r, name) for name in tuned if r.opposite(name) not in tuned]
    return problems


def mirror_problem(r: Recipe, name: str) -> str:
    """tune's repetition bound reads a composite's replies beside its mirror's (the reply gap needs both)."""
    mirror = r.opposite(name)
    head = f"tune.validation.replies: {name}'s replies are told apart from its mirror's (each part's opposite pole)"
    if mirror is None:
        parts = ", ".join(f"{r.partner(p)}: {w:g}" for p, w in r.composites[name].mix.items())
        return (
            f"{head}, and the recipe declares none: declare one (mix: {{{parts}}}), or remove tune.validation.replies"
        )
    return f"{head}, {mirror}, which the run does not export: add {mirror} to output.personas, or remove " + (
        "tune.validation.replies"
    )


def tuned_composites(r: Recipe) -> list[str]:
    """The composites `tune.mix_scale` scores: those the run exports."""
    return [name for name in r.exported if name in r.composites]


def output_persona_problems(r: Recipe) -> list[str]:
    """output.personas names known personas, each once, and at least one."""
    if r.output.personas is None:
        return []
    problems = []
    if not r.output.personas:
        problems.append("output.personas: an empty list exports nothing; name personas, or remove the key (all)")
    for i, name in enumerate(r.output.personas):
        if name not in r.personas:
            problems.append(f"output.personas.{i}: unknown persona {name!r}; known personas: {list(r.personas)}")
        elif r.output.personas.index(name) != i:
            problems.append(f"output.personas.{i}: {name!r} is already listed")
    return problems


def eval_section_problems(r: Recipe) -> list[str]:
    """The eval section's cross-references (so that validate and run refuse the same), and those of the tune
    section's validation items, an eval section of their own."""
    problems = eval_problems(r.eval, list(r.personas)) if r.eval is not None else []
    if r.tune is not None:
        problems += [
            p.replace("eval", "tune.validation", 1) for p in eval_problems(r.tune.validation, list(r.personas))
        ]
    return problems


def format_list_problems(r: Recipe) -> list[str]:
    """Each format once, with the format it is made from; the checkpoint always."""
    formats = r.output.formats
    problems = []
    if len(set(formats)) != len(formats):
        problems.append(f"output.formats: duplicates in {formats}")
    for name in formats:
        source = FORMATS[name].source
        if source is not None and source != "hf" and source not in formats:
            made = "quantized" if FORMATS[name].quantization else "made"
            problems.append(f"output.formats: {name!r} is {made} from the {source!r} export; add {source!r}")
    if "hf" not in formats:
        problems.append("output.formats: 'hf' is required (every other format is made from it)")
    return problems


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
    for name, persona in recipe.poles.items():
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
