"""What every report and manifest records about how it was made: package versions and stage timings."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from exporter import __version__


def versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "persona-export": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


@dataclass
class Timer:
    """Seconds per stage, in the order the stages ran (a stage run twice adds up)."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 3)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to `name` (when it completes)."""
        start = time.perf_counter()
        yield
        self.add(name, start)
