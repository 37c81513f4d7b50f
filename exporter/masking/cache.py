"""A cache of calibration statistics, keyed by what they depend on (model bytes, data, settings).

An interrupted or repeated run reuses statistics that are still valid instead of recalibrating.
Location: $PERSONA_EXPORT_CACHE, else $XDG_CACHE_HOME/persona-export, else ~/.cache/persona-export.
Entries appear atomically (written into a temporary folder, then renamed).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from exporter.masking.statistics import UNREADABLE, Statistics

log = logging.getLogger(__name__)


def cache_root() -> Path:
    if env := os.environ.get("PERSONA_EXPORT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "persona-export"


def load_cached(key: str) -> tuple[Statistics, dict[str, Any]] | None:
    entry = cache_root() / "stats" / key / "stats.safetensors"
    if not entry.exists() and not entry.is_symlink():
        return None
    try:
        stats, info = Statistics.load(entry)
    except UNREADABLE as exc:
        log.warning(
            "ignoring an unreadable cache entry %s (%s: %s); recalibrating", entry.parent, type(exc).__name__, exc
        )
        return None
    return (stats, info) if info.get("key") == key else None


def store(key: str, stats: Statistics, info: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only costs a recalibration next time."""
    folder = cache_root() / "stats"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    except OSError as exc:
        log.warning("could not cache statistics in %s (%s)", folder, exc)
        return
    try:
        stats.save(tmp / "stats.safetensors", info)
        shutil.rmtree(folder / key, ignore_errors=True)
        os.replace(tmp, folder / key)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        log.warning("could not cache statistics in %s (%s)", folder, exc)
        shutil.rmtree(tmp, ignore_errors=True)
