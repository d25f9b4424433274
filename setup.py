"""Builds the hot path's compiled modules; everything else is in pyproject.toml.

Each module with a .pxd beside it (proxy.compiled.hot_modules) is compiled by Cython in
its pure-Python mode: the .py is the source, the .pxd adds C types. The extensions are
optional: where the build fails (no C compiler or Python headers) pip still installs
pgsplit, which then runs those modules as Python and says so (proxy.compiled).
"""

from pathlib import Path

from setuptools import Extension, setup


def hot_path_extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:  # a build without the build requirements (pyproject.toml) installed
        print("pgsplit: Cython is not available; the hot path will run as Python")
        return []
    modules = sorted(p.with_suffix(".py") for p in Path("proxy").rglob("*.pxd") if p.with_suffix(".py").exists())
    extensions = cythonize(
        [Extension(".".join(m.with_suffix("").parts), [str(m)]) for m in modules],
        compiler_directives={
            "language_level": 3,
            "annotation_typing": False,  # types come from the .pxd files only
        },
        quiet=True,
    )
    for extension in extensions:
        extension.optional = True
    return extensions


setup(ext_modules=hot_path_extensions())
