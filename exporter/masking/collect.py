"""One persona's activation statistics, reused from an earlier run or the cache when their key still matches,
else calibrated; and the output projections' column norms that every score multiplies them with."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from exporter.errors import OutputError
from exporter.masking import cache
from exporter.masking.calibrate import calibrate
from exporter.masking.data import samples_digest, select_samples, tokenize
from exporter.masking.layerwise import CheckpointDownWeights, calibrate_layerwise, column_sq_norms_from_checkpoint
from exporter.masking.scoring import column_sq_norms
from exporter.masking.statistics import UNREADABLE, Statistics
from exporter.masking.steer import Layers
from exporter.model.sources import Loaded
from exporter.recipe.schema import PersonaSpec, Recipe
from exporter.reports.provenance import Timer, versions

log = logging.getLogger(__name__)
# bump when the statistic's definition or what is kept changes: saved statistics become stale
# (4: the decoder Linears' input channel squares, `in_sq`, kept for the Wanda baseline; 5: each decoder
# layer's mean output hidden state, `chan_sum.resid`, for residual steering)
STATS_FORMAT = 5


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
    """Calibrate one pole, or reuse statistics saved by an earlier run when their key still matches."""
    spec = recipe.poles[name]
    samples = select_samples(spec.calibration)
    data_sha = samples_digest(samples)
    key = stats_key(recipe, spec, m.model_sha256, data_sha)
    if reuse is not None:
        saved = reuse / "stats" / f"{name}.safetensors"
        # an unreadable manifest is loaded to say why; another key is stale without reading the tensors (an
        # older statistics format need not load)
        if saved.is_file() and _saved_key(saved) in (None, key):
            try:
                stats, info = Statistics.load(saved)
            except UNREADABLE as exc:
                raise OutputError(
                    f"--reuse-stats: {saved} cannot be read ({type(exc).__name__}: {exc}); delete it to recalibrate "
                    "that persona, or run without --reuse-stats"
                ) from None
            log.info("%s: reusing statistics from %s", name, saved)
            return stats, info
        if saved.is_file():
            log.info(
                "%s: saved statistics in %s are stale (model, data, settings or the statistics format %d changed); "
                "recalibrating",
                name,
                saved,
                STATS_FORMAT,
            )
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


def _saved_key(saved: Path) -> str | None:
    """The key in a saved statistics manifest (None when it cannot be read: loading then says why)."""
    try:
        return json.loads(saved.with_suffix(".json").read_text(encoding="utf-8")).get("key")  # type: ignore[no-any-return]
    except (OSError, ValueError, AttributeError):
        return None


def down_weights(m: Loaded) -> Layers:
    """Each layer's down_proj weight: the model's, or read from the shards when it is not whole in memory."""
    if m.bounded:
        return CheckpointDownWeights(m.resolved.folder, m.adapter, m.model.config)
    return [m.adapter.mlp_out(layer).weight.detach() for layer in m.adapter.layers(m.model)]


def column_norms(m: Loaded) -> dict[str, torch.Tensor]:
    """Squared column norms of every layer's output projections; read from the shards when not whole in memory."""
    if m.bounded:
        return column_sq_norms_from_checkpoint(m.resolved.folder, m.adapter, m.model.config)
    return column_sq_norms(m.model, m.adapter)
