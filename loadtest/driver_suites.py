"""Drivers' own test suites against pgsplit (or directly against PostgreSQL, to compare).

    python -m loadtest.driver_suites asyncpg|psycopg [--direct | --both] [-k EXPR] [FILE ...]

Starts a sandbox cluster (a primary, no replicas, so routing cannot change a result) and a
pgsplit in transaction pooling in front of it, gets the suite of the installed driver
version into a cache directory (``.driver-suites/``, ignored by git), installs what the
suite needs besides the driver into ``.driver-suites/deps`` (used only by the suite's runs),
then runs each test file in its own pytest process with a time limit per file, so a hang
costs that file only. Prints, per file, passed/failed/errors (and both runs side by side
with ``--both``), then the failing tests grouped by the first line of their error.

Where the suites come from:
- asyncpg: its PyPI sdist has tests/ (``pip download --no-binary asyncpg``). They use an
  existing server when PGHOST is set (``asyncpg._testbase``: RunningCluster, with PGPORT,
  PGUSER, PGPASSWORD, PGDATABASE).
- psycopg: its sdist has no tests; give a checkout of its repository (at the tag of the
  installed version, or the nearest one) with ``--source DIR`` or
  ``PGSPLIT_PSYCOPG_SOURCE``. Its tests take the server from PSYCOPG_TEST_DSN.

The suite user is a superuser (both suites create types, extensions and roles).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from loadtest.harness import ROOT, ProxyThread, config_text
from loadtest.sandbox import Cluster

CACHE = ROOT / ".driver-suites"
DEPS = CACHE / "deps"
SUITE_USER, SUITE_PASSWORD, SUITE_DB = "suite", "suite-secret", "postgres"

# What each suite needs besides the driver and pytest, and its own pytest settings.
EXTRA_DEPS = {"asyncpg": ["distro"], "psycopg": ["anyio>=4", "pproxy>=2.7"]}
PYTEST_INI = {
    # asyncpg's pyproject: importlib import mode (tests/ is a package importing the installed asyncpg)
    "asyncpg": "[pytest]\naddopts = --assert=plain --import-mode=importlib\nfilterwarnings = default\n",
    "psycopg": "[pytest]\naddopts = -ra\nfilterwarnings = error\n",
}
# CockroachDB-only tests, and psycopg_pool's (a separate package).
SKIPPED_DIRS = ("crdb/", "pool/")
# Files that check the driver's own source tree or build, not a server.
NOT_ABOUT_A_SERVER = {"asyncpg": {"test__sourcecode.py", "test_subinterpreters.py"},
                      "psycopg": {"test_typing.py", "test_windows.py", "test_module.py"}}


@dataclass
class FileResult:
    file: str
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> PASSED/FAILED/ERROR/...
    errors: dict[str, str] = field(default_factory=dict)  # test id -> first line of its error
    timed_out: bool = False
    seconds: float = 0.0

    def count(self, what: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == what)

    def line(self) -> str:
        text = f"{self.count('PASSED')} passed, {self.count('FAILED')} failed, {self.count('ERROR')} errors"
        return text + (f", TIMED OUT after {self.seconds:.0f} s" if self.timed_out else "")


# --- getting the suite ------------------------------------------------------------------------------


def suite_dir(driver: str, source: str | None = None) -> Path:
    """A directory holding the suite's tests/ and our pytest.ini (made once per version)."""
    version = metadata.version(driver)
    target = CACHE / f"{driver}-{version}"
    if not (target / "tests").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        if driver == "asyncpg":
            _unpack_sdist_tests(driver, version, target)
        else:
            source = source or os.environ.get("PGSPLIT_PSYCOPG_SOURCE")
            if not source or not (Path(source) / "tests").is_dir():
                sys.exit("psycopg's PyPI sdist has no tests: pass --source DIR (or set "
                         "PGSPLIT_PSYCOPG_SOURCE) to a checkout of psycopg's repository")
            shutil.copytree(Path(source) / "tests", target / "tests")
    (target / "pytest.ini").write_text(PYTEST_INI[driver])
    return target


def _unpack_sdist_tests(driver: str, version: str, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", driver,
                    f"{driver}=={version}", "-d", str(CACHE)], check=True, timeout=600)
    sdist = CACHE / f"{driver}-{version}.tar.gz"
    prefix = f"{driver}-{version}/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = "tests/" + m.name[len(prefix):]
        tar.extractall(target, members=members, filter="data")


