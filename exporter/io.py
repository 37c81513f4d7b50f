"""Atomic outputs: a run is written into a hidden staging folder next to the target, then renamed; single
files are written next to their target, then renamed (`write_atomic`, `write_json`). `--overwrite` replaces only
a folder the project wrote (`Product`): a run folder with its run.json, a sweep or tune folder with its report."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import OutputError

OWNER = ".owner-pid"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@dataclass(frozen=True)
class Product:
    """What a command writes as its output folder: a folder holding `manifest`, a JSON object with `key`."""

    what: str  # "a run folder"
    manifest: str  # "run.json"
    key: str  # a top-level key every version of that manifest holds

    def problem(self, folder: Path) -> str | None:
        """Why `folder` is not such a folder (what it lacks), or None."""
        manifest = folder / self.manifest
        if manifest.is_symlink() or not manifest.is_file():
            kind = "a symlink" if manifest.is_symlink() else "nothing" if not manifest.exists() else "not a file"
            return f"its {self.manifest} is {kind}" if kind != "nothing" else f"it has no {self.manifest}"
        try:
            if manifest.stat().st_size > 1 << 26:  # a manifest is a few kilobytes
                return f"its {self.manifest} is far larger than a manifest"
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return f"its {self.manifest} is not readable JSON"
        if not isinstance(data, dict) or self.key not in data:
            return f"its {self.manifest} is not the manifest of {self.what} (no {self.key!r})"
        return None


RUN_FOLDER = Product("a run folder", "run.json", "personas")
SWEEP_FOLDER = Product("a sweep folder", "report.json", "points")
TUNE_FOLDER = Product("a tune folder", "report.json", "grid")


def check_target(out: Path, overwrite: bool, product: Product | None = None) -> None:
    """Fail early, before any work, if `out` cannot be written; with `overwrite`, if `out` is not a `product`
    that an earlier command wrote (anything else is never replaced)."""
    if out.is_symlink():
        raise OutputError(
            f"output {str(out)!r} is a symlink (to {os.readlink(out)!r}); links are neither followed nor replaced: "
            "pass the folder itself or choose another --out"
        )
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {str(out)!r} exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is not a folder; remove it or choose another --out")
    if out.exists() and product is not None and (problem := product.problem(out)) is not None:
        raise OutputError(
            f"--overwrite replaces only {product.what} that persona-export wrote, and {str(out)!r} is not one "
            f"({problem}); move it away or choose another --out. Nothing was changed."
        )
    ancestor = out.absolute().parent
    while not ancestor.exists():  # nothing is created here: a failed check leaves no trace
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {str(out.parent)!r}: {str(ancestor)!r} is a file; choose another --out")
    if not os.access(ancestor, os.W_OK):
        raise OutputError(f"cannot write into {str(ancestor)!r} (permission denied); choose another --out")
    try:  # os.access trusts permission bits; root, read-only mounts and /sys or /proc say otherwise
        os.rmdir(tempfile.mkdtemp(prefix=".persona-export-probe-", dir=ancestor))
    except OSError as exc:
        first = out if out.parent.exists() else out.parent
        raise OutputError(
            f"cannot create {str(first)!r}: {str(ancestor)!r} cannot be written ({exc.strerror or exc}); choose "
            "another --out. Nothing was written."
        ) from None


def _make_parent(out: Path) -> list[Path]:
    """Create out's missing parents; returns the ones created, deepest first (removed again on failure)."""
    missing = [p for p in out.absolute().parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {str(out.parent)!r} ({exc.strerror}); choose another --out") from None
    return missing


def _unmake(created: list[Path]) -> None:
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shown_name(folder: Path) -> str:
    """The name of `folder` as the user knows it: a staging folder (`.NAME.partial-XXXX`) shows as NAME."""
    name = Path(folder).name
    if name.startswith(".") and ".partial-" in name:
        return name[1 : name.rindex(".partial-")]
    return name


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove staging folders of `out` left by killed runs (their owner process is gone)."""
    removed = []
    for stage in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        owner = stage / OWNER
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            pid = -1
        if pid <= 0 or not _alive(pid):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


@contextmanager
def staged(out: Path, overwrite: bool = False, product: Product | None = None) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `out` in one rename, on error it is removed. With
    `overwrite`, an existing `out` is replaced only when it is a `product` (check_target).

    A run killed with SIGKILL leaves its hidden staging folder behind; the next run for the same `out`
    removes it.
    """
    check_target(out, overwrite, product)
    created = _make_parent(out)
    remove_stale_stages(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        _unmake(created)
        raise OutputError(
            f"cannot create a staging folder in {str(out.parent)!r} ({exc.strerror or exc}); choose another --out. "
            "Nothing was written."
        ) from None
    try:
        (stage / OWNER).write_text(str(os.getpid()))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user makes
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _unmake(created)
        raise OutputError(f"cannot write into {str(stage)!r} ({exc.strerror or exc}); choose another --out") from None
    try:
        yield stage
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _unmake(created)
        on_stage = str(exc.filename or "").startswith(str(stage))  # any failure to write the output itself
        if exc.errno in DISK_ERRORS or on_stage:
            raise OutputError(
                f"writing the output under {str(out.parent)!r} failed: {exc.strerror} ({exc.filename or out}); "
                "free disk space or choose another --out. Nothing was written."
            ) from None
        raise
    except Exception as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _unmake(created)
        full = disk_full(exc)
        if full is not None:  # a writer that reports a full disk as its own error (safetensors, onnx, ...)
            raise OutputError(
                f"writing the output under {str(out.parent)!r} failed: {full}; free disk space or choose another "
                "--out. Nothing was written."
            ) from None
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _unmake(created)
        raise
    (stage / OWNER).unlink()
    for f in stage.rglob("*.safetensors"):  # safetensors writes 0600; serving as another user needs what umask gives
        f.chmod(0o666 & ~umask)
    swap_in(stage, out)


FULL = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def disk_full(exc: BaseException) -> str | None:
    """What says the disk was full, if anything does, in `exc` or the errors it came from: an OSError's code,
    or the system's message in a library's own error (safetensors writes "No space left on device")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return str(seen.strerror)
        text = str(seen)
        if (found := next((m for m in FULL if m in text), None)) is not None:
            return found
        seen = seen.__cause__ or seen.__context__
    return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(stage: Path, out: Path) -> None:
    """Put the finished `stage` in place of `out` (removed afterwards), with Ctrl-C and SIGTERM held back.

    Where the kernel can exchange two folders atomically, `out` is never missing or half-replaced; elsewhere
    the two renames happen back to back and the old folder is kept in a hidden folder until both succeeded.
    """
    held = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    old: Path | None = None
    try:
        if not out.exists():
            os.replace(stage, out)
        elif _exchange(stage, out):
            old = stage  # holds the previous `out` now
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(stage, out)
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` in one rename (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


LINKED = {".safetensors", ".onnx", ".onnx_data", ".data"}  # large files that nothing rewrites in place


def link_copy(src: Path, dst: Path, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Copy the folder `src` into the existing `dst` for staging: weights hard-linked (other files copied, since
    a writer may rewrite them in place), symlinks kept as links, hidden entries and the names in `skip` left out."""

    def link(s: str, d: str) -> str:
        if Path(s).suffix in LINKED:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return str(shutil.copy2(s, d))

    for entry in src.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(dst / entry.name))


def refuse_links(folder: Path, fix: str) -> None:
    """Raise OutputError naming the symlinks under `folder` (links not followed). A folder that is copied into a
    staging folder and written again must hold none: a file written through a link would land outside it."""
    links = [
        f"{Path(root, name)} -> {os.readlink(Path(root, name))!r}"
        for root, dirs, files in os.walk(folder, followlinks=False)
        for name in sorted(dirs + files)
        if Path(root, name).is_symlink()
    ]
    if links:
        raise OutputError(
            f"{folder} holds {len(links)} symlink(s) ({'; '.join(links[:5])}); persona-export neither follows nor "
            f"copies links in the folders it rewrites: {fix}. Nothing was changed."
        )


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
