"""Persona masks: which units each persona keeps, as sorted keep-indices per layer.

Removal rules (k units per layer, the same k in every layer):
  wanda / sparse         remove the k lowest-importance units of the persona.
  contrastive-wanda      c = z - median(z) per layer; S+ = I * phi(c), I from both personas' mean activation;
                         p+ removes the k lowest S+ among units with c < 0 (those that lean to p-), ties
                         broken by c, most negative first. With phi = relu this is pure c order.
  contrastive-sparse     d = S~+ - S~- (row-normalised sparse scores), c = d - median(d); p+ removes the k most
                         negative c.
Centring on the layer median (per KV group for query heads) keeps a layer-wide activation offset between the
two calibration sets from deciding which persona owns a unit, and guarantees floor(n/2) candidates per side
even when n is tiny (3 KV groups). For a pair the removal sets are disjoint by construction: p+ only removes
units with c < 0, p- only units with c > 0; swapping the personas negates c and swaps the masks exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from exporter.errors import ExportFolderError, MaskError
from exporter.masking import scoring
from exporter.masking.statistics import UNREADABLE, Statistics
from exporter.model.adapters import Geometry
from exporter.recipe.schema import MethodSpec, PruneSpec, Recipe


@dataclass(frozen=True)
class PersonaMask:
    persona: str
    geometry: Geometry  # of the dense model
    mlp_keep: torch.Tensor | None  # (layers, kept neurons), sorted
    head_keep: torch.Tensor | None  # (layers, kept query heads), sorted
    group_keep: torch.Tensor | None  # (layers, kept KV heads), sorted
    # (layers, hidden) float64 added to every down_proj output: steering and/or bias compensation (steer.py)
    mlp_bias: torch.Tensor | None = None
    steering: torch.Tensor | None = None  # (layers, hidden): the steering part of mlp_bias (eval's baseline)
    # soft masks: float64 factors on the down_proj (layers, intermediate) and o_proj (layers, heads*head_dim)
    # input columns of kept units, 1 = unchanged; the scaled columns are rounded to `scale_dtype` (the export's)
    mlp_scale: torch.Tensor | None = None
    attn_scale: torch.Tensor | None = None
    scale_dtype: str = "float32"

    def pruned_geometry(self) -> Geometry:
        g = self.geometry
        return Geometry(
            g.layers,
            g.hidden,
            g.intermediate if self.mlp_keep is None else self.mlp_keep.shape[1],
            g.heads if self.head_keep is None else self.head_keep.shape[1],
            g.kv_heads if self.group_keep is None else self.group_keep.shape[1],
            g.head_dim,
        )

    def channel_masks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """0/1 vectors over unit channels: mlp (layers, intermediate), attn (layers, heads*head_dim)."""
        g = self.geometry
        mlp = attn = None
        if self.mlp_keep is not None:
            mlp = torch.zeros(g.layers, g.intermediate).scatter_(1, self.mlp_keep, 1.0)
        if self.head_keep is not None:
            heads = torch.zeros(g.layers, g.heads).scatter_(1, self.head_keep, 1.0)
            attn = heads.repeat_interleave(g.head_dim, dim=1)
        return mlp, attn

    @property
    def scale_storage(self) -> torch.dtype:
        return getattr(torch, self.scale_dtype)  # type: ignore[no-any-return]

    def channel_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What each unit channel is multiplied by, float64: 0 where removed, its scale where kept."""
        masks = self.channel_masks()
        g = self.geometry
        full = ((g.layers, g.intermediate), (g.layers, g.heads * g.head_dim))
        out: list[torch.Tensor | None] = []
        for mask, scale, shape in zip(masks, (self.mlp_scale, self.attn_scale), full, strict=True):
            if mask is None and scale is None:
                out.append(None)
                continue
            m = mask.to(torch.float64) if mask is not None else torch.ones(shape, dtype=torch.float64)
            out.append(m * scale if scale is not None else m)
        return out[0], out[1]

    def removed(self, kind: str) -> list[list[int]]:
        keep = {"mlp": self.mlp_keep, "head": self.head_keep, "group": self.group_keep}[kind]
        if keep is None:
            return [[] for _ in range(self.geometry.layers)]
        n = self.geometry.units(kind)
        return [sorted(set(range(n)) - set(row.tolist())) for row in keep]

    def save(self, path: Path, manifest: dict[str, Any]) -> None:
        tensors = {
            k: v.contiguous()
            for k, v in (
                ("mlp_keep", self.mlp_keep),
                ("head_keep", self.head_keep),
                ("group_keep", self.group_keep),
                ("mlp_bias", self.mlp_bias),
                ("steering", self.steering),
                ("mlp_scale", self.mlp_scale),
                ("attn_scale", self.attn_scale),
            )
            if v is not None
        }
        save_file(tensors, str(path), metadata={"persona": self.persona})
        info = {**manifest, "persona": self.persona, "geometry": vars(self.geometry)}
        if self.mlp_scale is not None or self.attn_scale is not None:
            info["scale_dtype"] = self.scale_dtype
        info["pruned_geometry"] = vars(self.pruned_geometry())
        path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> PersonaMask:
        info = json.loads(path.with_suffix(".json").read_text())
        t = load_file(str(path))
        return cls(
            info["persona"],
            Geometry(**info["geometry"]),
            t.get("mlp_keep"),
            t.get("head_keep"),
            t.get("group_keep"),
            t.get("mlp_bias"),
            t.get("steering"),
            t.get("mlp_scale"),
            t.get("attn_scale"),
            info.get("scale_dtype", "float32"),
        )


