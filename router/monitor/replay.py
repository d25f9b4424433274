"""Read-your-writes in the monitor: replay positions learnt between rounds, and the
primary's commit LSNs.

Owns: the highest LSN sessions announced (`want_lsn`), the sessions waiting for a replica
in rotation to replay an LSN (`wait_for_lsn`), the replay-wait queries that learn it, and
the connection to the primary that reads its commit positions for the proxy's
`CommitLsnFetcher` (router.lsn.COMMIT_LSN_SQL).
Must not know: sessions, tokens, lag limits. It is apart from the rounds because it runs
between them: each replica in rotation that is behind the highest LSN wanted runs one
query at a time that returns as soon as it has replayed it (router.lsn.REPLAY_WAIT_SQL),
on a connection of its own, so its replay position is known one round trip after the
replay, with no polling in between. What it learns is installed into the same
`TopologyHolder` the rounds install into.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

import asyncpg

from router.lsn import COMMIT_LSN_SQL, CommitLsns, parse_lsn
from router.monitor.probe import MonitorSettings, Probe, close_or_terminate, connect_as_monitor, poll_error
from router.topology import BackendSpec, Topology, TopologyHolder

log = logging.getLogger("pgsplit.monitor")


class MonitorState(Protocol):
    """What read-your-writes reads of the monitor that owns it."""

    holder: TopologyHolder
    settings: MonitorSettings  # replaced on reload: read it when needed

    def probe(self, name: str) -> Probe | None: ...

    def primary_spec(self) -> BackendSpec: ...

    def last_reference_lsn(self) -> int | None: ...


class ReplayTracker:
    """Who waits for which LSN, and the replay waits that tell them."""

    def __init__(self, monitor: MonitorState):
        self._monitor = monitor
        self._started = False
        self._stopped = False
        self._epoch = 0  # +1 per retarget: replay waits of an older set are dropped
        self._highest_wanted = 0  # the highest LSN sessions announced (want_lsn)
        self._replay_wait_tasks: dict[str, asyncio.Task[None]] = {}  # replica -> its _replay_waits
        self._waiters: dict[int, tuple[int, asyncio.Future[bool]]] = {}
        self._waiter_seq = 0
        self.replay_waits = 0  # replay-wait queries sent (tests and status)

    def start(self) -> None:
        self._started = True

    async def stop(self) -> None:
        """Cancel the replay waits; every session still waiting is told False."""
        self._stopped = True
        tasks = list(self._replay_wait_tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, fut in self._waiters.values():
            if not fut.done():
                fut.set_result(False)

    def retarget(self) -> None:
        """The monitor switched to another backend set: what is learnt of the old one is
        no longer installed."""
        self._epoch += 1

    def want_lsn(self, lsn: int) -> None:
        """A session committed up to `lsn` and will read soon: have the replicas behind it
        report as soon as they replay it. Cheap when nothing new is wanted (every commit)."""
        if lsn > self._highest_wanted:
            self._highest_wanted = lsn
            self._start_replay_waits()

    async def wait_for_lsn(self, lsn: int, timeout: float) -> bool:
        """True as soon as a replica in rotation has replayed `lsn`; False after `timeout`."""
        if _reached(self._monitor.holder.current, lsn):
            return True
        if timeout <= 0 or self._stopped:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter_seq += 1
        key = self._waiter_seq
        self._waiters[key] = (lsn, fut)
        # Also when nothing new is wanted: a replica whose replay-wait ended (an error, out
        # of rotation for a while) is asked again for what is still missing.
        self._highest_wanted = max(self._highest_wanted, lsn)
        self._start_replay_waits()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False
        finally:
            del self._waiters[key]

    def wake_waiters(self, topo: Topology) -> None:
        """`topo` was installed: wake those waiting for what its rotation has replayed."""
        if not self._waiters:
            return
        best = max((r.replay_lsn for r in topo.rotation if r.replay_lsn is not None), default=None)
        if best is None:
            return
        for lsn, fut in self._waiters.values():
            if lsn <= best and not fut.done():
                fut.set_result(True)

    def note_replay(self, name: str, lsn: int) -> None:
        """Replica `name` has replayed `lsn` (a read's replay check said so)."""
        self._install_replay({name: lsn})

    def _start_replay_waits(self) -> None:
        if not self._started or self._stopped:
            return
        wanted = self._highest_wanted
        for r in self._monitor.holder.current.rotation:
            if (r.replay_lsn is None or r.replay_lsn < wanted) and r.name not in self._replay_wait_tasks:
                probe = self._monitor.probe(r.name)
                if probe is not None:
                    self._replay_wait_tasks[r.name] = asyncio.get_running_loop().create_task(
                        self._replay_waits(probe, self._epoch), name="pgsplit-monitor-replay")

    async def _replay_waits(self, probe: Probe, epoch: int) -> None:
        """One replica's replay-wait queries, one at a time, each for the highest LSN wanted
        when it starts (commits that come meanwhile share the next one), until the replica
        has replayed everything wanted or leaves rotation. A wait lasts at most one round:
        the rounds keep reporting a replica that falls behind."""
        timeout_ms = max(1, int(self._monitor.settings.interval_s * 1000))
        try:
            while not self._stopped and epoch == self._epoch:
                target = self._highest_wanted
                b = self._monitor.holder.current.backend(probe.name)
                if b is None or not b.in_rotation or not b.up or (b.replay_lsn is not None and b.replay_lsn >= target):
                    return
                self.replay_waits += 1
                lsn = await probe.replay_wait(target, timeout_ms)
                if lsn is None or epoch != self._epoch:
                    return  # not in recovery: the rounds will say what it is
                self._install_replay({probe.name: lsn})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  the rounds report health; waiters time out
            log.debug("replay wait on %s failed: %s", probe.name, exc)
        finally:
            if self._replay_wait_tasks.get(probe.name) is asyncio.current_task():
                del self._replay_wait_tasks[probe.name]

    def _install_replay(self, replay: Mapping[str, int | None]) -> None:
        holder = self._monitor.holder
        topo = holder.current  # read-modify-install with no await in between
        new = topo
        for name, lsn in replay.items():
            b = new.backend(name)
            if lsn is None or b is None or (b.replay_lsn is not None and lsn <= b.replay_lsn):
                continue
            ref = self._monitor.last_reference_lsn()
            lag_bytes = b.lag_bytes if ref is None else max(0, ref - lsn)
            new = new.with_backend(replace(b, replay_lsn=lsn, lag_bytes=lag_bytes))
        if new is not topo:
            holder.install(new)
            self.wake_waiters(new)


def _reached(topo: Topology, lsn: int) -> bool:
    return any(r.replay_lsn is not None and r.replay_lsn >= lsn for r in topo.rotation)


class CommitLsnReader:
    """The active primary's WAL flush and insert positions, over a connection of its own
    (a slow poll never delays it)."""

    def __init__(self, monitor: MonitorState):
        self._monitor = monitor
        self._conn: asyncpg.Connection | None = None
        self._target: BackendSpec | None = None
        self._lock = asyncio.Lock()

    async def read(self) -> CommitLsns:
        """Errors propagate as PollError."""
        async with self._lock:
            target = self._monitor.primary_spec()
            settings = self._monitor.settings
            stage = "connect"
            try:
                if self._conn is None or self._conn.is_closed() or self._target != target:
                    old, self._conn = self._conn, None
                    if old is not None:
                        old.terminate()
                    self._conn = await connect_as_monitor(target, settings, "commit lsn")
                    self._target = target
                stage = "query"
                async with asyncio.timeout(settings.timeout_s):
                    row = await self._conn.fetchrow(COMMIT_LSN_SQL)
            except Exception as exc:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                timeout = settings.connect_timeout_s if stage == "connect" else settings.timeout_s
                raise poll_error(exc, f"the WAL position of primary {target.name} "
                                      f"({target.host}:{target.port}), {stage}", timeout) from exc
            return CommitLsns(parse_lsn(row[0]), parse_lsn(row[1]))

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        await close_or_terminate(conn)
