"""Integrations of pyalign with training libraries (import the submodule you need)."""
