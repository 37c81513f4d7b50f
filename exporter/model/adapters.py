"""Architecture knowledge, in one place: which modules form a prunable unit, and which config fields change.

One registered adapter per `model_type`. MLP neuron k = row k of the input projections (gate, up) and
column k of the output projection (down). Attention: query head h = rows h*D:(h+1)*D of q_proj and the same
columns of o_proj; KV head g = those rows of k_proj and v_proj, serving query heads g*R:(g+1)*R (R = group size).
Each adapter owns how those rows and columns map to its weights (`slice_plan`), so fused projections (phi3's
`gate_up_proj`, `qkv_proj`) are sliced by the same code that slices separate ones, in memory or shard by shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from exporter.errors import UnsupportedModelError


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def units(self, kind: str) -> int:
        return {"mlp": self.intermediate, "head": self.heads, "group": self.kv_heads}[kind]


SlicePlan = dict[str, tuple[int, torch.Tensor]]  # Linear name inside a layer -> (dim, kept indices)


class Adapter:
    """Llama-style decoder: `model.model.layers[i].{mlp.{gate,up,down}_proj, self_attn.{q,k,v,o}_proj}`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_prefix: ClassVar[str] = "model.layers"  # state-dict prefix of decoder layer i: f"{prefix}.{i}."
    mlp_in_names: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")
    mlp_out_name: ClassVar[str] = "down_proj"
    # config field that gives every MLP projection a bias (stock loaders then read down_proj.bias), or None
    mlp_bias_flag: ClassVar[str | None] = None

    def geometry(self, config: Any) -> Geometry:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Geometry(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads, kv, head_dim)

    def base(self, model: Any) -> Any:
        return model.model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(self.base(model).layers)

    def mlp_out(self, layer: Any) -> nn.Linear:
        return getattr(layer.mlp, self.mlp_out_name)

    def attn_out(self, layer: Any) -> nn.Linear:
        return layer.self_attn.o_proj

    def slice_plan(
        self, g: Geometry, mlp: torch.Tensor | None, q: torch.Tensor | None, kv: torch.Tensor | None
    ) -> SlicePlan:
        """What to keep of each Linear of one layer: dim 0 = output rows (with the bias), dim 1 = input columns.

        g: dense geometry; mlp: kept neurons; q, kv: kept query / KV channels (head * head_dim + j); None = all.
        """
        plan: SlicePlan = {}
        if mlp is not None:
            plan |= {f"mlp.{n}": (0, mlp) for n in self.mlp_in_names} | {f"mlp.{self.mlp_out_name}": (1, mlp)}
        if q is not None and kv is not None:
            plan |= {"self_attn.q_proj": (0, q), "self_attn.o_proj": (1, q)}
            plan |= {"self_attn.k_proj": (0, kv), "self_attn.v_proj": (0, kv)}
        return plan

    def update_config(self, config: Any, geometry: Geometry) -> None:
        """Write the pruned sizes; `head_dim` is written explicitly since hidden/heads no longer gives it."""
        config.intermediate_size = geometry.intermediate
        config.num_attention_heads = geometry.heads
        config.num_key_value_heads = geometry.kv_heads
        config.head_dim = geometry.head_dim

    def update_modules(self, layer: Any, geometry: Geometry) -> None:
        """Attributes some attention implementations cache from the config at construction."""
        attn = layer.self_attn
        for name, value in (
            ("num_heads", geometry.heads),
            ("num_key_value_heads", geometry.kv_heads),
            ("num_key_value_groups", geometry.group_size),
        ):
            if hasattr(attn, name):
                setattr(attn, name, value)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = geometry.intermediate

    def check_mlp_bias(self, model_type: str, why: str) -> None:
        if self.mlp_bias_flag is None:
            supported = sorted(t for t, a in REGISTRY.items() if a.mlp_bias_flag is not None)
            raise UnsupportedModelError(
                f"{why} is stored as a down_proj bias, which stock {model_type} checkpoints cannot hold; "
                f"supported for: {', '.join(supported)}. Set it to its default for this model"
            )

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        """The MLP projections inside a decoder layer ("mlp.gate_proj", ...): all get a bias with the flag."""
        return tuple(f"mlp.{n}" for n in (*self.mlp_in_names, self.mlp_out_name))

    def mlp_bias_value(
        self, name: str, base: torch.Tensor | None, rows: int, bias: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """The bias the MLP projection `name` (of `mlp_linears`) holds once `bias` (hidden,) is added to
        down_proj's: its own bias `base` (zeros when it has none, `rows` long) plus `bias` on down_proj only,
        summed in float64 and rounded once to `dtype`."""
        start = base.to(torch.float64) if base is not None else torch.zeros(rows, dtype=torch.float64)
        return (start + (bias if name == f"mlp.{self.mlp_out_name}" else 0.0)).to(dtype)

    def mlp_biases(self, layer: Any, bias: torch.Tensor) -> dict[nn.Linear, torch.Tensor]:
        """The biases one layer's MLP projections hold once `bias` (hidden,) is added to down_proj's: zeros on
        the input projections that have none, since the config flag gives every MLP projection one."""
        out = {}
        for name in self.mlp_linears:
            linear = layer.get_submodule(name)
            out[linear] = self.mlp_bias_value(name, linear.bias, linear.out_features, bias, linear.weight.dtype)
        return out

    def add_mlp_bias(self, model: Any, bias: torch.Tensor) -> None:
        """Add `bias` (layers, hidden) to every down_proj bias, in place (all MLP biases stored: no missing keys)."""
        self.check_mlp_bias(model.config.model_type, "an MLP bias (method.steer, prune.mlp.compensate)")
        with torch.no_grad():
            for i, layer in enumerate(self.layers(model)):
                for linear, value in self.mlp_biases(layer, bias[i]).items():
                    linear.bias = nn.Parameter(value)
        setattr(model.config, str(self.mlp_bias_flag), True)


REGISTRY: dict[str, Adapter] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        REGISTRY[model_type] = cls()
    return cls


@register
class LlamaLayoutAdapter(Adapter):
    """The Llama layout as is. Mistral is the same; qwen2's q/k/v carry biases, sliced with their rows; qwen3's
    q_norm/k_norm act per head over head_dim and are shared by all heads: untouched by head removal. Of these,
    only Llama's config can give the MLP projections biases (mlp_bias), which steering and compensation need."""

    model_types = ("mistral", "qwen2", "qwen3")


@register
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    mlp_bias_flag = "mlp_bias"


@register
class Phi3Adapter(Adapter):
    """Fused projections: `mlp.gate_up_proj` = [gate; up] rows, `self_attn.qkv_proj` = [q; k; v] rows."""

    model_types = ("phi3",)

    def slice_plan(
        self, g: Geometry, mlp: torch.Tensor | None, q: torch.Tensor | None, kv: torch.Tensor | None
    ) -> SlicePlan:
        plan: SlicePlan = {}
        if mlp is not None:
            plan["mlp.gate_up_proj"] = (0, torch.cat([mlp, mlp + g.intermediate]))
            plan["mlp.down_proj"] = (1, mlp)
        if q is not None and kv is not None:
            q_rows, kv_rows = g.heads * g.head_dim, g.kv_heads * g.head_dim
            plan["self_attn.qkv_proj"] = (0, torch.cat([q, kv + q_rows, kv + q_rows + kv_rows]))
            plan["self_attn.o_proj"] = (1, q)
        return plan


def adapter_for(config: Any) -> Adapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(REGISTRY))}. "
            "Adding one means registering an Adapter in exporter/model/adapters.py"
        )
    return REGISTRY[model_type]
