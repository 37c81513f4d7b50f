"""`generate` and `serve` on whatever export a user has (a persona folder, hf/, onnx/, a Hub download, a GGUF
file), clear errors for the rest, the serve command itself, and the run's dense model served as `base`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from exporter.cli import main
from exporter.errors import ExportFolderError, OnnxModelError
from exporter.recipe.load import load_recipe
from exporter.runtime.runner import Runner, Sampling
from exporter.serve.server import ServeError, bind, served_models
from exporter.workflows.serve import base_export
from tests.helpers import REPO, expect, tiny_model, tiny_tokenizer, write_recipe
from tests.serve.running import fetch, running

SAMPLE = ["--temperature", "1.0", "--seed", "2", "--max-new-tokens", "8"]


def generated(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["generate", str(path), "--prompt", "plan a trip", *SAMPLE, *extra]) == 0
    return capsys.readouterr().out


def test_generate_takes_any_export(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    persona = run / "extravert"
    want = generated(persona, capsys)
    assert len(want.strip()) > 3
    hub = tmp_path / "someone--extravert"  # a Hub download: the checkpoint at the root, onnx/ beside it
    shutil.copytree(persona / "hf", hub)
    shutil.copytree(persona / "onnx", hub / "onnx")
    for path in (persona / "hf", persona / "onnx", hub, hub / "onnx"):
        assert generated(path, capsys) == want, path
    assert generated(hub, capsys, "--backend", "torch") == want
    assert Runner(hub).backend == "onnx" and Runner(persona / "hf").backend == "hf"
    assert Runner(hub).name == "someone--extravert" and Runner(persona / "onnx").name == "extravert"


def test_generate_runs_a_gguf_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.export.gguf import export_gguf

    model, tok = tiny_model("llama"), tiny_tokenizer()
    tok.bos_token = "<|system|>"  # transformers' GGUF tokenizer reader needs a BOS id in the file
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    export_gguf(tmp_path / "hf", tmp_path / "gguf")
    file = tmp_path / "gguf" / "model-f16.gguf"
    runner = Runner(file)
    assert (runner.backend, runner.name) == ("gguf", "model-f16")
    out = generated(file, capsys)
    assert out.strip() and out == generated(tmp_path / "hf", capsys)  # the same tiny model, fp16-rounded weights
    expect(["generate", str(tmp_path / "gguf"), "--prompt", "x"], ExportFolderError, "holds GGUF files", capsys)


def test_paths_that_are_not_exports_say_what_they_are(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(run): "is a run folder (personas: introvert, extravert); pass one persona",
        str(tmp_path / "empty"): "is not an export",
        str(tmp_path / "notes.txt"): "is a file but not a GGUF file",
    }
    for path, message in cases.items():
        expect(["generate", path, "--prompt", "x"], ExportFolderError, message, capsys)
    err = expect(
        ["serve", str(run / "introvert"), "--format", "onnx-genai"], OnnxModelError, "no genai/ folder", capsys
    )
    assert "persona-export export" in err and "--format onnx-genai" in err


def free_port() -> int:
    sock = bind("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@pytest.mark.subprocess
def test_serve_command_listens_on_loopback_and_stops_on_ctrl_c(run: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "exporter", "serve", str(run), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while fetch_health(port) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr and proc.stderr.read()
            time.sleep(0.2)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        out = api.chat.completions.create(model="introvert", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.choices[0].finish_reason in ("stop", "length") and out.model == "introvert"
        expect(["serve", str(run), "--port", str(port)], ServeError, f"cannot listen on 127.0.0.1:{port}", capsys)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert f"serving 2 model(s) on http://127.0.0.1:{port}/v1" in stdout
    assert "introvert: onnx on onnxruntime" in stdout and "Traceback" not in stderr


def fetch_health(port: int) -> dict | None:
    try:
        return fetch(f"http://127.0.0.1:{port}/health")[1]  # type: ignore[no-any-return]
    except OSError:
        return None


def test_the_runs_dense_model_is_served_as_base(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`serve --base` exports the model the run was cut from into RUN_DIR/base once; it then answers as `base`,
    as that model does."""
    model_dir = tmp_path / "dense"
    tiny_model("llama", seed=5).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = load_recipe(write_recipe(tmp_path, model_dir))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json")))
    folder = base_export(copy, "onnx")
    assert folder == copy / "base" and (folder / "onnx" / "model.onnx").is_file()
    stamp = (folder / "onnx" / "model.onnx").stat().st_mtime_ns
    assert base_export(copy, "onnx") == folder and (folder / "onnx" / "model.onnx").stat().st_mtime_ns == stamp
    models = served_models(copy, None)
    assert sorted(models) == ["base", "extravert", "introvert"] and models["base"].format == "onnx"
    chat = [{"role": "user", "content": "plan a trip"}]
    want = "".join(Runner(model_dir).stream(chat, 8, Sampling(temperature=1.0, seed=4)))
    with running(models) as url:
        api = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        out = api.chat.completions.create(model="base", messages=chat, temperature=1.0, seed=4, max_tokens=8)
    assert out.choices[0].message.content == want and want.strip()
    expect(["serve", str(run / "introvert"), "--base"], ExportFolderError, "is not a run folder", capsys)


def test_format_folders_are_named_by_the_registry(tmp_path: Path) -> None:
    """Each folder is found under its registered format name, whichever runtime family it shares (genai/ and
    q4-genai/ both run on onnxruntime-genai); an unregistered ONNX folder under its own name."""
    from exporter.runtime.exports import GENAI, ORT, locate

    folder = tmp_path / "download"
    for sub, files in {
        "onnx": ("config.json", "model.onnx"),
        "genai": ("genai_config.json",),
        "q4-genai": ("genai_config.json",),
        "onnx-custom": ("config.json", "model.onnx"),
    }.items():
        (folder / sub).mkdir(parents=True)
        for name in files:
            (folder / sub / name).write_text("{}")
    export = locate(folder)
    runtimes = {name: found.runtime for name, found in export.formats.items()}
    assert runtimes == {"onnx": ORT, "onnx-genai": GENAI, "onnx-q4": GENAI, "onnx-custom": ORT}
    assert export.pick().format == "onnx" and export.pick("onnx-q4").path == folder / "q4-genai"
    assert locate(folder / "q4-genai").formats.keys() == {"onnx-q4"}
