"""The package version, read by the build (pyproject.toml) and stamped into the compiled core."""
__version__ = "0.1.0"
