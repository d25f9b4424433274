"""The monitor: asyncpg pollers that tell routing which backends answer, what they are,
how far replicas lag, and which replicas receive reads.

Owns: the probes of the active set (router.monitor.probe), the poll rounds, every
`TopologyHolder.install` of a round, the gauges it exports, the data plane's reports
(`mark_down`, `check`), and switching to another backend set (`stage`, `retarget`).
It holds the parts that run between rounds: read-your-writes (router.monitor.replay) and
the volatile-function catalog (router.monitor.catalog).
Must not know: client sessions, pools, the wire protocol, the config file (it is handed
plain `BackendSpec`s and `MonitorSettings`; proxy/ builds them).

Shape of the code: the decisions are pure functions of data (router.monitor.lag:
`Sample.from_row`, `compute_lag`, `next_rotation`, `build_topology`, `describe_changes`),
unit-tested without a server; the `Monitor` class only gathers samples and installs what
they compute.

A round (every `interval_s`, 100 ms by default):

1. every backend's probe starts its poll unless the previous one is still running; a
   probe (re)connects first if it has no connection;
2. the round waits for the polls of backends believed up, at most half an interval, so a
   slow or dead backend never holds back the others: it keeps its last sample until its
   own `timeout_s` has passed, then counts as down (a failed poll counts at once, in
   the next round, even if a newer poll has answered by then: `Probe.take`);
3. the samples are turned into a new `Topology` (`build_topology`), installed with one
   assignment; state changes are logged and gauges updated; LSN waiters are woken.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from metrics import Metrics
from router.monitor.catalog import VolatileFunctionCatalog
from router.monitor.lag import Sample, build_topology, describe_changes, initial_topology, prune_history, reference_lsn
from router.monitor.probe import MonitorSettings, Probe
from router.monitor.replay import CommitLsnReader, ReplayTracker
from router.topology import BackendSpec, Role, Topology, TopologyHolder

log = logging.getLogger("pgsplit.monitor")


class Monitor:
    """Polls the active backend set and installs its snapshots (see the module docstring)."""

    def __init__(
        self,
        holder: TopologyHolder,
        backends: Sequence[BackendSpec],
        settings: MonitorSettings,
        metrics: Metrics | None = None,
        on_volatile_functions: Callable[[frozenset[str]], None] | None = None,
        *,
        cluster_name: str | None = None,
    ):
        self.holder = holder
        self.settings = settings  # replaced by retarget(settings=...) on reload
        self.metrics = metrics
        self.databases: Callable[[], Iterable[str]] = tuple  # databases clients use (the proxy sets it)
        self._cluster = cluster_name if cluster_name is not None else holder.current.cluster
        self._specs = list(backends)
        initial_topology(self._cluster, self._specs)  # validates the set
        self._probes = [Probe(s, settings) for s in self._specs]
        self._staged: tuple[str, list[Probe]] | None = None  # logged in ahead of a retarget
        self._history: list[tuple[float, int]] = []
        self._round_lock = asyncio.Lock()
        self._started = False
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._confirm_task: asyncio.Task[None] | None = None
        self.rounds = 0  # poll rounds installed (tests and status)
        self.replay = ReplayTracker(self)
        self._commit_lsns = CommitLsnReader(self)
        self.catalog = VolatileFunctionCatalog(self, on_volatile_functions)
        # Read-your-writes, as the data plane calls it (per commit or read: bound, not wrapped).
        self.want_lsn = self.replay.want_lsn
        self.wait_for_lsn = self.replay.wait_for_lsn
        self.note_replay = self.replay.note_replay
        self.primary_commit_lsns = self._commit_lsns.read

    @property
    def replay_waits(self) -> int:
        """Replay-wait queries sent (tests and status)."""
        return self.replay.replay_waits

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll once (so the proxy starts with real figures), then keep polling."""
        if self._started:
            return
        self._started = True
        self.replay.start()
        await self.poll_now(wait=self.settings.timeout_s)  # the optimistic snapshot: all "up"
        self._spawn(self._run(), "pgsplit-monitor")
        if self.catalog.on_names is not None:
            self._spawn(self.catalog.keep_fresh(), "pgsplit-monitor-catalog")

    async def stop(self) -> None:
        """Cancel the pollers and close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self.replay.stop()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self._probes), return_exceptions=True)
        await self.unstage()
        await self._commit_lsns.close()

    async def refresh_catalog(self) -> frozenset[str]:
        """Read the volatile functions now and hand them to the classifier (a database's
        first client); return them."""
        return await self.catalog.refresh()

    # --- what the replay tracker and the catalog read (MonitorState, CatalogSource) -----------

    def probe(self, name: str) -> Probe | None:
        return next((p for p in self._probes if p.name == name), None)

    def primary_spec(self) -> BackendSpec:
        return next(s for s in self._specs if s.role is Role.PRIMARY)

    def last_reference_lsn(self) -> int | None:
        """The WAL position the last round measured replicas against."""
        return self._history[-1][1] if self._history else None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.interval_s
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            if next_at < loop.time():  # fell behind (a long stall): do not burst to catch up
                next_at = loop.time() + interval
            try:
                await self.poll_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  the monitor must outlive any one bad round
                log.exception("monitor round failed")

    # --- rounds ---------------------------------------------------------------------------------

    async def poll_now(self, wait: float | None = None) -> Topology:
        """Run one round now and return the snapshot it installed. The round waits for the
        polls of backends believed up, at most `wait` (default half an interval): a poll
        that takes longer is used by a later round, so one slow backend costs the others
        at most that much freshness; backends known to be down are not waited for."""
        wait = self.settings.interval_s / 2 if wait is None else wait
        if self._stopped:
            return self.holder.current
        async with self._round_lock:
            probes = self._probes
            current = self.holder.current
            awaited = []
            for p in probes:
                task = p.ensure_poll()
                b = current.backend(p.name)
                if b is None or b.up:
                    awaited.append(task)
            if awaited:
                await asyncio.wait(awaited, timeout=wait)
            return self._install_round(self._previous(), probes)

    def _previous(self) -> Topology:
        """The snapshot to build on: the installed one if it is of our set."""
        cur = self.holder.current
        if cur.cluster == self._cluster and [b.name for b in cur.backends] == [
            s.name for s in sorted(self._specs, key=lambda s: s.role is not Role.PRIMARY)
        ]:
            return cur
        return initial_topology(self._cluster, self._specs, cur.generation)

    def _install_round(self, previous: Topology, probes: Sequence[Probe], generation: int | None = None) -> Topology:
        now = asyncio.get_running_loop().time()
        samples: dict[str, Sample | BaseException] = {}
        for p in probes:
            s = p.take(now)
            if s is not None:
                samples[p.name] = s
        topo = build_topology(previous, samples,
                              previous.generation if generation is None else generation,
                              now=now, history=self._history)
        ref = reference_lsn(previous, samples)
        if ref is not None and (not self._history or self._history[-1][1] < ref):
            self._history.append((now, ref))
            horizon = 2 * max([s.max_lag_seconds for s in self._specs] + [1.0]) + 1.0
            if self._history[0][0] < now - horizon:
                self._history = prune_history(self._history, now - horizon)
        self.rounds += 1
        self._install(topo, previous)
        return topo

    def _install(self, topo: Topology, previous: Topology | None) -> None:
        self.holder.install(topo)  # the one assignment readers rely on
        if previous is not None:
            for level, message in describe_changes(previous, topo):
                log.log(level, "%s", message)
        self._export(topo)
        self.replay.wake_waiters(topo)

    def _export(self, topo: Topology) -> None:
        m = self.metrics
        if m is None:
            return
        for b in topo.backends:
            m.backend_up.labels(b.name, b.role.value).set(1 if b.up else 0)
        for r in topo.replicas:
            m.replica_lag_bytes.labels(r.name).set(math.nan if r.lag_bytes is None else r.lag_bytes)
            m.replica_lag_seconds.labels(r.name).set(math.nan if r.lag_seconds is None else r.lag_seconds)
            m.replica_in_rotation.labels(r.name).set(1 if (r.up and r.in_rotation) else 0)
        m.topology_generation.set(topo.generation)
        m.split_brain.set(1 if topo.split_brain else 0)

    def _forget_metrics(self, names: Iterable[tuple[str, Role]]) -> None:
        m = self.metrics
        if m is None:
            return
        for name, role in names:
            for gauge, labels in ((m.backend_up, (name, role.value)), (m.replica_lag_bytes, (name,)),
                                  (m.replica_lag_seconds, (name,)), (m.replica_in_rotation, (name,))):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass

    # --- the data plane's reports -------------------------------------------------------------

    def mark_down(self, name: str, reason: str) -> None:
        """A server connection to `name` failed. A replica leaves rotation now (one
        install); a poll sent after this call decides whether it comes back. The primary is
        not taken down on the data plane's word (one failed connection may be one user's
        problem, e.g. 53300 too many connections, and refusing every write for it would be
        an outage of our own making, as PgCat reasons): an immediate poll confirms it."""
        topo = self.holder.current
        b = topo.backend(name)
        if b is None:
            return
        for p in self._probes:
            if p.name == name:
                p.down_since = asyncio.get_running_loop().time()
        if b.role is Role.REPLICA and b.up:
            self._install(topo.with_backend(replace(b, up=False, in_rotation=False, error=reason)), topo)
        if self._started and not self._stopped and (self._confirm_task is None or self._confirm_task.done()):
            self._confirm_task = self._spawn(self._confirm(), "pgsplit-monitor-confirm")

    async def check(self, name: str) -> bool:
        """The data plane lost one server connection to `name`: poll it now (a poll sent
        after this call, at most two poll timeouts) and install the round. True when it
        answered: the loss was that connection's alone, and the backend stays as it was."""
        probe = self.probe(name)
        if probe is None or not self._started or self._stopped:
            return True
        asked = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(2 * self.settings.timeout_s):
                while True:
                    task = probe.ensure_poll()
                    started = probe.task_started
                    await asyncio.wait([task])  # (not cancelled on timeout: the rounds use it)
                    if started >= asked:
                        break
        except TimeoutError:
            pass
        await self.poll_now(wait=0)
        return isinstance(probe.latest, Sample) and probe.latest_started >= asked

    async def _confirm(self) -> None:
        try:
            await self.poll_now()
        except Exception:  # noqa: BLE001  the regular rounds carry on
            log.exception("monitor confirmation round failed")

    # --- cutover --------------------------------------------------------------------------------

    async def stage(self, cluster_name: str, backends: Sequence[BackendSpec]) -> int:
        """Log in to a backend set that a retarget may switch to soon (a cutover's warm-up),
        so that the switch costs one poll instead of a login per backend: several round
        trips each, while clients are held. Returns how many logins succeeded; a failed
        one is simply tried again at the switch."""
        await self.unstage()
        probes = [Probe(s, self.settings) for s in backends]
        self._staged = (cluster_name, probes)
        done = await asyncio.gather(*(p.connect() for p in probes), return_exceptions=True)
        return sum(1 for d in done if not isinstance(d, BaseException))

    async def unstage(self) -> None:
        """Close the connections of a staged set that was not switched to."""
        staged, self._staged = self._staged, None
        if staged is not None:
            await asyncio.gather(*(p.close() for p in staged[1]), return_exceptions=True)

    def _take_staged(self, cluster_name: str, specs: Sequence[BackendSpec]) -> list[Probe]:
        staged, self._staged = self._staged, None
        ready = {p.spec: p for p in staged[1]} if staged is not None and staged[0] == cluster_name else {}
        probes = [ready.pop(s, None) or Probe(s, self.settings) for s in specs]
        for p in ready.values():  # staged for backends no longer configured
            self._spawn(p.close(), "pgsplit-monitor-unstage")
        return probes

    async def retarget(self, cluster_name: str, backends: Sequence[BackendSpec], *,
                       generation: int | None = None, settings: MonitorSettings | None = None) -> Topology:
        """Switch to another backend set: poll it once, install its first snapshot with
        generation + 1 (or `generation`) in one assignment, and poll it from then on
        (logged in with `settings`, when given: a reloaded [monitor] or [routing])."""
        specs = list(backends)
        initial_topology(cluster_name, specs)  # validates before anything changes
        async with self._round_lock:
            if settings is not None:
                self.settings = settings
            old_probes, old_specs = self._probes, self._specs
            self.replay.retarget()
            self._cluster, self._specs = cluster_name, specs
            self._probes = self._take_staged(cluster_name, specs)
            self._history = []
            gen = generation if generation is not None else self.holder.current.generation + 1
            base = initial_topology(cluster_name, specs, gen)
            if self._started and not self._stopped:
                await asyncio.wait([p.ensure_poll() for p in self._probes], timeout=self.settings.timeout_s)
            previous = self.holder.current
            topo = self._install_round(base, self._probes, gen)
        log.info("monitor switched from cluster %r (generation %d) to %r (generation %d): %s",
                 previous.cluster, previous.generation, cluster_name, gen,
                 ", ".join(f"{b.name}={'up' if b.up else 'down'}" for b in topo.backends))
        gone = {(s.name, s.role) for s in old_specs} - {(s.name, s.role) for s in specs}
        self._forget_metrics(gone)
        await asyncio.gather(*(p.close() for p in old_probes), return_exceptions=True)
        if self._stopped:
            await asyncio.gather(*(p.close() for p in self._probes), return_exceptions=True)
        return topo
