"""pgsplit's version: pyproject.toml's, through the installed package's metadata.

Separate so that the CLI (`pgsplit --version`) and the admin console (SHOW VERSION) say
the same without one importing the other."""

from __future__ import annotations

import importlib.metadata


def version() -> str:
    try:
        return importlib.metadata.version("pgsplit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
