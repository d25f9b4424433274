"""PgBouncer and Pgpool-II in front of a sandbox cluster, for the benchmarks.

Owns: writing each competitor's config files into a private temporary directory,
running the daemon in the foreground as the ``postgres`` OS user when this process is
root (PgBouncer refuses to run as root; the system services are never touched), on a
free loopback port, waiting until it accepts logins, measuring its memory, and stopping
it (also at interpreter exit, so a Ctrl-C or an error leaves nothing behind).

It knows nothing about pgsplit or pgbench: `loadtest.bench` drives these objects.

Authentication is SCRAM-SHA-256 end to end, as for the sandbox's ``app`` user:

- PgBouncer: ``auth_type = scram-sha-256`` with a userlist.txt holding the *plaintext*
  password, so it can answer the client's SCRAM exchange and run its own towards the
  server (PgBouncer docs, "Authentication file format").
- Pgpool-II: ``enable_pool_hba = on`` with a ``scram-sha-256`` line, and pool_passwd
  entries of the form ``user:TEXTpassword`` (Pgpool-II docs, 6.2.4 "scram-sha-256
  Authentication": md5 entries cannot be used for SCRAM, plain text or AES ones can).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "PGBOUNCER",
    "PGPOOL",
    "Backend",
    "CompetitorError",
    "PgBouncer",
    "Pgpool",
    "pid_rss_bytes",
    "tool_version",
]

PGBOUNCER = "/usr/sbin/pgbouncer"
PGPOOL = "/usr/sbin/pgpool"
LOCALHOST = "127.0.0.1"

_running: "weakref.WeakSet[Daemon]" = weakref.WeakSet()


class CompetitorError(RuntimeError):
    """A competitor could not be configured, started or reached."""


class Backend:
    """One PostgreSQL server a competitor connects to (host, port)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    @classmethod
    def of(cls, node: object) -> "Backend":
        """From a `loadtest.sandbox.Node` (anything with .host and .port)."""
        return cls(node.host, node.port)  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _as_root() -> bool:
    return os.geteuid() == 0


def _postgres_ids() -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise CompetitorError("running as root but there is no 'postgres' OS user") from None
    return pw.pw_uid, pw.pw_gid