def install_deps(driver: str) -> None:
    stamp = DEPS / f".{driver}"
    if stamp.exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(DEPS),
                    *EXTRA_DEPS[driver]], check=True, timeout=600)
    stamp.write_text("\n".join(EXTRA_DEPS[driver]))


# --- servers --------------------------------------------------------------------------------------


class Servers:
    """A one-node sandbox cluster with a superuser for the suite, and pgsplit in front of it."""

    def __init__(self, pool_size: int = 20):
        self.cluster = Cluster(0, name="drivers", users={SUITE_USER: SUITE_PASSWORD})
        self.pool_size = pool_size
        self.proxy: ProxyThread | None = None

    def __enter__(self) -> "Servers":
        self.cluster.start()
        try:
            self.cluster.sql(self.cluster.primary, f"ALTER ROLE {SUITE_USER} SUPERUSER")
            self.proxy = ProxyThread(config_text({"main": self.cluster},
                                                 sections={"pool": {"size": self.pool_size}})).start()
        except BaseException:
            self.cluster.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.cluster.stop()

    def address(self, direct: bool) -> tuple[str, int]:
        return ("127.0.0.1", self.cluster.primary.port if direct else self.proxy.port)


def suite_env(driver: str, host: str, port: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DEPS), os.environ.get("PYTHONPATH", "")]),
           "PGHOST": host, "PGPORT": str(port), "PGUSER": SUITE_USER, "PGPASSWORD": SUITE_PASSWORD,
           "PGDATABASE": SUITE_DB, "PGSSLMODE": "disable",
           "COLUMNS": "1000"}  # pytest cuts the summary's error lines to the terminal's width
    if driver == "psycopg":
        env["PSYCOPG_TEST_DSN"] = (f"host={host} port={port} user={SUITE_USER} password={SUITE_PASSWORD} "
                                   f"dbname={SUITE_DB} sslmode=disable")
    return env


# --- running ------------------------------------------------------------------------------------

_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
# pytest 9 reports a failed subtest (unittest's subTest) as "SUBFAILED(params) test - error"
_SUMMARY = re.compile(r"^(?:SUB)?(FAILED|ERROR)(?:\(.*?\))? (\S+::\S+?)(?: - (.*))?$")


def run_file(directory: Path, test_file: str | list[str], env: dict[str, str], file_timeout: float,
             test_timeout: float, keyword: str | None, deselect: list[str] = (),
             tb: str = "no") -> FileResult:
    """Run one test file (or several in one pytest process) under ``directory``/tests."""
    paths = [test_file] if isinstance(test_file, str) else list(test_file)
    # (psycopg's conftest uses pytest's cache: it stays in the suite's directory)
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", f"--tb={tb}", "-p", "no:randomly",
           f"--timeout={test_timeout:g}", *(f"tests/{p}" for p in paths)]
    cmd += [f"--deselect=tests/{t}" for t in deselect]
    if keyword:
        cmd += ["-k", keyword]
    result = FileResult(" ".join(paths))
    # psycopg's conftest flags every session in the cache and clears the flag at its end:
    # one that did not end (killed at its timeout, a crash, a test that signals its own
    # process) makes it refuse every later file. Each file is a run of its own here.
    (directory / ".pytest_cache" / "v" / "segfault").unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=file_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        result.timed_out = True
    result.seconds = time.monotonic() - started
    if tb != "no":
        print(out, flush=True)
    for line in out.splitlines():
        if m := _VERBOSE.match(line):
            result.outcomes[m[1]] = m[2]
        elif m := _SUMMARY.match(line):
            result.outcomes[m[2]] = m[1]
            result.errors[m[2]] = (m[3] or "").strip()
    if not result.outcomes and proc.returncode not in (0, 5):
        result.outcomes[result.file] = "ERROR"
        result.errors[result.file] = (out.strip().splitlines() or ["(no output)"])[-1]
    return result


def suite_files(directory: Path, driver: str, only: list[str]) -> list[str]:
    """Test files relative to tests/ (psycopg keeps some in types/, pq/, pool/, crdb/)."""
    tests = directory / "tests"
    files = sorted(str(p.relative_to(tests)) for p in tests.rglob("test_*.py"))
    if only:
        return [f for f in files if f in only or f.removesuffix(".py") in only
                or Path(f).name in only]
    return [f for f in files if Path(f).name not in NOT_ABOUT_A_SERVER[driver]
            and not f.startswith(SKIPPED_DIRS)]


