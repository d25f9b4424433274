"""What a session may ask of the process that runs it.

Owns: the `SessionHost` and `Consistency` protocols, and the one exception the host's
read-your-writes side raises. The process (proxy.app.Proxy) implements them; a test
drives a session with a fake that does (tests/support). The session imports nothing of
the process: this module is the whole of what it sees.

The attributes the per-unit path reads are plain attributes (`config`, `load`,
`topology`, `session_pooling`, `dataplane`, `metrics`): no property or call per unit.
Must not know: sessions' internals, sockets.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Protocol

from proxy.server.prepared import StatementNames
from router.classify.classifier import Classifier
from router.topology import BackendState, TopologyHolder


class TokenUnavailable(Exception):
    """The primary's WAL position could not be read (nor the monitor's last sample used)."""


class Consistency(Protocol):
    """The process's side of read-your-writes (the session's is proxy.session.consistency)."""

    def ticket(self) -> int:
        """A ticket for a commit seen now: a later fetch covers it (router.lsn)."""

    async def token_for(self, token: Any) -> int:
        """The LSN a replica must have replayed for the session's next read, learned into
        `token` (a SessionToken). Raises TokenUnavailable."""

    async def wait_for_replica(self, lsn: int) -> None:
        """Wait (at most routing.consistency_wait_ms) until a replica has replayed `lsn`."""

    def replayed(self, backend: str, lsn: int) -> None:
        """A replica reported that it has replayed `lsn`."""

    def want(self, lsn: int) -> None:
        """Ask the replicas to report when they have replayed `lsn`."""

    def count(self, outcome: str, waited_s: float | None = None) -> None:
        """A read that carried a token was served (proxy.session.consistency.outcome)."""


class DataPlaneGate(Protocol):
    holding: bool  # a cutover holds new units

    def hold_session(self, session: Any) -> None: ...


class SessionHost(Protocol):
    config: Any  # proxy.config.Config in force (routing.* is read per unit)
    load: dict[str, int]  # units on each backend: the policy balances on it, sessions keep it
    topology: TopologyHolder
    session_pooling: bool
    dataplane: DataPlaneGate
    classifier: Classifier
    metrics: Any  # metrics.Metrics: .units.record(...) per unit, .retries per retry
    consistency: Consistency
    statement_names: StatementNames  # the server-side names of client statements, process-wide

    def pool_for(self, backend: BackendState, user: str, database: str) -> Any:
        """The pool of server connections for (backend, user, database)."""

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run a task of the session's (tracked, its failure logged)."""

    async def check_backend(self, backend: str) -> bool:
        """True when the backend answers a poll sent now."""

    def client_opened(self, session: Any) -> None: ...

    def client_closed(self, session: Any) -> None: ...
