"""The recipe's typed schema: frozen models that reject unknown keys. The rules that span fields:
exporter/recipe/rules.py; reading YAML, overrides and relative paths: exporter/recipe/load.py; composite personas
(`personas.<name>.mix`): exporter/recipe/composites.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from exporter.recipe.composites import MixSpec, mix_description
from exporter.recipe.eval import EvalSpec, Seed
from exporter.recipe.formats import FormatName, Q4Activations
from exporter.recipe.generation import GenerationSpec
from exporter.recipe.push import PushSpec

# used with fullmatch: `$` would also accept a trailing newline
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
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
    """A pole: a persona calibrated on its own data."""

    description: str
    calibration: DataSpec


def _persona_kind(value: Any) -> str:
    """Which kind of persona a recipe entry is: a composite names `mix`, anything else is read as a pole."""
    if isinstance(value, dict):
        return "composite" if "mix" in value else "pole"
    return "composite" if isinstance(value, MixSpec) else "pole"


# the tags name the branch in pydantic's error locations; exporter/recipe/load.py leaves them out
PERSONA_KINDS = ("pole", "composite")
AnyPersona = Annotated[
    Annotated[PersonaSpec, Tag("pole")] | Annotated[MixSpec, Tag("composite")], Discriminator(_persona_kind)
]


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
    # each pair's steering vector made orthogonal, per layer, to the other pairs' directions of the same kind
    # (exporter/masking/axes.py), so that steering one axis does not move the others along theirs; with one
    # pair nothing changes
    steer_orthogonal: bool = False

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

    def with_sparsity(self, unit: str, sparsity: float | dict[str, float]) -> PruneSpec:
        """This prune section with the MLP (`unit` "mlp") or attention sparsity replaced (sweep, tune)."""
        if unit == "mlp":
            mlp = self.mlp.model_copy(update={"sparsity": sparsity}) if self.mlp else MlpPrune(sparsity=sparsity)
            return self.model_copy(update={"mlp": mlp})
        kind = self.attention.unit if self.attention else "kv-group"
        return self.model_copy(update={"attention": AttentionPrune(unit=kind, sparsity=sparsity)})


def mlp_biases(method: MethodSpec, prune: PruneSpec) -> bool:
    """Whether the exports carry down_proj biases: a steering bias or bias compensation."""
    return method.steers or (prune.mlp is not None and prune.mlp.compensate != "none")


class CalibrationSpec(Strict):
    batch_size: Annotated[int, Field(ge=1)] = 8
    tokens: Literal["response", "all"] = "response"
    layerwise: bool = False  # one decoder layer in memory at a time, weights read from the safetensors shards


class OutputSpec(Strict):
    formats: list[FormatName] = ["hf"]  # exporter/recipe/formats.py
    # onnx-genai: the weights' precision in onnxruntime-genai's builder (int4 / int8 MatMulNBits, or fp32)
    genai_precision: Literal["int4", "int8", "fp32"] = "int4"
    # onnx-q4: activations inside MatMulNBits. int8: rounded per block in the kernel, as llama.cpp does (fastest;
    # measured against the 4-bit floor); fp32: computes what the checkpoint computes, a parity target when every
    # matrix keeps exact blocks (about 1.5 x the int8 time per token on SmolLM2)
    q4_activations: Q4Activations = "int8"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"  # auto: the source checkpoint's
    # decoding defaults written into every format (exporter/recipe/generation.py); default plain greedy
    generation: GenerationSpec = GenerationSpec()
    # the personas a run exports (default: all); the others are still calibrated and masked when an exported
    # composite mixes them
    personas: list[str] | None = None

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
# the tune grid's lists of pole settings (tune.mix_scale keeps the recipe's instead)
POLE_AXES = ("sparsity", "steer", "steer_layers", "steer_vector", "compensate", "gamma", "amplify")


class TuneSpec(Strict):
    """`persona-export tune`: a grid searched on the `validation` items; the best setting is then reported on
    the recipe's `eval` items, which no choice looked at. Best = the largest shift of the weaker persona
    with every persona's neutral perplexity at most `max_perplexity_ratio` x dense (and, by default, some units
    removed)."""

    # MLP sparsities, as prune.mlp (required unless mix_scale is given)
    sparsity: Annotated[list[Fraction | dict[str, Fraction]], Field(min_length=1)] | None = None
    steer: Annotated[list[Alpha | dict[str, Alpha]], Field(min_length=1)] = [0.0]  # as method.steer
    steer_layers: Annotated[list[Depth | dict[str, Depth]], Field(min_length=1)] = [1.0]
    # the steering vector kinds searched (as method.steer_vector): mlp (the mean MLP-output difference in each
    # steered layer) and / or residual (the mean residual-stream difference after the last steered layer);
    # unset: the recipe's method.steer_vector
    steer_vector: Annotated[list[SteerVector | dict[str, SteerVector]], Field(min_length=1)] | None = None
    # also let each persona take its own best sparsity, steering alpha, steered layers and vector kind among points
    # that differ only in those (`sparsity`, `steer`, `steer_layers` and `steer_vector` then mappings per persona)
    # (recipes and run folders of earlier releases call it steer_per_persona)
    per_persona: bool = Field(False, validation_alias=AliasChoices("per_persona", "steer_per_persona"))
    compensate: Annotated[list[Literal["none", "personas", "persona"]], Field(min_length=1)] = ["none"]
    gamma: Annotated[list[Fraction], Field(min_length=1)] = [0.0]  # MLP soft-mask factors (0 = removal)
    amplify: Annotated[list[Annotated[float, Field(ge=1.0, le=4.0)]], Field(min_length=1)] = [1.0]
    # composite personas (`mix`): each factor multiplies every weight of a composite (its parts' removal quotas
    # and steering biases alike). With it, tune scores the composites the run exports (output.personas, else every
    # one) instead of the pairs, the poles staying at the recipe's method and prune settings (so the grid's other
    # lists are left out), and ranks each composite by its weakest own axis; with per_persona each composite takes
    # its own factor
    mix_scale: Annotated[list[Annotated[float, Field(gt=0.0, le=4.0)]], Field(min_length=1)] | None = None
    max_perplexity_ratio: Annotated[float, Field(gt=1.0)] = 1.15
    # only points that remove units can be chosen (the point of a persona export is a smaller model); points
    # with sparsity 0 or gamma > 0 are still scored, as references of the Pareto plot
    require_removal: bool = True
    # where the validation replies (which bound the repetition) are decoded: best-first, from the largest shift
    # down until a point is within every bound (the same choice, at a fraction of the cost), at every point
    # within the perplexity bound (a reply figure for every point of report.md), or before-shift: at every point
    # within the perplexity bound, before its answers, which are then scored only for the personas within the
    # repetition bound too (the same choice; cheaper where most points repeat beyond the bound, as composites do)
    replies: Literal["best-first", "every", "before-shift"] = "best-first"
    validation: EvalSpec

    @model_validator(mode="after")
    def _bounded(self) -> TuneSpec:
        if self.mix_scale is not None:
            given = sorted(self.model_fields_set & set(POLE_AXES))
            if given:
                raise ValueError(
                    f"tune.mix_scale tunes composites with their poles at the recipe's method and prune settings; "
                    f"remove tune.{', tune.'.join(given)} (tune the poles first, in a recipe of their pairs)"
                )
        elif self.sparsity is None:
            raise ValueError("tune.sparsity: give the MLP sparsities to search, e.g. [0.01] (or tune.mix_scale)")
        axes = (self.sparsity or [0], self.steer, self.steer_layers, self.compensate, self.gamma, self.amplify)
        points = math.prod(len(axis) for axis in axes) * len(self.mix_scale or [1.0])
        if points > MAX_TUNE_POINTS:
            raise ValueError(
                f"the grid has {points} points (the product of its lists' lengths); each is evaluated, so at most "
                f"{MAX_TUNE_POINTS}: shorten the lists"
            )
        return self


class Recipe(Strict):
    name: str
    model: ModelSpec
    personas: dict[str, AnyPersona]
    pairs: list[tuple[str, str]] = []
    method: MethodSpec
    prune: PruneSpec
    calibration: CalibrationSpec = CalibrationSpec()
    output: OutputSpec = OutputSpec()
    verify: VerifySpec = VerifySpec()
    eval: EvalSpec | None = None
    push: PushSpec | None = None
    tune: TuneSpec | None = None

    @property
    def poles(self) -> dict[str, PersonaSpec]:
        """The personas calibrated on their own data."""
        return {n: p for n, p in self.personas.items() if isinstance(p, PersonaSpec)}

    @property
    def composites(self) -> dict[str, MixSpec]:
        """The personas mixed from poles (`mix`)."""
        return {n: p for n, p in self.personas.items() if isinstance(p, MixSpec)}

    @property
    def exported(self) -> list[str]:
        """The personas a run exports: `output.personas`, else every persona, in the recipe's order."""
        return list(self.personas) if self.output.personas is None else list(self.output.personas)

    def description(self, persona: str) -> str:
        spec = self.personas[persona]
        if isinstance(spec, MixSpec):
            return mix_description(spec, {n: p.description for n, p in self.poles.items()})
        return spec.description

    def partner(self, persona: str) -> str | None:
        for a, b in self.pairs:
            if persona == a:
                return b
            if persona == b:
                return a
        return None

    def opposite(self, persona: str) -> str | None:
        """Whom the persona's replies are told apart from: a pole's partner; a composite's mirror, the composite
        of its parts' partners (INTJ's ESFP), whatever each one's weights, the one of equal weights when several
        have those parts (none when that is still not one)."""
        mix = self.composites.get(persona)
        if mix is None:
            return self.partner(persona)
        partners = {part: self.partner(part) for part in mix.mix}
        flipped = {q: mix.mix[part] for part, q in partners.items() if q is not None}
        if len(flipped) != len(mix.mix):
            return None
        same = [q for q, m in self.composites.items() if set(m.mix) == set(flipped)]
        if len(same) > 1:
            same = [q for q in same if self.composites[q].mix == flipped]
        return same[0] if len(same) == 1 else None

    def digest(self) -> str:
        """The recipe's hash: exporter/recipe/paths.py `recipe_sha256` says what it covers."""
        from exporter.recipe.paths import recipe_sha256

        return recipe_sha256(self)


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
