"""persona-export: persona subnetworks of a causal LM, physically pruned and exported."""

from __future__ import annotations

__version__ = "0.1.0"
