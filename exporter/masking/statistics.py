"""Activation statistics of one persona, per unit, accumulated in float64 from fp32 activations.

Per sample x and unit u with channels C_u, the statistic is the root mean square of the unit's activation
over the sample's counted tokens t (persona response by default, never padding):
    s_u(x) = sqrt(mean_{t, j in C_u} h_j(x, t)^2)
This is length-invariant (an L2 norm over tokens would favour the persona with longer answers).
Kept: sum_x s_u, sum_x s_u^2 (mean and variance across samples, for the contrastive z-score), and per channel
the sums over counted tokens of h_j^2 (the diagonal of E[h h^T], for the "sparse" score) and, for MLP
neurons, of h_j (the mean activation E[h_j], for steering and bias compensation: exporter/masking/steer.py),
and per decoder layer the sum over counted tokens of its output hidden state (the residual stream, for
`method.steer_vector: residual`).
Whole-model calibration also keeps, for every Linear of the decoder layers, the sum over counted tokens of
each input channel squared (`in_sq`, the Wanda baseline's ||X_j||^2); layer-by-layer calibration does not.
Unit kinds: "mlp" (neurons), "head" (query heads), "group" (KV groups).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from exporter.model.adapters import Geometry

KINDS = ("mlp", "head", "group")
# what Statistics.load raises for a file that is truncated, not safetensors, or not written by `save`
UNREADABLE = (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError)


@dataclass
class Statistics:
    geometry: Geometry
    n_samples: int = 0
    n_tokens: int = 0
    sum: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (layers, units)
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> (layers, units)
    chan_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # "mlp"/"attn" -> (layers, channels)
    chan_sum: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # "mlp": (layers, intermediate); "resid": (layers, hidden)
    in_sq: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name in a layer -> (layers, in_features)

    @classmethod
    def empty(cls, g: Geometry) -> Statistics:
        s = cls(g)
        for kind in KINDS:
            s.sum[kind] = torch.zeros(g.layers, g.units(kind), dtype=torch.float64)
            s.sumsq[kind] = torch.zeros_like(s.sum[kind])
        for part, width in (("mlp", g.intermediate), ("attn", g.heads * g.head_dim)):
            s.chan_sq[part] = torch.zeros(g.layers, width, dtype=torch.float64)
        s.chan_sum["mlp"] = torch.zeros(g.layers, g.intermediate, dtype=torch.float64)
        s.chan_sum["resid"] = torch.zeros(g.layers, g.hidden, dtype=torch.float64)
        return s

    def mean(self, kind: str) -> torch.Tensor:
        return self.sum[kind] / self.n_samples

    def var(self, kind: str) -> torch.Tensor:
        """Unbiased variance of the per-sample statistic across samples."""
        n = self.n_samples
        m = self.mean(kind)
        return ((self.sumsq[kind] - n * m * m) / max(n - 1, 1)).clamp_min(0.0)

    def second_moment(self, part: str) -> torch.Tensor:
        """E_tokens[h_j^2] per channel: the diagonal of E[h h^T]. (layers, channels)"""
        return self.chan_sq[part] / max(self.n_tokens, 1)

    def mlp_mean(self) -> torch.Tensor:
        """E_tokens[h_j] of each down_proj input channel over the counted tokens. (layers, intermediate)"""
        return self.chan_sum["mlp"] / max(self.n_tokens, 1)

    def resid_mean(self) -> torch.Tensor:
        """E_tokens of each decoder layer's output hidden state over the counted tokens. (layers, hidden)"""
        return self.chan_sum["resid"] / max(self.n_tokens, 1)

    def add_residual(self, layer: int, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        """hidden: (batch, seq, hidden) a decoder layer's output; weight: (batch, seq) bool, tokens that count."""
        w = weight.to(torch.float32).unsqueeze(-1)
        self.chan_sum["resid"][layer] += (hidden.to(torch.float32) * w).sum((0, 1), dtype=torch.float64)

    def add(self, layer: int, part: str, x: torch.Tensor, weight: torch.Tensor) -> None:
        """x: (batch, seq, channels) unit inputs; weight: (batch, seq) bool, tokens that count."""
        w = weight.to(torch.float32).unsqueeze(-1)
        x32 = x.to(torch.float32) * w  # fp32: fp16/bf16 squares overflow
        n_tok = weight.sum(1).clamp_min(1).to(torch.float64)  # (batch,)
        per_chan = x32.square().sum(1, dtype=torch.float64)  # (batch, channels)
        self.chan_sq[part][layer] += per_chan.sum(0)
        ms = per_chan / n_tok.unsqueeze(-1)  # per-sample mean square per channel
        if part == "mlp":
            self.chan_sum["mlp"][layer] += x32.sum((0, 1), dtype=torch.float64)
            self._add_unit("mlp", layer, ms)
            return
        g = self.geometry
        ms_head = ms.view(ms.shape[0], g.heads, g.head_dim).mean(-1)
        self._add_unit("head", layer, ms_head)
        self._add_unit("group", layer, ms_head.view(ms.shape[0], g.kv_heads, g.group_size).mean(-1))

    def _add_unit(self, kind: str, layer: int, mean_square: torch.Tensor) -> None:
        self.sum[kind][layer] += mean_square.sqrt().sum(0)
        self.sumsq[kind][layer] += mean_square.sum(0)

    def save(self, path: Path, manifest: dict[str, Any]) -> None:
        tensors = {f"sum.{k}": v for k, v in self.sum.items()}
        tensors |= {f"sumsq.{k}": v for k, v in self.sumsq.items()}
        tensors |= {f"chan_sq.{k}": v for k, v in self.chan_sq.items()}
        tensors |= {f"chan_sum.{k}": v for k, v in self.chan_sum.items()}
        tensors |= {f"in_sq.{k}": v for k, v in self.in_sq.items()}
        meta = {"n_samples": str(self.n_samples), "n_tokens": str(self.n_tokens)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        info = {
            **manifest,
            "n_samples": self.n_samples,
            "n_tokens": self.n_tokens,
            "geometry": vars(self.geometry),
        }
        path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> tuple[Statistics, dict[str, Any]]:
        """Statistics and their manifest; a file that is not what `save` writes raises one of UNREADABLE."""
        info = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        s = cls(Geometry(**info["geometry"]), int(info["n_samples"]), int(info["n_tokens"]))
        expected = {
            f"{group}.{kind}": tuple(v.shape)
            for group, d in vars(cls.empty(s.geometry)).items()
            if isinstance(d, dict)
            for kind, v in d.items()
        }
        tensors = load_file(str(path))
        shapes = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("in_sq.")}
        optional = [tuple(v.shape) for k, v in tensors.items() if k.startswith("in_sq.")]
        if shapes != expected or any(len(shape) != 2 or shape[0] != s.geometry.layers for shape in optional):
            raise ValueError(
                f"{path} holds {sorted(shapes)} with shapes that do not fit its geometry, expected "
                f"{sorted(expected)} (an older format?)"
            )
        for key, value in tensors.items():
            group, kind = key.split(".", 1)
            getattr(s, group)[kind] = value
        return s, info
