"""Progress bars for the stages that take more than a few seconds."""

from __future__ import annotations

from typing import Any


def progress(total: int, desc: str, unit: str = "step") -> Any:
    """A tqdm bar with items done out of `total` (hidden when TQDM_DISABLE is set, as -q does)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)
