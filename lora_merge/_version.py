"""The package version (one place; the package root and merged files' recipes read it)."""

__version__ = "0.1.0"
