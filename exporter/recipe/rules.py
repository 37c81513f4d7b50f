"""The recipe's rules that span fields (`semantic_problems`, one function per concern, every problem reported
with its key path) and what a model's context length allows (`limit_problems`). The schema itself, one field
at a time: exporter/recipe/schema.py; what the export formats need of a checkpoint: exporter/recipe/formats.py.
"""

from __future__ import annotations

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
    mlp_biases,
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
    """At least one persona, each a safe folder name with calibration data whose format is known."""
    problems: list[str] = []
    if not r.personas:
        problems.append("personas: at least one persona is required")
    for name, p in r.personas.items():
        where = f"personas.{name}"
        if not SAFE_NAME.fullmatch(name):
            problems.append(
                f"{where}: {name!r} is not a safe folder name; use lowercase letters, digits, '-' or '_' "
                "(at most 64 characters, starting with a letter or digit)"
            )
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
        for name in r.personas
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
        out += [(f"tune.sparsity.{i}", v) for i, v in enumerate(r.tune.sparsity)]
        out += [(f"tune.steer.{i}", v) for i, v in enumerate(r.tune.steer)]
        out += [(f"tune.steer_layers.{i}", v) for i, v in enumerate(r.tune.steer_layers)]
    return out


def mapping_problems(r: Recipe) -> list[str]:
    """A mapping per persona names only the recipe's personas."""
    problems = []
    for where, value in per_persona_settings(r):
        if isinstance(value, dict) and (unknown := sorted(set(value) - set(r.personas))):
            problems.append(f"{where}: unknown persona(s) {unknown}; known personas: {sorted(r.personas)}")
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
        for name in r.personas
        if method.alpha(name) > 0 and name not in paired
    ]


def prune_problems(r: Recipe) -> list[str]:
    """Amplification needs a contrastive score; soft masks and biases need the whole model; something changes."""
    problems = []
    units = {"mlp": r.prune.mlp, "attention": r.prune.attention}
    for kind, spec in units.items():
        if spec is not None and spec.amplify > 1 and not r.method.contrastive:
            problems.append(
                f"prune.{kind}.amplify: a persona's own units are those its partner's contrastive mask selects; "
                "use a contrastive-* method.score or set amplify to 1"
            )
    soft = any(s is not None and (s.gamma > 0 or s.amplify > 1) for s in units.values())
    if (soft or mlp_biases(r.method, r.prune)) and (r.model.max_memory is not None):
        problems.append(
            "model.max_memory: method.steer, prune.*.gamma, prune.*.amplify and prune.mlp.compensate need the "
            "whole model in memory; remove max_memory or set them to their defaults"
        )
    if r.prune.mlp is None and r.prune.attention is None:
        problems.append("prune: name at least one unit kind to prune ('mlp' and/or 'attention')")
    elif not r.method.steers and not any(p.prunes for p in (r.prune.mlp, r.prune.attention) if p is not None):
        problems.append(
            "prune: every sparsity is 0 and method.steer is 0, so each persona export would be the unpruned "
            "model; give 'prune.mlp.sparsity' (or attention) a value above 0, or set method.steer"
        )
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