def run_suite(driver: str, servers: Servers, direct: bool, files: list[str], directory: Path,
              file_timeout: float, test_timeout: float, keyword: str | None,
              tb: str = "no") -> dict[str, FileResult]:
    host, port = servers.address(direct)
    env = suite_env(driver, host, port)
    where = "directly" if direct else "through pgsplit"
    results = {}
    for f in files:
        r = results[f] = run_file(directory, f, env, file_timeout, test_timeout, keyword, tb=tb)
        print(f"[{driver} {where}] {f}: {r.line()}", flush=True)
    return results


def _cause(message: str) -> str:
    """Group key: the error's first line with numbers and quoted names blanked."""
    text = re.sub(r"\d+", "N", message)
    return re.sub(r"\"[^\"]*\"|'[^']*'", "'…'", text)[:160] or "(no message)"


def report(driver: str, proxied: dict[str, FileResult], direct: dict[str, FileResult] | None,
           label: str = "through pgsplit") -> str:
    lines = [f"\n== {driver}: per file ({label}" + (" | directly)" if direct else ")")]
    for f, r in proxied.items():
        line = f"  {f:40} {r.line()}"
        if direct:
            line += f"  |  {direct[f].line()}"
        lines.append(line)
    failing: dict[str, list[str]] = defaultdict(list)
    for r in proxied.values():
        direct_outcomes = direct[r.file].outcomes if direct else {}
        for test, outcome in r.outcomes.items():
            if outcome in ("FAILED", "ERROR") and direct_outcomes.get(test) not in ("FAILED", "ERROR"):
                failing[_cause(r.errors.get(test, "(file timed out)" if r.timed_out else ""))].append(test)
    if failing:
        lines.append(f"\n== {driver}: failing {label}" + (" only" if direct else "")
                     + ", by first line of the error")
        for cause, tests in sorted(failing.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  [{len(tests)}] {cause}")
            lines += [f"      {t}" for t in tests]
    totals = [sum(r.count(k) for r in proxied.values()) for k in ("PASSED", "FAILED", "ERROR")]
    lines.append(f"\n{driver} {label}: {totals[0]} passed, {totals[1]} failed, {totals[2]} errors, "
                 f"{sum(r.timed_out for r in proxied.values())} files timed out")
    if direct:
        totals = [sum(r.count(k) for r in direct.values()) for k in ("PASSED", "FAILED", "ERROR")]
        lines.append(f"{driver} directly: {totals[0]} passed, {totals[1]} failed, {totals[2]} errors, "
                     f"{sum(r.timed_out for r in direct.values())} files timed out")
    return "\n".join(lines)


def _save(driver: str, where: str, results: dict[str, FileResult]) -> None:
    path = CACHE / f"results-{driver}-{where}.json"
    path.write_text(json.dumps({f: r.__dict__ for f, r in results.items()}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.driver_suites", description=__doc__.split("\n\n")[0])
    ap.add_argument("driver", choices=["asyncpg", "psycopg"])
    ap.add_argument("files", nargs="*", help="test files to run (default: all that need a server)")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--direct", action="store_true", help="run against PostgreSQL directly")
    where.add_argument("--both", action="store_true", help="run through pgsplit, then directly, and compare")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("--source", help="a checkout of psycopg's repository (its sdist has no tests)")
    ap.add_argument("--file-timeout", type=float, default=300.0, help="seconds per test file (default 300)")
    ap.add_argument("--test-timeout", type=float, default=60.0, help="seconds per test (default 60)")
    ap.add_argument("--tb", default="no", help="pytest --tb style; other than 'no' prints each file's output")
    ap.add_argument("--pool-size", type=int, default=20, help="pgsplit's pool.size (default 20)")
    args = ap.parse_intermixed_args(argv)
    # a SIGTERM still stops the sandbox cluster and the proxy (the with block's exit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    directory = suite_dir(args.driver, args.source)
    install_deps(args.driver)
    files = suite_files(directory, args.driver, args.files)
    with Servers(args.pool_size) as servers:
        proxied = direct = None
        if not args.direct:
            proxied = run_suite(args.driver, servers, False, files, directory, args.file_timeout,
                                args.test_timeout, args.keyword, args.tb)
            _save(args.driver, "pgsplit", proxied)
        if args.direct or args.both:
            direct = run_suite(args.driver, servers, True, files, directory, args.file_timeout,
                               args.test_timeout, args.keyword, args.tb)
            _save(args.driver, "direct", direct)
    print(report(args.driver, proxied or direct, direct if proxied else None,
                 "through pgsplit" if proxied else "directly"))
    bad = [r for r in (proxied or direct).values() if r.timed_out or r.count("FAILED") or r.count("ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
