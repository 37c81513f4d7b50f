"""The server as the tests run it: uvicorn in a thread of the test process on a free loopback port, and a run
folder of two tiny personas (different weights) with hf/ and onnx/."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exporter.export.onnx import export_onnx
from exporter.serve.scheduler import Served
from exporter.serve.server import Limits, bind, make_server
from tests.helpers import make_report, tiny_model, tiny_tokenizer

PERSONAS = {"introvert": 0, "extravert": 1}  # name -> seed of its tiny model


def two_persona_run(root: Path) -> Path:
    """RUN/run.json and RUN/<persona>/{report.json, hf/, onnx/} for each of PERSONAS."""
    run = root / "run"
    for name, seed in PERSONAS.items():
        folder = run / name
        tiny_model("llama", seed).save_pretrained(folder / "hf")
        tiny_tokenizer().save_pretrained(folder / "hf")
        export_onnx(folder / "hf", folder / "onnx")
        (folder / "report.json").write_text(json.dumps(make_report(name)))
    (run / "run.json").write_text(json.dumps({"personas": dict.fromkeys(PERSONAS, "passed")}))
    return run


@contextmanager
def running(models: dict[str, Served], limits: Limits | None = None, api_key: str | None = None) -> Iterator[str]:
    """The app on 127.0.0.1 at a free port while the block runs; yields the base URL (…/v1)."""
    server = make_server(models, limits or Limits(), api_key)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def fetch(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, Any]:
    """(status, JSON body) of a GET, or of a POST of `body`, with the standard library's client."""
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def slow_steps(model: Served, seconds: float) -> Callable[[Any], Any]:
    """`model`'s decode step taking at least `seconds` (for monkeypatch.setattr(model.decoder, "step", ...))."""
    step = model.decoder.step

    def slow(tokens: Any) -> Any:
        time.sleep(seconds)
        return step(tokens)

    return slow
