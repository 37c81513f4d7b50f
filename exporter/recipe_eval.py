"""The recipe's optional `eval:` section (see exporter/evaluate.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EvalSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