def _as_server_user(cmd: Sequence[str]) -> list[str]:
    """Run as the postgres OS user when root. runuser's PAM session resets the soft limit
    on open files to 1024, too few for thousands of clients: raise it to the hard limit
    again (allowed for any user) before exec."""
    cmd = [str(c) for c in cmd]
    if not _as_root():
        return cmd
    return ["runuser", "-u", "postgres", "--", "/bin/sh", "-c",
            'ulimit -n "$(ulimit -Hn)" && exec "$@"', "sh", *cmd]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def pid_rss_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tool_version(program: str) -> str:
    """First line of ``program --version`` ("" if it cannot run)."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def _quote_ini(value: str) -> str:
    return value.replace("'", "''")


class Daemon:
    """A competitor daemon run in the foreground in its own temporary directory."""

    name = "daemon"
    program = ""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"pgsplit-bench-{self.name}-"))
        self.output_path = self.dir / "output.log"  # the daemon's stdout and stderr
        self.log_path = self.dir / f"{self.name}.log"
        self.pid_path = self.dir / f"{self.name}.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        if _as_root():
            uid, gid = _postgres_ids()
            os.chown(self.dir, uid, gid)

    # -- files
    def _write(self, name: str, text: str, mode: int = 0o600) -> Path:
        path = self.dir / name
        path.write_text(text)
        os.chmod(path, mode)
        if _as_root():
            uid, gid = _postgres_ids()
            os.chown(path, uid, gid)
        return path

    def command(self) -> list[str]:
        raise NotImplementedError

    # -- process
    def start(self, timeout: float = 30.0) -> "Daemon":
        if not Path(self.program).exists():
            raise CompetitorError(f"{self.program} is not installed "
                                  "(scripts/install.sh bench installs it)")
        out = open(self.output_path, "wb")
        self.proc = subprocess.Popen(_as_server_user(self.command()), cwd=self.dir,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CompetitorError(f"{self.name} exited with {self.proc.returncode}:\n"
                                      f"{self.log_tail()}")
            if self.daemon_pid() is not None and self._accepts():
                return self
            time.sleep(0.05)
        self.stop()
        raise CompetitorError(f"{self.name} did not accept connections on port {self.port} "
                              f"within {timeout:g}s:\n{self.log_tail()}")

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def daemon_pid(self) -> int | None:
        """PID of the daemon itself (not of runuser): from its pid file, else the child
        of runuser running the program (Pgpool-II writes no pid file with -n)."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
            if os.path.exists(f"/proc/{pid}"):
                return pid
        except (OSError, ValueError, IndexError):
            pass
        if self.proc is None or self.proc.poll() is not None:
            return None
        if not _as_root():
            return self.proc.pid
        comm = Path(self.program).name[:15]
        for pid in _children(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    return pid
            except OSError:
                continue
        return None

    def rss_bytes(self) -> int:
        pid = self.daemon_pid()
        if pid is None:
            raise CompetitorError(f"{self.name} is not running")
        return pid_rss_bytes(pid)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in dict.fromkeys((self.log_path, self.output_path)):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    stop_signal = signal.SIGINT

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemon (its own shutdown signal, then SIGKILL to its process group)."""
        proc = self.proc
        if proc is None:
            return
        pid = self.daemon_pid()
        if proc.poll() is None:
            try:
                if pid is not None:
                    os.kill(pid, self.stop_signal)
                else:
                    proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            except ProcessLookupError:
                proc.wait(timeout)
        self.proc = None
        _running.discard(self)

    def cleanup(self) -> None:
        """Stop and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PgBouncer(Daemon):
    """PgBouncer in transaction pooling mode in front of one server."""

    name = "pgbouncer"
    program = PGBOUNCER
    # SIGINT is PgBouncer's "safe shutdown" (waits for clients); SIGTERM is immediate.
    stop_signal = signal.SIGTERM

    def __init__(self, backend: Backend, users: Mapping[str, str], *, dbname: str = "app",
                 pool_size: int = 20, max_client_conn: int = 10000,
                 pool_mode: str = "transaction", extra: Mapping[str, str] | None = None):
        super().__init__()
        self.backend = backend
        self.users = dict(users)
        self.dbname = dbname
        userlist = "".join(f'"{u}" "{p}"\n' for u, p in self.users.items())
        auth_file = self._write("userlist.txt", userlist)
        settings = {
            "listen_addr": LOCALHOST,
            "listen_port": str(self.port),
            "unix_socket_dir": str(self.dir),
            "auth_type": "scram-sha-256",
            "auth_file": str(auth_file),
            "pool_mode": pool_mode,
            "default_pool_size": str(pool_size),
            "min_pool_size": "0",
            "reserve_pool_size": "0",
            "max_client_conn": str(max_client_conn),
            "max_db_connections": "0",
            "logfile": str(self.log_path),
            "pidfile": str(self.pid_path),
            "log_connections": "0",
            "log_disconnections": "0",
            "log_pooler_errors": "1",
            "stats_period": "3600",
            "server_login_retry": "1",
            # drivers send these; PgBouncer would otherwise refuse the login
            "ignore_startup_parameters": "extra_float_digits,options",
            **(extra or {}),
        }
        self.config_path = self._write("pgbouncer.ini", "\n".join([
            "[databases]",
            f"{dbname} = host={backend.host} port={backend.port} dbname={dbname}",
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in settings.items()),
        ]) + "\n")

    def command(self) -> list[str]:
        return [self.program, str(self.config_path)]

    def errors(self) -> list[str]:
        """ERROR/WARNING/FATAL lines of its log."""
        return [ln for ln in self.log_text().splitlines()
                if re.search(r"\b(ERROR|FATAL|WARNING)\b", ln)]


