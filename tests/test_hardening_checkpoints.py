"""A loaded checkpoint matches its config exactly (sources and exports), push reads nothing outside the persona
folder whatever symlinks say, and push checks report.json against its schema (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.cli import main
from exporter.errors import (
    ExportFolderError,
    ModelSourceError,
    OutputError,
    ParityError,
    PersonaExportError,
)
from exporter.model import sources
from exporter.recipe.schema import load_recipe
from tests.conftest import tiny_model, tiny_tokenizer, write_recipe
from tests.hardening import expect, snapshot

# -- checkpoints that do not match their config (sources and exports) -------------------------------------

TENSOR_EDITS: dict[str, tuple[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], str]] = {
    "only-embeddings": (lambda sd: {k: v for k, v in sd.items() if "embed" in k}, "missing from the checkpoint"),
    "one-tensor-missing": (
        lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.down_proj.weight"},
        "1 tensor(s) missing from the checkpoint (model.layers.1.mlp.down_proj.weight)",
    ),
    "a-norm-missing": (
        lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"},
        "(model.norm.weight)",
    ),
    "unexpected-tensor": (
        lambda sd: {**sd, "model.layers.7.mlp.up_proj.weight": torch.zeros(4, 4)},
        "the model does not have (model.layers.7.mlp.up_proj.weight)",
    ),
    "reshaped-tensor": (
        lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(50, 64)},
        "model.layers.0.mlp.up_proj.weight: [50, 64] stored, [96, 64] by config.json",
    ),
    "reshaped-and-missing": (
        lambda sd: {
            **{k: v for k, v in sd.items() if "layers.1.self_attn" not in k},
            "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64),
        },
        "4 tensor(s) missing",
    ),
}


def tampered_checkpoint(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    weights = folder / "model.safetensors"
    save_file(edit(load_file(str(weights))), str(weights), metadata={"format": "pt"})
    return folder


def test_a_complete_checkpoint_loads(tiny_llama_dir: Path) -> None:
    """The check must not refuse a good checkpoint (tied LM head, stored once)."""
    model = sources.load_exact(tiny_llama_dir, "the model", ModelSourceError, dtype=torch.float32)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in load_file(
        str(tiny_llama_dir / "model.safetensors")
    )


def test_a_config_that_contradicts_the_weights_is_refused(tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tiny_llama_dir / "config.json").write_text(json.dumps(config | {"intermediate_size": 80}))
    with pytest.raises(ModelSourceError, match=r"\[96, 64\] stored, \[80, 64\] by config\.json"):
        sources.load(sources.resolve(load_recipe(write_recipe(tiny_llama_dir.parent, tiny_llama_dir)).model))


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_a_source_checkpoint_must_match_its_config(
    case: str, tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    edit, message = TENSOR_EDITS[case]
    tampered_checkpoint(tiny_llama_dir, edit)
    recipe = write_recipe(tmp_path, tiny_llama_dir)
    before = snapshot(tmp_path)
    text = expect(["run", str(recipe), "--out", str(tmp_path / "out")], ModelSourceError, message, capsys)
    assert "does not match its config.json" in text
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", sorted(TENSOR_EDITS))
def test_an_export_checkpoint_must_match_its_config(case: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    edit, message = TENSOR_EDITS[case]
    persona = tmp_path / "run" / "introvert"
    shutil.copytree(tiny_llama_dir, persona / "hf")
    from tests.test_push import make_report

    (persona / "report.json").write_text(json.dumps(make_report("introvert")))
    tampered_checkpoint(persona / "hf", edit)
    from exporter.runtime.runner import Runner
    from exporter.verify.hf import build_prompts, verify_export

    with pytest.raises(ExportFolderError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Runner(persona, "torch")
    model = tiny_model("llama")
    adapter = sources_adapter(model)
    from exporter.masking.masks import PersonaMask

    mask = PersonaMask("introvert", adapter.geometry(model.config), None, None, None)
    with pytest.raises(ParityError, match=r"the export in .* does not match its config\.json"):
        verify_export(
            {torch.float32: model},
            adapter,
            mask,
            persona / "hf",
            build_prompts(tiny_tokenizer()),
            pad_id=0,
            greedy_tokens=2,
            fp64_max_abs=1e-6,
        )


def sources_adapter(model: Any) -> Any:
    from exporter.model.adapters import adapter_for

    return adapter_for(model.config)


# -- push never reads outside the persona folder ----------------------------------------------------------


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
    from tests.test_push import REPO, make_persona

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


def test_export_overwrite_refuses_a_symlinked_onnx_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.test_push import make_persona

    checkpoint = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    persona = make_persona(tmp_path / "run", checkpoint)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "model.onnx").write_text("keep me")
    (persona / "onnx").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    for fmt in ("onnx", "onnx-int8"):
        argv = ["export", str(persona), "--format", fmt, "--overwrite"]
        expect(argv, OutputError, "onnx is a symlink (to", capsys)
    assert snapshot(tmp_path) == before


# -- push: a report.json whose fields have the wrong types ------------------------------------------------

REPORT_EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("passed-as-text", lambda r: r["verification"]["hf"].update(passed="true"), "verification.hf.passed"),
    ("passed-as-one", lambda r: r["verification"]["hf"].update(passed=1), "verification.hf.passed"),
    # a stored `status` is not read: PersonaReport computes it from the verdicts
    ("persona-number", lambda r: r.update(persona=3), "persona: input should be a valid string"),
    ("parameters-text", lambda r: r["parameters"].update(dense="20000"), "parameters.dense"),
    ("base-model-missing", lambda r: r.pop("base_model"), "base_model: required key is missing"),
    ("geometry-null", lambda r: r.update(geometry=None), "geometry:"),
    ("onnx-passed-text", lambda r: r["verification"].update(onnx={"passed": "yes"}), "verification.onnx.passed"),
]


@pytest.mark.parametrize("case", REPORT_EDITS, ids=[c[0] for c in REPORT_EDITS])
def test_push_checks_the_report_schema(
    case: tuple[str, Callable[[dict[str, Any]], None], str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tests.test_push import REPO, make_persona

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
    from tests.test_push import make_persona

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
