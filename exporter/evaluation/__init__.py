"""Persona evaluation: items, metrics, baselines, the conditions scored and their summary."""
