"""What every report and manifest records about how it was made: package versions and stage timings."""

from __future__ import annotations

import time
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
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, start: float) -> None:
        self.stages[name] = round(self.stages.get(name, 0.0) + time.perf_counter() - start, 3)
