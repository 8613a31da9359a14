"""The package version, in a module that imports nothing (``etda --version`` stays fast)."""

__version__ = "0.1.0"
