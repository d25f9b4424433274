"""Sandbox clusters: a primary with ``initdb``, streaming replicas with ``pg_basebackup``,
every server on a loopback port and a Unix socket in its node's directory, and the knobs the
tests turn (apply delay, paused replay, stop, SIGKILL, freeze, promote, cascading standbys).

`Node` is one server's addresses and process; `Cluster` creates, starts, breaks and stops
them. Every started cluster is stopped at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql as psql

from loadtest.sandbox.binaries import find_bindir, server_major_version
from loadtest.sandbox.certs import SandboxCa
from loadtest.sandbox.processes import (
    LOCALHOST,
    SandboxError,
    _alive,
    _as_server_user,
    _children,
    _chown,
    _mapped_dsm_files,
    _poll,
    _port_accepts,
    _proc_state,
    _running_as_root,
    _server_env,
    free_port,
)

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
        tls: SandboxCa | None = None,
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
        # With `tls`, the servers run ssl = on with its server certificate and accept TCP
        # connections only inside TLS (hostssl), as a managed service does.
        self.tls = tls
        if tls is not None:
            self.settings.setdefault("ssl", "on")
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
        if self.tls is not None:
            lines = [line.replace("host    ", "hostssl ", 1) if line.startswith("host ") else line for line in lines]
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
        if self.tls is not None:  # (ssl_cert_file and ssl_key_file default to these; standbys copy them)
            for source, name in ((self.tls.server_cert, "server.crt"), (self.tls.server_key, "server.key")):
                self._write(node.datadir / name, Path(source).read_text())
                (node.datadir / name).chmod(0o600)
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
