"""The proxy process: state shared by every session, and its start and stop.

Owns: the config in force, the SCRAM verifiers, the classifier, the topology holder and
its monitor, the pools, the per-backend load counters the policy balances on, the live
sessions and their cancel keys, the read-your-writes token fetcher, and the background
tasks. Sessions reach shared state only through this object (no globals), so a test can
run several proxies in one process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time

from metrics import Metrics
from proxy import wire
from proxy.auth import Verifiers
from proxy.backend import UNKNOWN_SETTINGS, ServerConnection
from proxy.config import Config
from proxy.consistency import ReadYourWrites
from proxy.dataplane import DataPlane
from proxy.errors import ConnectionFailure, ProxyError, ServerError
from proxy.listener import Listener, new_cancel_key
from proxy.pool import Pool, Pools, PoolSettings
from proxy.session import ClientSession, State
from router.classify import Classifier
from router.lsn import CommitLsnFetcher
from router.monitor import BackendSpec, Monitor, MonitorSettings, initial_topology
from router.policy import startup_backend
from router.topology import BackendState, Role, TopologyHolder

log = logging.getLogger("pgsplit")

WARM_UP_LOGINS = 4  # a cutover's warm-up opens this many server connections at a time (live traffic goes on)


def backend_specs(config: Config, cluster_name: str) -> list[BackendSpec]:
    cluster = config.clusters[cluster_name]
    specs = []
    for name in cluster.members:
        b = config.backends[name]
        specs.append(BackendSpec(
            name=name, host=b.host, port=b.port,
            role=Role.PRIMARY if name == cluster.primary else Role.REPLICA,
            weight=b.weight,
            max_lag_bytes=b.max_lag_bytes if b.max_lag_bytes is not None else config.routing.max_lag_bytes,
            max_lag_seconds=b.max_lag_seconds if b.max_lag_seconds is not None else config.routing.max_lag_seconds,
        ))
    return specs


def monitor_settings(config: Config) -> MonitorSettings:
    r = config.routing
    return MonitorSettings(
        user=config.monitor.user, password=config.monitor.secret(), dbname=config.monitor.dbname,
        interval_s=r.monitor_interval_ms / 1000, timeout_s=r.monitor_timeout_ms / 1000,
        catalog_refresh_s=r.catalog_refresh_s,
    )


class Proxy:
    def __init__(self, config: Config, *, metrics: Metrics | None = None, config_path: str | None = None):
        self.config = config
        self.config_path = config_path  # what SIGHUP and POST /v1/reload read again
        self.metrics = metrics or Metrics()
        self.verifiers = Verifiers({u.name: u.secret() for u in config.users})
        self.classifier = Classifier(config.routing.classify_cache_size)
        self.session_pooling = config.pool.mode == "session"
        self.pools = Pools(self._pool_settings(config), self._passwords(config), on_connect=self._connected)
        specs = backend_specs(config, config.active)
        self.topology = TopologyHolder(initial_topology(config.active, specs))
        self.monitor = Monitor(self.topology, specs, monitor_settings(config), self.metrics,
                               on_volatile_functions=self.classifier.set_volatile_functions)
        self._catalog_databases: set[str] = set()  # databases whose catalog was read
        self.monitor.databases = lambda: self._catalog_databases
        self.lsn_fetcher = CommitLsnFetcher(self.monitor.primary_commit_lsns)
        self.consistency = ReadYourWrites(self.lsn_fetcher, self.monitor, self.topology, self.metrics,
                                          lambda: self.config.routing)
        self._async_default: dict[tuple[str, str], bool] = {}  # (user, db): synchronous_commit off
        self.load: dict[str, int] = {}
        self.sessions: set[ClientSession] = set()
        self.by_key: dict[tuple[int, bytes], ClientSession] = {}
        self.listener = Listener(self)
        self.dataplane = DataPlane(self)
        self.ssl_context = self._ssl_context(config)
        self.admin = None
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self._down_watch: asyncio.Task | None = None
        self.started_at = time.time()
        self.metrics.client_counts = self.client_counts
        self.metrics.server_counts = self.pools.counts
        self.metrics.prepared_counts = self.pools.prepared_counts
        self.metrics.prepared_evictions = lambda: self.pools.evictions.count
        self.migration_watches: dict[str, object] = {}  # target cluster -> router.migrate.Watch
        self._migration_locks: dict[str, asyncio.Lock] = {}

    # --- configuration ---------------------------------------------------------------------

    @staticmethod
    def _pool_settings(config: Config) -> PoolSettings:
        p = config.pool
        return PoolSettings(size=p.size, connect_timeout_s=p.connect_timeout_s, acquire_timeout_s=p.acquire_timeout_s,
                            idle_timeout_s=p.idle_timeout_s, server_lifetime_s=p.server_lifetime_s,
                            keepalive_idle_s=p.keepalive_idle_s, keepalive_interval_s=p.keepalive_interval_s,
                            keepalive_count=p.keepalive_count, tcp_user_timeout_s=p.tcp_user_timeout_s,
                            max_prepared_statements=p.max_prepared_statements)

    @staticmethod
    def _passwords(config: Config) -> dict[str, str]:
        return {u.name: u.secret() for u in config.users}

    @staticmethod
    def _ssl_context(config: Config) -> ssl.SSLContext | None:
        if not config.listen.tls_enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(config.listen.tls_cert), str(config.listen.tls_key))
        return ctx

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.monitor.start()
        await self.listener.start(self.config.listen.host, self.config.listen.port)
        from proxy.admin import Admin  # aiohttp is only needed once the proxy runs

        self.admin = Admin(self)
        await self.admin.start(self.config.admin.host, self.config.admin.port)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._down_watch = asyncio.get_running_loop().create_task(self._cut_units_on_down_backends())
        log.info("pgsplit listening on %s:%s, admin on %s:%s, active cluster %r",
                 self.config.listen.host, self.port, self.config.admin.host, self.admin.port, self.config.active)

    @property
    def port(self) -> int:
        return self.listener.port

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
        for watch in list(self.migration_watches.values()):
            await watch.stop()
        await self.monitor.stop()
        await self.lsn_fetcher.aclose()
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

    def too_many_clients(self) -> bool:
        return len(self.sessions) > self.config.listen.max_client_connections

    def register_session(self, session: ClientSession) -> tuple[int, bytes]:
        while True:
            key = new_cancel_key()
            if key not in self.by_key:
                self.by_key[key] = session
                return key

    def cancel(self, process_id: int, secret_key: bytes) -> asyncio.Task | None:
        """The task forwarding a client's CancelRequest to its server, if there is one."""
        session = self.by_key.get((process_id, secret_key))
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
        return self.pools.get(backend.name, backend.host, backend.port, user, database)

    @staticmethod
    def pool_of(server: ServerConnection) -> Pool:
        return server.pool

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
        """Borrow a server connection for a freshly authenticated client: check that the
        database exists, apply the client's startup settings, learn the parameter set
        the client is shown."""
        from proxy.errors import RoutingError

        for attempt in range(2):
            decision = startup_backend(self.topology.current, self.load)
            if decision.error is not None:
                raise RoutingError(*decision.error)
            pool = self.pool_for(decision.backend, session.user, session.database)
            try:
                conn = await pool.acquire()
                break
            except ConnectionFailure:
                # The backend failed before the monitor noticed (a crashed primary refuses
                # connections): once its check agrees, the login goes where the next
                # decision says (a replica), instead of failing.
                if attempt or await self.check_backend(decision.backend.name):
                    raise
            except ServerError as exc:
                if exc.sqlstate.startswith("28"):
                    exc.message = f"pgsplit could not log in to backend {decision.backend.name}: {exc.message}"
                    exc.fields = {**exc.fields, "M": exc.message}
                raise
        try:
            replay = session.carried.settings_for(conn)
            if replay is not None:
                done = asyncio.get_running_loop().create_future()
                conn.swallow(replay, done.set_result)
                try:
                    step = await done
                except BaseException:
                    conn.settings_key = UNKNOWN_SETTINGS  # (whether the replay ran is not known)
                    raise
                if step.error is not None:
                    conn.settings_key = UNKNOWN_SETTINGS  # (the replay was undone as a whole)
                    raise ServerError(step.error, fatal=True)
            params = dict(conn.params)
            key = (session.user, session.database)
            if key not in self._async_default:
                self._async_default[key] = await _async_commit_default(conn)
            session.carried.async_default = self._async_default[key]
        finally:
            pool.release(conn)
        if "in_hot_standby" in params:
            params["in_hot_standby"] = "off"  # the proxy accepts writes wherever they run
        if session.database not in self._catalog_databases:
            await self._read_catalog(session.database)
        return params

    async def _read_catalog(self, database: str) -> None:
        """The first client of a database: read its volatile functions before its first
        statement is routed (later refreshes run in the monitor)."""
        self._catalog_databases.add(database)
        try:
            async with asyncio.timeout(self.config.routing.monitor_timeout_ms / 1000 * 5):
                await self.monitor.refresh_catalog()
        except Exception as exc:  # the periodic refresh tries again
            log.warning("reading the volatile-function catalog of database %r failed: %s", database, exc)

    async def switch_cluster(self, name: str):
        """Make another configured cluster the active backend set (the cutover's swap)."""
        specs = backend_specs(self.config, name)
        topology = await self.monitor.retarget(name, specs)
        self.config = self.config.with_active(name)
        self.pools.retire_backends({s.name for s in specs})
        return topology

    # --- cutover and pause (the admin API's POST /v1/cutover, /v1/pause, /v1/resume) ----------

    _admin_op: str | None = None  # "cutover" or "pause" while one is in progress: one at a time

    def start_cutover(self, target: str, dry_run: bool = False, timeout_s: float | None = None,
                      on_event=None, reverse: bool = False) -> asyncio.Task:
        """Check the request now (ValueError: bad arguments; CutoverBusy: a cutover or a pause
        is in progress) and run router.cutover in a task of its own, so an admin client that
        hangs up does not cancel a cutover halfway. The task's result is the summary event.
        `reverse`: a logical target (an online migration's) replicates back to the source
        afterwards, so a later cutover back loses nothing written in between."""
        from router.cutover import ControlAccount, Cutover, CutoverBusy, CutoverSettings, LogicalOptions, PgControl

        if not isinstance(target, str) or target not in self.config.clusters:
            raise ValueError(f"{target!r} is not a cluster (known: {', '.join(sorted(self.config.clusters))})")
        if target == self.config.active:
            raise ValueError(f"cluster {target!r} is already the active one")
        if not isinstance(dry_run, bool):
            raise ValueError("dry_run must be true or false")
        if not isinstance(reverse, bool):
            raise ValueError("reverse must be true or false")
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or timeout_s <= 0):
            raise ValueError("timeout_s must be a number of seconds > 0")
        if self._admin_op == "cutover" or (self._admin_op is not None and not dry_run):
            raise CutoverBusy(f"a {self._admin_op} is in progress" + (
                "; POST /v1/resume first" if self._admin_op == "pause" else ""))
        source = self.config.active
        specs = backend_specs(self.config, target)
        c, m = self.config.cutover, self.config.monitor
        settings = CutoverSettings(
            pause_timeout_s=c.pause_timeout_s, catchup_timeout_s=c.catchup_timeout_s,
            cancel_idle_in_transaction=c.idle_in_transaction == "cancel", max_lag_bytes=specs[0].max_lag_bytes,
            timeout_s=timeout_s, dry_run=dry_run)
        logical = LogicalOptions(reverse=reverse, reverse_name=self.migration_name(source),
                                 reverse_conninfo=self._publisher_conninfo(target))
        control = PgControl(backend_specs(self.config, source)[0], specs[0], specs[1:],
                            ControlAccount(m.user, m.secret(), m.dbname, self.config.pool.connect_timeout_s),
                            logical)
        cutover = Cutover(source, target, self.dataplane, control, settings, on_event,
                          warm_up=lambda: self._warm_up(target))
        if not dry_run:
            self._admin_op = "cutover"
        return self.spawn(self._run_cutover(cutover))

    async def _run_cutover(self, cutover) -> dict:
        try:
            result = await cutover.run()
        finally:
            if not cutover.settings.dry_run:
                self._admin_op = None
                if self.config.active != cutover.target:  # warmed-up pools of a target not taken
                    self.pools.retire_backends({s.name for s in backend_specs(self.config, self.config.active)})
                    await self.monitor.unstage()
        if not cutover.settings.dry_run:
            self.metrics.cutovers.labels(result=result.result.value).inc()
        if result.pause_seconds is not None:
            self.metrics.cutover_pause_seconds.observe(result.pause_seconds)
        if self.config.active == cutover.target:
            await self._migration_cut_over(cutover.source, cutover.target, cutover.control)
        return result.to_dict()

    async def _warm_up(self, target: str) -> dict:
        """Before the pause, open as many server connections to the target cluster per
        (user, database) as the active one has now: sessions of a hot standby survive its
        promotion and take writes after it, so held units find connections ready instead
        of all logging in at once after the swap. A login failure refuses the cutover."""
        active = {s.name: s for s in backend_specs(self.config, self.config.active)}
        specs = backend_specs(self.config, target)
        by_name = {s.name: s for s in specs}
        want: dict[tuple[str, str, str], int] = {}
        for pool in self.pools:
            spec = active.get(pool.address.backend)
            if spec is None or not pool.total:
                continue
            dests = specs[:1] if spec.role is Role.PRIMARY or len(specs) == 1 else specs[1:]
            for d in dests:
                key = (d.name, pool.user, pool.database)
                want[key] = min(self.config.pool.size, want.get(key, 0) + -(-pool.total // len(dests)))

        gate = asyncio.Semaphore(WARM_UP_LOGINS)

        async def login(pool: Pool) -> ServerConnection:
            async with gate:
                return await pool.acquire()

        async def fill(key: tuple[str, str, str], n: int) -> int:
            spec = by_name[key[0]]
            pool = self.pools.get(spec.name, spec.host, spec.port, key[1], key[2])
            # all held until every one is open (a released one would be lent again)
            conns = await asyncio.gather(*(login(pool) for _ in range(max(0, n - pool.total))),
                                         return_exceptions=True)
            for conn in conns:
                if isinstance(conn, ServerConnection):
                    pool.release(conn)
            for conn in conns:
                if isinstance(conn, BaseException):
                    raise conn
            return len(conns)

        # The monitor logs in too, so the swap costs it one poll rather than logins.
        staged, *opened = await asyncio.gather(self.monitor.stage(target, specs),
                                               *(fill(k, n) for k, n in want.items()), return_exceptions=True)
        for n, key in zip(opened, want):
            if isinstance(n, BaseException):
                raise ValueError(f"{key[1]}@{key[2]} cannot log in to {key[0]} of cluster {target!r}: {n}") from n
        return {"server_connections": sum(opened), "pools": len(want),
                "monitor_logins": staged if isinstance(staged, int) else 0}

    async def admin_cutover(self, target: str, dry_run: bool = False, timeout_s: float | None = None,
                            on_event=None) -> dict:
        """Run a cutover to cluster `target` and return its summary (see start_cutover)."""
        return await asyncio.shield(self.start_cutover(target, dry_run, timeout_s, on_event))

    async def admin_reload(self) -> dict:
        """POST /v1/reload: read the config file again (see proxy.reload)."""
        from proxy.reload import reload_file

        return await reload_file(self)

    async def admin_pause(self, timeout_s: float | None = None) -> dict:
        """Hold new units and wait for those in flight (and open transactions) to finish;
        on timeout, undo the pause and fail (ValueError)."""
        from router.cutover import CutoverBusy

        if self._admin_op is not None:
            raise CutoverBusy(f"a {self._admin_op} is in progress")
        self._admin_op = "pause"
        self.dataplane.hold()
        try:
            drained = await self.dataplane.drain(timeout_s or self.config.cutover.pause_timeout_s)
        except BaseException as exc:
            self.dataplane.release()
            self._admin_op = None
            if isinstance(exc, TimeoutError):
                raise ValueError(f"not paused: {exc}") from exc
            raise
        log.info("traffic paused by the admin API (drained in %.1f ms)", drained.seconds * 1000)
        return {"paused": True, "drain_seconds": round(drained.seconds, 4),
                "waited_for_units": drained.waited_for_units}

    async def admin_resume(self) -> dict:
        """Release the units held since POST /v1/pause."""
        from router.cutover import CutoverBusy

        if self._admin_op == "cutover":
            raise CutoverBusy("a cutover is in progress; it resumes traffic itself")
        if self._admin_op != "pause":
            raise ValueError("traffic is not paused")
        paused = self.dataplane.release()
        self._admin_op = None
        log.info("traffic resumed by the admin API after %.3f s (%d units held)", paused, self.dataplane.held_units)
        return {"resumed": True, "pause_seconds": round(paused, 4), "units_held": self.dataplane.held_units}

    # --- online migration (pgsplit migrate; /v1/migrate/*) ------------------------------------
    #
    # A migration goes from the active cluster's primary to the primary of cluster `target`
    # (router.migrate, over the [monitor] account); its publication, subscription and slots
    # are named after the target (`migration_name`). A started one is watched: lag, copy
    # states and schema drift every `migration.watch_interval_s`, into the metrics.

    @staticmethod
    def migration_name(target: str) -> str:
        """The publication/subscription of a migration to cluster `target`: a migration to
        "next" is "pgsplit_next"; the reverse of a cutover main -> next is a migration to
        "main", "pgsplit_main", so a cutover back finds it by that name."""
        return "pgsplit_" + re.sub(r"[^a-z0-9_]", "_", target.lower())

    def _control_endpoint(self, cluster: str):
        from router.migrate import Endpoint

        spec = backend_specs(self.config, cluster)[0]
        m = self.config.monitor
        return Endpoint(spec.host, spec.port, m.user, m.secret(), m.dbname, self.config.pool.connect_timeout_s)

    def _publisher_conninfo(self, cluster: str) -> str | None:
        """How the other side's subscription reaches `cluster`'s primary, from
        [migration.conninfo] (None: as the proxy reaches it)."""
        from router.migrate import publisher_conninfo

        fragment = self.config.migration.conninfo.get(cluster)
        if fragment is None:
            return None
        return publisher_conninfo(fragment, self.config.monitor.user, self.config.monitor.secret())

    async def _migration(self, target: str) -> dict:
        """The migration to `target` as the config says it: ValueError for a bad name."""
        from router import migrate

        if not isinstance(target, str) or target not in self.config.clusters:
            raise ValueError(f"{target!r} is not a cluster (known: {', '.join(sorted(self.config.clusters))})")
        source = self.config.active
        if target == source:
            raise ValueError(f"cluster {target!r} is the active one: a migration goes from it, not to it")
        src = self._control_endpoint(source)
        dbs = list(self.config.migration.databases) or await migrate.databases_of(src)
        if not dbs:
            raise migrate.MigrateError("source", f"cluster {source}",
                                       "has no database to migrate (set migration.databases)")
        return {"source": source, "target": target, "name": self.migration_name(target), "databases": dbs,
                "src": src, "tgt": self._control_endpoint(target)}

    @staticmethod
    def _migration_head(m: dict) -> dict:
        return {k: m[k] for k in ("source", "target", "name", "databases")}

    async def admin_migrate_plan(self, target: str) -> dict:
        """What `start` would do and what blocks it (router.migrate.plan)."""
        from router import migrate

        m = await self._migration(target)
        plan = await migrate.plan(m["src"], m["tgt"], name=m["name"], databases=m["databases"])
        return {**self._migration_head(m), "plan": plan.to_dict(), "text": plan.render()}

    async def admin_migrate_start(self, target: str) -> dict:
        """Copy the schema, start the publication and subscription (router.migrate.start;
        refused with the plan's blockers), then watch it. Idempotent: a migration that
        runs already is kept, and watched from now on."""
        from router import migrate

        m = await self._migration(target)
        lock = self._migration_locks.setdefault(target, asyncio.Lock())
        async with lock:
            report = await migrate.start(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                                         source_conninfo=self._publisher_conninfo(m["source"]))
            log.info("migration %s -> %s started (%s): %s", m["source"], target, m["name"],
                     "; ".join(report.created) or "everything existed already")
            watch = self._watch_migration(m)
        try:
            st, drift = await watch.check()
            first = {"status": st.to_dict(), "drift": drift}
        except migrate.MigrateError as exc:
            first = {"error": str(exc)}
        return {**self._migration_head(m), "start": report.to_dict(), **first,
                "watch_interval_s": watch.interval}

    async def admin_migrate_status(self, target: str) -> dict:
        """Per table the copy state, the lag, rates and ETA (from the round before, when
        watched), and the schema drift, asked now."""
        from router import migrate

        m = await self._migration(target)
        watch = self.migration_watches.get(target)
        if watch is not None and watch.source == m["src"] and watch.name == m["name"]:
            st, drift = await watch.check()
        else:
            st, drift = await asyncio.gather(
                migrate.status(m["src"], m["tgt"], name=m["name"], databases=m["databases"]),
                migrate.drift(m["src"], m["tgt"], databases=m["databases"]))
            watch = None
        return {**self._migration_head(m), "status": st.to_dict(), "text": st.render(), "drift": drift,
                "watching": watch is not None, "watch_interval_s": self.config.migration.watch_interval_s}

    async def admin_migrate_verify(self, target: str, tables: list[str] | None = None,
                                   chunk_rows: int | None = None) -> dict:
        """Row counts and chunked checksums of every table on both sides
        (router.migrate.verify); the differing tables and key ranges by name."""
        from router import migrate

        if tables is not None and (not isinstance(tables, list) or not all(isinstance(t, str) for t in tables)):
            raise ValueError("tables must be a list of \"schema.table\" names")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError("chunk_rows must be a whole number >= 1")
        m = await self._migration(target)
        report = await migrate.verify(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                                      tables=tables, chunk_rows=chunk_rows or self.config.migration.verify_chunk_rows)
        log.info("migration %s -> %s: verify %s in %.1f s%s", m["source"], target,
                 "equal" if report.equal else "DIFFERENT", report.seconds,
                 "".join(f"; {line}" for line in report.differences[:20]))
        return {**self._migration_head(m), "verify": report.to_dict(), "text": report.render()}

    def _watch_migration(self, m: dict):
        from router.migrate import Watch

        old = self.migration_watches.get(m["target"])
        if old is not None and old.source == m["src"] and old.name == m["name"] and old.running:
            return old
        if old is not None:
            self.spawn(old.stop())
        watch = Watch(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                      interval=self.config.migration.watch_interval_s,
                      label=f"{m['source']} -> {m['target']}", on_update=self._migration_metrics)
        self.migration_watches[m["target"]] = watch.start()
        return watch

    def _migration_metrics(self, _watch=None) -> None:
        """The metrics of every watched migration: the largest lag, tables per copy state,
        drift if any has some."""
        watches = list(self.migration_watches.values())
        lag, states, drift = 0, {}, False
        for w in watches:
            if w.status is not None:
                lag = max(lag, w.status.lag_bytes)
                for state, n in w.status.state_counts().items():
                    states[state] = states.get(state, 0) + n
            drift = drift or bool(w.drift)
        self.metrics.set_migration(lag, states, drift)

    async def _migration_cut_over(self, source: str, target: str, control) -> None:
        """After a cutover to `target`: its migration is over (no longer watched); with a
        reverse replication, the migration back to `source` is watched instead."""
        watch = self.migration_watches.pop(target, None)
        if watch is not None:
            await watch.stop()
        if getattr(control, "kind", None) == "logical" and control.logical.reverse:
            try:
                m = await self._migration(source)
                self._watch_migration(m)
            except Exception as exc:  # noqa: BLE001  the cutover stands; status can still be asked
                log.warning("watching the reverse migration %s -> %s failed: %s", target, source, exc)
        self._migration_metrics()

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict:
        topo = self.topology.current
        backends = []
        pool_counts = self.pools.counts()
        for b in topo.backends:
            backends.append({
                "name": b.name, "host": b.host, "port": b.port, "role": b.role.value, "up": b.up,
                "in_recovery": b.in_recovery, "in_rotation": b.in_rotation if b.role is Role.REPLICA else None,
                "lag_bytes": b.lag_bytes, "lag_seconds": b.lag_seconds, "weight": b.weight,
                "error": b.error, "load": self.load.get(b.name, 0),
                "server_connections": {state: n for (name, state), n in pool_counts.items() if name == b.name},
            })
        return {
            "cluster": topo.cluster, "generation": topo.generation, "split_brain": topo.split_brain,
            "primary_writable": topo.primary_writable, "backends": backends,
            "clients": self.client_counts(), "pool_mode": self.config.pool.mode,
            "uptime_s": round(time.time() - self.started_at, 1),
        }


async def _async_commit_default(conn: ServerConnection) -> bool:
    """Whether this user's commits in this database are asynchronous unless the session
    says otherwise (synchronous_commit = off from the server, database or role settings)."""
    done = asyncio.get_running_loop().create_future()
    conn.swallow(wire.query(b"SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'"),
                 done.set_result, rows=True)
    step = await done
    if step.error is not None or not step.rows:
        return True  # unknown: assume the worst (the insert position covers everything)
    return wire.parse_data_row(step.rows[0])[0] == b"off"


def _shutdown() -> ProxyError:
    from proxy.errors import AdminShutdown

    return AdminShutdown("terminating connection due to administrator command: pgsplit is shutting down")
