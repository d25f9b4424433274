"""When a unit's server fails it: retries, and lost server connections.

Owns (as a part of ClientSession): running again on the primary a read a replica refused
before anything reached the client, running elsewhere a read whose server connection was
lost when its backend failed (after asking the monitor whether it did), and telling the
client what became of its units in flight on a lost connection (a write's outcome is
unknown; a transaction is rolled back; a pinned session's server-side state is gone).
Must not know: the process (only proxy.session.host), how replies are cut into steps.
"""

from __future__ import annotations

import logging

from proxy import wire
from proxy.server.connection import ServerConnection
from proxy.server.replies import Step
from proxy.errors import QueryCanceled, ServerError, ServerLost, ServerLostInTransaction, ServerLostWithSessionState
from proxy.session.attachment import Attachment
from proxy.session.stream import State
from router.classify.analysis import TxControl

log = logging.getLogger("pgsplit.session")

TX_IDLE = wire.TX_IDLE


class Recovery(Attachment):
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    def _retry(self, server: ServerConnection, step: Step) -> None:
        """A replica refused an autocommit read (read-only or recovery conflict) before
        anything reached the client: run it again on the primary. One the client
        cancelled meanwhile is answered as cancelled instead, as its server would have."""
        if step.cancelled:
            self._force_primary_next = False  # (it was for the unit that does not run again)
            self.transport.write(QueryCanceled("canceling statement due to user request").to_wire()
                                 + wire.ready_for_query(self.tx.status))
            self._settle(server)
            return
        self.host.metrics.retries.labels(reason=step.retry_reason or "?").inc()
        data = step.retry
        self._release()
        self._requeue(data)
        self._retry_skip = step.delivered
        if step.retry_reason in ("25006", "40001"):
            self._force_primary_next = True  # the replica cannot run it; the primary can
        self.resume()

    # --- failures ------------------------------------------------------------------------

    def server_lost(self, server: ServerConnection, exc: Exception | None, pending: list[Step]) -> None:
        """The server connection died while lent to this session; `pending` are the steps
        of this client's units it had not finished."""
        pool = server.pool
        in_tx = self.tx.status != TX_IDLE
        first = pending[0] if pending else None
        self._detach(server)
        self.owned.pop(server.backend, None)
        pool.discard(server)
        if self.state is not State.READY:
            return
        if (first is not None and first.retry is not None and not first.rows_out and not first.cancelled
                and len(pending) == 1
                and not self.tx.effects and self.tx.status == TX_IDLE):
            # A read that could run elsewhere: it does if the backend failed. One lost
            # connection is not that (the unit may have ended its own server, or someone
            # terminated this one): the monitor checks the backend first, so such a unit
            # neither runs again on every backend in turn nor takes them out of rotation.
            backend = self.host.topology.current.backend(server.backend)
            if backend is not None and not backend.up:
                self._retry_lost_read(server.backend, first)
            else:
                self._routing = self.host.spawn(self._check_lost_read(server.backend, server.lost_reason, first))
            return
        self._lost_units(server.backend, server.lost_reason, pending, in_tx)

    def _retry_lost_read(self, backend: str, step: Step) -> None:
        log.info("server %s lost during a read; retrying it elsewhere", backend)
        self.host.metrics.retries.labels(reason="server_lost").inc()
        self._requeue(step.retry)
        self._retry_skip = step.delivered
        self.resume()

    async def _check_lost_read(self, backend: str, reason: str | None, step: Step) -> None:
        """The client's bytes wait in the stash (as while routing) until the check says."""
        try:
            failed = not await self.host.check_backend(backend)
        except Exception:  # noqa: BLE001  (a bug in the check: the client gets its error)
            log.exception("checking backend %s failed", backend)
            failed = False
        self._routing = None
        if self.state is not State.READY:
            return
        if failed:
            self._retry_lost_read(backend, step)
        else:
            self._lost_units(backend, reason, [step], False)

    def _lost_units(self, backend: str, reason: str | None, pending: list[Step], in_tx: bool) -> None:
        """Tell the client what became of its units in flight on a lost connection."""
        first = pending[0] if pending else None
        if first is not None and first.error is not None and first.error.get("V", first.error.get("S")) in ("FATAL", "PANIC"):
            # The server said why it ended the connection: the client reads it (a read's
            # was held back for a retry) and its connection ends too, as PostgreSQL's does.
            if first.retrying:
                self.transport.write(ServerError(first.error).to_wire())
            self.close(f"backend {backend} ended the connection: {first.error.get('M', '')}")
            return
        lost = reason or f"server connection to backend {backend} was lost"
        if in_tx:
            if any(a.tx is TxControl.COMMIT for s in pending for a in (s.analyses or ())):
                self.fail(ServerLostInTransaction(
                    f"{lost} while the transaction was committing; its outcome is unknown: "
                    "it may or may not have committed"))
            else:
                self.fail(ServerLostInTransaction(f"{lost} during the query; the transaction is rolled back"))
            return
        if self.carried.pins:
            # What the session kept on that server (temporary tables, LISTEN, advisory
            # locks, WITH HOLD cursors) is gone: carrying on elsewhere would hide that.
            self.fail(ServerLostWithSessionState(
                f"{lost}; this session's server-side state (temporary tables, LISTEN, "
                "advisory locks, WITH HOLD cursors) is gone with it"))
            return
        group = pending[-1] if pending and not pending[-1].closed else None
        answered = pending[:-1] if group is not None else pending
        ready = wire.ready_for_query(TX_IDLE)
        # Each unit in flight gets its error and its ReadyForQuery, in order.
        out = b"".join(_lost_error(lost, s) + ready for s in answered)
        if group is not None:
            # The client's group is still open (a Flush in it, its Sync to come). As a
            # server after an error, the proxy skips to that Sync and answers it; the
            # error comes now if the client waits for replies of the group, else with
            # its next message: a client idle between its prepare and its execute
            # (asyncpg) must not get an ErrorResponse it did not ask for.
            self._skip_to_sync = True
            if group.error is None or group.retrying:
                if group.done < group.sent:
                    out += _lost_error(lost, group)
                else:
                    self._group_error = _lost_error(lost, group)
        if out:
            self.transport.write(out)
        if answered:
            self.tx.ready(TX_IDLE)
        self.resume()


def _lost_error(lost: str, step: Step) -> bytes:
    """A unit's error when its server connection is lost. A write's outcome is unknown:
    it may have committed before the connection went."""
    return ServerLost(f"{lost} while a write was in flight; its outcome is unknown: it may or may not have committed"
                      if step.writes else f"{lost} during the query").to_wire()
