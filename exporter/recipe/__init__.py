"""Recipes: the typed schema, its eval and push sections, loading YAML with overrides, validation."""
