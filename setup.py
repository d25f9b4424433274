"""Builds the hot path's compiled modules; everything else is in pyproject.toml.

Each module with a .pxd beside it (hotpath.hot_modules) is compiled by Cython in
its pure-Python mode: the .py is the source, the .pxd adds C types. The extensions are
optional: where the build fails (no C compiler or Python headers) pip still installs
pgsplit, which then runs those modules as Python and says so (hotpath). The digest
of the sources compiled goes into hotpath/_built.py once every extension is built (not
before: an interrupted or failed build, or a setup.py run that builds nothing, must not
vouch for extensions left from an earlier build), so that sources changed since (an
editable install) run as Python rather than beside stale extensions.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _compiled_module():
    """hotpath/__init__.py, loaded by its path (before the build, its imports may not be installed)."""
    spec = importlib.util.spec_from_file_location("pgsplit_build_compiled", HERE / "hotpath" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOTPATH = _compiled_module()


class BuildHotPath(build_ext):
    """build_ext, then the digest of the sources compiled, only if every extension built."""

    failed: list[str]

    def run(self) -> None:
        self.failed = []
        super().run()
        if not self.extensions or self.failed:
            return
        target = Path(self.build_lib if not self.inplace else HERE) / "hotpath" / f"{HOTPATH.BUILT}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("# Written by setup.py: the digest of the hot path's sources it compiled (hotpath).\n"
                          f'SOURCES = "{_DIGEST}"\n')

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception:
            self.failed.append(ext.name)  # (optional: build_ext warns and goes on)
            raise


def hot_path_extensions() -> list[Extension]:
    compiled = HOTPATH
    try:
        from Cython.Build import cythonize
    except ImportError:  # a build without the build requirements (pyproject.toml) installed
        print("pgsplit: Cython is not available; the hot path will run as Python")
        return []
    names = compiled.hot_modules(HERE)
    extensions = cythonize(
        [Extension(name, [str(compiled._source(name, HERE).relative_to(HERE))]) for name in names],
        compiler_directives={
            "language_level": 3,
            "annotation_typing": False,  # types come from the .pxd files only
            # A typed name that holds None raises AttributeError as the source would, not a
            # crash of the process (a check of one pointer per access)
            "nonecheck": True,
        },
        quiet=True,
    )
    for extension in extensions:
        extension.optional = True
    return extensions


# The digest is taken before Cython reads the sources; BuildHotPath records it after the build.
_DIGEST = HOTPATH.sources_digest(HERE)
# (the modules compile one per core: the install is part of every CI run)
setup(ext_modules=hot_path_extensions(), cmdclass={"build_ext": BuildHotPath},
      options={"build_ext": {"parallel": os.cpu_count() or 1}})
