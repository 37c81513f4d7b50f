"""Recipes: YAML read with `safe_load`, validated into frozen models that reject unknown keys.

Every problem in a recipe is reported at once, each with its key path (`personas.introvert.calibration.path`).
Relative paths are resolved against the recipe file's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exporter.errors import RecipeError
from exporter.inputs import DuplicateKeyError, file_problem, load_yaml
from exporter.recipe.eval import EvalSpec, eval_problems
from exporter.recipe.push import PushSpec

# used with fullmatch: `$` would also accept a trailing newline
SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
EMBEDDED_MODELS = ("smollm2-135m-instruct",)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(Strict):
    repo_id: str
    revision: str


class ModelSpec(Strict):
    """Exactly one of `embedded`, `path`, `hub`."""

    embedded: Literal["smollm2-135m-instruct"] | None = None
    path: str | None = None
    hub: HubSource | None = None
    trust_remote_code: bool = False
    # a CPU memory budget ("8GiB", "500MB" or bytes): the model is loaded with accelerate's device_map="auto"
    # within it, the rest offloaded to disk; calibration, scoring, pruning and the float64 proof then read the
    # checkpoint layer by layer and shard by shard (bounded-memory run; needs a safetensors source)
    max_memory: str | int | None = None


class DataSpec(Strict):
    path: str
    format: Literal["json", "jsonl", "csv", "text"] | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    chat_template: bool = True
    system_prompt: str | None = None
    max_samples: Annotated[int, Field(ge=1)]
    max_tokens: Annotated[int, Field(ge=8)] = 256
    seed: int = 0


class PersonaSpec(Strict):
    description: str
    calibration: DataSpec


class MethodSpec(Strict):
    score: Literal["wanda", "sparse", "contrastive-wanda", "contrastive-sparse"]
    phi: Literal["softplus", "relu"] = "softplus"
    tau: Annotated[float, Field(gt=0.0)] = 0.25
    damping: Annotated[float, Field(ge=0.0)] = 0.01
    eps: Annotated[float, Field(gt=0.0)] = 1e-6
    # alpha of the persona steering bias baked into down_proj biases (exporter/masking/steer.py); 0 = none
    steer: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0

    @property
    def contrastive(self) -> bool:
        return self.score.startswith("contrastive-")


class MlpPrune(Strict):
    sparsity: Fraction
    round_to: Annotated[int, Field(ge=1)] = 1
    # removed neurons' mean output kept as a down_proj bias (FLAP): mean over both personas' data or the own
    compensate: Literal["none", "personas", "persona"] = "none"
    # soft mask (the paper's Eq. 7): the selected neurons are kept, their down_proj columns scaled by gamma
    # (0 = removal); amplify > 1 scales the persona's own neurons (those its partner's mask selects)
    gamma: Fraction = 0.0
    amplify: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0


class AttentionPrune(Strict):
    unit: Literal["kv-group", "query-head"]
    sparsity: Fraction
    gamma: Fraction = 0.0  # as for MLP neurons, on the o_proj columns of the selected heads
    amplify: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0


class PruneSpec(Strict):
    mlp: MlpPrune | None = None
    attention: AttentionPrune | None = None


class CalibrationSpec(Strict):
    batch_size: Annotated[int, Field(ge=1)] = 8
    tokens: Literal["response", "all"] = "response"
    layerwise: bool = False  # one decoder layer in memory at a time, weights read from the safetensors shards


class OutputSpec(Strict):
    formats: list[Literal["hf", "onnx", "onnx-int8"]] = ["hf"]
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # auto: the source checkpoint's

    def resolved(self, source_dtype: str | None) -> OutputSpec:
        """`auto` replaced by the source's dtype (float32 when the source names none or another one)."""
        if self.dtype != "auto":
            return self
        known = ("float32", "bfloat16", "float16")
        return self.model_copy(update={"dtype": source_dtype if source_dtype in known else "float32"})


class VerifySpec(Strict):
    prompts: list[str] | None = None
    fp64_max_abs: Annotated[float, Field(gt=0.0)] = 1e-6
    greedy_tokens: Annotated[int, Field(ge=1)] = 32
    onnx_max_abs: Annotated[float, Field(gt=0.0)] = 1e-2
    onnx_mean_abs: Annotated[float, Field(gt=0.0)] = 1e-3
    # prove float64 parity one decoder layer at a time (no float64 copy of the whole model; needs a
    # safetensors source); the end-to-end fp32 check still runs
    layerwise: bool = False


