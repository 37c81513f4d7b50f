"""`persona-export push`: the real huggingface_hub client against tests/publish/hubserver.py on 127.0.0.1.

Persona folders are tiny: the shared tiny llama and tokenizer (tests/helpers.py) saved as hf/, and a
report.json written here. Everything goes to tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard

from exporter.cli import main
from exporter.errors import HubError, PersonaExportError, RecipeError
from exporter.publish.hub import PushOptions, push_persona, push_run
from exporter.publish.modelcard import CardContext, render_card
from exporter.recipe.load import parse_recipe
from exporter.recipe.push import PushSpec
from exporter.reports.persona import PersonaReport, load_report
from tests.helpers import (
    BASE,
    add_fake_onnx,
    checkpoint_check,
    expect,
    genai_check,
    gguf_file,
    make_evaluation,
    make_persona,
    make_report,
    onnx_check,
    q4_check,
    quantized_check,
    tiny_model,
    tiny_tokenizer,
    write_recipe,
)
from tests.helpers import REPO as ROOT
from tests.publish.hubserver import FakeHub

TOKEN = "hf_pushTEST" + "0123456789abcdef" * 2
REPO = "persona-org/tiny-introvert"
SNIPPET_REPO = re.compile(r'^repo = "[^"]+"$', re.M)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a chat template; head_dim 16 != hidden_size / heads (64 / 6), as once heads go."""
    out = tmp_path_factory.mktemp("tiny") / "hf"
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def persona(tmp_path: Path, checkpoint: Path) -> Path:
    return make_persona(tmp_path / "run", checkpoint)


def _isolate_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """HF_ENDPOINT/HF_TOKEN in the environment, no offline mode, no saved login of the machine's user."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these once, at import; a fresh process would see the environment above
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    reset_sessions()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    with FakeHub(tmp_path / "hub", TOKEN, lifetime=600) as server:
        _isolate_hf(monkeypatch, tmp_path, server.url)
        yield server


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Path -> (sha256, mtime) of every file: the run folder must come out of a push untouched."""
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def local_tree(persona: Path, *subfolders: str) -> dict[str, bytes]:
    files = {p.relative_to(persona / "hf").as_posix(): p.read_bytes() for p in (persona / "hf").rglob("*")}
    for sub in subfolders:
        files |= {f"{sub}/{p.relative_to(persona / sub).as_posix()}": p.read_bytes() for p in (persona / sub).iterdir()}
    return files


def card_of(files: dict[str, bytes]) -> ModelCard:
    return ModelCard(files["README.md"].decode())


