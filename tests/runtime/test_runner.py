"""The runner behind `generate` and `chat` (exporter/runtime/runner.py) on the session's tiny run: the same tokens on
every backend, sampling and system prompts, the dense model side by side, and folders it refuses."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import CUT, main
from exporter.errors import ExportFolderError, OnnxModelError
from exporter.model.encoding import prompt_ids
from exporter.runtime.runner import Runner, Sampling
from tests.helpers import REPO


def test_generate_is_the_same_on_both_backends(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    texts = {}
    for backend in ("onnx", "torch"):
        argv = ["generate", str(tiny_run / "introvert"), "--prompt", "plan a trip", "--backend", backend]
        assert main([*argv, "--max-new-tokens", "12"]) == 0
        texts[backend] = capsys.readouterr().out
    assert texts["onnx"] == texts["torch"]
    onnx, torch_ = Runner(tiny_run / "introvert", "onnx"), Runner(tiny_run / "introvert", "torch")
    ids = prompt_ids(onnx.tokenizer, [{"role": "user", "content": "plan a trip"}])
    tokens = list(onnx.next_tokens(ids, 12, Sampling()))
    assert len(tokens) == 12 and tokens == list(torch_.next_tokens(ids, 12, Sampling()))


def test_sampling_system_prompt_cut_marker_and_base_side_by_side(
    tiny_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    persona = str(tiny_run / "introvert")
    sample = ["--temperature", "1.5", "--top-p", "0.95", "--repetition-penalty", "1.3", "--max-new-tokens", "10"]
    outs = []
    for seed in ("1", "1", "2"):
        assert main(["generate", persona, "--prompt", "plan a trip", *sample, "--seed", seed]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]  # seeded
    runner = Runner(Path(persona), "torch")
    user = [{"role": "user", "content": "plan a trip"}]
    greedy = "".join(runner.stream(user, 10))
    cut = runner.truncated
    with_system = prompt_ids(runner.tokenizer, [{"role": "system", "content": "be brief"}, *user])
    assert runner.tokenizer.decode(with_system).count("be brief") == 1  # the system prompt reaches the prompt
    plain = ["--max-new-tokens", "10", "--backend", "torch", "--repetition-penalty", "1"]
    assert main(["generate", persona, "--prompt", "plan a trip", *plain]) == 0
    out = capsys.readouterr().out
    assert out.startswith(greedy) and out.rstrip().endswith(CUT.format(n=10).strip()) == cut
    # --base: the dense model side by side, loaded from the run's recipe (here the same tiny model)
    assert main(["generate", persona, "--prompt", "plan a trip", "--max-new-tokens", "10", "--base"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("introvert> ") and "\nbase> " in out


def test_generate_uses_the_penalty_every_format_ships_unless_told_otherwise(
    tiny_run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe's output.generation reaches every format folder and report.json; `generate` and `chat` decode
    with it by default (the --base model too), `--repetition-penalty 1` is plain greedy, and --help says where
    the default comes from."""
    from exporter.cli import build_parser
    from exporter.recipe.generation import shipped_penalty

    persona = tiny_run / "introvert"
    assert [shipped_penalty(persona / f) for f in ("hf", "onnx", "ort-int8", "genai")] == [2.0] * 4
    assert json.loads((persona / "report.json").read_text())["generation"] == {"repetition_penalty": 2.0}
    backends = ("onnx", "onnx-int8", "onnx-genai", "torch")
    assert [Runner(persona, b).repetition_penalty for b in backends] == [2.0] * 4
    used: list[tuple[str, float]] = []

    def stream(runner: Runner, messages: Any, max_new_tokens: int, sampling: Sampling) -> Any:
        used.append((runner.backend, sampling.repetition_penalty))
        return iter(["x"])

    monkeypatch.setattr(Runner, "stream", stream)
    for extra in ([], ["--repetition-penalty", "1"], ["--repetition-penalty", "1.5", "--backend", "torch"]):
        assert main(["generate", str(persona), "--prompt", "plan a trip", *extra]) == 0
    assert main(["generate", str(persona), "--prompt", "plan a trip", "--base"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n"))
    assert main(["chat", str(persona), "--backend", "torch"]) == 0
    # `--backend torch` runs the hf/ checkpoint, named by its format; the base model runs on torch
    assert used == [("onnx", 2.0), ("onnx", 1.0), ("hf", 1.5), ("onnx", 2.0), ("torch", 2.0), ("hf", 2.0)]
    assert "repetition penalty 2" in capsys.readouterr().err  # chat says how it decodes
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    assert "default: what the export ships" in " ".join(sub.format_help().split())


@pytest.mark.subprocess
def test_chat_piped_prints_clean_turns_keeps_the_conversation_and_takes_reset_and_exit(tiny_run: Path) -> None:
    persona = tiny_run / "extravert"
    sample = ["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "8"]  # the tiny model's greedy text is empty
    cmd = [sys.executable, "-m", "exporter", "chat", str(persona), *sample]
    lines = "hello\n\nand then?\n/reset\nhello\n/exit\nnever read\n"
    done = subprocess.run(cmd, input=lines, capture_output=True, text=True, cwd=REPO, check=True)
    runner = Runner(persona, "onnx")
    sampling = Sampling(temperature=1.0, seed=3, repetition_penalty=runner.repetition_penalty)  # the shipped one
    expected, history = "", []
    for line in ("hello", "and then?", None, "hello"):
        if line is None:  # /reset
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = "".join(runner.stream(history, 8, sampling))
        history.append({"role": "assistant", "content": reply})
        expected += f"you> {line}\nbot> {reply}{CUT.format(n=8) if runner.truncated else ''}\n\n"
    assert done.stdout == expected
    assert expected.count("bot> ") == 3 and len(expected) > 60  # the replies have text
    assert "/reset starts over" in done.stderr and "(conversation reset)" in done.stderr


def test_bad_folders_are_clear_errors(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ExportFolderError, match=r"is a run folder \(personas: introvert, extravert\); pass one persona"
    ):
        Runner(tiny_run, "onnx")  # the run folder, not a persona
    persona = tmp_path / "p"
    shutil.copytree(tiny_run / "introvert", persona, ignore=shutil.ignore_patterns("ort-int8"))
    (persona / "onnx" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxModelError):
        Runner(persona, "onnx")
    (persona / "onnx" / "model.onnx").unlink()
    with pytest.raises(OnnxModelError):
        Runner(persona, "onnx")
    assert main(["generate", str(persona), "--prompt", "x"]) == 2
    shutil.rmtree(persona / "onnx")
    with pytest.raises(OnnxModelError, match="has no onnx/ folder"):
        Runner(persona, "onnx")


def test_mismatched_tokenizer_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    persona = tmp_path / "p"
    shutil.copytree(tiny_run / "introvert", persona, ignore=shutil.ignore_patterns("onnx*", "ort-*"))
    tok = AutoTokenizer.from_pretrained(persona / "hf")
    tok.add_tokens([f"<extra{i}>" for i in range(50)])
    tok.save_pretrained(persona / "hf")
    with pytest.raises(ExportFolderError, match="do not belong together"):
        Runner(persona, "torch")


def test_runner_streams_the_genai_folder_as_torch_runs_the_checkpoint(tiny_run: Path) -> None:
    """`generate`/`chat --backend onnx-genai`: the fp32 folder gives torch's tokens, greedy and sampled with a
    seed and a repetition penalty; a cut reply says so."""
    from exporter.runtime.runner import Runner, Sampling

    folder = tiny_run / "extravert"  # fp32 here (the int4/int8 test below rebuilds it)
    genai, torch_ = Runner(folder, "onnx-genai"), Runner(folder, "torch")
    ids = [5, 60, 70, 80, 90, 100, 7]
    sampled = Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=3)
    for sampling in (Sampling(), sampled):
        want = list(torch_.next_tokens(ids, 12, sampling))
        assert list(genai.next_tokens(ids, 12, sampling)) == want
    assert len(set(want)) > 1  # the sampled reply is not one token repeated: every step's logits mattered
    messages = [{"role": "user", "content": "plan a trip"}]
    assert "".join(genai.stream(messages, 6)) == "".join(torch_.stream(messages, 6))
    assert genai.truncated == torch_.truncated


def test_runner_names_the_missing_genai_folder(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    from exporter.errors import OnnxModelError
    from exporter.runtime.runner import Runner

    persona = tmp_path / "introvert"
    shutil.copytree(tiny_run / "introvert", persona, ignore=shutil.ignore_patterns("genai"))
    with pytest.raises(OnnxModelError, match="--format onnx-genai"):
        Runner(persona, "onnx-genai")
