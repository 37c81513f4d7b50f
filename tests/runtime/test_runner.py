"""The runner behind `generate` and `chat` (exporter/runtime/runner.py) on the session's tiny run: the same tokens on
every backend, sampling and system prompts, the dense model side by side, and folders it refuses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
    assert main(["generate", persona, "--prompt", "plan a trip", "--max-new-tokens", "10", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(greedy) and out.rstrip().endswith(CUT.format(n=10).strip()) == cut
    # --base: the dense model side by side, loaded from the run's recipe (here the same tiny model)
    assert main(["generate", persona, "--prompt", "plan a trip", "--max-new-tokens", "10", "--base"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("introvert> ") and "\nbase> " in out


@pytest.mark.subprocess
def test_chat_piped_prints_clean_turns_keeps_the_conversation_and_takes_reset_and_exit(tiny_run: Path) -> None:
    persona = tiny_run / "extravert"
    sample = ["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "8"]  # the tiny model's greedy text is empty
    cmd = [sys.executable, "-m", "exporter", "chat", str(persona), *sample]
    lines = "hello\n\nand then?\n/reset\nhello\n/exit\nnever read\n"
    done = subprocess.run(cmd, input=lines, capture_output=True, text=True, cwd=REPO, check=True)
    runner, sampling = Runner(persona, "onnx"), Sampling(temperature=1.0, seed=3)
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