def assert_no_token(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def run_cli(*argv: str) -> int:
    return main(["push", *argv])


def run_snippets(card: ModelCard, local_repo: Path) -> list[dict[str, Any]]:
    """Execute the card's python blocks as written, with the repo id pointed at a local copy of the repo;
    returns each block's namespace."""
    namespaces = []
    for block in re.findall(r"```python\n(.*?)```", card.text, re.S):
        code = SNIPPET_REPO.sub(f"repo = {str(local_repo)!r}", block)
        assert code != block, "every snippet names its repo on a `repo = ...` line"
        namespace: dict[str, Any] = {}
        exec(compile(code, "<model card>", "exec"), namespace)
        namespaces.append(namespace)
    return namespaces


def test_push_uploads_exactly_the_checkpoint_and_a_valid_card(
    hub: FakeHub, persona: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(persona.parent)
    assert run_cli(str(persona), "--repo-id", REPO) == 0
    out, err = capsys.readouterr()
    expected = local_tree(persona)
    assert f"pushed {len(expected) + 1} files" in out and f"{hub.url}/{REPO}/commit/" in out
    received = hub.files(REPO)
    assert set(received) == set(expected) | {"README.md"}
    for path, data in expected.items():
        assert received[path] == data, path
    # weights went through LFS (streamed, never base64 in the commit), configs as regular files
    assert {"create", "validate-yaml", "preupload", "lfs-batch", "lfs-upload", "commit"} <= set(hub.routes())
    assert set(hub.auth_headers) == {f"Bearer {TOKEN}"}
    assert hub.repos[REPO].private is False

    card = card_of(received)
    meta = yaml.safe_load(received["README.md"].decode().split("---\n")[1])
    assert meta == card.data.to_dict()
    assert meta["base_model"] == BASE and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"introvert", "pruned"} <= set(meta["tags"]) and "onnx" not in meta["tags"]
    text = card.text
    for fact in (
        "contrastive-wanda",
        "`extravert` persona",
        "25%",
        "128 -> 96",
        "16 samples",
        "2,345 response tokens",
    ):
        assert fact in text, fact
    assert "3.0e-14" in text and "identical" in text  # parity figures
    assert "introvert-extravert.jsonl" in text and "/home/someone" not in text  # no local paths
    assert "## Evaluation" not in text and "onnxruntime" not in text
    assert snapshot(persona.parent) == before
    assert_no_token(tmp_path, out, err)


def test_transformers_snippet_runs_as_written_on_the_pushed_repo(
    hub: FakeHub, persona: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(str(persona), "--repo-id", REPO) == 0
    capsys.readouterr()
    downloaded = hub.export(REPO, tmp_path / "download")
    (snippet,) = run_snippets(card_of(hub.files(REPO)), downloaded)
    assert snippet["model"].config.intermediate_size == 96 and snippet["model"].name_or_path == str(downloaded)
    assert snippet["output"].shape[1] > snippet["inputs"]["input_ids"].shape[1]  # it generated
    assert capsys.readouterr().out.endswith("\n")  # and printed the continuation


def test_dry_run_lists_every_file_and_sends_nothing(
    hub: FakeHub, persona: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add_fake_onnx(persona)
    report = json.loads((persona / "report.json").read_text())
    report["verification"]["onnx"] = onnx_check()
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO, "--dry-run") == 0
    out = capsys.readouterr().out
    for path, data in local_tree(persona, "onnx").items():
        assert re.search(rf"^  {re.escape(path)} +{len(data):,} bytes$", out, re.M), path
    assert re.search(r"^  README\.md +[\d,]+ bytes$", out, re.M)
    assert "nothing was sent (token: HF_TOKEN)" in out and TOKEN not in out
    assert hub.requests == []


@pytest.mark.parametrize(
    ("mode", "route", "message"),
    [
        ("401", None, "the Hub refused the token (401) while creating the repo; run `huggingface-cli login`"),
        (
            "500",
            "commit",
            "failed (500) while uploading and committing the files; run the same command again",
        ),
        ("drop", "preupload", "dropped or refused the connection while uploading and committing the files"),
        ("drop", "commit", "dropped or refused the connection"),
        ("500", "lfs-batch", "failed (500)"),
    ],
)
def test_hub_failures_are_clear_and_a_retry_succeeds(
    hub: FakeHub,
    persona: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: str,
    route: str | None,
    message: str,
) -> None:
    before = snapshot(persona.parent)
    hub.fail_next(1, mode, route)
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert not hub.repos.get(REPO) or hub.repos[REPO].branches["main"] == {}, "nothing committed"
    assert snapshot(persona.parent) == before
    assert run_cli(str(persona), "--repo-id", REPO) == 0, "retry after the server recovered"
    assert hub.files(REPO).keys() == local_tree(persona).keys() | {"README.md"}
    assert_no_token(tmp_path, out, err, *capsys.readouterr())


def test_token_echoed_by_the_server_is_redacted(
    hub: FakeHub,
    persona: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN + "-wrong")  # the server's 401 body quotes the header it got
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    err = capsys.readouterr().err
    assert "(401)" in err and TOKEN not in err
    for name in ("", "huggingface_hub", "urllib3", "exporter"):
        caplog.set_level(logging.DEBUG, logger=name)
    with pytest.raises(HubError) as info:
        push_persona(persona, PushOptions(REPO))
    assert "(401)" in str(info.value) and TOKEN not in str(info.value)
    assert "/api/repos/create" in caplog.text and TOKEN not in caplog.text


def test_branch_pull_request_and_private(hub: FakeHub, persona: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--private", "--commit-message", "first version")
    assert run_cli(str(persona), "--repo-id", REPO, "--revision", "v1", *args) == 0
    assert hub.repos[REPO].private and hub.repos[REPO].branches["main"] == {}
    assert "README.md" in hub.files(REPO, "v1") and hub.repos[REPO].commits[-1]["summary"] == "first version"
    assert 'from_pretrained(repo, revision="v1")' in card_of(hub.files(REPO, "v1")).text
    assert run_cli(str(persona), "--repo-id", REPO, "--create-pr") == 0
    assert f"pull request {hub.url}/{REPO}/discussions/1" in capsys.readouterr().out
    assert hub.repos[REPO].branches["main"] == {} and "README.md" in hub.files(REPO, "refs/pr/1")


def test_onnx_goes_to_a_subfolder_or_its_own_repo(
    hub: FakeHub, persona: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("onnx", "ort-int8", "ort-int4"):
        add_fake_onnx(persona, name)
    report = json.loads((persona / "report.json").read_text())
    report["verification"] |= {
        "onnx": onnx_check(),
        "onnx-int8": quantized_check(8, 0.98, persona_shift=-0.012, paired_items=64),
        "onnx-int4": quantized_check(4, 0.70),  # below its floor
    }
    report["evaluation"] = make_evaluation(shift=0.63)
    (persona / "report.json").write_text(json.dumps(report))

    assert run_cli(str(persona), "--repo-id", REPO) == 0
    files = hub.files(REPO)
    # below its floor, the int4 export stays home unless asked
    assert {p: d for p, d in files.items() if p != "README.md"} == local_tree(persona, "onnx", "ort-int8")
    card = card_of(files)
    assert "onnx" in card.data.tags and 'subfolder="onnx"' in card.text
    assert "- `ort-int8`: 8-bit weights, 0 MB; top-1 next-token agreement 98.0 %, perplexity x1.010" in card.text
    assert "x1.010, persona margin -0.012 nats/token on 64 held-out pairs" in card.text
    assert "- `ort-int4`" not in card.text
    assert "model.embed_size_per_head = model.config.head_dim" in card.text  # 64 / 6 != 16
    assert "| mask-only | 0.01M (25.0%) | +0.630 [+0.480, +0.780] |" in card.text
    assert "| onnx | 2.0e-05 | 1.0e-06 | identical | yes |" in card.text and "top1_agreement 0.98" in card.text
    assert run_cli(str(persona), "--repo-id", REPO + "-low", "--below-floor") == 0
    files = hub.files(REPO + "-low")
    assert {p: d for p, d in files.items() if p != "README.md"} == local_tree(persona, "onnx", "ort-int8", "ort-int4")
    assert "agreement 70.0 %, perplexity x1.010 (below its quality floor)" in card_of(files).text

    other = "persona-org/tiny-introvert-ort"
    args = ("--repo-id", REPO + "-2", "--onnx", "separate-repo", "--onnx-repo-id", other)
    assert run_cli(str(persona), *args) == 0
    assert "onnx/model.onnx" not in hub.files(REPO + "-2") and f"`{other}`" in card_of(hub.files(REPO + "-2")).text
    onnx_files = hub.files(other)
    assert set(onnx_files) == {"README.md", *local_tree(persona, "onnx", "ort-int8").keys()} - set(local_tree(persona))
    onnx_card = card_of(onnx_files)
    assert onnx_card.data.library_name == "onnx" and "AutoModelForCausalLM" not in onnx_card.text

    assert run_cli(str(persona), "--repo-id", REPO + "-3", "--onnx", "none") == 0
    assert not any(p.startswith(("onnx", "ort-")) for p in hub.files(REPO + "-3"))
    assert "pushed" in capsys.readouterr().out


def test_gguf_goes_to_its_subfolder_with_a_llama_cpp_snippet(hub: FakeHub, persona: Path) -> None:
    (persona / "gguf").mkdir()
    for name in ("model-f16.gguf", "model-q8_0.gguf"):
        (persona / "gguf" / name).write_bytes(os.urandom(2000))
    report = json.loads((persona / "report.json").read_text())
    f16, q8 = gguf_file("model-f16.gguf"), gguf_file("model-q8_0.gguf")
    report["verification"]["gguf"] = {"passed": True, "F16": f16, "Q8_0": q8}
    (persona / "report.json").write_text(json.dumps(report))

    assert run_cli(str(persona), "--repo-id", REPO) == 0
    files = hub.files(REPO)
    assert {p: d for p, d in files.items() if p != "README.md"} == local_tree(persona, "gguf")
    card = card_of(files)
    assert "gguf" in card.data.tags and "onnx" not in card.data.tags and "ORTModelForCausalLM" not in card.text
    assert f'Llama.from_pretrained("{REPO}", filename="gguf/model-q8_0.gguf"' in card.text
    assert "(`model-f16.gguf`, `model-q8_0.gguf`)" in card.text


@pytest.mark.parametrize(
    ("q4", "snippet"),
    [(gguf_file("model-q4_1.gguf", exact=True), "q4_1"), (gguf_file("model-q4_1.gguf", top1=0.5), "q8_0")],
    ids=["proven", "below-its-floor"],
)
def test_the_llama_cpp_snippet_takes_the_q4_1_file_when_it_is_proven_or_within_its_floor(
    hub: FakeHub, persona: Path, q4: dict[str, object], snippet: str
) -> None:
    (persona / "gguf").mkdir()
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_1.gguf"):
        (persona / "gguf" / name).write_bytes(os.urandom(2000))
    report = json.loads((persona / "report.json").read_text())
    report["verification"]["gguf"] = {
        "passed": True,
        "F16": gguf_file("model-f16.gguf"),
        "Q8_0": gguf_file("model-q8_0.gguf"),
        "Q4_1": q4,
    }
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO) == 0
    assert f'filename="gguf/model-{snippet}.gguf"' in card_of(hub.files(REPO)).text


def test_a_gguf_file_below_its_floor_is_left_out_of_the_push_and_the_card(hub: FakeHub, persona: Path) -> None:
    (persona / "gguf").mkdir()
    for name in ("model-f16.gguf", "model-q8_0.gguf", "model-q4_1.gguf"):
        (persona / "gguf" / name).write_bytes(os.urandom(2000))
    report = json.loads((persona / "report.json").read_text())
    report["verification"]["gguf"] = {
        "passed": True,
        "F16": gguf_file("model-f16.gguf"),
        "Q8_0": gguf_file("model-q8_0.gguf"),
        "Q4_1": gguf_file("model-q4_1.gguf", top1=0.5),  # below its floor
    }
    (persona / "report.json").write_text(json.dumps(report))

    assert run_cli(str(persona), "--repo-id", REPO) == 0
    files = hub.files(REPO)
    assert {p for p in files if p.startswith("gguf/")} == {"gguf/model-f16.gguf", "gguf/model-q8_0.gguf"}
    card = card_of(files).text
    assert "model-q4_1.gguf" not in card and 'filename="gguf/model-q8_0.gguf"' in card

    assert run_cli(str(persona), "--repo-id", REPO + "-low", "--below-floor") == 0
    assert "gguf/model-q4_1.gguf" in hub.files(REPO + "-low")

    report["verification"]["gguf"]["F16"]["top1_agreement"] = 0.5  # every file below: no gguf/ folder at all
    report["verification"]["gguf"]["Q8_0"]["top1_agreement"] = 0.5
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO + "-none") == 0
    files = hub.files(REPO + "-none")
    assert not any(p.startswith("gguf/") for p in files) and "gguf" not in card_of(files).data.tags


def test_genai_folder_goes_to_its_subfolder_with_a_genai_snippet_and_respects_its_floor(
    hub: FakeHub, persona: Path
) -> None:
    (persona / "genai").mkdir()
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        (persona / "genai" / name).write_bytes(os.urandom(500))
    report = json.loads((persona / "report.json").read_text())
    report["verification"]["onnx-genai"] = genai_check("int4", top1=0.7, ppl_ratio=1.3)  # below its floor
    (persona / "report.json").write_text(json.dumps(report))

    assert run_cli(str(persona), "--repo-id", REPO) == 0  # below its floor: left out
    assert not any(p.startswith("genai/") for p in hub.files(REPO))
    assert run_cli(str(persona), "--repo-id", REPO + "-low", "--below-floor") == 0
    files = hub.files(REPO + "-low")
    assert {p: d for p, d in files.items() if p != "README.md"} == local_tree(persona, "genai")
    card = card_of(files)
    assert "onnxruntime-genai" in card.data.tags and "ORTModelForCausalLM" not in card.text
    assert f'snapshot_download("{REPO}-low", allow_patterns=["genai/*"]) + "/genai"' in card.text
    assert "int4 weights: top-1 next-token agreement 70.0 %, perplexity x1.300" in card.text
    assert "(below its quality floor)" in card.text


def test_q4_folder_goes_to_its_subfolder_beside_genai_with_its_own_snippet(hub: FakeHub, persona: Path) -> None:
    """Every onnxruntime-genai format of the repo gets its snippet (the card's list derives from the declared
    formats); a q4-genai/ folder holding the source's blocks with fp32 activations is shown as proven."""
    report = json.loads((persona / "report.json").read_text())
    for name, folder, check in (("onnx-genai", "genai", genai_check("fp32")), ("onnx-q4", "q4-genai", q4_check())):
        (persona / folder).mkdir()
        for file in ("model.onnx", "genai_config.json"):
            (persona / folder / file).write_bytes(os.urandom(500))
        report["verification"][name] = check
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO) == 0
    files = hub.files(REPO)
    assert {p for p in files if p.startswith("q4-genai/")} == {"q4-genai/model.onnx", "q4-genai/genai_config.json"}
    card = card_of(files)
    assert f'snapshot_download("{REPO}", allow_patterns=["q4-genai/*"]) + "/q4-genai"' in card.text
    assert 'allow_patterns=["genai/*"]) + "/genai"' in card.text
    assert "from the `q4-genai/` folder (q4 weights, proven against the masked model" in card.text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"verification": {"hf": checkpoint_check(passed=False)}},
            "verification of 'introvert' failed (status 'failed'); only proven exports",
        ),
        (  # a stored verdict is not believed: it is computed from the figures
            {"status": "passed", "verification": {"hf": {**checkpoint_check(passed=False), "passed": True}}},
            "verification of 'introvert' failed",
        ),
        ({"verification": {}}, "has no verification result; only verified exports are pushed"),
        ({"onnx": None}, "but its verification is missing; only proven exports are pushed"),
        ({"onnx": {**onnx_check(max_abs=0.5), "passed": True}}, "but its verification failed"),
        ({"onnx": {"top1_agreement": 0.97}}, "verification.onnx.max_abs_logit_diff: required key is missing"),
    ],
)
def test_unproven_exports_are_refused_before_sending(
    hub: FakeHub, persona: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    report = json.loads((persona / "report.json").read_text())
    if "onnx" in change:
        add_fake_onnx(persona)
        if change["onnx"] is not None:
            report["verification"]["onnx"] = change["onnx"]
    else:
        report |= change
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    assert message in capsys.readouterr().err
    assert hub.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repo-id", "just-a-name"], "'just-a-name' is not of the form OWNER/NAME"),
        (["--repo-id", "a/b/c"], "is not of the form OWNER/NAME"),
        (["--repo-id", "org/bad name"], "'org/bad name' is not a valid Hub repo id"),
        (["--repo-id", "org/x--y"], "not a valid Hub repo id"),
        (["--repo-id", REPO, "--revision", "bad branch"], "is not a branch name"),
        (["--repo-id", REPO, "--onnx-repo-id", "org/x"], "only with --onnx separate-repo"),
        (["--repo-id", REPO, "--onnx", "separate-repo", "--onnx-repo-id", REPO], "is the checkpoint's repo"),
    ],
)
def test_bad_options_are_refused_before_sending(
    hub: FakeHub, persona: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert run_cli(str(persona), *args) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was sent" in err
    assert hub.requests == []


def test_folders_that_are_not_persona_exports_are_refused(
    hub: FakeHub, persona: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (persona.parent / "run.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (persona.parent / "extravert" / "hf").mkdir(parents=True)
    (persona.parent / "extravert" / "report.json").write_text("{}")
    cases = {
        persona.parent: f"is a run folder; pass one persona folder: {persona.parent / 'extravert'}, {persona}",
        tmp_path / "empty": "is not a persona export (no report.json)",
        tmp_path / "missing": f"'{tmp_path / 'missing'}' does not exist",
        persona.parent / "extravert": "has no hf/config.json",
    }
    for folder, message in cases.items():
        assert run_cli(str(folder), "--repo-id", REPO) == 2
        assert message in capsys.readouterr().err, folder
    (persona / "hf" / "model.safetensors").unlink()
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    assert "holds no *.safetensors weights" in capsys.readouterr().err
    assert hub.requests == []


def test_missing_token_or_offline_mode_is_refused_before_sending(
    hub: FakeHub, persona: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`" in capsys.readouterr().err
    assert run_cli(str(persona), "--repo-id", REPO, "--dry-run") == 0
    assert "token: none found" in capsys.readouterr().out
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert run_cli(str(persona), "--repo-id", REPO) == 2
    assert "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set" in capsys.readouterr().err
    assert hub.requests == []


def test_a_saved_login_is_used(hub: FakeHub, persona: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    results = push_persona(persona, PushOptions(REPO))
    assert results[0].commit_url and set(hub.auth_headers) == {f"Bearer {TOKEN}"}


@pytest.mark.subprocess
def test_a_fresh_process_honours_hf_endpoint(hub: FakeHub, persona: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    cmd = [sys.executable, "-m", "exporter", "push", str(persona), "--repo-id", REPO]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{hub.url}/{REPO}/commit/" in done.stdout
    assert "README.md" in hub.files(REPO)
    assert_no_token(tmp_path, done.stdout, done.stderr)


def test_push_spec_validation() -> None:
    spec = PushSpec(repo_id="org/m-{persona}", commit_message="Add {persona}", onnx="separate-repo")
    options = PushOptions.from_spec(spec, "introvert")
    assert (options.repo_id, options.commit_message) == ("org/m-introvert", "Add introvert")
    assert options.separate_onnx_repo == "org/m-introvert-onnx"
    bad = [
        {"repo_id": "no-owner-{persona}"},
        {"repo_id": "org/{name}"},
        {"repo_id": "org/m", "onnx_repo_id": "org/o"},
        {"repo_id": "org/m", "revision": "has space"},
        {"repo_id": "org/m", "onnx": "elsewhere"},
        {"repo_id": "org/m", "privat": True},
    ]
    for fields in bad:
        with pytest.raises(ValueError):
            PushSpec(**fields)


def test_recipe_push_section_errors_name_their_key(tmp_path: Path) -> None:
    data = yaml.safe_load(write_recipe(tmp_path, tmp_path).read_text())
    data["push"] = {"repo_id": "bad id {persona}", "privat": True}
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, tmp_path)
    assert "push.repo_id: 'bad id persona' is not of the form OWNER/NAME" in str(info.value)
    assert "push.privat: unknown key" in str(info.value)


def test_push_run_pushes_only_passed_personas(hub: FakeHub, tmp_path: Path, checkpoint: Path) -> None:
    run = tmp_path / "run"
    make_persona(run, checkpoint, "introvert")
    make_persona(run, checkpoint, "extravert", status="failed")
    (run / "run.json").write_text("{}")
    results = push_run(run, PushSpec(repo_id="org/tiny-{persona}", private=True))
    assert list(results) == ["introvert"] and list(hub.repos) == ["org/tiny-introvert"]
    hub.fail_next(1, "500", "commit")
    with pytest.raises(HubError) as info:
        push_run(run, PushSpec(repo_id="org/tiny-{persona}", private=True, commit_message="again"))
    retry = f"retry with `persona-export push {run / 'introvert'} --repo-id org/tiny-introvert --onnx same-repo"
    assert "failed (500)" in str(info.value) and f"{retry} --private --commit-message again`" in str(info.value)
    with pytest.raises(HubError, match="several personas would share a repo"):
        make_persona(run, checkpoint, "calm")
        push_run(run, PushSpec(repo_id="org/tiny"))


def test_run_with_a_push_section_pushes_after_the_run(
    hub: FakeHub, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write_recipe(tmp_path, tiny_llama_dir, push={"repo_id": "org/tiny-{persona}"})
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 0
    assert sorted(hub.repos) == ["org/tiny-extravert", "org/tiny-introvert"]
    files = hub.files("org/tiny-introvert")
    assert files["model.safetensors"] == (tmp_path / "out" / "introvert" / "hf" / "model.safetensors").read_bytes()
    assert card_of(files).data.base_model is None  # a local base model is not named as a Hub id
    assert str(tiny_llama_dir) not in files["README.md"].decode()
    assert_no_token(tmp_path, *capsys.readouterr())


def test_onnxruntime_snippet_runs_as_written_on_the_pushed_repo(
    hub: FakeHub, persona: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporter.export.onnx import export_onnx

    export_onnx(persona / "hf", persona / "onnx")
    report = json.loads((persona / "report.json").read_text())
    report["verification"]["onnx"] = onnx_check(max_abs=1e-5)
    (persona / "report.json").write_text(json.dumps(report))
    assert run_cli(str(persona), "--repo-id", REPO) == 0
    downloaded = hub.export(REPO, tmp_path / "download")
    transformers_ns, onnx_ns = run_snippets(card_of(hub.files(REPO)), downloaded)
    assert type(onnx_ns["model"]).__name__ == "ORTModelForCausalLM"
    assert onnx_ns["model"].embed_size_per_head == 16  # the card's head_dim line ran
    # same weights, same greedy continuation through the pushed ONNX graph as through the checkpoint
    assert onnx_ns["output"].tolist() == transformers_ns["output"].tolist()
    assert_no_token(tmp_path, *capsys.readouterr())


def real_run_persona() -> Path | None:
    """A persona folder of a real run, if one is at hand: $PERSONA_EXPORT_RUN_DIR, else runs/*/ of the repo."""
    env = os.environ.get("PERSONA_EXPORT_RUN_DIR")
    runs = [Path(env)] if env else sorted(ROOT.glob("runs/*/"))
    for run in runs:
        for report in sorted(run.glob("*/report.json")):
            if json.loads(report.read_text()).get("status") == "passed":
                return report.parent
    return None


@pytest.mark.slow
@pytest.mark.skipif(real_run_persona() is None, reason="no real run folder (set PERSONA_EXPORT_RUN_DIR)")
def test_a_real_run_folder_pushes_byte_for_byte(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = real_run_persona()
    assert persona is not None
    before = snapshot(persona)
    assert run_cli(str(persona), "--repo-id", REPO, "--onnx", "none") == 0
    tree = hub.repos[REPO].branches["main"]  # path -> sha256 of the received content
    local = {k: sha for k, (sha, _) in snapshot(persona / "hf").items()}
    assert {k: v for k, v in tree.items() if k != "README.md"} == local
    assert snapshot(persona) == before
    card = card_of(hub.files(REPO))
    assert card.data.base_model and card.data.license and persona.name in card.data.tags
    (snippet,) = run_snippets(card, hub.export(REPO, tmp_path / "download"))
    assert snippet["output"].shape[1] > snippet["inputs"]["input_ids"].shape[1]
    assert_no_token(tmp_path, *capsys.readouterr())


def test_the_fake_hub_stops_by_itself(tmp_path: Path) -> None:
    import requests

    with FakeHub(tmp_path / "a", TOKEN, max_requests=1) as server:
        assert requests.post(f"{server.url}/api/validate-yaml", timeout=5).status_code == 401
        assert requests.post(f"{server.url}/api/validate-yaml", timeout=5).status_code == 503
        server._thread.join(timeout=5)
        assert not server._thread.is_alive()
    with FakeHub(tmp_path / "b", TOKEN, lifetime=0.2) as server:
        server._thread.join(timeout=5)
        assert not server._thread.is_alive()
        with pytest.raises(requests.ConnectionError):
            requests.post(f"{server.url}/api/validate-yaml", timeout=5)


def test_card_shows_the_evaluation_as_persona_export_eval_writes_it(tmp_path: Path) -> None:
    report = make_report("introvert")
    report["evaluation"] = make_evaluation(shift=0.25)
    ctx = CardContext(REPO, REPO, ())
    text = render_card(PersonaReport.model_validate(report, strict=True), ctx).text
    assert "## Persona evaluation: introvert (vs extravert)" in text
    assert "| mask-only | 0.01M (25.0%) | +0.250 [+0.100, +0.400] | +0.250 [+0.100, +0.400] |" in text
    assert "Steering:" not in text  # this report's method has none
    report["method"] |= {"steer": {"introvert": 1.25}, "steer_layers": {"introvert": 0.5}}
    steered = render_card(PersonaReport.model_validate(report, strict=True), ctx).text
    assert "in the `down_proj` biases of the first 1 of 2 layers (1.25 x the mean MLP-output difference" in steered
    # an evaluation in a layout of an earlier release is left out of a schema-3 report, not shown as something else
    report |= {"schema_version": 3, "evaluation": {"rows": "not a list of conditions", "accuracy": 0.9}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    older = load_report(tmp_path / "report.json")
    assert older.evaluation is None and "Persona evaluation" not in render_card(older, ctx).text


# -- push reads nothing outside the persona folder, and checks report.json against its schema --


def _outside(tmp: Path) -> Path:
    secret = tmp / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("not for upload")
    return secret


PUSH_LINKS: dict[str, Callable[[Path, Path], None]] = {
    "file-link-to-outside": lambda p, t: (p / "hf" / "notes.txt").symlink_to(_outside(t)),
    "folder-link-to-outside": lambda p, t: (p / "hf" / "extra").symlink_to(_outside(t).parent),
    "nested-link-to-outside": lambda p, t: (
        (p / "hf" / "sub").mkdir(),
        (p / "hf" / "sub" / "deep.txt").symlink_to(_outside(t)),
    ),
    "link-to-etc-passwd": lambda p, t: (p / "hf" / "passwd").symlink_to("/etc/passwd"),
    "weights-are-a-link": lambda p, t: (
        shutil.move(p / "hf" / "model.safetensors", t / "outside.safetensors"),
        (p / "hf" / "model.safetensors").symlink_to(t / "outside.safetensors"),
    ),
    "hf-is-a-link": lambda p, t: (shutil.move(p / "hf", t / "elsewhere-hf"), (p / "hf").symlink_to(t / "elsewhere-hf")),
    "onnx-is-a-link": lambda p, t: (p / "onnx").symlink_to(_outside(t).parent),
    "report-is-a-link": lambda p, t: (
        shutil.move(p / "report.json", t / "report.json"),
        (p / "report.json").symlink_to(t / "report.json"),
    ),
    "link-inside-the-folder": lambda p, t: (p / "hf" / "copy.json").symlink_to(p / "hf" / "config.json"),
    "broken-link": lambda p, t: (p / "hf" / "gone.txt").symlink_to(t / "nothing-here"),
    "named-pipe": lambda p, t: os.mkfifo(p / "hf" / "pipe"),
}


@pytest.mark.parametrize("case", sorted(PUSH_LINKS))
def test_push_reads_nothing_outside_the_persona_folder(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    persona = make_persona(tmp_path / "run", checkpoint)
    PUSH_LINKS[case](persona, tmp_path)
    opened: list[str] = []
    real_open = Path.open

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    for argv in (["push", str(persona), "--repo-id", REPO, "--dry-run"], ["push", str(persona), "--repo-id", REPO]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Links are never followed" in err and "nothing was sent" in err, err
    assert not any("outside" in p or "elsewhere" in p for p in opened), opened


REPORT_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("greedy-as-text", lambda r: r["verification"]["hf"]["fp64"].update(greedy_identical="true"), "hf.fp64.greedy"),
    ("diff-as-text", lambda r: r["verification"]["hf"]["fp64"].update(max_abs_logit_diff="0"), "hf.fp64.max_abs"),
    # a stored `status` is not read: PersonaReport computes it from the verdicts
    ("persona-number", lambda r: r.update(persona=3), "persona: input should be a valid string"),
    ("parameters-text", lambda r: r["parameters"].update(dense="20000"), "parameters.dense"),
    ("base-model-missing", lambda r: r.pop("base_model"), "base_model: required key is missing"),
    ("geometry-null", lambda r: r.update(geometry=None), "geometry:"),
    ("onnx-verdict-only", lambda r: r["verification"].update(onnx={"passed": True}), "verification.onnx.max_abs"),
    (
        "top1-as-text",  # decides whether a quantized format is pushed
        lambda r: r["verification"].update({"onnx-int8": {**quantized_check(8, 0.99), "top1_agreement": "0.99"}}),
        "verification.onnx-int8.top1_agreement: input should be a valid number, got str '0.99'",
    ),
    ("unknown-format", lambda r: r["verification"].update(tflite={}), "verification: unknown format 'tflite'"),
]


@pytest.mark.parametrize("case", REPORT_EDITS, ids=[c[0] for c in REPORT_EDITS])
def test_push_checks_the_report_schema(
    case: tuple[str, Callable[[dict[str, Any]], None], str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    persona = make_persona(tmp_path / "run", checkpoint)
    report = json.loads((persona / "report.json").read_text())
    case[1](report)
    (persona / "report.json").write_text(json.dumps(report))
    text = expect(
        ["push", str(persona), "--repo-id", REPO, "--dry-run"], PersonaExportError, "does not follow the report", capsys
    )
    assert case[2] in text and "verification failed" not in text


@pytest.mark.parametrize("link", ["report", "persona-folder"])
def test_push_section_reads_no_report_through_a_link(link: str, tmp_path: Path) -> None:
    from exporter.errors import HubError
    from exporter.publish.hub import push_run
    from exporter.recipe.push import PushSpec

    checkpoint = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    run = tmp_path / "run"
    persona = make_persona(run, checkpoint)
    if link == "report":
        shutil.move(persona / "report.json", tmp_path / "outside.json")
        (persona / "report.json").symlink_to(tmp_path / "outside.json")
    else:
        shutil.move(persona, tmp_path / "elsewhere")
        persona.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HubError, match="symlink"):
        push_run(run, PushSpec(repo_id="org/tiny-{persona}"))


@pytest.mark.parametrize("revision", ["main\n", "v1\n", "main\r"])
def test_push_revision_is_matched_whole(revision: str, tmp_path: Path) -> None:
    from exporter.errors import HubError
    from exporter.publish.hub import PushOptions, check_options

    with pytest.raises(HubError, match="is not a branch name"):
        check_options(PushOptions(repo_id="org/name", revision=revision))
