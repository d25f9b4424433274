"""One client session: the client socket's protocol, after the handshake.

Owns: the socket events and flow control in both directions, the server connection
attached to the session (attach, detach, release at ReadyForQuery 'I'), and the end of
each unit's replies (`unit_ready`). What follows the client from one connection to the next
(`carried`), its transaction (`tx`) and its read-your-writes token (`token`) are objects
of their own. The client's byte stream, routing a unit, forwarding it, and retrying it or
answering for it when its server fails are parts of this class written in
proxy.session.stream, routing, forward (with statements) and recovery.

A unit starts when nothing is in flight and the session is idle (status 'I'). Units the
client pipelines behind one in flight follow its server connection, except that a unit
needing the primary never follows a replica: it waits until the replica's units finish,
then is routed afresh. In a transaction ('T'/'E') everything stays on the connection.
The connection goes back to its pool at ReadyForQuery 'I' with nothing in flight
(transaction mode), or stays with the client (session mode, or pinned).

Must not know: how replies are cut into steps (proxy.server.replies), SQL (router.classify),
which backend to pick (router.policy), the process (only proxy.session.host).
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
from typing import Any, Coroutine

from proxy import wire
from proxy.server.connection import ServerConnection, send_cancel
from proxy.server.replies import Step, StepKind
from proxy.errors import AdminShutdown, ProxyError
from proxy.session.carried import CarriedState, Stmt
from proxy.session.consistency import SessionToken
from proxy.session.host import SessionHost
from proxy.session.routing import Routing
from proxy.session.stream import State
from proxy.session.transaction import Transaction
from router.classify.analysis import Analysis
from router.topology import BackendState

log = logging.getLogger("pgsplit.session")

TX_IDLE = wire.TX_IDLE
_FORWARD = StepKind.FORWARD
_READY = State.READY  # (an enum member read through the class costs a Python-level lookup)
LINGER_S = 2.0  # how long a closed session's socket still takes the client's input
PAUSED_CHECK_S = 1.0  # how often a client whose reading is paused is checked for a hang-up
CONSOLE_INBOX_MAX = 256 * 1024  # an admin console client's unread input past this stops the reading


def peer_hung_up(transport: asyncio.BaseTransport) -> bool:
    """The other end of `transport` closed or reset the connection (without reading it)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


