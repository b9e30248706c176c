"""The package version (also in pyproject.toml), importable without the collector."""

__version__ = "0.1.0"
