"""The `run` orchestrator: recipe -> load -> calibrate -> score/mask -> prune -> export -> verify.

Each stage lives in its own module; this file only wires them, times them and writes manifests.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from exporter import __version__
from exporter.evaluation import conditions as eval_run
from exporter.export.hf import DTYPES, export_hf
from exporter.export.prune import count_parameters, prune_model
from exporter.export.shards import prune_checkpoint
from exporter.io import check_target, folder_bytes, staged
from exporter.masking import cache
from exporter.masking.calibrate import calibrate
from exporter.masking.data import samples_digest, select_samples, tokenize
from exporter.masking.layerwise import calibrate_layerwise, column_sq_norms_from_checkpoint
from exporter.masking.masks import PersonaMask, compute_mask
from exporter.masking.scoring import column_sq_norms
from exporter.masking.stats import Statistics
from exporter.model import sources
from exporter.model.adapters import Adapter, adapter_for
from exporter.model.checkpoint import checkpoint_dtype, checkpoint_parameters
from exporter.recipe.schema import PersonaSpec, Recipe
from exporter.verify.hf import build_prompts, reference_copy, verify_export
from exporter.verify.layers import verify_layers
from exporter.workflows.onnx_stage import onnx_stage

log = logging.getLogger(__name__)
STATS_FORMAT = 1  # bump when the statistic's definition changes: saved statistics become stale


def versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "persona-export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


@dataclass
class Timer:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 3)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    adapter: Adapter
    resolved: sources.ResolvedModel
    model_sha256: str
    max_memory: str | int | None = None  # accelerate placed the model within this CPU budget ...
    offload_dir: Path | None = None  # ... and offloaded the rest here

    @property
    def bounded(self) -> bool:
        """The model is not whole in memory: read the checkpoint layer by layer and shard by shard."""
        return self.max_memory is not None

    def placement(self, name: str) -> dict[str, Any]:
        """from_pretrained arguments that load another model (an export) within the same budget."""
        if self.max_memory is None or self.offload_dir is None:
            return {}
        return sources.placement(self.max_memory, self.offload_dir / name)

    def device_map(self) -> dict[str, int]:
        """How many top-level blocks accelerate put on each device ("cpu", "disk"); empty when loaded whole."""
        return dict(Counter(getattr(self.model, "hf_device_map", {}).values())) if self.bounded else {}


def load_model(recipe: Recipe, offload_dir: Path | None = None) -> Loaded:
    """The model, whole in memory; or, given `offload_dir` and a recipe with model.max_memory, placed by
    accelerate within that budget with the rest offloaded to `offload_dir`."""
    resolved = sources.resolve(recipe.model)
    budget = recipe.model.max_memory if offload_dir is not None else None
    model, tokenizer = sources.load(
        resolved, recipe.model.trust_remote_code, max_memory=budget, offload_dir=offload_dir
    )
    adapter = adapter_for(model.config)
    digest = sources.file_digest(resolved.files)
    return Loaded(model, tokenizer, adapter, resolved, digest, budget, offload_dir if budget else None)


def stats_key(recipe: Recipe, persona: PersonaSpec, model_sha: str, data_sha: str) -> str:
    cal = persona.calibration
    fields = {
        "format": STATS_FORMAT,
        "model": model_sha,
        "data": data_sha,
        "chat_template": cal.chat_template,
        "system_prompt": cal.system_prompt,
        "max_tokens": cal.max_tokens,
        "tokens": recipe.calibration.tokens,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def persona_statistics(
    recipe: Recipe, name: str, m: Loaded, reuse: Path | None, timer: Timer, use_cache: bool = True
) -> tuple[Statistics, dict[str, Any]]:
    """Calibrate one persona, or reuse statistics saved by an earlier run when their key still matches."""
    spec = recipe.personas[name]
    samples = select_samples(spec.calibration)
    data_sha = samples_digest(samples)
    key = stats_key(recipe, spec, m.model_sha256, data_sha)
    if reuse is not None:
        saved = reuse / "stats" / f"{name}.safetensors"
        if saved.is_file():
            stats, info = Statistics.load(saved)
            if info.get("key") == key:
                log.info("%s: reusing statistics from %s", name, saved)
                return stats, info
            log.info("%s: saved statistics in %s are stale (model, data or settings changed)", name, saved)
    if use_cache and (cached := cache.load_cached(key)) is not None:
        log.info("%s: reusing cached statistics %s", name, key[:12])
        return cached
    t = time.perf_counter()
    tokenized = [tokenize(m.tokenizer, s, spec.calibration) for s in samples]
    layerwise = recipe.calibration.layerwise or m.bounded  # one decoder layer at a time, read from the shards
    run_calibration = partial(calibrate_layerwise, m.resolved.folder) if layerwise else partial(calibrate, m.model)
    stats = run_calibration(
        m.adapter,
        tokenized,
        pad_id=m.tokenizer.pad_token_id,
        batch_size=recipe.calibration.batch_size,
        response_only=recipe.calibration.tokens == "response",
        desc=f"calibrate {name}",
    )
    timer.add(f"calibrate.{name}", t)
    info = {
        "key": key,
        "persona": name,
        "data_path": spec.calibration.path,
        "data_sha256": data_sha,
        "model_sha256": m.model_sha256,
        "statistic": "per-sample RMS over counted tokens",
        "tokens": recipe.calibration.tokens,
        "versions": versions(),
    }
    if use_cache:
        cache.store(key, stats, info)
    return stats, info


def check_disjoint(a: PersonaMask, b: PersonaMask) -> None:
    for kind in ("mlp", "head", "group"):
        for layer, (ra, rb) in enumerate(zip(a.removed(kind), b.removed(kind), strict=True)):
            common = set(ra) & set(rb)
            assert not common, f"{kind} units {sorted(common)} of layer {layer} removed from both personas"


def run(
    recipe: Recipe, out: Path, *, overwrite: bool = False, reuse: Path | None = None, use_cache: bool = True
) -> dict[str, Any]:
    """Run the whole pipeline into `out` (atomically). Returns the run summary (also in run.json)."""
    check_target(out, overwrite)
    if recipe.model.max_memory is None:
        return _run(recipe, out, overwrite, reuse, use_cache, None)
    # bounded memory: the float64 proof is layer by layer, calibration reads one layer at a time
    recipe = recipe.model_copy(
        update={
            "calibration": recipe.calibration.model_copy(update={"layerwise": True}),
            "verify": recipe.verify.model_copy(update={"layerwise": True}),
        }
    )
    with tempfile.TemporaryDirectory(prefix="persona-export-offload-") as tmp:
        return _run(recipe, out, overwrite, reuse, use_cache, Path(tmp))


def _run(
    recipe: Recipe, out: Path, overwrite: bool, reuse: Path | None, use_cache: bool, offload_dir: Path | None
) -> dict[str, Any]:
    eval_items = eval_run.prepare(recipe) if recipe.eval else None  # data problems surface before loading
    timer = Timer()
    t = time.perf_counter()
    log.info("loading the model (%s)", recipe.model.embedded or recipe.model.path or recipe.model.hub)
    m = load_model(recipe, offload_dir)
    if recipe.output.dtype == "auto":  # the source checkpoint's dtype
        recipe = recipe.model_copy(update={"output": recipe.output.resolved(checkpoint_dtype(m.resolved.folder))})
    timer.add("load", t)
    with staged(out, overwrite) as stage:
        (stage / "stats").mkdir()
        all_stats: dict[str, Statistics] = {}
        infos: dict[str, dict[str, Any]] = {}
        for name in recipe.personas:
            stats, info = persona_statistics(recipe, name, m, reuse, timer, use_cache)
            stats.save(stage / "stats" / f"{name}.safetensors", info)
            all_stats[name] = stats
            infos[name] = {**info, "n_samples": stats.n_samples, "n_tokens": stats.n_tokens}

        t = time.perf_counter()
        if m.bounded:
            col_sq = column_sq_norms_from_checkpoint(m.resolved.folder, m.adapter, m.model.config)
        else:
            col_sq = column_sq_norms(m.model, m.adapter)
        masks: dict[str, PersonaMask] = {}
        for name in recipe.personas:
            partner = recipe.partner(name)
            masks[name] = compute_mask(
                name, recipe.method, recipe.prune, all_stats[name], all_stats[partner] if partner else None, col_sq
            )
        if recipe.method.contrastive:
            for a, b in recipe.pairs:
                check_disjoint(masks[a], masks[b])
        timer.add("score", t)

        dtype = DTYPES[recipe.output.dtype]
        if m.bounded:  # the placed model itself; its weights are as stored, in fp32
            references: dict[torch.dtype, Any] = {torch.float32: m.model}
        else:
            exact = () if recipe.verify.layerwise else (torch.float64,)  # else proven layer by layer, from disk
            references = {d: reference_copy(m.model, dtype, d) for d in (*exact, torch.float32)}
        prompts = build_prompts(m.tokenizer, recipe.verify.prompts)
        reports = {}
        for name in recipe.personas:
            reports[name] = export_persona(recipe, name, m, masks[name], infos[name], references, prompts, stage, timer)
        if eval_items is not None:
            t = time.perf_counter()
            eval_run.evaluate_into(stage, recipe, eval_items, m, masks, reports)
            timer.add("eval", t)
        summary = {
            "recipe": recipe.name,
            "recipe_sha256": recipe.digest(),
            "base_model": m.resolved.base_model,
            "model_sha256": m.model_sha256,
            "personas": {n: r["status"] for n, r in reports.items()},
            "timings_s": timer.stages,
            "versions": versions(),
        }
        (stage / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
        (stage / "run.json").write_text(json.dumps(summary, indent=2))
    if recipe.push is not None:  # only once the run folder is complete; pushes personas that passed
        from exporter.publish.hub import push_run

        push_run(out, recipe.push)
    summary["reports"] = reports
    return summary


def _describe(mask: PersonaMask) -> str:
    d, p = mask.geometry, mask.pruned_geometry()
    parts = [f"{d.intermediate - p.intermediate} of {d.intermediate} MLP neurons"]
    if p.heads != d.heads:
        parts.append(f"{d.heads - p.heads} of {d.heads} query heads ({d.kv_heads - p.kv_heads} KV heads)")
    return " and ".join(parts) + " per layer"


def export_persona(
    recipe: Recipe,
    name: str,
    m: Loaded,
    mask: PersonaMask,
    stats_info: dict[str, Any],
    references: dict[torch.dtype, Any],
    prompts: Any,
    stage: Path,
    timer: Timer,
) -> dict[str, Any]:
    folder = stage / name
    folder.mkdir()
    mask_manifest = {"recipe_sha256": recipe.digest(), "model_sha256": m.model_sha256, "stats_key": stats_info["key"]}
    mask.save(folder / "masks.safetensors", mask_manifest)

    t = time.perf_counter()
    log.info("%s: removing %s and exporting", name, _describe(mask))
    if m.bounded:  # shard by shard from the source checkpoint, never the whole model
        files = prune_checkpoint(
            m.resolved.folder, m.adapter, mask, folder / "hf", dtype=DTYPES[recipe.output.dtype], tokenizer=m.tokenizer
        )
        dense_params = checkpoint_parameters(m.resolved.folder)
        pruned_params = checkpoint_parameters(folder / "hf")
        timer.add(f"export_hf.{name}", t)
    else:
        pruned = prune_model(copy.deepcopy(m.model), m.adapter, mask)
        timer.add(f"prune.{name}", t)
        t = time.perf_counter()
        files = export_hf(pruned, m.tokenizer, folder / "hf", recipe.output.dtype)
        timer.add(f"export_hf.{name}", t)
        dense_params = count_parameters(m.model)
        pruned_params = count_parameters(pruned)
        del pruned

    t = time.perf_counter()
    log.info("%s: verifying the export against the masked model (float64 and fp32)", name)
    figures = verify_export(
        references,
        m.adapter,
        mask,
        folder / "hf",
        prompts,
        pad_id=m.tokenizer.pad_token_id,
        greedy_tokens=recipe.verify.greedy_tokens,
        fp64_max_abs=recipe.verify.fp64_max_abs,
        load_kwargs=m.placement(name),
    )
    if recipe.verify.layerwise:
        figures["fp64_layers"] = verify_layers(
            m.resolved.folder,
            folder / "hf",
            m.adapter,
            mask,
            prompts,
            storage=DTYPES[recipe.output.dtype],
            max_abs=recipe.verify.fp64_max_abs,
        )
        figures["passed"] = figures["fp64_layers"]["passed"]
    timer.add(f"verify_hf.{name}", t)
    onnx_timings: dict[str, float] = {}
    if figures["passed"]:  # ONNX is made from the proven checkpoint only
        onnx = onnx_stage(
            folder,
            list(recipe.output.formats),
            references[torch.float32],
            m.adapter,
            mask,
            prompts,
            recipe.verify,
            onnx_timings,
        )
    else:
        onnx = {}
    passed = figures["passed"] and all(r["passed"] for r in onnx.values())

    element = torch.tensor([], dtype=DTYPES[recipe.output.dtype]).element_size()
    weights_bytes = sum(size for f, size in files.items() if f.endswith(".safetensors"))
    report = {
        "persona": name,
        "description": recipe.personas[name].description,
        "partner": recipe.partner(name),
        "status": "passed" if passed else "failed",
        "base_model": {
            "name": m.resolved.base_model,
            "sha256": m.model_sha256,
            "license": m.resolved.license,
            "model_type": m.model.config.model_type,
            "weights": (
                f"GGUF file {m.resolved.gguf_file}, de-quantized to float32 by transformers"
                if m.resolved.gguf_file
                else "safetensors"
            ),
        },
        "recipe": {"name": recipe.name, "sha256": recipe.digest()},
        "method": recipe.method.model_dump(mode="json"),
        "prune": recipe.prune.model_dump(mode="json"),
        "calibration": {
            "path": recipe.personas[name].calibration.path,
            "samples": stats_info["n_samples"],
            "tokens_counted": stats_info["n_tokens"],
            "data_sha256": stats_info["data_sha256"],
            "statistic": stats_info["statistic"],
            "tokens": stats_info["tokens"],
        },
        "geometry": {"dense": vars(mask.geometry), "pruned": vars(mask.pruned_geometry())},
        "removed_per_layer": {k: mask.removed(k) for k in ("mlp", "head", "group")},
        "parameters": {"dense": dense_params, "pruned": pruned_params, "ratio": pruned_params / dense_params},
        "bytes": {
            "dense_weights": dense_params * element,
            "pruned_weights_on_disk": weights_bytes,
            "hf_folder": folder_bytes(folder / "hf"),
            "ratio": weights_bytes / (dense_params * element),
        },
        "dtype": recipe.output.dtype,
        "loading": {"max_memory": m.max_memory, "device_map": m.device_map()} if m.bounded else {"whole": True},
        "verification": {"hf": figures, **onnx},
        "timings_s": {k.split(".")[0]: v for k, v in timer.stages.items() if k.endswith(f".{name}")} | onnx_timings,
        "versions": versions(),
    }
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    if not figures["passed"]:
        log.error(
            "%s: the export does not match the masked model: %s", name, figures.get("fp64_layers", figures.get("fp64"))
        )
    elif not passed:
        log.error("%s: the ONNX export does not match the masked model: %s", name, onnx["onnx"])
    return report
