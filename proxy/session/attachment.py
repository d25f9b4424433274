"""The server connection attached to a client session: attach, detach, give back, and the
end of each unit's replies.

Owns: lending a connection to the session (`_attach`: the load count, the settings replay
and the deferred BEGIN that go ahead of the unit), taking it back (`_detach`, `_release`),
and what happens at the ReadyForQuery that ends a step (`unit_ready`: the unit's duration,
the transaction's bookkeeping, a retry, then `_settle`: give the connection back when the
session is idle). Part of ClientSession (proxy.session.client), which holds the fields;
the first part above the byte stream, so that every other part calls these directly
(compiled, a C call: attachment.pxd).
Must not know: routing decisions (proxy.session.routing), the reply framing.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

from proxy import wire
from proxy.errors import ServerLostInTransaction
from proxy.server.connection import UNKNOWN_SETTINGS, ServerConnection
from proxy.server.replies import Step, StepKind
from proxy.session.stream import ByteStream, State
from router.policy import UnitFacts
from router.topology import BackendState, Role

log = logging.getLogger("pgsplit.session")

TX_IDLE = wire.TX_IDLE
_FORWARD = StepKind.FORWARD
_PRIMARY, _REPLICA = Role.PRIMARY, Role.REPLICA  # (read once: through the enum class each read costs)


class Attachment(ByteStream):
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    def _attach(self, conn: ServerConnection, backend: BackendState, unit: bytes, facts: UnitFacts | None) -> None:
        conn.attach(self, self.transport.write)
        conn.last_client_pid = self.process_id  # (a notification it sends names this client)
        self.server = conn
        self.backend = backend
        self._unit_key = (backend.name, "primary" if backend.role is _PRIMARY else "replica")
        self._fresh = True
        self._force_primary_next = False
        host = self.host
        load = host.load
        load[backend.name] = load.get(backend.name, 0) + 1
        if self._write_paused:
            conn.transport.pause_reading()
        carried = self.carried
        if conn.settings_key != carried.settings_key:
            conn.swallow(carried.settings_for(conn), self._replayed, ahead=True)
        tx = self.tx
        if tx.deferred_begin is not None:
            conn.swallow(wire.query(tx.begin_sent()), self._began, ahead=True)
        self._retry_data = unit if (backend.role is _REPLICA and tx.status == TX_IDLE
                                    and host.config.routing.retry_reads_on_replica_error) else None

    def _replayed(self, step: Step) -> None:
        if step.error is not None:
            log.warning("replaying session settings on %s failed: %s",
                        self.server.backend if self.server else "?", step.error.get("M"))
            if self.server is not None:
                # The replay ran as one implicit transaction: its RESETs were undone too, so
                # whatever the connection carried it still does. The next unit replays.
                self.server.settings_key = UNKNOWN_SETTINGS
            if self.transport is not None and self.state is State.READY:
                self.transport.write(wire.notice_response(
                    "01000", "pgsplit could not restore this session's settings on a new server connection: "
                    + step.error.get("M", ""), severity="WARNING"))

    def _began(self, step: Step) -> None:
        if step.error is not None:
            # The client believes it is in a transaction; it must not carry on without one.
            self.fail(ServerLostInTransaction(
                "could not start the transaction on the server: " + step.error.get("M", "")))

    def _detach(self, server: ServerConnection) -> None:
        server.detach(self)
        if self.server is server:
            self.server = None
            backend = self.backend
            if backend is not None:
                load = self.host.load
                name = backend.name
                load[name] = load.get(name, 1) - 1 or 0
            self.backend = None
        self._open = None
        self._lsn_after = False
        if self._write_paused and server.transport is not None and not server.closed:
            server.transport.resume_reading()

    def _release(self) -> None:
        """The unit is over and nothing is in flight: give the connection back."""
        server = self.server
        self._detach(server)
        if self.host.session_pooling and not server.closed:
            return  # stays in self.owned
        pool = server.pool  # (compiled, a typed view: a C call)
        pool.release(server)

    def unit_ready(self, server: ServerConnection, step: Step) -> None:
        """Called by the server connection at the ReadyForQuery that ends a step."""
        tx = self.tx
        if step.status != tx.status:
            tx.ready(step.status)
        if step.kind is _FORWARD:
            fwd = step  # (compiled, a typed view: attachment.pxd)
            seconds = perf_counter() - fwd.t0
            self._unit_stats.record(fwd.backend, fwd.role, "write" if fwd.writes else "read", seconds)
            counters = self._db_counters
            counters[1] += 1
            counters[2] += seconds  # (a float add; SHOW STATS gives microseconds)
            if fwd.status == TX_IDLE:  # a transaction ended (a lone statement's too), as PgBouncer counts
                counters[0] += 1
            if fwd.writes or fwd.analyses or fwd.status != TX_IDLE or tx.wrote or tx.effects or tx.failed:
                commit_async = tx.after_unit(fwd, self.carried, self.server)
                if tx.changed_schema and tx.schema_settled():
                    self.host.statement_names.new_epoch()
                if commit_async is not None:
                    self.token.note_commit(self.host.consistency.ticket(), commit_async,
                                           asyncio.get_running_loop().time())
            if fwd.retrying:
                self._retry(server, fwd)
                return
        self._settle(server)

    def _settle(self, server: ServerConnection) -> None:
        """Nothing more in flight on the attached connection: give it back if the session
        is idle, and go on with the bytes that waited."""
        if server is not self.server or server.steps or self._open is not None:
            return
        if self.tx.status == TX_IDLE and not self.carried.pins and self._routing is None:
            self._release()
        if self._stash or self._pause_reasons:
            self.resume()