class ClientSession(Routing):
    def __init__(self, host: SessionHost):
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.state = State.HANDSHAKE
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.process_id = 0
        self.secret_key = b""
        self.tls = False
        self.tx = Transaction()
        self.carried = CarriedState(host.classifier.classify, host.statement_names)
        self.token = SessionToken(host.config.routing.consistency)
        self.server: ServerConnection | None = None
        self.backend: BackendState | None = None
        self.owned: dict[str, ServerConnection] = {}  # session pool mode: kept per backend
        self.route_primary = False  # SET pgsplit.route = 'primary'
        self.units = 0
        self.inbox = None  # handshake input, see proxy.listener
        self._stash = b""
        self._parts: list[bytes] = []  # a message gathered in pieces (see _hold)
        self._missing = 0  # bytes of it still to come
        self._skip = 0  # bytes of a long client message still to pass through
        self._skip_to: ServerConnection | None = None  # the connection that has its head
        self._open: Step | None = None  # the step receiving the current unit's messages
        self._fresh = False  # a server was just attached for the unit that follows
        self._routing: asyncio.Task | None = None  # the unit waits for a route, a token or a check
        self._unnamed: Analysis | None = None
        self._bound_copy = False
        self._copy_done = False
        self._force_primary_next = False  # the next unit attached goes to the primary
        self._cancel_pending = False  # the client cancelled the unit that waits for its route
        self._lsn_after = False  # the unit about to be sent is followed by a read of its commit's LSN
        self._retry_data: bytes | None = None
        self._retry_skip = 0  # reply bytes of a retried unit the client already has
        self._skip_to_sync = False
        self._group_error: bytes | None = None  # for the next message of a group whose server was lost
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self._memo_sql = b""
        self._memo_analysis: Analysis | None = None
        self._memo_version = -1
        self._close_reason = ""
        self._pools: dict[str, object] = {}  # pool per backend name, looked up once
        self._unit_key = ("", "")  # (backend name, role) of the attached server, for metrics
        self._unit_stats = host.metrics.units  # (compiled, a typed field: record is a C call)
        self._handshake_task: asyncio.Task | None = None
        self.connected_at = time.time()  # (SHOW CLIENTS)
        self.application_name = ""
        self._write_waiter: asyncio.Future | None = None  # the console's, while the client does not read
        self._db_counters: list = [0, 0, 0.0]  # transactions, units, unit seconds of its database (SHOW STATS)

    # --- what others may read ----------------------------------------------------------------

    @property
    def status(self) -> int:
        """The transaction status the client was last given."""
        return self.tx.status

    @property
    def stmts(self) -> dict[bytes, Stmt]:
        """The client's named statements (a server error naming one is renamed back)."""
        return self.carried.stmts

    @property
    def waiting(self) -> bool:
        """A unit waits for a route, a token or a check."""
        return self._routing is not None

    def activity(self) -> tuple[bool, bool]:
        """(a unit is in flight, the session is idle in a transaction): what a pause of
        the data plane waits for."""
        if self._routing is not None:
            return True, False
        server = self.server
        tx = self.tx
        if server is None:
            return False, tx.status != TX_IDLE and tx.deferred_begin is None
        if server.steps or self._open is not None:
            return True, False
        return False, tx.status != TX_IDLE

    # --- socket events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.host.client_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.state is _READY:
            # The common unit (a lone Query, or Bind/Execute/Sync of a prepared statement)
            # of an idle session or inside a transaction is the fast case; anything else
            # takes the general path.
            if not self._stash and self._common_unit(data):
                return
            if self._skip:
                data = self._pass_long(data)
                if not data:
                    return
            if self._missing:
                data = self._gather(data)
                if data is None:
                    return
            elif self._stash:
                data = self._stash + data
                self._stash = b""
            self._process(data)
        elif self.inbox is not None and self.state is not State.CLOSED:
            self.inbox.feed(data)  # the handshake's, or the admin console's
            if self.state is State.CONSOLE and len(self.inbox.buf) > CONSOLE_INBOX_MAX:
                self.pause_reading("console input")  # until the console has taken its messages

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.CLOSED:
            self._cleanup()
            return
        self.state = State.CLOSED
        if self.inbox is not None:
            self.inbox.close()
        reason = self._close_reason or ("client closed the connection" if exc is None else f"client connection error: {exc}")
        log.debug("session %s (%s@%s) ended: %s", self.process_id, self.user, self.peer, reason)
        self._cleanup()

    def pause_writing(self) -> None:
        # The client reads slower than the server sends: stop reading the server.
        self._write_paused = True
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self._write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def writable(self) -> None:
        """Return once the client's write buffer is below its high-water mark (at once
        when it is): the admin console's flow control. Meanwhile the client's input is
        not read. Bounded by the client: reading ends it, and so does leaving (the paused
        reading's check closes the session, which wakes this and cancels the console)."""
        while self._write_paused and self.state is not State.CLOSED:
            self.pause_reading("console output")
            self._write_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
                self.resume_reading("console output")

    def console_input_taken(self) -> None:
        """The console took a message from the inbox: read the client again once the
        unread input is back under CONSOLE_INBOX_MAX."""
        if "console input" in self._pause_reasons and self.inbox is not None \
                and len(self.inbox.buf) <= CONSOLE_INBOX_MAX:
            self.resume_reading("console input")

    def pause_reading(self, reason: str = "server") -> None:
        if not self._pause_reasons and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(PAUSED_CHECK_S, self._check_paused)
        self._pause_reasons.add(reason)

    def _check_paused(self) -> None:
        """While reading is paused the event loop does not see the client go away: look
        at the socket every PAUSED_CHECK_S, and end the session (cancelling what it runs)
        once the client has hung up."""
        if not self._pause_reasons or self.state is State.CLOSED or self.transport is None:
            return
        if peer_hung_up(self.transport):
            self.close("client went away while its input was held back")
            return
        asyncio.get_running_loop().call_later(PAUSED_CHECK_S, self._check_paused)

    def resume_reading(self, reason: str = "server") -> None:
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and self.state is not State.CLOSED:
            self.transport.resume_reading()

    # --- ending ----------------------------------------------------------------------------

    def begin_handshake(self, inbox: Any, handshake: Coroutine[Any, Any, None]) -> None:
        """The listener's part: its handshake reads the client's first bytes from `inbox`,
        in a task that ends with the session."""
        self.inbox = inbox
        self._handshake_task = self.host.spawn(handshake)

    def fail(self, error: ProxyError) -> None:
        """Send an error; a fatal one also ends the session."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(error.to_wire())
        if error.fatal:
            self.close(error.message)

    def close(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._close_reason = reason
        level = logging.DEBUG if reason == "client sent Terminate" else logging.INFO
        log.log(level, "closing session %s (%s@%s): %s", self.process_id, self.user, self.peer, reason)
        self.state = State.CLOSED
        if self.inbox is not None:
            self.inbox.close()
        if self.transport is not None:
            self._close_transport(linger=level != logging.DEBUG)
        self._cleanup()

    def _close_transport(self, linger: bool) -> None:
        """Close the client's socket without losing the error just written to it. Closing
        a socket with unread input makes the kernel send a reset, and a reset can overtake
        the bytes the client has not read yet (a client still sending COPY data saw
        "server closed the connection unexpectedly" instead of the error). So the write
        side is shut behind the last bytes, and what the client still sends is read and
        dropped until it closes, for at most LINGER_S."""
        transport = self.transport
        if not linger or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (the selector loop's shutdown() says so)
            transport.close()
            return
        transport.resume_reading()  # (data_received drops it: the session is closed)
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _cleanup(self) -> None:
        self._wake_writer()
        if self._routing is not None:
            self._routing.cancel()
            self._routing = None
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        server = self.server
        if server is not None:
            self._drop_server(server, busy=bool(server.steps) or self.tx.status != TX_IDLE)
        for conn in list(self.owned.values()):
            self._drop_server(conn, busy=False)
        self.owned.clear()
        self.host.client_closed(self)

    def _drop_server(self, server: ServerConnection, *, busy: bool) -> None:
        """The client is gone: a busy server is cancelled and closed, an idle one returned."""
        self._detach(server)
        pool = server.pool
        if busy or server.closed or self.carried.pins:
            if busy and not server.closed:
                self.host.spawn(send_cancel(server.host, server.port, server.process_id, server.secret_key, server.tls))
                server.abort()  # what the client left unsent to it goes too (a graceful close waits for it)
            pool.discard(server)
        else:
            pool.release(server)

    # --- after the handshake -----------------------------------------------------------

    def start(self, leftover: bytes) -> None:
        self.state = State.READY
        self.inbox = None
        self._db_counters = self.host.metrics.units.database_counters(self.database)
        if leftover:
            self._process(leftover)

    def set_startup_settings(self, params: dict[str, str]) -> None:
        self.carried.startup(params)

    def topology_swapped(self, keep: set[str], lsn: int | None) -> None:
        """Another backend set is active: connections to the old one go, and the LSN
        tokens of the old timeline become `lsn`, the new primary's position at the swap
        (it covers every write made before the cutover)."""
        self.token.restart(lsn)
        self._pools.clear()
        if self.carried.pins:
            self.fail(AdminShutdown(
                "terminating connection: a cutover moved the database to another cluster, and this "
                "session's server-side state (temporary tables, LISTEN, advisory locks or WITH HOLD "
                "cursors) cannot move with it"))
            return
        for name, conn in list(self.owned.items()):
            if name not in keep:
                del self.owned[name]
                if conn is self.server:
                    self._detach(conn)
                conn.pool.discard(conn)
        server = self.server
        if server is not None and server.backend not in keep and not server.steps and self.tx.status == TX_IDLE:
            self._detach(server)
            server.pool.discard(server)

    def abort_transaction(self, reason: str) -> None:
        """Roll back the client's open transaction (its server connection is closed) and
        answer everything up to its COMMIT/ROLLBACK as a failed transaction block."""
        server = self.server
        if server is not None:
            self._detach(server)
            self.owned.pop(server.backend, None)
            server.pool.discard(server)
        self.tx.rolled_back_here(reason)

    def cancel(self) -> asyncio.Task | None:
        """A CancelRequest with this session's key arrived: cancel this client's unit in
        flight, if any (nothing in flight, or only the proxy's own requests: dropped).
        Returns the task that sends it to the server."""
        server = self.server
        if server is None:
            if self._routing is not None:
                # A unit waits for its route (a token, a replica, a pool connection, or to
                # run again on the primary): it is answered as cancelled instead of sent.
                self._cancel_pending = True
            return None
        if not any(step.kind is _FORWARD for step in server.steps):
            return None
        for step in server.steps:
            if step.kind is _FORWARD:
                # What the client cancels does not run again elsewhere: a unit marked to (a
                # replica refused it, or was found behind, while the cancel reached the
                # check ahead of it or the unit itself) ends with the cancellation instead.
                step.cancelled = True
        return self.host.spawn(server.pool.cancel(server))

    def write_local(self, reply: bytes) -> None:
        self.transport.write(reply)
