"""The data plane as the cutover sees it: hold new units, drain the ones in flight, swap
the backend set, let the held units go.

Owns: the pause (a flag every session checks before it routes a new unit, and the set of
sessions waiting on it), the drain (waiting until no unit is in flight, with a deadline
for sessions idle in a transaction), and the swap's effects on sessions (connections to
the old set retired, read-your-writes tokens reset, pinned sessions ended: their
server-side state cannot move). ops.cutover drives it through these methods and never
imports proxy/.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from collections.abc import Collection
from typing import Protocol

from proxy.session.client import ClientSession
from router.topology import Topology

log = logging.getLogger("pgsplit.dataplane")

POLL_S = 0.002  # how often the drain looks again (units end within milliseconds)


class DrainTimeout(TimeoutError):
    """Units still in flight, or transactions still open, when the pause timed out."""

    def __init__(self, message: str, in_flight: int, idle_in_transaction: int):
        super().__init__(message)
        self.in_flight = in_flight
        self.idle_in_transaction = idle_in_transaction


@dataclass
class DrainReport:
    seconds: float
    waited_for_units: int  # sessions that had a unit in flight when the pause began
    cancelled_transactions: int


class DataPlaneHost(Protocol):
    """What the pause and the swap ask of the process (proxy.app.Proxy)."""

    sessions: Collection[ClientSession]

    async def switch_cluster(self, name: str) -> Topology: ...


class DataPlane:
    def __init__(self, proxy: DataPlaneHost):
        self.proxy = proxy
        self.holding = False
        self.held: set[ClientSession] = set()
        self.held_units = 0  # units that waited during the current/last pause
        self.paused_at: float | None = None

    # --- pause ---------------------------------------------------------------------------

    def hold(self) -> None:
        """From now on, a session about to route a new unit waits (clients see latency)."""
        self.holding = True
        self.held_units = 0
        self.paused_at = time.monotonic()

    def hold_session(self, session: ClientSession) -> None:
        if session not in self.held:
            self.held.add(session)
            self.held_units += 1

    @staticmethod
    def _busy(session: ClientSession) -> tuple[bool, bool]:
        """(a unit is in flight, the session is idle in a transaction)"""
        return session.activity()

    def census(self) -> tuple[int, int]:
        in_flight = idle_tx = 0
        for s in list(self.proxy.sessions):
            busy, in_tx = self._busy(s)
            in_flight += busy
            idle_tx += in_tx
        return in_flight, idle_tx

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> DrainReport:
        """Wait until no unit is in flight and no transaction is open. At the deadline,
        open transactions are cancelled (rolled back, the client told so) if asked;
        otherwise, or if units are still running, DrainTimeout."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        first, _ = self.census()
        cancelled = 0
        while True:
            in_flight, idle_tx = self.census()
            if in_flight == 0 and idle_tx == 0:
                return DrainReport(time.monotonic() - t0, first, cancelled)
            if time.monotonic() >= deadline:
                if in_flight == 0 and cancel_idle_in_transaction:
                    for s in list(self.proxy.sessions):
                        if self._busy(s)[1]:
                            s.abort_transaction("the transaction was rolled back by a cutover to another "
                                                "cluster (it stayed idle longer than cutover.pause_timeout_s)")
                            cancelled += 1
                    continue
                raise DrainTimeout(
                    f"{in_flight} unit(s) still running and {idle_tx} session(s) idle in a transaction "
                    f"after {timeout:g}s", in_flight, idle_tx)
            await asyncio.sleep(POLL_S)

    def release(self) -> float:
        """Let the held units go; returns how long the pause lasted."""
        self.holding = False
        held, self.held = self.held, set()
        for session in held:
            session.resume()
        paused = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        self.paused_at = None
        return paused

    # --- swap ----------------------------------------------------------------------------

    async def install(self, cluster: str) -> Topology:
        """Make `cluster` the active backend set: one assignment of its topology (a new
        generation), connections to the old set retired, sessions told."""
        proxy = self.proxy
        topology = await proxy.switch_cluster(cluster)
        keep = {b.name for b in topology.backends}
        for session in list(proxy.sessions):
            session.topology_swapped(keep, topology.primary_lsn)
        return topology