def load_mask(path: Path) -> PersonaMask:
    """A persona's masks.safetensors (+ .json); a missing or corrupt one is an ExportFolderError."""
    try:
        return PersonaMask.load(path)
    except UNREADABLE as exc:
        raise ExportFolderError(
            f"cannot read the persona's mask {path} ({type(exc).__name__}: {exc}); re-run `persona-export run`"
        ) from None


def removal_count(n: int, sparsity: float, round_to: int = 1, what: str = "units") -> int:
    """Units to remove of n: floor(sparsity * n), with the kept count rounded up to a multiple of round_to."""
    kept = n - math.floor(sparsity * n + 1e-9)
    if round_to > 1:
        kept = min(n, -(-kept // round_to) * round_to)
    if kept < 1:
        raise MaskError(f"sparsity {sparsity} leaves no {what} in a layer (of {n}); lower the sparsity")
    return n - kept


Order = list[list[list[int]]]  # per layer, per group: the unit indices (into the layer) in removal order


def removal_order(
    scores: torch.Tensor,
    *,
    allowed: torch.Tensor | None = None,
    tiebreak: torch.Tensor | None = None,
    groups: int = 1,
) -> Order:
    """Every allowed unit of each layer (of each of `groups` equal blocks when > 1), lowest score first, ties
    broken by `tiebreak`, then by index. scores, allowed, tiebreak: (layers, units)."""
    layers, n = scores.shape
    size = n // groups
    tb = tiebreak if tiebreak is not None else torch.zeros_like(scores)
    ok = allowed if allowed is not None else torch.ones_like(scores, dtype=torch.bool)
    out: Order = []
    for layer in range(layers):
        blocks = []
        for b in range(groups):
            lo = b * size
            s, t, a = scores[layer, lo : lo + size], tb[layer, lo : lo + size], ok[layer, lo : lo + size]
            cand = torch.nonzero(a).flatten()
            # lexicographic (score, tiebreak, index): stable sorts from the last key to the first
            order = cand[torch.sort(t[cand], stable=True).indices]
            order = order[torch.sort(s[order], stable=True).indices]
            blocks.append((lo + order).tolist())
        out.append(blocks)
    return out


def keep_indices(removed: list[list[int]], n: int) -> torch.Tensor:
    """Sorted keep-indices (layers, n - removed per layer) from each layer's removed units (equal counts)."""
    return torch.stack([torch.tensor(sorted(set(range(n)) - set(r)), dtype=torch.long) for r in removed])


def first_k(order: Order, k: int, n: int, what: str = "units") -> torch.Tensor:
    """Keep-indices (layers, n - k * groups) removing the first k units of every layer and group of `order`."""
    removed = []
    for layer, blocks in enumerate(order):
        for b, cand in enumerate(blocks):
            if len(cand) < k:
                raise MaskError(
                    f"layer {layer}: only {len(cand)} {what} can be removed disjointly"
                    f"{f' in group {b}' if len(blocks) > 1 else ''}, {k} asked; lower the sparsity"
                    " (or use kv-group units for attention)"
                )
        removed.append([u for cand in blocks for u in cand[:k]])
    return keep_indices(removed, n)


def select_keep(
    scores: torch.Tensor,
    k: int,
    *,
    allowed: torch.Tensor | None = None,
    tiebreak: torch.Tensor | None = None,
    groups: int = 1,
    what: str = "units",
) -> torch.Tensor:
    """Remove the k lowest-scored allowed units in each layer (each of `groups` equal blocks when > 1).

    scores, allowed, tiebreak: (layers, units). Returns sorted keep-indices (layers, units - k*groups).
    """
    order = removal_order(scores, allowed=allowed, tiebreak=tiebreak, groups=groups)
    return first_k(order, k, scores.shape[1], what)


WHAT = {"mlp": "MLP neurons", "head": "query heads", "group": "KV groups"}


def unit_order(
    kind: str,
    method: MethodSpec,
    stats: Statistics,
    partner: Statistics | None,
    col_sq: dict[str, torch.Tensor],
) -> Order:
    """The persona's removal candidates of one unit kind, in the order its mask removes them."""
    groups = stats.geometry.kv_heads if kind == "head" else 1  # query heads: as many from every KV group
    if method.score == "wanda":
        return removal_order(scoring.wanda(stats, col_sq, kind), groups=groups)
    if method.score == "sparse":
        return removal_order(scoring.sparse(stats, col_sq, kind, method.damping), groups=groups)
    assert partner is not None, "contrastive methods need a partner (checked by the recipe)"
    if method.score == "contrastive-wanda":
        c = scoring.centred(scoring.zscore(stats, partner, kind, method.eps), groups)
        pooled = scoring.wanda(stats, col_sq, kind) + scoring.wanda(partner, col_sq, kind)
        s = pooled * scoring.phi(c, method.phi, method.tau)
        return removal_order(s, allowed=c < 0, tiebreak=c, groups=groups)
    d = scoring.row_normalised(scoring.sparse(stats, col_sq, kind, method.damping)) - scoring.row_normalised(
        scoring.sparse(partner, col_sq, kind, method.damping)
    )
    c = scoring.centred(d, groups)
    return removal_order(c, allowed=c < 0, groups=groups)


def removals(persona: str, prune: PruneSpec, g: Geometry) -> dict[str, int]:
    """Units the persona's own mask removes in every layer, per unit kind scored: "mlp" (neurons), "group" (KV
    groups, with their query heads) or "head" (query heads, per KV group). Kinds it removes none of are left out."""
    out = {}
    if prune.mlp is not None and (s := prune.mlp.fraction(persona)) > 0:
        out["mlp"] = removal_count(g.intermediate, s, prune.mlp.round_to, WHAT["mlp"])
    if prune.attention is not None and (s := prune.attention.fraction(persona)) > 0:
        if prune.attention.unit == "kv-group":
            out["group"] = removal_count(g.kv_heads, s, 1, WHAT["group"])
        else:
            out["head"] = removal_count(g.group_size, s, 1, "query heads per KV group")
    return out


def mask_from_keep(persona: str, g: Geometry, keep: dict[str, torch.Tensor]) -> PersonaMask:
    """A mask from keep-indices per unit kind (as `removals` names them); attention keeps both heads and groups."""
    head_keep = group_keep = None
    if "group" in keep:
        group_keep = keep["group"]
        head_keep = (group_keep.unsqueeze(-1) * g.group_size + torch.arange(g.group_size)).flatten(1)
    elif "head" in keep:
        head_keep = keep["head"]
        group_keep = torch.arange(g.kv_heads).expand(g.layers, -1).clone()
    return PersonaMask(persona, g, keep.get("mlp"), head_keep, group_keep)


def compute_mask(
    persona: str,
    method: MethodSpec,
    prune: PruneSpec,
    stats: Statistics,
    partner: Statistics | None,
    col_sq: dict[str, torch.Tensor],
) -> PersonaMask:
    g = stats.geometry
    keep = {
        kind: first_k(unit_order(kind, method, stats, partner, col_sq), k, g.units(kind), WHAT[kind])
        for kind, k in removals(persona, prune, g).items()
    }
    return mask_from_keep(persona, g, keep)


def compute_masks(
    recipe: Recipe,
    stats: dict[str, Statistics],
    col_sq: dict[str, torch.Tensor],
    prune: PruneSpec | None = None,
) -> dict[str, PersonaMask]:
    """Every pole's mask (contrastive methods score against the persona's partner; composites:
    exporter/masking/mix.py); `prune` replaces the recipe's prune section (a sweep's sparsities). Opposing masks
    of a contrastive method are disjoint."""
    prune = prune or recipe.prune
    masks = {
        p: compute_mask(p, recipe.method, prune, stats[p], stats[q] if (q := recipe.partner(p)) else None, col_sq)
        for p in recipe.poles
    }
    if recipe.method.contrastive:
        for a, b in recipe.pairs:
            check_disjoint(masks[a], masks[b])
    return masks


def check_disjoint(a: PersonaMask, b: PersonaMask) -> None:
    for kind in ("mlp", "head", "group"):
        for layer, (ra, rb) in enumerate(zip(a.removed(kind), b.removed(kind), strict=True)):
            if common := set(ra) & set(rb):
                raise MaskError(
                    f"{kind} units {sorted(common)} of layer {layer} are removed from both {a.persona!r} and "
                    f"{b.persona!r}; an opposing pair must lose disjoint units: lower the sparsity"
                )


def soften(
    recipe: Recipe, masks: dict[str, PersonaMask], storage: str, prune: PruneSpec | None = None
) -> dict[str, PersonaMask]:
    """Soft masks (METHOD.md section 6): with `gamma` > 0 the units a mask selects are kept and scaled by gamma
    instead of removed; with `amplify` > 1 a persona's own units, the ones its partner's mask selects, are
    scaled up. Works on the hard masks of `compute_masks`; unchanged when neither is set."""
    prune = prune or recipe.prune
    mlp, att = prune.mlp, prune.attention
    if not any(s is not None and (s.gamma > 0 or s.amplify > 1) for s in (mlp, att)):
        return masks
    out = {}
    for name, mask in masks.items():
        partner = masks[q] if (q := recipe.partner(name)) else None
        mine = mask.channel_masks()
        theirs = partner.channel_masks() if partner is not None else (None, None)
        mlp_keep, head_keep, group_keep = mask.mlp_keep, mask.head_keep, mask.group_keep
        scales: list[torch.Tensor | None] = []
        for index, spec in enumerate((mlp, att)):  # 0: MLP neurons, 1: attention heads
            own, other = mine[index], theirs[index]
            if spec is None or own is None or (spec.gamma == 0 and spec.amplify == 1):
                scales.append(None)
                continue
            scale = torch.ones(own.shape, dtype=torch.float64)
            if spec.gamma > 0:  # selected units kept, scaled down
                scale[own == 0] = spec.gamma
                if index == 0:
                    mlp_keep = None
                else:
                    head_keep = group_keep = None
            if spec.amplify > 1 and other is not None:
                scale[other == 0] = spec.amplify
            scales.append(scale)
        out[name] = replace(
            mask,
            mlp_keep=mlp_keep,
            head_keep=head_keep,
            group_keep=group_keep,
            mlp_scale=scales[0],
            attn_scale=scales[1],
            scale_dtype=storage,
        )
    return out
