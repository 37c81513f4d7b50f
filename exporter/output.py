"""Atomic outputs: everything is written into a hidden staging folder next to the target, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter.errors import OutputError


def check_target(out: Path, overwrite: bool) -> None:
    """Fail early, before any work, if `out` cannot be written."""
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is not a folder; remove it or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write into {str(parent)!r} (permission denied); choose another --out")


@contextmanager
def staged(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `out` in one rename, on error it is removed."""
    check_target(out, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(stage, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, out)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
