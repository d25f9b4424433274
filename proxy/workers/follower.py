"""A worker's monitor: the supervisor's snapshots, installed here; no poll rounds of its own.

Owns: installing the snapshots the supervisor pushes (only of the worker's own backend
set, never older ones, keeping what this worker's replay waits learnt meanwhile), and
the supervisor's answers to the data plane's reports (a failed connection, a lost one).
One monitor per host polls the servers; each worker keeps only what its sessions need
between rounds: read-your-writes' replay waits and commit-LSN reads (router.monitor.replay),
which are per session work, and the volatile-function catalog of its classifier.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace

from router.monitor.monitor import Monitor
from router.monitor.probe import MonitorSettings
from router.topology import BackendSpec, Topology
from proxy.workers.channel import Channel

log = logging.getLogger("pgsplit.monitor")


class FollowerMonitor(Monitor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel: Channel | None = None  # set by the worker once its channel is open
        self._next: Topology | None = None  # the snapshot of a swap, before the swap runs here

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.replay.start()
        if self.catalog.on_names is not None:
            self._spawn(self.catalog.keep_fresh(), "pgsplit-monitor-catalog")

    async def poll_now(self, wait: float | None = None) -> Topology:
        return self.holder.current  # (the supervisor's monitor polls)

    # --- what the supervisor sends -------------------------------------------------------------

    def install_pushed(self, topo: Topology) -> None:
        """A snapshot of the supervisor's monitor. One of another backend set waits for the
        swap that brings it (`expect`); an older one than installed is dropped."""
        current = self.holder.current
        if topo.cluster != self._cluster or topo.generation < current.generation:
            return
        if topo.generation == current.generation:
            topo = _keep_replay(topo, current)
        self.holder.install(topo)
        self.replay.wake_waiters(topo)

    def expect(self, topo: Topology) -> None:
        """The snapshot the next retarget (the swap) installs."""
        self._next = topo

    async def retarget(self, cluster_name: str, backends: Sequence[BackendSpec], *,
                       generation: int | None = None, settings: MonitorSettings | None = None) -> Topology:
        """Point the replay waits and commit-LSN reads at another set (a swap or a reload)
        and install the supervisor's snapshot of it, if it sent one."""
        specs = list(backends)
        async with self._round_lock:
            if settings is not None:
                self.settings = settings
            old = self._probes
            self.replay.retarget()
            self._cluster, self._specs = cluster_name, specs
            self._probes = self._take_staged(cluster_name, specs)
            self._history = []
            upcoming, self._next = self._next, None
            if upcoming is not None and upcoming.cluster == cluster_name:
                self.holder.install(upcoming)
                self.replay.wake_waiters(upcoming)
        await asyncio.gather(*(p.close() for p in old), return_exceptions=True)
        return self.holder.current

    # --- the data plane's reports, answered by the supervisor's monitor ---------------------------

    def mark_down(self, name: str, reason: str) -> None:
        topo = self.holder.current
        b = topo.backend(name)
        if b is not None and b.role.value == "replica" and b.up:  # out of rotation here now, as one process does
            self.holder.install(topo.with_backend(replace(b, up=False, in_rotation=False, error=reason)))
        if self.channel is not None:
            self.channel.notify("mark_down", name, reason)

    async def check(self, name: str) -> bool:
        if self.channel is None:
            return True
        try:
            return await self.channel.request("check", name, timeout=2 * self.settings.timeout_s + 1)
        except (ConnectionError, TimeoutError) as exc:
            log.warning("could not ask the supervisor about %s: %s", name, exc)
            return False


def _keep_replay(pushed: Topology, mine: Topology) -> Topology:
    """A replica this worker saw replay further (its replay waits) keeps that position."""
    out = pushed
    for r in pushed.replicas:
        seen = mine.backend(r.name)
        if (seen is not None and seen.replay_lsn is not None
                and (r.replay_lsn is None or seen.replay_lsn > r.replay_lsn)):
            out = out.with_backend(replace(r, replay_lsn=seen.replay_lsn))
    return out