class TuneSpec(Strict):
    """`persona-export tune`: a grid searched on the `validation` items; the best setting is then reported on
    the recipe's `eval` items, which no choice looked at. Best = the largest paired shift of the weaker persona
    with every persona's neutral perplexity at most `max_perplexity_ratio` x dense (and, by default, some units
    removed)."""

    sparsity: Annotated[list[Fraction], Field(min_length=1)]  # MLP sparsities
    steer: Annotated[list[Annotated[float, Field(ge=0.0, le=10.0)]], Field(min_length=1)] = [0.0]
    compensate: Annotated[list[Literal["none", "personas", "persona"]], Field(min_length=1)] = ["none"]
    gamma: Annotated[list[Fraction], Field(min_length=1)] = [0.0]  # MLP soft-mask factors (0 = removal)
    amplify: Annotated[list[Annotated[float, Field(ge=1.0, le=4.0)]], Field(min_length=1)] = [1.0]
    max_perplexity_ratio: Annotated[float, Field(gt=1.0)] = 1.15
    # only points that remove units can be chosen (the point of a persona export is a smaller model); points
    # with sparsity 0 or gamma > 0 are still scored, as references of the Pareto plot
    require_removal: bool = True
    validation: EvalSpec


class Recipe(Strict):
    name: str
    model: ModelSpec
    personas: dict[str, PersonaSpec]
    pairs: list[tuple[str, str]] = []
    method: MethodSpec
    prune: PruneSpec
    calibration: CalibrationSpec = CalibrationSpec()
    output: OutputSpec = OutputSpec()
    verify: VerifySpec = VerifySpec()
    eval: EvalSpec | None = None
    push: PushSpec | None = None
    tune: TuneSpec | None = None

    def partner(self, persona: str) -> str | None:
        for a, b in self.pairs:
            if persona == a:
                return b
            if persona == b:
                return a
        return None

    def digest(self) -> str:
        """sha256 of the validated recipe (paths already resolved), stable across key order."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<top level>"


def _semantic_problems(r: Recipe) -> list[str]:
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
    if r.model.max_memory is not None:
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
    if r.method.contrastive:
        for name in r.personas:
            if name not in seen:
                problems.append(
                    f"personas.{name}: method.score {r.method.score!r} needs every persona in an opposing "
                    "pair; add it to 'pairs' or use 'wanda'/'sparse'"
                )
    if r.method.steer > 0:
        for name in r.personas:
            if name not in seen:
                problems.append(
                    f"personas.{name}: method.steer steers toward a persona and away from its opposite; add "
                    f"{name!r} to 'pairs' or set method.steer to 0"
                )
    units = {"mlp": r.prune.mlp, "attention": r.prune.attention}
    for kind, spec in units.items():
        if spec is not None and spec.amplify > 1 and not r.method.contrastive:
            problems.append(
                f"prune.{kind}.amplify: a persona's own units are those its partner's contrastive mask selects; "
                "use a contrastive-* method.score or set amplify to 1"
            )
    soft = any(s is not None and (s.gamma > 0 or s.amplify > 1) for s in units.values())
    if (r.method.steer > 0 or soft or (r.prune.mlp is not None and r.prune.mlp.compensate != "none")) and (
        r.model.max_memory is not None
    ):
        problems.append(
            "model.max_memory: method.steer, prune.*.gamma, prune.*.amplify and prune.mlp.compensate need the "
            "whole model in memory; remove max_memory or set them to their defaults"
        )
    if r.prune.mlp is None and r.prune.attention is None:
        problems.append("prune: name at least one unit kind to prune ('mlp' and/or 'attention')")
    elif r.method.steer == 0 and all(p.sparsity == 0 for p in (r.prune.mlp, r.prune.attention) if p is not None):
        problems.append(
            "prune: every sparsity is 0 and method.steer is 0, so each persona export would be the unpruned "
            "model; give 'prune.mlp.sparsity' (or attention) a value above 0, or set method.steer"
        )
    if r.eval is not None:  # the eval section's cross-references, so that validate and run refuse the same
        problems += eval_problems(r.eval, list(r.personas))
    if r.tune is not None:  # the validation items are an eval section of their own
        problems += [
            p.replace("eval", "tune.validation", 1) for p in eval_problems(r.tune.validation, list(r.personas))
        ]
    if len(set(r.output.formats)) != len(r.output.formats):
        problems.append(f"output.formats: duplicates in {r.output.formats}")
    if "onnx-int8" in r.output.formats and "onnx" not in r.output.formats:
        problems.append("output.formats: 'onnx-int8' is quantized from the fp32 ONNX export; add 'onnx'")
    if "hf" not in r.output.formats:
        problems.append("output.formats: 'hf' is required (every other format is made from it)")
    return problems


def memory_bytes(size: str | int) -> int | None:
    """A size as accelerate reads it ("8GiB", "500MB", bytes), or None if it is not one."""
    from accelerate.utils import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def infer_format(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "text", ".md": "text"}.get(suffix)


def override_value(item: str, raw: str) -> Any:
    """An override's value, read as YAML data (no tags, no duplicate keys); errors name the override."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(
            f"override {item!r}: the value is not valid YAML ({problem}); quote it if it is text "
            "(e.g. name='a: b'), or close its brackets (e.g. prune.mlp.sparsity=0.1, pairs=[[a, b]])"
        ) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides; values are parsed as YAML data (never with tags)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise RecipeError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. prune.mlp.sparsity=0.1")
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not inside a mapping")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: the parent of {parts[-1]!r} is not a mapping")
        node[parts[-1]] = override_value(item, raw)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def fix(p: Any) -> Any:
        return str((base / p).resolve()) if isinstance(p, str) and not Path(p).is_absolute() else p

    model = data.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = fix(model["path"])
    personas = data.get("personas")
    if isinstance(personas, dict):
        for spec in personas.values():
            cal = spec.get("calibration") if isinstance(spec, dict) else None
            if isinstance(cal, dict) and "path" in cal:
                cal["path"] = fix(cal["path"])
    tune = data.get("tune")
    for ev in (data.get("eval"), tune.get("validation") if isinstance(tune, dict) else None):
        if not isinstance(ev, dict):
            continue
        sections = [ev.get(k) for k in ("paired", "statements", "neutral", "replies")]
        paired = ev.get("paired")
        if isinstance(paired, dict) and isinstance(paired.get("responses"), dict):
            sections += list(paired["responses"].values())
        for section in sections:
            if isinstance(section, dict) and "path" in section:
                section["path"] = fix(section["path"])


