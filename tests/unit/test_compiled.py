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

from proxy import compiled

ROOT = Path(__file__).resolve().parents[2]


def _report_in_child(**env: str) -> dict[str, bool]:
    """compiled.report() in a fresh interpreter (the choice is made at the first import)."""
    out = subprocess.run(
        [sys.executable, "-c", "import json, proxy.compiled as c; print(json.dumps(c.report()))"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    return json.loads(out)


def test_the_hot_modules_are_those_with_a_pxd():
    assert "proxy.server.replies" in compiled.hot_modules()
    for name in compiled.hot_modules():
        assert (ROOT / Path(*name.split("."))).with_suffix(".pxd").exists()


def _expected() -> dict[str, bool]:
    """All compiled when every extension is built and current, else none."""
    usable = not any(compiled._unusable(name) for name in compiled.hot_modules())
    return {name: usable for name in compiled.hot_modules()}


def test_the_hot_modules_run_compiled_exactly_when_every_extension_is_built_and_current():
    assert _report_in_child(PGSPLIT_UNCOMPILED="") == _expected()


def test_pgsplit_uncompiled_runs_every_hot_module_as_python():
    assert not any(_report_in_child(PGSPLIT_UNCOMPILED="1").values())


def test_this_run_is_compiled_or_not_as_its_lane_says():
    report = compiled.report()
    if os.environ.get("PGSPLIT_UNCOMPILED") == "1":
        assert not any(report.values())
    elif os.environ.get("PGSPLIT_EXPECT_COMPILED") == "1":  # make test's main lane
        assert all(report.values()), compiled.describe()
        assert compiled.describe().startswith("compiled")
    else:
        assert report == _expected()


def test_one_extension_older_than_its_source_sends_every_hot_module_to_its_source(tmp_path):
    """An editable install's extension built before an edit of its .py or .pxd would run
    the old code: it runs as Python instead, and says why. So do the others, built or
    not: compiled modules cimport each other's C types, and a compiled one next to a
    Python one fails at import ("size changed, may indicate binary incompatibility")."""
    package = tmp_path / "proxy"
    (package / "server").mkdir(parents=True)
    for name in ("__init__.py", "compiled.py"):
        (package / name).write_text((ROOT / "proxy" / name).read_text())
    (package / "server" / "__init__.py").write_text("")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in ("current", "edited"):
        (package / "server" / f"{name}.py").write_text("WHERE = 'source'\n")
        (package / "server" / f"{name}.pxd").write_text("")
        # An empty file where the extension would be: loading it would fail the import.
        (package / "server" / f"{name}{suffix}").write_bytes(b"")
    os.utime(package / "server" / f"edited{suffix}", (1, 1))  # built long before its source
    script = ("import proxy.compiled as c, proxy.server.current as a, proxy.server.edited as b; "
              "print(a.WHERE, b.WHERE); print(c.describe())")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path), "PGSPLIT_UNCOMPILED": ""})
    assert out.returncode == 0, out.stderr
    where, described = out.stdout.splitlines()
    assert where == "source source"
    assert described.startswith("uncompiled: proxy.server.edited changed since built")
