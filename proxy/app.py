"""The proxy process: state shared by every session, and its start and stop.

Owns: the config in force, the SCRAM verifiers, the classifier, the topology holder and
its monitor, the pools, the per-backend load counters the policy balances on, the live
sessions and their cancel keys, the read-your-writes token fetcher, and the background
tasks. Sessions reach shared state only through this object (no globals), so a test can
run several proxies in one process. Its parts are built from the config by
proxy.process.wiring; the admin operations that drive it live in proxy.admin.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from metrics import Metrics, merge_snapshots, render
from proxy.access import ClientCounts, refusal
from proxy.admin import console
from proxy.admin.http import Admin
import hotpath
from proxy.admin.operations import AdminOps
from proxy.auth import ScramExchange, Verifiers
from proxy.config import Config
from proxy.process import warmup
from proxy.process.consistency import ReadYourWrites
from proxy.process.login import Logins
from proxy.process.lookup import UserLookup
from proxy.dataplane import DataPlane
from proxy.errors import AdminShutdown, ConnectionFailure, ProxyError, ServerError
from proxy.listener import Listener, new_cancel_key
from proxy.process.wiring import backend_specs, keeps_client_key, runtime_settings, ssl_context
from proxy.scram import ScramKeys, Verifier
from proxy.server.pool import Pool, Pools
from proxy.workers.follower import FollowerMonitor
from proxy.workers.link import RemoteAdminOps, WorkerLink
from proxy.session.client import ClientSession, State
from router.classify.classifier import Classifier
from router.lsn import CommitLsnFetcher
from router.monitor.lag import initial_topology
from router.monitor.monitor import Monitor
from router import tls
from router.topology import BackendState, Role, TopologyHolder

log = logging.getLogger("pgsplit")


class Proxy:
    def __init__(self, config: Config, *, metrics: Metrics | None = None, config_path: str | None = None,
                 worker: WorkerLink | None = None):
        self.config = config
        self.worker = worker  # one of `pgsplit run --workers N`'s workers (proxy.workers.worker)
        self.workers: Any = None  # proxy.workers.supervisor.Supervisor, in the supervisor of N workers
        self.config_path = config_path  # what SIGHUP and POST /v1/reload read again
        self.metrics = metrics or Metrics()
        settings = runtime_settings(config)
        self.verifiers = Verifiers(settings.passwords, settings.verifiers)
        self.lookup = UserLookup(settings.lookup) if settings.lookup is not None else None
        self.classifier = Classifier(config.routing.classify_cache_size)
        self.session_pooling = config.pool.mode == "session"
        self.settings = settings  # built from self.config; swapped with it on reload
        self.client_limits = ClientCounts()
        self.pools = Pools(settings.pool, settings.passwords, on_connect=self._connected, sizes=settings.pool_sizes)
        self.statement_names = self.pools.statement_names
        specs = list(settings.backends)
        self.topology = TopologyHolder(initial_topology(config.active, specs))
        # A worker follows the supervisor's monitor (one per host) and exports no backend gauges.
        monitor = Monitor if worker is None else FollowerMonitor
        self.monitor = monitor(self.topology, specs, settings.monitor, self.metrics if worker is None else None,
                               on_volatile_functions=self.classifier.set_volatile_functions)
        if worker is not None:
            self.monitor.channel = worker.channel
        self.logins = Logins(self, self.monitor)
        self.monitor.databases = lambda: self.logins.catalog_databases
        self.lsn_fetcher = CommitLsnFetcher(self.monitor.primary_commit_lsns)
        self.consistency = ReadYourWrites(self.lsn_fetcher, self.monitor, self.topology, self.metrics,
                                          lambda: self.config.routing)
        self.load: dict[str, int] = {}
        self.sessions: set[ClientSession] = set()
        self.by_key: dict[tuple[int, bytes], ClientSession] = {}
        self.listener = Listener(self)
        self.dataplane = DataPlane(self)
        self.ssl_context = ssl_context(config)
        self.admin_ops = AdminOps(self) if worker is None else RemoteAdminOps(self, worker)
        self.client_port: int | None = None  # the supervisor's: the port its workers listen on
        self.admin: Admin | None = None  # the HTTP server, from start() on
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._down_watch: asyncio.Task | None = None
        self.started_at = time.time()
        self.hot_path = hotpath.describe()  # compiled, or why not
        self.metrics.client_counts = self.client_counts
        self.metrics.server_counts = self.pools.counts
        self.metrics.prepared_counts = self.pools.prepared_counts
        self.metrics.prepared_evictions = lambda: self.pools.evictions.count
        self.metrics.pool_waiting = self.pools.waiting_counts
        self.metrics.pool_timeouts = self.pools.timeout_counts

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, *, clients: bool = True, admin: bool = True) -> None:
        """Start the monitor, the client listener (not in a supervisor: its workers listen)
        and the admin API (not in a worker: its supervisor serves it, once they listen)."""
        await self.monitor.start()
        if clients:
            port = self.config.listen.port if self.worker is None else self.worker.port
            await self.listener.start(self.config.listen.host, port, reuse_port=self.worker is not None)
        if admin and self.worker is None:
            await self.start_admin()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._down_watch = asyncio.get_running_loop().create_task(self._cut_units_on_down_backends())
        if self.admin is not None:
            log.info("pgsplit listening on %s:%s, admin on %s:%s, active cluster %r",
                     self.config.listen.host, self.port, self.config.admin.host, self.admin.port, self.config.active)
        if self.worker is None:  # (told once, by the supervisor: its workers import the same build)
            if self.hot_path.startswith("compiled"):
                log.info("hot path %s", self.hot_path)
            else:  # (it works the same, with more instructions per unit)
                log.warning("hot path %s", self.hot_path)

    async def start_admin(self) -> None:
        self.admin = Admin(self.admin_ops)
        await self.admin.start(self.config.admin.host, self.config.admin.port)

    @property
    def port(self) -> int:
        return self.client_port if self.client_port is not None else self.listener.port

    async def stop(self) -> None:
        await self.listener.stop()
        for session in list(self.sessions):
            session.fail(_shutdown())
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._down_watch is not None:
            self._down_watch.cancel()
        if self.admin is not None:
            await self.admin.stop()
        await self.admin_ops.stop()
        await self.monitor.stop()
        await self.lsn_fetcher.aclose()
        if self.lookup is not None:
            self.lookup.close()
        self.pools.close()
        for task in list(self._tasks):
            task.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.pools.sweep()

    async def _cut_units_on_down_backends(self) -> None:
        """The monitor's verdict reaches the units in flight: on a backend it declared down
        (not answering its polls, or refusing connections), a unit that has waited
        `pool.down_backend_wait_s` (counted from the verdict, or from the unit's start if
        later) has its server connection cut. The session's lost-connection path then
        re-sends a read that delivered nothing elsewhere and fails anything else with 08006
        (a write's outcome unknown). Without this a unit waits for the whole outage: a
        stopped server's kernel still acknowledges every byte."""
        loop = asyncio.get_running_loop()
        down_since: dict[str, float] = {}
        while True:
            wait = self.config.pool.down_backend_wait_s
            await asyncio.sleep(max(0.05, min(0.25, wait / 4)))
            now = loop.time()
            down = {b.name for b in self.topology.current.backends if not b.up}
            for name in list(down_since):
                if name not in down:
                    del down_since[name]
            for name in down:
                since = down_since.setdefault(name, now)
                if now - since >= wait:
                    self._cut_units_on(name, wait)

    def _cut_units_on(self, backend: str, wait: float) -> None:
        started_before = time.perf_counter() - wait  # (steps are stamped with perf_counter)
        for pool in self.pools:
            if pool.address.backend != backend:
                continue
            for conn in list(pool.busy):
                if conn.steps and not conn.closed and conn.steps[0].t0 <= started_before:
                    log.warning("cutting a server connection to %s: a unit waited %.1f s on it after "
                                "the monitor declared the backend down", backend, wait)
                    conn.lost_reason = f"backend {backend} stopped answering (the monitor declared it down)"
                    conn.abort()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, (ProxyError, OSError, TimeoutError)):
                log.error("background task failed: %r", exc, exc_info=exc)

    # --- sessions ------------------------------------------------------------------------------

    def client_opened(self, session: ClientSession) -> None:
        self.sessions.add(session)

    def client_closed(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.by_key.pop((session.process_id, session.secret_key), None)
        self.client_limits.leave(session, session.user, session.database)

    def too_many_clients(self) -> bool:
        return len(self.sessions) > self.config.listen.max_client_connections

    def refusal(self, user: str, database: str, host: str) -> ProxyError | None:
        """[[access]]'s verdict on a client (proxy.access), before it is asked a password."""
        return refusal(self.settings.access, user, database, host)

    async def look_up(self, user: str) -> Verifier | None:
        """The verifier [auth_query] finds on the active primary for a user not in
        [[users]]; None without [auth_query] (the user is then unknown)."""
        if user in self.verifiers or self.lookup is None:
            return None
        return await self.lookup.verifier(user, self.topology.current.primary)

    def logged_in(self, user: str, exchange: ScramExchange) -> None:
        """A client proved its password: for a user pgsplit has no password of, its
        ClientKey logs the user in to the backends from now on."""
        if exchange.client_key is not None:
            keys = ScramKeys(exchange.verifier, exchange.client_key)
            if keeps_client_key(self.settings, user, keys):  # (not when a reload changed the user meanwhile)
                self.pools.remember_keys(user, keys)

    def admit(self, session: ClientSession) -> None:
        """Count an authenticated session against max_client_connections of its user and
        its database, or raise 53300; client_closed releases it."""
        self.client_limits.admit(session, session.user, session.database, self.settings.limits)

    def console_parameters(self, params: dict[str, str]) -> dict[str, str]:
        """The parameters an admin console client is shown at login (no backend is asked)."""
        return console.startup_parameters(params)

    async def run_console(self, session: ClientSession) -> None:
        """Answer an authenticated admin console client until it leaves (proxy.admin.console)."""
        await console.Console(self, session).run()

    def register_session(self, session: ClientSession) -> tuple[int, bytes]:
        while True:
            key = new_cancel_key(None if self.worker is None else self.worker.index)
            if key not in self.by_key:
                self.by_key[key] = session
                return key

    def cancel(self, process_id: int, secret_key: bytes) -> asyncio.Task | None:
        """The task forwarding a client's CancelRequest to its server, if there is one."""
        session = self.by_key.get((process_id, secret_key))
        if session is None and self.worker is not None and process_id & 0xFF != self.worker.index:
            return self.spawn(self.worker.forward_cancel(process_id, secret_key))  # (another worker's session)
        if session is None:
            log.info("cancel request with an unknown key ignored")
            return None
        return session.cancel()

    def client_counts(self) -> dict[str, int]:
        counts = {"handshake": 0, "idle": 0, "active": 0, "waiting": 0}
        for s in self.sessions:
            if s.state is State.HANDSHAKE:
                counts["handshake"] += 1
            elif s.waiting:
                counts["waiting"] += 1
            elif s.server is not None:
                counts["active"] += 1
            else:
                counts["idle"] += 1
        return counts

    # --- server connections ----------------------------------------------------------------

    def pool_for(self, backend: BackendState, user: str, database: str) -> Pool:
        return self.pools.get(backend.name, backend.host, backend.port, user, database, backend.tls)

    def _connected(self, backend: str, error: Exception | None) -> None:
        self.metrics.server_connects.labels(backend=backend, result="ok" if error is None else "error").inc()
        # Not a login refused for one user (53300, 28000, ...); 57P03 is the server refusing
        # everyone (shutting down, starting up).
        if isinstance(error, ConnectionFailure) or (isinstance(error, ServerError) and error.sqlstate == "57P03"):
            self.note_backend_failure(backend)

    def note_backend_failure(self, backend: str) -> None:
        """A connection to the backend failed: the monitor confirms or clears it."""
        self.monitor.mark_down(backend, "a server connection failed")

    async def check_backend(self, backend: str) -> bool:
        """One server connection to the backend was lost: True when the monitor's poll,
        sent now, says the backend answers (the loss was that connection's alone)."""
        return await self.monitor.check(backend)

    async def first_contact(self, session: ClientSession) -> dict[str, str]:
        """A freshly authenticated client's first server contact (proxy.process.login)."""
        return await self.logins.first_contact(session)

    async def switch_cluster(self, name: str):
        """Make another configured cluster the active backend set (the cutover's swap)."""
        specs = backend_specs(self.config, name)
        topology = await self.monitor.retarget(name, specs)
        self.config = self.config.with_active(name)
        self.settings = runtime_settings(self.config)
        self.pools.retire_backends({s.name for s in specs})
        return topology

    # --- what the admin operations ask of the process (proxy.admin.operations) --------------------

    async def reconfigure(self, config: Config) -> int:
        """Put a reloaded config in force (proxy.admin.reload checked it and kept what only a
        restart changes): the config and the settings built from it are swapped together,
        nothing awaited in between; then a changed backend set or monitor account is polled
        with a new topology generation. Returns the generation in force."""
        old, new = self.settings, runtime_settings(config)
        tls.forget_files()  # (certificate files rotated in place are read again)
        same_users = (new.passwords, new.verifiers) == (old.passwords, old.verifiers)
        verifiers = self.verifiers if same_users else Verifiers(new.passwords, new.verifiers)
        self.config, self.settings, self.verifiers = config, new, verifiers
        if new.lookup != old.lookup:  # (a new login or query: the answers of the old one are dropped)
            if self.lookup is not None:
                self.lookup.close()
            self.lookup = UserLookup(new.lookup) if new.lookup is not None else None
        if (new.passwords, new.verifiers, new.lookup) != (old.passwords, old.verifiers, old.lookup):
            settings = new
            self.pools.update_credentials(new.passwords, lambda user, keys: keeps_client_key(settings, user, keys))
        if new.pool != old.pool:
            self.pools.update_settings(new.pool)
        if new.pool_sizes != old.pool_sizes:
            self.pools.update_sizes(new.pool_sizes)
        if new.backends != old.backends or new.monitor != old.monitor:
            await self.monitor.retarget(config.active, new.backends, settings=new.monitor)
        if self.workers is not None:  # (its snapshots reach them first, on the same channels)
            await self.workers.reconfigure(config)
        return self.topology.current.generation

    async def warm_up(self, target: str) -> dict:
        """A cutover's warm-up of cluster `target` (proxy.process.warmup): in a supervisor,
        its monitor's logins here and the server connections in every worker."""
        done = await warmup.warm_up(self.pools, self.monitor, self.config, target)
        if self.workers is not None:
            done.update(await self.workers.warm_up(target))
        return done

    async def drop_warm_up(self) -> None:
        """A cutover that did not switch: close what its warm-up opened."""
        await warmup.drop_warm_up(self.pools, self.monitor, self.config)
        if self.workers is not None:
            await self.workers.drop_warm_up()

    # --- status --------------------------------------------------------------------------------

    def worker_report(self) -> dict:
        """A worker's figures for its supervisor: /metrics, status, the cutover's census."""
        return {"listening": self.listener.server is not None, "clients": self.client_counts(),
                "census": self.dataplane.census(), "held_units": self.dataplane.held_units,
                "servers": list(self.pools.counts().items()),
                "load": dict(self.load), "metrics": self.metrics.snapshot()}

    async def refresh(self) -> None:
        """Before a scrape or a status: a supervisor collects its workers' figures now."""
        if self.workers is not None:
            await self.workers.refresh()

    def metrics_text(self) -> bytes:
        if self.workers is None:
            return self.metrics.exposition()
        return render(merge_snapshots(self.metrics.snapshot(), self.workers.metrics_snapshots()))

    def status(self) -> dict:
        topo = self.topology.current
        backends = []
        pool_counts = self.pools.counts()
        load = self.load
        clients = self.client_counts()
        if self.workers is not None:  # (the sessions and pools are the workers')
            pool_counts, load, clients = {}, {}, dict.fromkeys(clients, 0)
            for report in self.workers.reports():
                for key, n in report["servers"]:
                    pool_counts[key] = pool_counts.get(key, 0) + n
                for name, n in report["load"].items():
                    load[name] = load.get(name, 0) + n
                for state, n in report["clients"].items():
                    clients[state] = clients.get(state, 0) + n
        for b in topo.backends:
            backends.append({
                "name": b.name, "host": b.host, "port": b.port, "role": b.role.value, "up": b.up,
                "in_recovery": b.in_recovery, "in_rotation": b.in_rotation if b.role is Role.REPLICA else None,
                "lag_bytes": b.lag_bytes, "lag_seconds": b.lag_seconds, "weight": b.weight,
                "error": b.error, "load": load.get(b.name, 0),
                "server_connections": {state: n for (name, state), n in pool_counts.items() if name == b.name},
            })
        return {
            "cluster": topo.cluster, "generation": topo.generation, "split_brain": topo.split_brain,
            "primary_writable": topo.primary_writable, "backends": backends,
            "clients": clients, "pool_mode": self.config.pool.mode,
            "uptime_s": round(time.time() - self.started_at, 1), "hot_path": self.hot_path,
            **({"workers": self.workers.status()} if self.workers is not None else {}),
        }


def _shutdown() -> ProxyError:
    return AdminShutdown("terminating connection due to administrator command: pgsplit is shutting down")
