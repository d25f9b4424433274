"""`pgsplit --version`: the version of pyproject.toml, through the installed package's metadata."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from proxy.cli import main

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_prints_pyprojects(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"pgsplit {VERSION}\n"


def test_version_is_in_help_and_works_as_a_command() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--version" in done.stdout
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"pgsplit {VERSION}\n")
