"""Read-your-writes, the process's side (proxy.session.host.Consistency).

Owns: reading the primary's WAL position for a session's token (router.lsn's coalesced
fetcher, or the monitor's last sample when the primary does not answer), waiting for a
replica to replay an LSN, passing replicas' replay reports to the monitor, and counting
how reads that carried a token were served. The session's side (the token and its rules)
is proxy.session.consistency; this is the only way from a session to the monitor.
Must not know: sessions' internals, sockets.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from proxy.session.consistency import SessionToken
from proxy.session.host import TokenUnavailable
from router.lsn import CommitLsnFetcher
from router.monitor.probe import PollError
from router.topology import TopologyHolder

_UNAVAILABLE = (PollError, ConnectionError, OSError, TimeoutError)


class ReadYourWrites:
    def __init__(self, fetcher: CommitLsnFetcher, monitor, topology: TopologyHolder, metrics,
                 routing: Callable[[], object]):
        self.fetcher = fetcher
        self.monitor = monitor
        self.topology = topology
        self.metrics = metrics
        self._routing = routing  # the routing config in force (a reload replaces it)

    def ticket(self) -> int:
        return self.fetcher.ticket()

    async def token_for(self, token: SessionToken) -> int:
        """The LSN a replica must have replayed for the session's next read."""
        try:
            if token.mode == "global":
                # Other sessions' commits may be asynchronous: the insert position covers them.
                return (await self.fetcher.fetch_current()).covering(True)
            lsn = (await self.fetcher.fetch_after(token.ticket)).covering(token.commit_async)
        except _UNAVAILABLE as exc:
            # The primary does not answer. The monitor's last sample of its WAL position
            # still serves if that poll was sent after the commit (or the read) began.
            since = token.commit_time if token.mode != "global" else asyncio.get_running_loop().time()
            topo = self.topology.current
            if topo.primary_lsn is None or topo.primary_lsn_at <= since:
                raise TokenUnavailable(str(exc)) from exc
            lsn = topo.primary_lsn
            if token.mode == "global":
                return lsn
        return token.learned(lsn)

    async def wait_for_replica(self, lsn: int) -> None:
        await self.monitor.wait_for_lsn(lsn, self._routing().consistency_wait_ms / 1000)

    def replayed(self, backend: str, lsn: int) -> None:
        self.monitor.note_replay(backend, lsn)

    def want(self, lsn: int) -> None:
        self.monitor.want_lsn(lsn)

    def count(self, outcome: str, waited_s: float | None = None) -> None:
        self.metrics.units.consistency[outcome] += 1
        if waited_s is not None:
            self.metrics.consistency_wait_seconds.observe(waited_s)
