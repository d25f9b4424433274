"""Whether the hot path runs compiled, and the switch that runs it as plain Python.

The hot path's modules are plain Python with a `.pxd` file beside them that gives Cython
the C types (Cython's pure-Python mode): `pip install` compiles each into an extension
module (setup.py), and where it cannot (no compiler, no Python headers) they run as the
Python they are. One source either way; the modules with a `.pxd` are the list.

The import system prefers an extension module to a source file of the same name, so a
finder placed first sends a hot module to its source when PGSPLIT_UNCOMPILED=1 asks for
it (the unit tests' second lane, the benchmark's comparison) or when the source was
edited after the extension was built (an editable install would otherwise run old code);
all of them, when any one cannot run compiled.
Must not import anything of pgsplit's: it runs before the first hot module is imported.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent  # where the packages live
ENV_UNCOMPILED = "PGSPLIT_UNCOMPILED"
_REBUILD = "rebuild with `pip install -e .`"


def hot_modules() -> list[str]:
    """The modules built by Cython: those with a .pxd beside their .py, by dotted name."""
    return sorted(".".join(p.relative_to(_ROOT).with_suffix("").parts)
                  for p in (_ROOT / "proxy").rglob("*.pxd") if p.with_suffix(".py").exists())


def _source(name: str) -> Path:
    return _ROOT.joinpath(*name.split(".")).with_suffix(".py")


def _extension(name: str) -> Path | None:
    source = _source(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = source.with_suffix(suffix)
        if path.exists():
            return path
    return None


def _asked_uncompiled() -> bool:
    return os.environ.get(ENV_UNCOMPILED, "") not in ("", "0")


def _stale(name: str) -> bool:
    """Built before its .py or .pxd last changed."""
    built = _extension(name)
    if built is None:
        return False
    source = _source(name)
    return built.stat().st_mtime < max(source.stat().st_mtime, source.with_suffix(".pxd").stat().st_mtime)


class _SourceFirst:
    """A meta-path finder that loads the named hot modules from their .py files."""

    def __init__(self, names: list[str]):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            return importlib.util.spec_from_file_location(fullname, _source(fullname))
        return None


def _unusable(name: str) -> bool:
    return _extension(name) is None or _stale(name)


def choose() -> None:
    """Called by proxy/__init__, before any hot module is imported. All or nothing: the
    compiled modules know each other's C layout (a .pxd cimports another's types), so one
    that runs as Python makes every other fail to import."""
    names = hot_modules()
    if _asked_uncompiled() or any(_unusable(name) for name in names):
        sys.meta_path.insert(0, _SourceFirst(names))


def report() -> dict[str, bool]:
    """Each hot module: True when it runs compiled."""
    return {name: isinstance(importlib.import_module(name).__spec__.loader, importlib.machinery.ExtensionFileLoader)
            for name in hot_modules()}


def describe() -> str:
    """One line for the start-up log and `pgsplit status`."""
    modules = report()
    plain = [name for name, compiled in modules.items() if not compiled]
    if not plain:
        return f"compiled ({len(modules)} modules)"
    if _asked_uncompiled():
        return f"uncompiled: {ENV_UNCOMPILED} is set"
    why = []
    stale = [name for name in modules if _stale(name)]
    if stale:
        why.append(f"{', '.join(stale)} changed since built ({_REBUILD})")
    missing = [name for name in modules if _extension(name) is None]
    if missing:
        why.append(f"{len(missing)} of {len(modules)} modules not built (the install could not compile them;"
                   f" {_REBUILD} with a C compiler and the Python headers installed)")
    return "uncompiled: " + "; ".join(why)
