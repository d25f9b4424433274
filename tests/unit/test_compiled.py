"""The compiled hot path: which modules run compiled, and the switch that runs them as Python.

`make test` runs the suite with PGSPLIT_EXPECT_COMPILED=1 (an install that silently fell
back to Python must fail CI, not pass it slower) and the unit tests again with
PGSPLIT_UNCOMPILED=1.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hotpath as compiled

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _report_in_child(**env: str) -> dict[str, bool]:
    """compiled.report() in a fresh interpreter (the choice is made at the first import)."""
    out = subprocess.run(
        [sys.executable, "-c", "import json, hotpath as c; print(json.dumps(c.report()))"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return json.loads(out)


def _expected() -> dict[str, bool]:
    """All compiled when every extension is built from these sources, else none."""
    usable = compiled.why_not() is None
    return {name: usable for name in compiled.hot_modules()}


def test_the_hot_modules_are_those_with_a_pxd():
    assert {"proxy.server.replies", "proxy.session.routing"} <= set(compiled.hot_modules())
    for name in compiled.hot_modules():
        assert (ROOT / Path(*name.split("."))).with_suffix(".pxd").exists()


def test_the_hot_modules_run_compiled_exactly_when_every_extension_is_built_from_these_sources(monkeypatch):
    monkeypatch.setenv(compiled.ENV_UNCOMPILED, "")  # (the child runs without the switch)
    assert _report_in_child(PGSPLIT_UNCOMPILED="") == _expected()


def test_pgsplit_uncompiled_runs_every_hot_module_as_python():
    assert not any(_report_in_child(PGSPLIT_UNCOMPILED="1").values())


def test_this_run_is_compiled_or_not_as_its_lane_says():
    report = compiled.report()
    if compiled._asked_uncompiled():
        assert not any(report.values())
    elif os.environ.get("PGSPLIT_EXPECT_COMPILED") == "1":  # make test's main lane
        assert all(report.values()), compiled.describe()
        assert compiled.describe().startswith("compiled")
    else:
        assert report == _expected()


# --- a package of two hot modules, with empty files where the extensions would be --------
# (loading an empty file as an extension fails the import: a test passes only if the
# source was loaded instead)

def _package(tmp_path: Path, *, built: str | None) -> Path:
    package = tmp_path / "proxy"
    (package / "server").mkdir(parents=True)
    (package / "__init__.py").write_text((ROOT / "proxy" / "__init__.py").read_text())
    (tmp_path / "hotpath").mkdir()
    (tmp_path / "hotpath" / "__init__.py").write_text((ROOT / "hotpath" / "__init__.py").read_text())
    (package / "server" / "__init__.py").write_text("")
    for name in ("first", "second"):
        (package / "server" / f"{name}.py").write_text("WHERE = 'source'\n")
        (package / "server" / f"{name}.pxd").write_text("")
        (package / "server" / f"{name}{SUFFIX}").write_bytes(b"")
    if built is not None:
        (tmp_path / "hotpath" / f"{compiled.BUILT}.py").write_text(f'SOURCES = "{built}"\n')
    return package


def _run(tmp_path: Path, script: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path), "PGSPLIT_UNCOMPILED": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_sources_changed_since_the_build_send_every_hot_module_to_its_source(tmp_path):
    """An editable install edited since its build would run the old code; a compiled
    module next to one run as Python fails at import ("size changed, may indicate binary
    incompatibility"): all of them run as Python, and say why."""
    package = _package(tmp_path, built=None)
    (tmp_path / "hotpath" / f"{compiled.BUILT}.py").write_text(f'SOURCES = "{compiled.sources_digest(tmp_path)}"\n')
    (package / "server" / "second.pxd").write_text("# edited after the build\n")
    where_a, where_b, described = _run(tmp_path, "import hotpath as c, proxy.server.first as a, "
                                                 "proxy.server.second as b; print(a.WHERE); print(b.WHERE); "
                                                 "print(c.describe())")
    assert (where_a, where_b) == ("source", "source")
    assert described.startswith("uncompiled: the sources changed since they were compiled")


def test_a_missing_extension_sends_every_hot_module_to_its_source(tmp_path):
    package = _package(tmp_path, built=None)
    (tmp_path / "hotpath" / f"{compiled.BUILT}.py").write_text(f'SOURCES = "{compiled.sources_digest(tmp_path)}"\n')
    (package / "server" / f"second{SUFFIX}").unlink()  # (its optional build failed)
    where_a, described = _run(tmp_path, "import hotpath as c, proxy.server.first as a; "
                                        "print(a.WHERE); print(c.describe())")
    assert where_a == "source"
    assert described.startswith("uncompiled: 1 of 2 modules not built")


def test_an_extension_whose_pxd_is_gone_is_not_imported(tmp_path):
    """An extension left behind (the module is no longer compiled, or another checkout's
    build) would shadow the module's source."""
    package = _package(tmp_path, built=None)
    (package / "server" / "third.py").write_text("WHERE = 'source'\n")
    (package / "server" / f"third{SUFFIX}").write_bytes(b"")
    (tmp_path / "hotpath" / f"{compiled.BUILT}.py").write_text(f'SOURCES = "{compiled.sources_digest(tmp_path)}"\n')
    (where,) = _run(tmp_path, "import proxy.server.third as t; print(t.WHERE)")
    assert where == "source"


@pytest.mark.parametrize("digest", ["", "0" * 64])
def test_the_digest_is_of_the_sources_compiled(tmp_path, digest):
    package = _package(tmp_path, built=digest)
    assert compiled.sources_digest(tmp_path) != digest
    (package / "server" / "first.py").write_text("WHERE = 'edited'\n")
    before = compiled.sources_digest(tmp_path)
    (package / "server" / "first.py").write_text("WHERE = 'edited again'\n")
    assert compiled.sources_digest(tmp_path) != before


@pytest.mark.parametrize("package, module", [("router", "policy"), ("metrics", "units")])
def test_each_package_makes_the_same_choice_when_it_is_imported_first(tmp_path, package, module):
    """router's and metrics' hot modules are chosen with proxy's even where proxy is never
    imported (their own unit tests): a stale extension there would run old code."""
    _package(tmp_path, built="0" * 64)  # proxy's digest differs: nothing runs compiled
    first = tmp_path / package
    first.mkdir()
    init = (ROOT / package / "__init__.py").read_text()
    # (metrics' own __init__ goes on to import prometheus_client and its modules: the choice is what counts)
    (first / "__init__.py").write_text(init[: init.index("_hotpath.choose()") + len("_hotpath.choose()")] + "\n")
    (first / f"{module}.py").write_text("WHERE = 'source'\n")
    (first / f"{module}.pxd").write_text("")
    (first / f"{module}{SUFFIX}").write_bytes(b"")
    (where, modules) = _run(tmp_path, f"import sys, {package}.{module} as m; print(m.WHERE); "
                                      "print(sorted(m for m in sys.modules if m.startswith('proxy')))")
    assert where == "source"
    assert modules == "[]"  # (the package does not load the proxy to make the choice)
