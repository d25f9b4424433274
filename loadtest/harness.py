"""Running pgsplit in front of a sandbox cluster: config text, a proxy in a thread, a proxy
in a process. Used by the tests, `pgsplit demo` and the benchmarks.

Owns: turning a `loadtest.sandbox.Cluster` (or several) into a pgsplit TOML config, and
starting/stopping a proxy with it. A proxy in a thread has its own event loop (of the kind
proxy.loop chooses), so tests can use blocking clients (psql, pgbench, psycopg) and still look
at the proxy's internals; a proxy in a process is what an operator runs (`pgsplit run -c FILE`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import loop as event_loop

ROOT = Path(__file__).resolve().parents[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class NodeSet:
    """Some nodes of a sandbox `Cluster` as one config cluster, e.g. a cutover's target (a
    standby of the primary and a cascading standby of it) next to the source (the primary
    and one replica): ``{"main": NodeSet.of(c, "primary", ["replica1"]),
    "next": NodeSet.of(c, "next1", ["next2"])}``. `config_text` reads the same attributes
    of it as of a Cluster (users, md5_users, superuser_password, primary, replicas, nodes)."""

    primary: Any  # loadtest.sandbox.Node
    replicas: Sequence[Any] = ()
    users: Mapping[str, str] = field(default_factory=dict)
    md5_users: Mapping[str, str] = field(default_factory=dict)
    superuser_password: str = "postgres-secret"

    @classmethod
    def of(cls, cluster: Any, primary: Any, replicas: Sequence[Any] = ()) -> "NodeSet":
        """Nodes (or node names) of `cluster`, with its users and superuser password."""
        return cls(cluster.node(primary), [cluster.node(r) for r in replicas], dict(cluster.users),
                   dict(cluster.md5_users), cluster.superuser_password)

    @property
    def nodes(self) -> list[Any]:
        return [self.primary, *self.replicas]


def config_text(clusters: Mapping[str, Any], *, active: str | None = None, port: int = 0, admin_port: int = 0,
                sections: Mapping[str, Mapping[str, Any]] | None = None,
                backend_overrides: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A pgsplit config for sandbox clusters: {config cluster name: Cluster or NodeSet}.

    Backends are named "<cluster>_<node>" (e.g. main_primary, main_replica1). Users come
    from the first cluster; the monitor logs in as its superuser. `sections` adds or
    overrides keys of [listen], [admin], [routing], [pool], [cutover], ...
    """
    names = list(clusters)
    first = clusters[names[0]]
    sections = {k: dict(v) for k, v in (sections or {}).items()}
    listen = {"host": "127.0.0.1", "port": port, **sections.pop("listen", {})}
    admin = {"host": "127.0.0.1", "port": admin_port, **sections.pop("admin", {})}
    monitor = {"user": "postgres", "password": first.superuser_password, **sections.pop("monitor", {})}
    lines = [f"active = {_toml_value(active or names[0])}"]
    for title, table in (("listen", listen), ("admin", admin), ("monitor", monitor), *sections.items()):
        lines.append(f"\n[{title}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for user, password in {**first.users, **first.md5_users}.items():
        lines += ["\n[[users]]", f"name = {_toml_value(user)}", f"password = {_toml_value(password)}"]
    for cname, cluster in clusters.items():
        for node in cluster.nodes:
            bname = f"{cname}_{node.name}"
            lines += [f"\n[backends.{bname}]", f'host = "{node.host}"', f"port = {node.port}"]
            for k, v in (backend_overrides or {}).get(bname, {}).items():
                lines.append(f"{k} = {_toml_value(v)}")
        replicas = [f"{cname}_{r.name}" for r in cluster.replicas]
        lines += [f"\n[clusters.{cname}]", f'primary = "{cname}_{cluster.primary.name}"',
                  f"replicas = {_toml_value(replicas)}"]
    return "\n".join(lines) + "\n"


class ProxyThread:
    """A pgsplit proxy on its own event loop (proxy.loop's kind) in a daemon thread."""

    def __init__(self, text: str):
        from proxy.config import parse_config

        self.config = parse_config(text, source="<test>")
        self.text = text
        self.proxy = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pgsplit-proxy", daemon=True)

    def start(self, timeout: float = 30.0) -> "ProxyThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the proxy did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        from proxy.app import Proxy

        loop = self.loop = event_loop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self.proxy = Proxy(self.config)
            loop.run_until_complete(self.proxy.start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.proxy.stop())
            loop.run_until_complete(asyncio.sleep(0.05))
            loop.close()
            self._stopped.set()

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def admin_port(self) -> int:
        return self.proxy.admin.port

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def dsn(self, user: str = "app", password: str | None = None, dbname: str = "app", **params: str) -> str:
        if password is None:
            password = {u.name: u.secret() for u in self.config.users}.get(user) or ""
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}?sslmode=disable{extra}"

    def call(self, fn, *args, timeout: float = 30.0):
        """Run fn(*args) on the proxy's loop (a coroutine function is awaited there)."""
        async def runner():
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._stopped.wait(timeout)
        self._thread.join(timeout)

    def __enter__(self) -> "ProxyThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # (ended meanwhile)
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyProcess:
    """`pgsplit run -c FILE` as a child process (what an operator runs)."""

    def __init__(self, text: str, *, port: int | None = None, admin_port: int | None = None, env=None,
                 workers: int | None = 1):
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        text = text.replace("port = 0\n", f"port = {self.port}\n", 1).replace(
            "port = 0\n", f"port = {self.admin_port}\n", 1)
        self.dir = tempfile.mkdtemp(prefix="pgsplit-proc-")
        self.config_path = Path(self.dir) / "pgsplit.toml"
        self.config_path.write_text(text)
        self.log_path = Path(self.dir) / "pgsplit.log"
        self.env = {**os.environ, **(env or {})}
        self.workers = workers  # `--workers`: one process unless asked (None: pgsplit's default)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "ProxyProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_path)]
                + ([] if self.workers is None else ["--workers", str(self.workers)]),
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgsplit exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"pgsplit did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        """Resident memory of pgsplit: its process and, with workers, theirs."""
        return sum(_rss(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
