"""The recipe's typed schema: frozen models that reject unknown keys, and the rules that span fields
(`semantic_problems`). Reading YAML, overrides and relative paths: exporter/recipe/load.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from exporter.recipe.eval import EvalSpec, Seed, eval_problems
from exporter.recipe.push import PushSpec

# used with fullmatch: `$` would also accept a trailing newline
SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
EMBEDDED_MODELS = ("smollm2-135m-instruct",)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


T = TypeVar("T")


def per_persona(value: T | dict[str, T], persona: str, default: T) -> T:
    """A setting given once for every persona, or as a mapping per persona (a persona left out: `default`)."""
    return value.get(persona, default) if isinstance(value, dict) else value


def values(value: T | dict[str, T]) -> list[T]:
    return list(value.values()) if isinstance(value, dict) else [value]


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
    seed: Seed = 0


class PersonaSpec(Strict):
    description: str
    calibration: DataSpec


Alpha = Annotated[float, Field(ge=0.0, le=10.0)]


def steered_layers(n_layers: int, fraction: float) -> int:
    """How many of the first layers carry a steering bias (`method.steer_layers`; at least one)."""
    return max(1, round(fraction * n_layers))


Depth = Annotated[float, Field(gt=0.0, le=1.0)]
SteerVector = Literal["mlp", "residual"]


class MethodSpec(Strict):
    score: Literal["wanda", "sparse", "contrastive-wanda", "contrastive-sparse"]
    phi: Literal["softplus", "relu"] = "softplus"
    tau: Annotated[float, Field(gt=0.0)] = 0.25
    damping: Annotated[float, Field(ge=0.0)] = 0.01
    eps: Annotated[float, Field(gt=0.0)] = 1e-6
    # alpha of the persona steering bias baked into down_proj biases (exporter/masking/steer.py); 0 = none.
    # One value for every persona, or one per persona ({introvert: 1.5, extravert: 1.0}; a persona left out: 0)
    steer: Alpha | dict[str, Alpha] = 0.0
    # the first fraction of the decoder layers that carry the steering bias (1 = every layer); the last layers'
    # share moves the persona least per unit of perplexity and makes replies repeat themselves most
    steer_layers: Depth | dict[str, Depth] = 1.0  # as steer: one value, or one per persona (left out: 1)
    # what the steering bias is: "mlp", each steered layer's mean MLP-output difference added in that layer;
    # "residual", the mean residual-stream difference after the last steered layer, added there once (what the
    # first `steer_layers` of the layers build up, without steering any layer after them)
    steer_vector: SteerVector | dict[str, SteerVector] = "mlp"  # one value, or one per persona (left out: mlp)

    @property
    def contrastive(self) -> bool:
        return self.score.startswith("contrastive-")

    def alpha(self, persona: str) -> float:
        return per_persona(self.steer, persona, 0.0)

    def depth(self, persona: str) -> float:
        """The fraction of the first layers that carry `persona`'s steering bias."""
        return per_persona(self.steer_layers, persona, 1.0)

    def vector(self, persona: str) -> SteerVector:
        default: SteerVector = "mlp"
        return per_persona(self.steer_vector, persona, default)

    @property
    def steers(self) -> bool:
        return any(a > 0 for a in values(self.steer))


class Units(Strict):
    # the fraction of the units of every layer that a persona's mask selects: one value, or one per persona
    # ({introvert: 0.01, extravert: 0.02}; a persona left out: 0, it removes none of these units)
    sparsity: Fraction | dict[str, Fraction]

    def fraction(self, persona: str) -> float:
        return per_persona(self.sparsity, persona, 0.0)

    @property
    def prunes(self) -> bool:
        """Whether some persona's mask selects some of these units."""
        return any(s > 0 for s in values(self.sparsity))


class MlpPrune(Units):
    round_to: Annotated[int, Field(ge=1)] = 1
    # removed neurons' mean output kept as a down_proj bias (FLAP): mean over both personas' data or the own
    compensate: Literal["none", "personas", "persona"] = "none"
    # soft mask (the paper's Eq. 7): the selected neurons are kept, their down_proj columns scaled by gamma
    # (0 = removal); amplify > 1 scales the persona's own neurons (those its partner's mask selects)
    gamma: Fraction = 0.0
    amplify: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0


class AttentionPrune(Units):
    unit: Literal["kv-group", "query-head"]
    gamma: Fraction = 0.0  # as for MLP neurons, on the o_proj columns of the selected heads
    amplify: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0


class PruneSpec(Strict):
    mlp: MlpPrune | None = None
    attention: AttentionPrune | None = None


def mlp_biases(method: MethodSpec, prune: PruneSpec) -> bool:
    """Whether the exports carry down_proj biases: a steering bias or bias compensation."""
    return method.steers or (prune.mlp is not None and prune.mlp.compensate != "none")


class CalibrationSpec(Strict):
    batch_size: Annotated[int, Field(ge=1)] = 8
    tokens: Literal["response", "all"] = "response"
    layerwise: bool = False  # one decoder layer in memory at a time, weights read from the safetensors shards


