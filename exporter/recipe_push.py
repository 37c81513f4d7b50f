"""The recipe's optional `push:` section (see exporter/hub.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PushSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
