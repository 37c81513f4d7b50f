"""Persona evaluation: items, metrics, baselines, the conditions scored, one mask scorer and the summary."""