class Pgpool(Daemon):
    """Pgpool-II in streaming-replication mode: backend0 is the primary, the replicas (if
    any) take reads with load balancing on; connection cache on."""

    name = "pgpool"
    program = PGPOOL
    # Pgpool-II: SIGTERM smart, SIGINT fast, SIGQUIT immediate shutdown.
    stop_signal = signal.SIGINT

    def __init__(self, primary: Backend, replicas: Sequence[Backend],
                 users: Mapping[str, str], *, check_user: str, check_password: str,
                 num_init_children: int = 140, max_pool: int = 1,
                 primary_weight: float = 0.0, extra: Mapping[str, str] | None = None):
        super().__init__()
        self.log_path = self.output_path  # log_destination = stderr
        self.primary = primary
        self.replicas = list(replicas)
        self.users = dict(users)
        self.pcp_port = _free_port()
        self.wd_port = _free_port()
        self.num_init_children = num_init_children
        pool_passwd = self._write("pool_passwd",
                                  "".join(f"{u}:TEXT{p}\n" for u, p in self.users.items()))
        hba = self._write("pool_hba.conf", "\n".join([
            "# TYPE  DATABASE  USER  ADDRESS  METHOD",
            "local   all       all             scram-sha-256",
            f"host    all       all   {LOCALHOST}/32  scram-sha-256",
        ]) + "\n")
        self.pcp_path = self._write("pcp.conf", "")
        settings = self._settings(pool_passwd, check_user=check_user,
                                  check_password=check_password, max_pool=max_pool)
        settings.update(self._backend_settings(primary_weight))
        settings.update(extra or {})
        self.config_path = self._write("pgpool.conf", "\n".join(
            f"{k} = {self._value(v)}" for k, v in settings.items()) + "\n")
        self.hba_path = hba

    def _settings(self, pool_passwd: Path, *, check_user: str, check_password: str,
                  max_pool: int) -> dict[str, object]:
        """pgpool.conf without its backends: addresses, files, auth, pooling, balancing."""
        return {
            "backend_clustering_mode": "streaming_replication",
            "listen_addresses": LOCALHOST,
            "port": self.port,
            "socket_dir": str(self.dir),
            "pcp_listen_addresses": LOCALHOST,
            "pcp_port": self.pcp_port,
            "pcp_socket_dir": str(self.dir),
            "wd_ipc_socket_dir": str(self.dir),
            "use_watchdog": False,
            "wd_port0": self.wd_port,
            "pid_file_name": str(self.pid_path),
            "logdir": str(self.dir),
            "log_destination": "stderr",
            "logging_collector": False,
            "log_min_messages": "warning",
            "enable_pool_hba": True,
            "pool_passwd": str(pool_passwd),
            "allow_clear_text_frontend_auth": False,
            "ssl": False,
            "num_init_children": self.num_init_children,
            # one backend connection per child and backend is enough for one user/db
            "max_pool": max_pool,
            "connection_cache": True,
            "child_life_time": 0,
            "child_max_connections": 0,
            "connection_life_time": 0,
            "client_idle_limit": 0,
            "listen_backlog_multiplier": 4,
            "load_balance_mode": bool(self.replicas),
            # pgsplit balances every autocommit read on its own; do the same here
            "statement_level_load_balance": bool(self.replicas),
            "disable_load_balance_on_write": "transaction",
            "sr_check_period": 10,
            "sr_check_user": check_user,
            "sr_check_password": check_password,
            "sr_check_database": "postgres",
            "delay_threshold": 0,
            "health_check_period": 0,
            "failover_on_backend_error": False,
            "failover_on_backend_shutdown": False,
            "memory_cache_enabled": False,
            "memqcache_oiddir": str(self.dir / "oiddir"),
            "search_primary_node_timeout": 10,
        }

    def _backend_settings(self, primary_weight: float) -> dict[str, object]:
        """backend0 is the primary (weight primary_weight when there are replicas), then the replicas."""
        settings: dict[str, object] = {}
        for i, b in enumerate([self.primary, *self.replicas]):
            weight = primary_weight if (i == 0 and self.replicas) else 1.0
            settings[f"backend_hostname{i}"] = b.host
            settings[f"backend_port{i}"] = b.port
            settings[f"backend_weight{i}"] = weight
            settings[f"backend_flag{i}"] = "DISALLOW_TO_FAILOVER"
            settings[f"backend_application_name{i}"] = f"pgpool{i}"
        return settings

    @staticmethod
    def _value(v: object) -> str:
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, (int, float)):
            return str(v)
        return "'" + _quote_ini(str(v)) + "'"

    def command(self) -> list[str]:
        # -n: do not detach; -D: discard a pgpool_status file from an earlier run
        return [self.program, "-n", "-D", "-f", str(self.config_path),
                "-F", str(self.pcp_path), "-a", str(self.hba_path)]

    def errors(self) -> list[str]:
        return [ln for ln in self.log_text().splitlines()
                if re.search(r"\b(ERROR|FATAL|PANIC)\b", ln)]


@atexit.register
def _stop_all_at_exit() -> None:
    for d in list(_running):
        try:
            d.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
