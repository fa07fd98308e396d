"""The catalogue of named configurations: package data ``flexna.tools.masks`` (JSON + PNG, no code)."""
