"""Known third-party notices are muted where they arise, by their text only; verbosity levels."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import pytest
import torch.jit

from exporter.quiet import ADVANCED_INDEXING, TIED_INITIALIZERS, muted, onnx_export_noise, set_verbosity


def test_only_the_known_message_is_muted_and_only_inside_the_block(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger(TIED_INITIALIZERS[0])
    with caplog.at_level(logging.WARNING, logger=TIED_INITIALIZERS[0]):
        with muted(*TIED_INITIALIZERS, follow_up=True):
            log.warning(TIED_INITIALIZERS[1] + " for the tied weights:")
            log.warning("\tmodel.embed_tokens.weight: {'onnx::MatMul_123'}")
            log.warning("a new warning of the same library")
        log.warning(TIED_INITIALIZERS[1] + " again, outside the block")
    assert [r.getMessage() for r in caplog.records] == [
        "a new warning of the same library",
        TIED_INITIALIZERS[1] + " again, outside the block",
    ]


def test_onnx_export_mutes_tracer_warnings_but_not_others() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with onnx_export_noise():
            warnings.warn("converting a tensor to a Python boolean", torch.jit.TracerWarning, stacklevel=1)
            warnings.warn(ADVANCED_INDEXING + " in opset 18 is achieved by ...", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_quiet_hides_progress_bars_and_info(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(name, "")  # restored (removed) afterwards, whatever set_verbosity writes
    loggers = [
        logging.getLogger(n)
        for n in ("", "transformers", "optimum", "huggingface_hub", "matplotlib", "gguf", "httpx", "urllib3")
    ]
    levels = [log.level for log in loggers]
    try:
        set_verbosity("normal", terminal=True)
        assert os.environ["TQDM_DISABLE"] == "" and logging.getLogger().level == logging.INFO
        assert logging.getLogger("matplotlib").level == logging.WARNING  # its font-cache INFO line
        assert logging.getLogger("gguf").level == logging.WARNING  # a line per GGUF file written
        set_verbosity("quiet", terminal=True)
        assert os.environ["TQDM_DISABLE"] == "1" and logging.getLogger().level == logging.ERROR
        set_verbosity("verbose")
        assert logging.getLogger().level == logging.DEBUG and logging.getLogger("transformers").level == logging.INFO
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def test_bars_are_off_when_stderr_is_a_file_and_verbose_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar's redraws written to a log file become megabytes of text; -v asks for everything, bars included."""
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(name, "")
    loggers = [
        logging.getLogger(n)
        for n in ("", "transformers", "optimum", "huggingface_hub", "matplotlib", "gguf", "httpx", "urllib3")
    ]
    levels = [log.level for log in loggers]
    try:
        set_verbosity("verbose", terminal=False)
        assert os.environ["TQDM_DISABLE"] == ""
        set_verbosity("normal", terminal=False)
        assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def test_off_a_terminal_each_bar_leaves_one_stage_line(caplog: pytest.LogCaptureFixture) -> None:
    from exporter.quiet import progress

    assert not sys.stderr.isatty()  # pytest captures stderr
    with caplog.at_level(logging.INFO):
        with progress(5, "eval mask:introvert", "answer") as bar:
            bar.update(5)
        with progress(1, "export ONNX introvert") as bar:
            bar.update(1)
    assert [r.getMessage() for r in caplog.records] == [
        "eval mask:introvert (5 answers)",
        "export ONNX introvert (1 step)",
    ]
