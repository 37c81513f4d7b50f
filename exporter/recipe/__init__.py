"""Recipes: the typed schema and the rules across its fields, its eval, push and tune sections, the export formats,
loading YAML with overrides."""