class OutputSpec(Strict):
    formats: list[Literal["hf", "onnx", "onnx-int8", "onnx-int4", "gguf", "onnx-genai"]] = ["hf"]
    # onnx-genai: the weights' precision in onnxruntime-genai's builder (int4 / int8 MatMulNBits, or fp32)
    genai_precision: Literal["int4", "int8", "fp32"] = "int4"
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

    @property
    def onnx_thresholds(self) -> dict[str, float]:
        """The ONNX export's bounds on |logit difference| from the masked reference (fp32)."""
        return {"max_abs_logit_diff": self.onnx_max_abs, "mean_abs_logit_diff": self.onnx_mean_abs}


MAX_TUNE_POINTS = 1000


class TuneSpec(Strict):
    """`persona-export tune`: a grid searched on the `validation` items; the best setting is then reported on
    the recipe's `eval` items, which no choice looked at. Best = the largest paired shift of the weaker persona
    with every persona's neutral perplexity at most `max_perplexity_ratio` x dense (and, by default, some units
    removed)."""

    sparsity: Annotated[list[Fraction | dict[str, Fraction]], Field(min_length=1)]  # MLP sparsities, as prune.mlp
    steer: Annotated[list[Alpha | dict[str, Alpha]], Field(min_length=1)] = [0.0]  # as method.steer
    steer_layers: Annotated[list[Depth | dict[str, Depth]], Field(min_length=1)] = [1.0]
    # also let each persona take its own best sparsity, steering alpha and steered layers among points that
    # differ only in those (`sparsity`, `steer` and `steer_layers` then mappings per persona)
    # (recipes and run folders of earlier releases call it steer_per_persona)
    per_persona: bool = Field(False, validation_alias=AliasChoices("per_persona", "steer_per_persona"))
    compensate: Annotated[list[Literal["none", "personas", "persona"]], Field(min_length=1)] = ["none"]
    gamma: Annotated[list[Fraction], Field(min_length=1)] = [0.0]  # MLP soft-mask factors (0 = removal)
    amplify: Annotated[list[Annotated[float, Field(ge=1.0, le=4.0)]], Field(min_length=1)] = [1.0]
    max_perplexity_ratio: Annotated[float, Field(gt=1.0)] = 1.15
    # only points that remove units can be chosen (the point of a persona export is a smaller model); points
    # with sparsity 0 or gamma > 0 are still scored, as references of the Pareto plot
    require_removal: bool = True
    validation: EvalSpec

    @model_validator(mode="after")
    def _bounded(self) -> TuneSpec:
        axes = (self.sparsity, self.steer, self.steer_layers, self.compensate, self.gamma, self.amplify)
        points = math.prod(len(axis) for axis in axes)
        if points > MAX_TUNE_POINTS:
            raise ValueError(
                f"the grid has {points} points (the product of its lists' lengths); each is evaluated, so at most "
                f"{MAX_TUNE_POINTS}: shorten the lists"
            )
        return self


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
        """The recipe's hash: exporter/recipe/paths.py `recipe_sha256` says what it covers."""
        from exporter.recipe.paths import recipe_sha256

        return recipe_sha256(self)


def semantic_problems(r: Recipe) -> list[str]:
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
    mappings: list[tuple[str, Any]] = [("method.steer", r.method.steer), ("method.steer_layers", r.method.steer_layers)]
    mappings += [("method.steer_vector", r.method.steer_vector)]
    mappings += [
        (f"prune.{k}.sparsity", u.sparsity) for k, u in (("mlp", r.prune.mlp), ("attention", r.prune.attention)) if u
    ]
    if r.tune is not None:
        mappings += [(f"tune.sparsity.{i}", v) for i, v in enumerate(r.tune.sparsity)]
        mappings += [(f"tune.steer.{i}", v) for i, v in enumerate(r.tune.steer)]
        mappings += [(f"tune.steer_layers.{i}", v) for i, v in enumerate(r.tune.steer_layers)]
    for where, value in mappings:
        if isinstance(value, dict) and (unknown := sorted(set(value) - set(r.personas))):
            problems.append(f"{where}: unknown persona(s) {unknown}; known personas: {sorted(r.personas)}")
    steers = [("method.steer", r.method)]
    steers += [(w, r.method.model_copy(update={"steer": v})) for w, v in mappings if w.startswith("tune.steer.")]
    for where, method in steers:
        problems += [
            f"personas.{name}: {where} steers toward a persona and away from its opposite; add {name!r} to "
            f"'pairs' or set its {where} to 0"
            for name in r.personas
            if method.alpha(name) > 0 and name not in seen
        ]
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
    if r.eval is not None:  # the eval section's cross-references, so that validate and run refuse the same
        problems += eval_problems(r.eval, list(r.personas))
    if r.tune is not None:  # the validation items are an eval section of their own
        problems += [
            p.replace("eval", "tune.validation", 1) for p in eval_problems(r.tune.validation, list(r.personas))
        ]
    if len(set(r.output.formats)) != len(r.output.formats):
        problems.append(f"output.formats: duplicates in {r.output.formats}")
    for quantized in ("onnx-int8", "onnx-int4"):
        if quantized in r.output.formats and "onnx" not in r.output.formats:
            problems.append(f"output.formats: {quantized!r} is quantized from the fp32 ONNX export; add 'onnx'")
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