_EXPECTED = {  # pydantic error type -> what the key needs, in the recipe's words
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "int_type": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "dict_type": "a mapping (key: value lines)",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "list_type": "a list ([a, b] or '- ' lines)",
    "tuple_type": "a list ([a, b] or '- ' lines)",
}


def _schema_message(err: Any) -> str:
    """One schema problem: unknown, missing, null, or of the wrong type, with what is expected."""
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (misspelled? remove it or check the recipe reference in README.md)"
    if kind == "missing":
        return "required key is missing"
    if value is None:
        return "the key is present but has no value (null); give it a value, or remove the key if it is optional"
    if kind in _EXPECTED:
        hint = ""
        if kind.startswith("int") and isinstance(value, str | float):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number == int(number) and abs(number) < 1e9:
                hint = f"; write it in plain digits: {int(number)}"
            elif isinstance(value, str) and math.isfinite(number):
                hint = f"; write a whole number in plain digits (e.g. 96): YAML reads {value} as text, not a number"
        return f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}{hint}"
    return f"{err['msg']} (got {value!r})"


def parse_recipe(data: Any, base: Path, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping at the top level, got {type(data).__name__}")
    _resolve_paths(data, base)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            lines.append(f"  {_loc(err['loc'])}: {_schema_message(err)}")
        raise RecipeError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    problems = _semantic_problems(recipe)
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise RecipeError(f"recipe {problem}; pass the path of a YAML recipe (see recipes/)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8-sig"))
    except DuplicateKeyError as exc:
        lines = "\n".join(f"  {p}" for p in exc.problems)
        raise RecipeError(f"{path}: {len(exc.problems)} problem(s):\n{lines}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe {path} ({exc.strerror})") from None
    if isinstance(data, dict):
        data = apply_overrides(data, overrides or [])
    return parse_recipe(data, path.parent.resolve(), source=str(path))
