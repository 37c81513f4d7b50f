"""Known third-party notices, silenced only where they arise and only by their exact text: any other warning of
the same libraries still shows. Also the command line's verbosity and the progress bars of long stages."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

# (logger, the start of the message): each is muted only around the call that emits it
LEGACY_TOKENIZER = ("transformers.models.llama.tokenization_llama_fast", "You are using the default legacy behaviour")
TORCH_DTYPE = "`torch_dtype` is deprecated!"  # optimum's own use; this project passes `dtype`
TORCH_DTYPE_LOGGERS = ("transformers.modeling_utils", "transformers.configuration_utils")
TIED_INITIALIZERS = ("optimum", "Found different candidate ONNX initializers")
ADVANCED_INDEXING = "Exporting aten::index operator of advanced indexing"  # a regex prefix, as warnings matches it


class _Drop(logging.Filter):
    def __init__(self, match: Callable[[str], bool]) -> None:
        super().__init__()
        self.match = match

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.match(record.getMessage())


@contextmanager
def muted(logger: str, starts: str, *, follow_up: bool = False) -> Iterator[None]:
    """Drop records of `logger` whose message starts with `starts`; with `follow_up`, also the tab-indented
    lines such a record is followed by (optimum lists the tied weights that way)."""

    def match(msg: str) -> bool:
        return msg.startswith(starts) or (follow_up and msg.startswith("\t"))

    log = logging.getLogger(logger)
    drop = _Drop(match)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


@contextmanager
def gguf_tokenizer_noise() -> Iterator[None]:
    """transformers' GGUF tokenizer conversion: the Llama tokenizer's "legacy behaviour" notice (the exports
    ship a tokenizer rebuilt from the GGUF metadata, exporter/model/tokenizer.py)."""
    with muted(*LEGACY_TOKENIZER):
        yield


@contextmanager
def onnx_export_noise() -> Iterator[None]:
    """optimum's export: torch's tracer warnings about Python values in the graph and its note on advanced
    indexing (the exported graph is proven against the masked model afterwards), the tied embedding's
    duplicate-initializer notice, and its own use of the deprecated `torch_dtype`."""
    import torch.jit

    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # the TorchScript exporter's note that advanced indexing becomes Gather & co. and would be wrong for
        # negative indices: the exported graph is compared with the masked model after every export
        warnings.filterwarnings("ignore", message=ADVANCED_INDEXING, category=UserWarning)
        stack.enter_context(muted(*TIED_INITIALIZERS, follow_up=True))
        for name in TORCH_DTYPE_LOGGERS:
            stack.enter_context(muted(name, TORCH_DTYPE))
        yield


LEVELS = ("quiet", "normal", "verbose")


def set_verbosity(level: str, terminal: bool | None = None) -> None:
    """ "quiet": errors only, no progress bars; "normal": our INFO lines and third-party warnings (the known
    ones are muted where they arise); "verbose": everything, third-party INFO and our DEBUG included.

    Progress bars need a terminal (`terminal`, default: whether stderr is one): written to a file or a pipe,
    every redraw of a bar becomes text, megabytes of it in a long run, so there only "verbose" keeps them."""
    if terminal is None:
        terminal = sys.stderr.isatty()
    ours = {"quiet": logging.ERROR, "normal": logging.INFO, "verbose": logging.DEBUG}[level]
    logging.basicConfig(level=ours, format="%(levelname)s %(message)s")
    logging.getLogger().setLevel(ours)
    theirs = {"quiet": "error", "normal": "warning", "verbose": "info"}[level]
    os.environ["TRANSFORMERS_VERBOSITY"] = theirs  # transformers and optimum read it when they set up logging
    for name in ("transformers", "optimum", "huggingface_hub", "matplotlib", "gguf"):  # gguf: a line per file written
        logging.getLogger(name).setLevel(theirs.upper())
    for name in ("httpx", "urllib3"):  # a line per HTTP request otherwise
        logging.getLogger(name).setLevel(logging.DEBUG if level == "verbose" else logging.WARNING)
    if level == "quiet" or (level == "normal" and not terminal):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it for every bar that does not pass `disable`
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def progress(total: int, desc: str, unit: str = "step", iterable: Any = None) -> Any:
    """A tqdm bar with items done out of `total`, over `iterable` if given (hidden through TQDM_DISABLE by -q,
    and off a terminal, where the stage gets an INFO line instead)."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        units = unit if total == 1 else {"reply": "replies", "batch": "batches"}.get(unit, unit + "s")
        logging.getLogger("exporter").info("%s (%d %s)", desc, total, units)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
