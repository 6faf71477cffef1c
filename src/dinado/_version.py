"""The package version (one place: dinado.__version__ and `dinado --version` read it)."""

__version__ = "0.1.0"
