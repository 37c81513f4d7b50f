"""Start-up: the table of served models (every persona of a run, RUN_DIR/base when exported, or the one export
at a path), each loaded once in the format asked for, and uvicorn serving the app on one port."""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import PersonaExportError
from exporter.runtime.decoders import generation_config, open_export, shipped_repetition_penalty
from exporter.runtime.exports import Export, Found, locate_models
from exporter.runtime.reply import end_ids
from exporter.serve.app import Guard, create_app
from exporter.serve.scheduler import Scheduler, Served

log = logging.getLogger(__name__)


class ServeError(PersonaExportError):
    """The server cannot start as asked (a port in use, a bad limit)."""


@dataclass(frozen=True)
class Limits:
    max_batch: int = 8  # rows decoded together (all models)
    max_queue: int = 16  # requests waiting beyond those
    max_body: int = 1_000_000  # bytes of one request body
    threads: int | None = None  # onnxruntime's intra-op threads per model; None: one per core


def sampling_defaults(config: dict[str, Any], repetition_penalty: float) -> dict[str, Any]:
    """The request defaults a generation_config.json gives (greedy unless it samples), with the repetition
    penalty the format ships, as `generate` and `chat` read it."""
    sample = bool(config.get("do_sample", False))
    return {
        "temperature": float(config.get("temperature") or 1.0) if sample else 0.0,
        "top_p": float(config.get("top_p") or 1.0) if sample else 1.0,
        "repetition_penalty": repetition_penalty,
        "max_tokens": config.get("max_new_tokens") if isinstance(config.get("max_new_tokens"), int) else None,
    }


def load_served(name: str, found: Found, threads: int | None) -> Served:
    decoder, tokenizer = open_export(found, threads)
    config = generation_config(found)
    return Served(
        name,
        found.format,
        found.runtime,
        decoder,
        tokenizer,
        end_ids(tokenizer, config),
        sampling_defaults(config, shipped_repetition_penalty(found)),
    )


def chosen_formats(path: Path, fmt: str | None) -> dict[str, Found]:
    """The format of every model at `path` that `serve` would load, checked before anything is loaded."""
    exports: dict[str, Export] = locate_models(path)
    return {name: export.pick(fmt) for name, export in exports.items()}


def served_models(path: Path, fmt: str | None, threads: int | None = None) -> dict[str, Served]:
    """Every model at `path` in format `fmt` (None: each one's preferred format), loaded."""
    return {name: load_served(name, found, threads) for name, found in chosen_formats(path, fmt).items()}


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    sock.listen(128)
    return sock


def make_server(models: dict[str, Served], limits: Limits, api_key: str | None) -> Any:
    """A uvicorn.Server for the app (not yet running); `server.run(sockets=[bind(...)])` serves."""
    import uvicorn

    scheduler = Scheduler(models, limits.max_batch, limits.max_queue)
    app = Guard(create_app(models, scheduler), api_key, limits.max_body)
    # connections beyond the rows, the queue and a few for /health and /v1/models get uvicorn's own 503
    config = uvicorn.Config(
        app, log_level="warning", limit_concurrency=limits.max_batch + limits.max_queue + 8, timeout_keep_alive=5
    )
    return uvicorn.Server(config)


def serve(path: Path, fmt: str | None, host: str, port: int, limits: Limits, api_key: str | None) -> None:
    """Load the models at `path` and serve them until interrupted."""
    api_key = api_key or os.environ.get("PERSONA_EXPORT_API_KEY") or None
    chosen = chosen_formats(path, fmt)
    sock = bind(host, port)  # a port in use is said before minutes of loading
    try:
        models = {name: load_served(name, found, limits.threads) for name, found in chosen.items()}
        server = make_server(models, limits, api_key)
        shown = host if ":" not in host else f"[{host}]"
        for name, m in models.items():
            print(f"  {name}: {m.format} on {m.runtime}, context {m.decoder.context} tokens")
        print(f"serving {len(models)} model(s) on http://{shown}:{port}/v1 (rows decoded together: ", end="")
        print(f"{limits.max_batch}, queue: {limits.max_queue}{', API key required' if api_key else ''}); Ctrl-C stops")
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        sock.close()
