"""Whether the hot path runs compiled, and the switch that runs it as plain Python.

The hot path's modules are plain Python with a `.pxd` file beside them that gives Cython
the C types (Cython's pure-Python mode): `pip install` compiles each into an extension
module (setup.py), and where it cannot (no compiler, no Python headers) they run as the
Python they are. One source either way; the modules with a `.pxd` are the list.

They run compiled all together or not at all: they know each other's C layout (a .pxd
cimports another's types), so one that runs as Python makes the others fail to import.
The build records a digest of the sources it compiled (`hotpath/_built.py`, written by
setup.py); where the sources differ from it (an editable install edited since
its build, an extension left from another checkout), an extension is missing, or
PGSPLIT_UNCOMPILED=1 asks for it, a finder placed first sends every hot module to its
source, as well as any module whose extension has no .pxd beside it any more: the import
system would otherwise prefer an extension to a source file of the same name.
Must not import anything of pgsplit's: it runs before the first hot module is imported
(and setup.py loads it by its path, to compute the same digest). A package of its own, so
that proxy, router and metrics each make the choice first (each package's __init__
calls `choose()`) without one depending on another.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent  # where the packages live
# Where hot modules live: proxy's session and server, router's policy and classifier,
# metrics' per-unit counters (each package's __init__ calls choose() first, so the choice
# precedes them all).
PACKAGES = ("proxy", "router", "metrics")
ENV_UNCOMPILED = "PGSPLIT_UNCOMPILED"
BUILT = "_built"  # hotpath._built, written by setup.py: SOURCES, the digest it compiled
_REBUILD = "rebuild with `pip install .` (`pip install -e .` for a checkout)"


def hot_modules(root: Path = _ROOT) -> list[str]:
    """The modules built by Cython: those with a .pxd beside their .py, by dotted name."""
    return sorted(".".join(p.relative_to(root).with_suffix("").parts)
                  for package in PACKAGES for p in (root / package).rglob("*.pxd") if p.with_suffix(".py").exists())


def _source(name: str, root: Path = _ROOT) -> Path:
    return root.joinpath(*name.split(".")).with_suffix(".py")


def sources_digest(root: Path = _ROOT) -> str:
    """One digest of every hot module's .py and .pxd: what a build compiled."""
    digest = hashlib.sha256()
    for name in hot_modules(root):
        source = _source(name, root)
        for path in (source, source.with_suffix(".pxd")):
            digest.update(f"{name}:{path.suffix}:".encode() + path.read_bytes())
    return digest.hexdigest()


def _extensions() -> set[str]:
    """Modules of PACKAGES that have an extension file, by dotted name."""
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)
    found = set()
    for path in (path for package in PACKAGES for path in (_ROOT / package).rglob("*.so")):
        name = ".".join(path.relative_to(_ROOT).parts)
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is not None:
            found.add(name[: -len(suffix)])
    return found


def _asked_uncompiled() -> bool:
    return os.environ.get(ENV_UNCOMPILED, "") not in ("", "0")


def _built_digest() -> str | None:
    try:
        return importlib.import_module(f"{__name__}.{BUILT}").SOURCES
    except (ImportError, AttributeError):
        return None


def why_not() -> str | None:
    """Why the hot path cannot run compiled, or None when it can."""
    if _asked_uncompiled():
        return f"{ENV_UNCOMPILED} is set"
    names = hot_modules()
    missing = [name for name in names if name not in _extensions()]
    if missing:
        return (f"{len(missing)} of {len(names)} modules not built (the install could not compile them: "
                f"{_REBUILD} with a C compiler and the Python headers installed)")
    if _built_digest() != sources_digest():
        return f"the sources changed since they were compiled ({_REBUILD})"
    return None


class _SourceFirst:
    """A meta-path finder that loads the named modules from their .py files."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            return importlib.util.spec_from_file_location(fullname, _source(fullname))
        return None


_chosen = False


def choose() -> None:
    """Called by the __init__ of proxy, router and metrics, before any hot module is
    imported; the first call that completes decides (one that raised decides nothing)."""
    global _chosen
    if _chosen:
        return
    hot = hot_modules()
    to_source = {name for name in _extensions() - set(hot) if _source(name).exists()}  # (no .pxd any more)
    if why_not() is not None:
        to_source |= set(hot)
    if to_source:
        sys.meta_path.insert(0, _SourceFirst(to_source))
    _chosen = True


def report() -> dict[str, bool]:
    """Each hot module: True when it runs compiled."""
    return {name: isinstance(importlib.import_module(name).__spec__.loader, importlib.machinery.ExtensionFileLoader)
            for name in hot_modules()}


def describe() -> str:
    """One line for the start-up log and `pgsplit status`."""
    modules = report()
    if all(modules.values()):
        return f"compiled ({len(modules)} modules)"
    return f"uncompiled: {why_not() or 'some modules were imported before the choice was made'}"
