"""One client session: the client socket's protocol, after the handshake.

Owns: framing the client's bytes into units of work (a Query, or extended-protocol
messages up to Sync), asking the router where each unit runs, borrowing a server
connection for it, forwarding it (rewriting only statement names), and everything that
must follow the client from one server connection to the next: SET values, named
prepared statements (client name -> the proxy's server-side name, prepared lazily on
each server connection that needs it), pins, the read-your-writes token.

A unit starts when nothing is in flight and the session is idle (status 'I'). Units the
client pipelines behind one in flight follow its server connection, except that a unit
needing the primary never follows a replica: it waits until the replica's units finish,
then is routed afresh. In a transaction ('T'/'E') everything stays on the connection.
The connection goes back to its pool at ReadyForQuery 'I' with nothing in flight
(transaction mode), or stays with the client (session mode, or pinned).

Must not know: how replies are cut into steps (proxy.server.replies), SQL (router.classify),
which backend to pick (router.policy).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import select
from dataclasses import replace
from time import perf_counter
from typing import TYPE_CHECKING

from proxy import commands, local, wire
from proxy.errors import (
    AdminShutdown, ConnectionFailure, ProtocolViolation, ProxyError, RoutingError, ServerError, ServerLost,
    ServerLostInTransaction,
)
from proxy.server.connection import UNKNOWN_SETTINGS, ServerConnection, send_cancel
from proxy.server.replies import ForwardStep, LocalStep, Step, StepKind, SwallowStep
from router.classify import Analysis, Pin, Route, TxControl, Unpin
from router.lsn import COMMIT_LSN_SQL, REPLAY_WAIT_SQL, CommitLsns, format_lsn, parse_lsn
from router.monitor.probe import PollError
from router.policy import Decision, SessionFacts, UnitFacts, decide_route, replica_to_check
from router.topology import BackendState, Role

if TYPE_CHECKING:  # pragma: no cover
    from proxy.app import Proxy

log = logging.getLogger("pgsplit.session")

F_BIND, F_CLOSE, F_DESCRIBE, F_EXECUTE = wire.F_BIND, wire.F_CLOSE, wire.F_DESCRIBE, wire.F_EXECUTE
F_FLUSH, F_PARSE, F_QUERY, F_SYNC = wire.F_FLUSH, wire.F_PARSE, wire.F_QUERY, wire.F_SYNC
F_TERMINATE, F_FUNCTION_CALL = wire.F_TERMINATE, wire.F_FUNCTION_CALL
F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL = wire.F_COPY_DATA, wire.F_COPY_DONE, wire.F_COPY_FAIL
TX_IDLE, TX_IN_BLOCK, TX_FAILED = wire.TX_IDLE, wire.TX_IN_BLOCK, wire.TX_FAILED

_FORWARD = StepKind.FORWARD
_MAY_WRITE = frozenset({F_QUERY, F_PARSE, F_BIND})
_IGNORED_WHEN_IDLE = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_FLUSH})
_WRITE = Route.WRITE
UNIT_END = frozenset({F_QUERY, F_SYNC, F_FLUSH, F_FUNCTION_CALL, F_TERMINATE})
OPENS_STEP = frozenset({F_PARSE, F_BIND, F_DESCRIBE, F_EXECUTE, F_CLOSE, F_QUERY, F_SYNC, F_FUNCTION_CALL})
CLIENT_TYPES = wire.FRONTEND_TYPES
MAX_UNROUTED = 1 << 20  # a unit larger than this is routed before its Sync arrives
STASH_PAUSE = 4 << 20  # stop reading the client while this much waits for a route
GATHER_MIN = 64 << 10  # a message still missing more than this is gathered in pieces
LINGER_S = 2.0  # how long a closed session's socket still takes the client's input
PAUSED_CHECK_S = 1.0  # how often a client whose reading is paused is checked for a hang-up
FRAME_BATCH = 4096  # messages framed at a time (a longer unit is routed as a large one)
_STATEMENT_KIND = 0x53  # 'S' in Close/Describe


def peer_hung_up(transport: asyncio.BaseTransport) -> bool:
    """The other end of `transport` closed or reset the connection (without reading it)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


class State(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CLOSED = "closed"


class Boundary(enum.Enum):
    GO = 0  # the unit runs on the attached connection
    WAIT = 1  # wait for more bytes or for the units in flight to finish
    ROUTE = 2  # give the connection back and route the unit afresh


class Stmt:
    """A named statement the client prepared (protocol Parse, or one answered locally)."""

    __slots__ = ("server_name", "parse", "analysis", "local")

    def __init__(self, server_name: bytes, parse: bytes, analysis: Analysis, local: bool = False):
        self.server_name = server_name
        self.parse = parse
        self.analysis = analysis
        self.local = local


RETRY_MAX_BYTES = 1 << 20  # a larger unit is not kept for a retry
# A message whose body the proxy cannot read (a string without its terminator, a Bind cut
# short...): its unit goes to the primary unchanged, and PostgreSQL answers it (ERROR 08P01,
# the session goes on), as it would without the proxy.
MALFORMED = Analysis(Route.WRITE, parse_error=True, reason="malformed message")
_READ_UNIT = UnitFacts(False, None)
_WRITE_UNIT = UnitFacts(True, None)
_NO_TOKEN = SessionFacts(False, None)
_TOKEN_MODES = frozenset(("session", "token"))  # modes whose reads wait for the session's own commits
_COMMIT_LSNS = wire.query(COMMIT_LSN_SQL)
_DESCRIBE_PORTAL = b"D\0\0\0\x06P\0"  # Describe of the unnamed portal
# The replay check ahead of a read (router.lsn.REPLAY_WAIT_SQL), prepared once per server
# connection under a name no client statement gets (theirs are "pgsplit_" + hex digits).
_REPLAY_WAIT = b"pgsplit_replay_wait"
_REPLAY_WAIT_PARSE = wire.build_parse(_REPLAY_WAIT, REPLAY_WAIT_SQL.encode())
_EXECUTE_SYNC = wire.message(F_EXECUTE, b"\0\0\0\0\0") + wire.SYNC  # unnamed portal, all rows
# Settings RESET ALL leaves as they are (GUC_NO_RESET_ALL); setting or resetting the
# session authorization resets the role as well.
_NOT_RESET_BY_ALL = ("session_authorization", "role")
_RESETS_ROLE = ("session_authorization",)
# Session effects a rollback does not undo.
_UNTRANSACTIONAL = ("prepare", "deallocate", "deallocate_all")


def _replay_wait_request(conn: ServerConnection, lsn: int, timeout_ms: int) -> bytes:
    """Bind and Execute of the replay check for `lsn` (prepared here first if need be)."""
    parse = b""
    prepared = conn.prepared
    if _REPLAY_WAIT in prepared:
        prepared.move_to_end(_REPLAY_WAIT)
    else:  # (first in its own request group: nothing before it can keep the Closes from running)
        parse = b"".join(_close(name) for name in prepared.make_room()) + _REPLAY_WAIT_PARSE
        prepared.add(_REPLAY_WAIT)
    # no parameter format codes (all text), the parameters, no result format codes (text)
    rest = b"\0\0" + wire.text_values([format_lsn(lsn), str(timeout_ms)]) + b"\0\0"
    return parse + wire.build_bind(b"", _REPLAY_WAIT, rest) + _EXECUTE_SYNC


def _close(server_name: bytes) -> bytes:
    return wire.build_target(F_CLOSE, _STATEMENT_KIND, server_name)


def _is_lone_query(data: bytes) -> bool:
    """`data` is exactly one whole Query message."""
    n = len(data)
    return n >= 6 and data[0] == F_QUERY and int.from_bytes(data[1:5], "big") == n - 1 and data[-1] == 0


def _needs_tracking(a: Analysis) -> bool:
    """Statements only the general path handles from an idle session: transaction control
    and what `_tracked_in_transaction` lists."""
    return a.tx is not None or _tracked_in_transaction(a)


def _tracked_in_transaction(a: Analysis) -> bool:
    """Statements only the general path handles inside a transaction: SET and other
    effects, pins, SQL EXECUTE, COPY FROM, several statements, synchronous_commit."""
    return bool(a.effects or a.pins or a.unpins or a.executes or a.is_copy_in
                or a.statements != 1 or a.mentions_sync_commit)


class _Extended:
    """An extended-protocol unit the short paths take (ClientSession._extended_unit): its
    analysis and, for a Bind of a prepared statement, the pieces to rebuild the Bind with
    the server's name."""

    __slots__ = ("analysis", "stmt", "described", "portal", "bind_rest", "tail")

    def __init__(self, analysis: Analysis, stmt: "Stmt | None", described: bool,
                 portal: bytes = b"", bind_rest: bytes = b"", tail: bytes = b""):
        self.analysis = analysis
        self.stmt = stmt  # None: behind an unnamed Parse
        self.described = described
        self.portal = portal
        self.bind_rest = bind_rest  # the Bind's body after the portal and statement names
        self.tail = tail  # [Describe,] Execute, Sync


def server_statement_name(sql: bytes, param_section: bytes) -> bytes:
    """The proxy's name for a statement: derived from its text and parameter types, so
    every pooled connection that has it prepared can serve every client that uses it."""
    return b"pgsplit_" + hashlib.blake2b(sql + b"\0" + param_section, digest_size=10).hexdigest().encode()


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ClientSession(asyncio.Protocol):
    def __init__(self, app: "Proxy"):
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.state = State.HANDSHAKE
        self.peer = "?"
        self.user = ""
        self.database = ""
        self.process_id = 0
        self.secret_key = b""
        self.tls = False
        self.status = TX_IDLE
        self.server: ServerConnection | None = None
        self.backend: BackendState | None = None
        self.owned: dict[str, ServerConnection] = {}  # session pool mode: kept per backend
        self.settings: dict[str, str] = {}  # GUC name -> statement that sets it
        self.startup_settings: dict[str, str] = {}
        self.settings_key: tuple = ()
        self.stmts: dict[bytes, Stmt] = {}
        self.sql_prepared: dict[str, str] = {}
        self.sql_prepared_analysis: dict[str, Analysis] = {}
        self.pins: set[Pin] = set()
        self.route_primary = False  # SET pgsplit.route = 'primary'
        self.default_read_only = False
        self.consistency = app.config.routing.consistency
        self.token: int | None = None  # an LSN at or past this session's last commit
        self.commit_pending = False  # a commit finished; its LSN is not fetched yet
        self.commit_ticket = 0
        self.commit_async = False  # the last commit may have returned before its WAL was flushed
        self.async_commit: bool | None = None  # the session's synchronous_commit = off (None: default)
        self.async_default = True  # the default for this user and database (first contact reads it)
        self._tx_async = False  # the open transaction named synchronous_commit (SET LOCAL, set_config)
        self._startup_async_commit: bool | None = None
        self.commit_time = 0.0  # loop time the last commit was seen
        self.min_lsn: int | None = None  # SET pgsplit.min_lsn
        self.units = 0
        self.inbox = None  # handshake input, see proxy.listener
        self._stash = b""
        self._parts: list[bytes] = []  # a message gathered in pieces (see _hold)
        self._missing = 0  # bytes of it still to come
        self._skip = 0  # bytes of a long client message still to pass through
        self._open: Step | None = None  # the step receiving the current unit's messages
        self._fresh = False  # a server was just attached for the unit that follows
        self._routing: asyncio.Task | None = None
        self._unnamed: Analysis | None = None
        self._bound_copy = False
        self._copy_done = False
        self._deferred_begin: bytes | None = None
        self._force_primary_next = False
        self._retry_data: bytes | None = None
        self._retry_skip = 0  # reply bytes of a retried unit the client already has
        self._skip_to_sync = False
        self._aborted: str | None = None  # why the open transaction was rolled back
        self._tx_effects: list = []
        self._tx_failed = False
        self._tx_wrote = False  # the open transaction (or unit) wrote on the primary
        self._pause_reasons: set[str] = set()
        self._write_paused = False
        self._memo_sql = b""
        self._memo_analysis: Analysis | None = None
        self._memo_version = -1
        self._close_reason = ""
        self._pools: dict[str, object] = {}  # pool per backend name, looked up once
        self._unit_key = ("", "")  # (backend name, role) of the attached server, for metrics
        self._record = app.metrics.units.record
        self._handshake_task: asyncio.Task | None = None

    # --- socket events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.app.client_opened(self)

    def data_received(self, data: bytes) -> None:
        if self.state is State.READY:
            # The common unit (a lone Query, or Bind/Execute/Sync of a prepared statement)
            # of an idle session or inside a transaction takes a short way; anything else
            # the general one.
            if self.server is None:
                if self._plain and not self._stash and self._fast_unit(data):
                    return
            elif self.status == TX_IN_BLOCK and self._in_transaction_unit(data):
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
        elif self.state is State.HANDSHAKE and self.inbox is not None:
            self.inbox.feed(data)

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
        transport.write_eof()
        transport.resume_reading()  # (data_received drops it: the session is closed)
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _cleanup(self) -> None:
        if self._routing is not None:
            self._routing.cancel()
            self._routing = None
        if self._handshake_task is not None and not self._handshake_task.done():
            self._handshake_task.cancel()
        server = self.server
        if server is not None:
            self._drop_server(server, busy=bool(server.steps) or self.status != TX_IDLE)
        for conn in list(self.owned.values()):
            self._drop_server(conn, busy=False)
        self.owned.clear()
        self.app.client_closed(self)

    def _drop_server(self, server: ServerConnection, *, busy: bool) -> None:
        """The client is gone: a busy server is cancelled and closed, an idle one returned."""
        self._detach(server)
        pool = server.pool
        if busy or server.closed or self.pins:
            if busy and not server.closed:
                self.app.spawn(send_cancel(server.host, server.port, server.process_id, server.secret_key))
                server.abort()  # what the client left unsent to it goes too (a graceful close waits for it)
            pool.discard(server)
        else:
            pool.release(server)

    # --- after the handshake -----------------------------------------------------------

    def start(self, leftover: bytes) -> None:
        self.state = State.READY
        self.inbox = None
        if leftover:
            self._process(leftover)

    def set_startup_settings(self, params: dict[str, str]) -> None:
        for name, value in params.items():
            self.startup_settings[name.lower()] = f"SET {name} = {quote_literal(value)}"
            if name.lower() == "synchronous_commit":
                self._startup_async_commit = value.strip().lower() in ("off", "false", "0", "no")
                self.async_commit = self._startup_async_commit
        self.settings = dict(self.startup_settings)
        self._settings_changed()

    def _settings_changed(self) -> None:
        self.settings_key = tuple(sorted(self.settings.items()))

    def replay_sql(self) -> bytes:
        # RESET ALL leaves role and session_authorization alone (GUC_NO_RESET_ALL); the
        # latter's reset puts the role back too.
        return ";\n".join(["RESET SESSION AUTHORIZATION", "RESET ALL", *self.settings.values()]).encode()

    # --- the client byte stream ------------------------------------------------------------

    def _pass_long(self, data: bytes) -> bytes:
        """Forward the rest of a long client message (CopyData) already partly sent."""
        n = min(self._skip, len(data))
        if self.server is not None:
            self.server.send(data[:n] if n < len(data) else data)
        self._skip -= n
        return data[n:]

    def _process(self, buf: bytes) -> None:
        """Route new units and forward messages, until the bytes run out or must wait.

        The bytes are framed once, a batch of messages at a time, and every step below
        walks the frames by index: the work per message stays constant however many
        messages the client pipelined (re-framing the rest after each unit made a long
        pipeline cost the square of its length)."""
        pos = 0
        n = len(buf)
        while pos < n and self.state is State.READY and self._routing is None:
            try:
                frames, complete = wire.split_messages(buf, pos, valid_types=CLIENT_TYPES, limit=FRAME_BATCH)
            except wire.ProtocolViolation as exc:
                self.fail(ProtocolViolation(str(exc)))
                return
            if not frames:
                if self.server is not None and self._stream_long(buf, pos):
                    return
                break
            i = self._walk(buf, frames)
            if i < len(frames):
                pos = frames[i][1]
                break
            pos = complete
        if pos < n and self.state is State.READY:
            self._hold(buf, pos)

    def _walk(self, buf: bytes, frames: list) -> int:
        """Run the units of `frames`; returns the index of the first frame that must
        wait (len(frames) when all went)."""
        i = 0
        nf = len(frames)
        while i < nf and self.state is State.READY and self._routing is None:
            if self._skip_to_sync:
                i = self._skip_group(frames, i)
                continue
            if self.server is None:
                if self.app.dataplane.holding:  # a cutover is in progress: wait for it
                    self.app.dataplane.hold_session(self)
                    return i
                start = self._start_unit(buf, frames, i)
                if start < 0:
                    return i
                if self.server is None:  # answered here, or nothing to run
                    i = start
                    continue
                i = start
            stop = self._forward(buf, frames, i)
            if stop is None:
                return nf
            i = stop
            if self.server is not None:
                return i  # waiting on the units in flight
        return i

    def _hold(self, buf: bytes, pos: int) -> None:
        """Keep the bytes from `pos` until they can go on. A message that has not fully
        arrived is gathered in pieces (`_gather`: linear in its size, and reading goes on
        until it is whole); complete messages that wait for a route or for the units in
        flight stop the reading once they pass STASH_PAUSE."""
        rest = buf[pos:] if pos else buf
        n = len(rest)
        missing = 1 + wire.header_length(rest, 0) - n if n >= 5 else 0  # of its first message
        self._stash = rest
        if missing > GATHER_MIN:
            self._parts = [rest]
            self._missing = missing
        elif n > STASH_PAUSE and missing <= 0:
            self.pause_reading("stash")

    def _gather(self, data: bytes) -> bytes | None:
        """More of a message that has not fully arrived; the whole of what is held once it
        has (None until then)."""
        self._parts.append(data)
        self._missing -= len(data)
        if self._missing > 0:
            return None
        data = b"".join(self._parts)
        self._parts = []
        self._missing = 0
        self._stash = b""
        return data

    def _requeue(self, data: bytes) -> None:
        """A unit to run again, ahead of the bytes that wait."""
        if self._missing:
            self._parts[0] = data + self._parts[0]
        self._stash = data + self._stash

    def _skip_group(self, frames: list, i: int) -> int:
        """After an error the proxy answered for a group still arriving: drop messages up
        to its Sync, then answer that Sync, as a server skips after an error."""
        for j in range(i, len(frames)):
            if frames[j][0] == F_SYNC:
                self._skip_to_sync = False
                self.transport.write(wire.ready_for_query(self.status))
                return j + 1
        return len(frames)

    def _stream_long(self, buf: bytes, pos: int) -> bool:
        """A CopyData too large to wait for whole is passed through as it arrives."""
        if len(buf) - pos < 5 or buf[pos] != F_COPY_DATA:
            return False
        length = wire.header_length(buf, pos)
        if length < 64 * 1024:
            return False
        self.server.send(buf[pos:] if pos else buf)
        self._skip = 1 + length - (len(buf) - pos)
        return True

    def resume(self) -> None:
        """Bytes held while a route was chosen or units drained: process them now."""
        if self._routing is not None or self.state is not State.READY:
            return
        if self._pause_reasons:
            self.resume_reading("stash")
        if self._stash and not self._missing:
            data, self._stash = self._stash, b""
            self._process(data)

    # --- the short way for the common unit ---------------------------------------------

    @property
    def _plain(self) -> bool:
        """Nothing unusual about the session: idle, or in a transaction the proxy has
        answered BEGIN for and not yet routed (not declared read only); unpinned, nothing
        held or pending."""
        if self._deferred_begin is None:
            if self.status != TX_IDLE:
                return False
        elif self.default_read_only:
            return False
        return (not self.pins and self._routing is None and not self._skip and self._aborted is None
                and not self._skip_to_sync and not self.route_primary and not self._force_primary_next
                and not self._retry_skip and not self.app.session_pooling and not self.app.dataplane.holding)

    def _short_unit(self, data: bytes) -> "tuple[Analysis, _Extended | None] | None":
        """(analysis, None) for a lone Query, (analysis, its parts) for an
        `_extended_unit`, None for any other unit: the shapes the short paths take."""
        if data[0] == F_QUERY:
            return (self._classify(data[5:-1]), None) if _is_lone_query(data) else None
        ext = self._extended_unit(data)
        return None if ext is None else (ext.analysis, ext)

    def _extended_unit(self, data: bytes) -> "_Extended | None":
        """`data` as Bind, [Describe portal,] Execute, Sync of a statement the session
        prepared (libpq sends the Describe: psql, pgbench, psycopg; asyncpg does not), or
        the same behind an unnamed Parse (libpq's PQexecParams). None for anything else."""
        t = data[0]
        if t != F_BIND and t != F_PARSE:
            return None
        n = len(data)
        start_b = 0
        if t == F_PARSE:
            start_b = 1 + int.from_bytes(data[1:5], "big")
            if n < 7 or data[5] != 0 or start_b + 7 > n or data[start_b] != F_BIND \
                    or data[start_b + 5 : start_b + 7] != b"\0\0":  # unnamed portal and statement
                return None
        end_b = start_b + 1 + int.from_bytes(data[start_b + 1 : start_b + 5], "big")
        described = data[end_b : end_b + 7] == _DESCRIBE_PORTAL
        x = end_b + 7 if described else end_b  # the Execute
        if x + 15 != n or data[x] != F_EXECUTE or data[x + 10] != F_SYNC \
                or data[x + 1 : x + 5] != b"\0\0\0\x09" or data[-4:] != b"\0\0\0\x04":
            return None
        if t == F_PARSE:
            end_sql = data.find(b"\0", 6, start_b)
            if end_sql < 0:
                return None
            return _Extended(self._classify(data[6:end_sql]), None, described)
        try:
            portal, name, off = wire.parse_bind_names(data[5:end_b])
        except wire.ProtocolViolation:
            return None
        stmt = self.stmts.get(name) if name else None
        if stmt is None or stmt.local:
            return None
        return _Extended(stmt.analysis, stmt, described, portal, data[5 + off : end_b], data[end_b:])

    def _send_unit(self, conn: ServerConnection, data: bytes, analysis: Analysis, ext: "_Extended | None",
                   trailer: bytes = b"") -> Step:
        """Write a lone Query (`ext` None) or an `_extended_unit` to the attached
        connection, under a new step; `trailer` (a request of the proxy's own) goes in the
        same write, behind it."""
        step = self._new_step()
        step.closed = True
        self._open = None
        if analysis.route is _WRITE:
            step.writes = True
        if ext is None:
            conn.send(data + trailer)
            return step
        step.extended = True
        stmt = ext.stmt
        if stmt is None:  # behind an unnamed Parse
            self._unnamed = analysis  # for later Binds of the unnamed statement
            step.sent = 4 if ext.described else 3  # Parse, Bind, Describe and Execute complete once each
            conn.send(data + trailer)
            return step
        parse = b""
        if stmt.server_name in conn.prepared:
            conn.prepared.move_to_end(stmt.server_name)  # (least recently used goes first)
        else:  # prepared first here, ahead of the Bind
            parse = self._prepare_here(step, stmt) + stmt.parse
        step.sent += 3 if ext.described else 2  # Bind, Describe and Execute complete once each
        conn.send(parse + wire.build_bind(ext.portal, stmt.server_name, ext.bind_rest) + ext.tail + trailer)
        return step

    def _fast_unit(self, data: bytes) -> bool:
        """Route and forward a lone Query or an `_extended_unit` of an idle session, or
        the first statement of a transaction whose BEGIN the proxy answered (it goes to the
        primary, the BEGIN ahead of it), without the general framing loop. False (nothing
        done) when the unit is anything else: the general path then handles it from
        scratch."""
        unit = self._short_unit(data)
        if unit is None:
            return False
        analysis, ext = unit
        if _needs_tracking(analysis) or analysis.hint is not None:
            if (analysis.tx is TxControl.BEGIN and ext is None and self._deferred_begin is None
                    and analysis.statements == 1 and not analysis.effects and analysis.hint is None):
                commands.defer_begin(self, wire.parse_query(data[5:]))  # as the general path would
                return True
            return False
        in_tx = self._deferred_begin is not None
        writes = in_tx or analysis.route is _WRITE
        token = None
        if not writes and self.consistency != "eventual":
            if self.consistency != "session" or self.commit_pending:
                return False  # a token to fetch first, or another mode: the general path
            token = self.token
        app = self.app
        # (the tie-breaker counts only units sent here: one handed to the general path
        # must get the same choice there, where it waits for a connection if need be)
        decision = decide_route(_WRITE_UNIT if writes else _READ_UNIT,
                                _NO_TOKEN if token is None else SessionFacts(False, token),
                                app.topology.current, app.load, tiebreak=self.units + 1,
                                allow_wait=token is None or app.config.routing.consistency_wait_ms > 0)
        backend = decision.backend
        check = decision.wait_lsn
        if check is not None:
            # No replica is known to have the session's writes yet: the read goes to one
            # behind a query that waits there until it has replayed them (at most
            # consistency_wait_ms), and runs again on the primary if that was not enough.
            backend = replica_to_check(app.topology.current, app.load, self.units + 1)
        if backend is None:
            return False
        conn = self._borrow_now(backend)
        if conn is None:
            return False
        self.units += 1
        if token is not None and check is None:
            app.note_consistency(decision)
        self._attach(conn, backend, data, None)
        self._fresh = False
        if check is not None:
            wait = conn.swallow(_replay_wait_request(conn, check, app.config.routing.consistency_wait_ms),
                                self._replay_checked, rows=True, ahead=True)
            wait.server, wait.lsn, wait.t0 = conn, check, perf_counter()
            self._send_unit(conn, data, analysis, ext).retry = data
        elif writes and not in_tx and self.consistency in _TOKEN_MODES:
            # The WAL position, read right behind the write on its connection and in the
            # same write: the next read has its token without a round trip of its own
            # (router.lsn fetches it when this one fails).
            self._send_unit(conn, data, analysis, ext, _COMMIT_LSNS)
            conn.swallow(_COMMIT_LSNS, self._commit_lsns_read, rows=True, written=True).server = conn
        else:
            self._send_unit(conn, data, analysis, ext)
        return True

    def _in_transaction_unit(self, data: bytes) -> bool:
        """A lone Query or an `_extended_unit` inside the transaction of the attached
        connection, with nothing in flight and nothing `_tracked_in_transaction` (COMMIT
        and ROLLBACK are fine: their analysis goes with the step, as on the general path):
        forwarded as the general path would. False (nothing done) otherwise."""
        server = self.server
        if (server.steps or self._open is not None or self._stash or self._skip or self._skip_to_sync
                or self._aborted is not None or self._routing is not None):
            return False
        unit = self._short_unit(data)
        if unit is None:
            return False
        analysis, ext = unit
        if _tracked_in_transaction(analysis):
            return False
        self._fresh = False
        step = self._send_unit(server, data, analysis, ext)
        if analysis.tx is not None:  # COMMIT, ROLLBACK, SAVEPOINT...: seen at its ReadyForQuery
            self._note_analysis(step, analysis)
        return True

    def _replay_checked(self, wait: Step) -> None:
        """The replay check ahead of a read: the replica has the session's writes (it is
        noted, for the reads after it), or the read behind it, whose replies have not
        reached the client, runs again on the primary."""
        server = wait.server
        replayed = None
        if wait.error is None and wait.rows:
            text = wire.parse_data_row(wait.rows[0])[0]
            replayed = None if text is None else parse_lsn(text.decode())
        app = self.app
        if wait.error is not None:
            # dropped where the proxy could not see it: prepared again next time
            server.prepared.discard(_REPLAY_WAIT)
        if replayed is not None and replayed >= wait.lsn:
            app.monitor.note_replay(server.backend, replayed)
            app.metrics.units.consistency["waited"] += 1
            app.metrics.consistency_wait_seconds.observe(perf_counter() - wait.t0)
        elif server.steps and server.steps[0].retry is not None:
            read = server.steps[0]
            read.retrying = True
            read.retry_reason = "replica_behind"
            self._force_primary_next = True
            app.metrics.units.consistency["fallback"] += 1

    def _commit_lsns_read(self, step: Step) -> None:
        server = step.server
        if step.error is None and step.rows:
            flush, insert = wire.parse_data_row(step.rows[0])
            lsn = CommitLsns(parse_lsn(flush.decode()), parse_lsn(insert.decode())).covering(self.commit_async)
            self.token = lsn if self.token is None else max(self.token, lsn)
            self.commit_pending = False
            if not self.app.config.routing.consistency_wait_ms:
                # Reads never wait on a replica (nor check one): the monitor asks the
                # replicas to report its replay, so that they serve the reads after it.
                self.app.monitor.want_lsn(lsn)
        if not server.closed:
            self._settle(server)

    # --- classification ------------------------------------------------------------------

    def _classify(self, sql: bytes) -> Analysis:
        classifier = self.app.classifier
        if sql == self._memo_sql and self._memo_version == classifier.version:
            return self._memo_analysis
        analysis = classifier.classify(sql.decode("utf-8", "replace"))
        self._memo_sql = sql
        self._memo_analysis = analysis
        self._memo_version = classifier.version
        return analysis

    def _scan_unit(self, buf: bytes, frames: list, i: int) -> tuple[int, list[Analysis], bool] | None:
        """(index of the unit's last frame, analyses, uses FunctionCall) for the unit that
        starts at frames[i]; None if its end has not arrived yet."""
        analyses: list[Analysis] = []
        unnamed = self._unnamed
        fcall = False
        for j in range(i, len(frames)):
            t, s, e = frames[j]
            try:
                if t == F_QUERY:
                    analyses.append(self._classify(wire.parse_query(buf[s + 5 : e])))
                elif t == F_PARSE:
                    name, sql, _ = wire.parse_parse(buf[s + 5 : e])
                    a = self._classify(sql)
                    analyses.append(a)
                    if not name:
                        unnamed = a
                elif t == F_BIND:
                    _, stmt, _ = wire.parse_bind_names(buf[s + 5 : e])
                    st = self.stmts.get(stmt) if stmt else None
                    a = st.analysis if st is not None else (unnamed if not stmt else None)
                    if a is not None:
                        analyses.append(a)
            except wire.ProtocolViolation:
                analyses.append(MALFORMED)
            if t == F_FUNCTION_CALL:
                fcall = True
            if t in UNIT_END:
                return j, analyses, fcall
        if frames[-1][2] == len(buf) or len(buf) - frames[i][1] > MAX_UNROUTED or len(frames) >= FRAME_BATCH:
            # Routed before its end: nothing more has come (a pipeline without Sync, as
            # libpq's pipeline mode sends until its pipeline_sync, waits for results that
            # PostgreSQL sends as it goes), or the unit is large (bytes of a message still
            # arriving count: a large Bind behind its Parse). The rest follows the
            # connection as after a Flush.
            return len(frames) - 1, analyses, fcall
        return None

    def _unit_facts(self, analyses: list[Analysis], fcall: bool) -> UnitFacts:
        writes = fcall
        hint = None
        for a in analyses:
            if a.hint is not None and hint is None:
                hint = Role.PRIMARY if a.hint is Route.WRITE else Role.REPLICA
            if a.route is Route.WRITE:
                if a.executes and len(a.executes) == 1 and a.statements == 1:
                    prepared = self.sql_prepared_analysis.get(a.executes[0])
                    if prepared is not None and prepared.route is Route.READ:
                        continue
                writes = True
            elif a.tx is TxControl.BEGIN and not self.default_read_only:
                writes = True
        return UnitFacts(writes=writes, hint=hint)

    # --- routing a new unit ----------------------------------------------------------------

    def _session_facts(self, token: int | None) -> SessionFacts:
        if self._force_primary_next:
            self._force_primary_next = False
            return SessionFacts(True, token)
        return SessionFacts(bool(self.pins) or self.route_primary, token)

    def _start_unit(self, buf: bytes, frames: list, i: int) -> int:
        """Route the unit at frames[i]; returns the index to continue from (i itself when
        the unit is to be forwarded on the connection just attached), or -1 to wait (for
        more bytes, or for an asynchronous route)."""
        t = frames[i][0]
        if t in _IGNORED_WHEN_IDLE:
            # after a failed COPY the server drops these too; Flush has nothing to flush
            i += 1
            while i < len(frames) and frames[i][0] in _IGNORED_WHEN_IDLE:
                i += 1
            return i
        if t == F_TERMINATE:
            self.close("client sent Terminate")
            return len(frames)
        scan = self._scan_unit(buf, frames, i)
        if scan is None:
            return -1
        last, analyses, fcall = scan
        if self._aborted is not None:
            unit_last = self._unit_last(frames, last)
            self._answer_aborted(buf[frames[i][1] : frames[unit_last][2]], analyses)
            return unit_last + 1
        handled = self._answer_locally(buf, frames[i : last + 1], analyses)
        if handled:
            return last + 1
        if handled is None:
            return -1
        facts = self._unit_facts(analyses, fcall)
        if self._deferred_begin is not None:
            # The transaction's first statement: it runs on the primary unless the
            # transaction was declared read only.
            read_only = self.default_read_only or any(a.tx is TxControl.SET_TX_READ_ONLY for a in analyses)
            facts = UnitFacts(writes=facts.writes or not read_only, hint=facts.hint)
        self.units += 1  # the tie-breaker between equally loaded replicas
        token, fetch = self.read_token(facts)
        unit = self._unit_bytes(buf, frames, i, last)
        if not fetch:
            decision = self._decide(facts, token)
            if decision.error is None and decision.wait_lsn is None:
                if token is not None:
                    self.app.note_consistency(decision)
                conn = self._borrow_now(decision.backend)
                if conn is not None:
                    self._attach(conn, decision.backend, unit, facts)
                    return i
        self._routing = self.app.spawn(self._route_later(facts, unit))
        return -1

    @staticmethod
    def _unit_last(frames: list, last: int) -> int:
        """The index of the last frame of the unit that ends at (or after) frames[last]:
        its Sync (or Query), which may come after the Flush it was routed at; as far as
        has arrived if it has not."""
        for j in range(last, len(frames)):
            t = frames[j][0]
            if t == F_SYNC or t == F_QUERY or t == F_FUNCTION_CALL:
                return j
        return len(frames) - 1

    def _unit_bytes(self, buf: bytes, frames: list, i: int, last: int) -> bytes:
        start, end = frames[i][1], frames[self._unit_last(frames, last)][2]
        return buf if start == 0 and end == len(buf) else buf[start:end]

    def _decide(self, facts: UnitFacts, token: int | None, allow_wait: bool = True) -> Decision:
        app = self.app
        return decide_route(facts, self._session_facts(token), app.topology.current, app.load, tiebreak=self.units,
                            allow_wait=allow_wait and app.config.routing.consistency_wait_ms > 0)

    def read_token(self, facts: UnitFacts) -> tuple[int | None, bool]:
        """The LSN a replica must have replayed for this unit, and whether it must be
        fetched first (read-your-writes, see router.lsn)."""
        if facts.writes or self.consistency == "eventual":
            return None, False
        if self.consistency == "global":
            return None, True
        token = self.token
        if self.consistency == "token" and self.min_lsn is not None:
            token = self.min_lsn if token is None else max(token, self.min_lsn)
        return token, self.commit_pending

    def _borrow_now(self, backend: BackendState) -> ServerConnection | None:
        if self.owned:
            owned = self.owned.get(backend.name)
            if owned is not None and not owned.closed:
                return owned
        pool = self._pools.get(backend.name)
        if pool is None or pool.closed or pool.address.port != backend.port or pool.address.host != backend.host:
            pool = self._pools[backend.name] = self.app.pool_for(backend, self.user, self.database)
        conn = pool.try_acquire()
        if conn is not None and self.app.session_pooling:
            self.owned[backend.name] = conn
        return conn

    async def _route_later(self, facts: UnitFacts, unit: bytes) -> None:
        """The slow path of routing: fetch the LSN token, wait for a replica, wait for a
        pool connection. The unit's bytes wait in the stash meanwhile."""
        app = self.app
        try:
            try:
                token, fetch = self.read_token(facts)
                if fetch:
                    try:
                        token = await app.lsn_token(self)
                    except (PollError, ConnectionError, OSError, TimeoutError) as exc:
                        # Without the token no replica is known to be safe: the primary serves.
                        log.info("session %s: LSN token unavailable (%s); reading from the primary",
                                 self.process_id, exc)
                        self._force_primary_next = True
                decision = self._decide(facts, token)
                if decision.wait_lsn is not None:
                    decision = await app.wait_for_replica(self, facts, decision.wait_lsn)
                elif token is not None and decision.error is None:
                    app.note_consistency(decision)
                for attempt in range(3):
                    if decision.error is not None:
                        raise RoutingError(*decision.error)
                    backend = decision.backend
                    conn = self.owned.get(backend.name)
                    if conn is not None and not conn.closed:
                        break
                    try:
                        conn = await app.pool_for(backend, self.user, self.database).acquire()
                    except (ConnectionFailure, ServerError) as exc:
                        if backend.role is not Role.REPLICA or attempt == 2:
                            raise
                        # The replica is marked down already if it failed as a whole (the
                        # pool told the monitor): ask again, and another backend serves the
                        # read. A login it refused (a ServerError: 57P03 while it shuts down,
                        # or this user's limit or pg_hba) is not the client's failure either.
                        log.info("session %s: %s; reading elsewhere", self.process_id, exc)
                        decision = self._decide(facts, token, allow_wait=False)
                        if decision.backend is backend:  # (a refusal for this user only)
                            decision = self._decide(UnitFacts(facts.writes, Role.PRIMARY), token)
                        continue
                    if app.session_pooling:
                        self.owned[backend.name] = conn
                    break
            except ProxyError as exc:
                self._routing = None
                self._refuse_unit(unit, exc)
                return
            if self.state is not State.READY:
                conn.pool.release(conn)
                return
            self._routing = None
            self._attach(conn, backend, unit, facts)
            self.resume()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - a bug; keep the other sessions alive
            log.exception("routing failed in session %s", self.process_id)
            self._routing = None
            self.close(f"internal error while routing: {exc}")

    def abort_transaction(self, reason: str) -> None:
        """Roll back the client's open transaction (its server connection is closed) and
        answer everything up to its COMMIT/ROLLBACK as a failed transaction block."""
        server = self.server
        if server is not None:
            self._detach(server)
            self.owned.pop(server.backend, None)
            server.pool.discard(server)
        self._deferred_begin = None
        self._aborted = reason
        self.status = TX_FAILED

    def _answer_aborted(self, unit: bytes, analyses: list[Analysis]) -> None:
        if len(analyses) == 1 and analyses[0].statements == 1 and analyses[0].tx in (
                TxControl.COMMIT, TxControl.ROLLBACK):
            self._aborted = None
            self.status = TX_IDLE
            frames, _ = wire.split_messages(unit)
            if frames[0][0] == F_QUERY:
                self.transport.write(local.simple(local.Answer(tag="ROLLBACK"), TX_IDLE))
            else:
                types = [(t, unit[s + 5] if t in (F_DESCRIBE, F_CLOSE) else 0) for t, s, e in frames]
                self.transport.write(local.extended(local.Answer(tag="ROLLBACK"), types, TX_IDLE))
            return
        err = ProxyError("current transaction is aborted, commands ignored until end of transaction block",
                         detail=self._aborted)
        err.sqlstate = "25P02"
        self._reply_error(unit, err)

    def topology_swapped(self, keep: set[str], lsn: int | None) -> None:
        """Another backend set is active: connections to the old one go, and the LSN
        tokens of the old timeline become `lsn`, the new primary's position at the swap
        (it covers every write made before the cutover)."""
        self.token = lsn
        self.commit_pending = False
        self.min_lsn = None
        self._pools.clear()
        if self.pins:
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
        if server is not None and server.backend not in keep and not server.steps and self.status == TX_IDLE:
            self._detach(server)
            server.pool.discard(server)

    def _refuse_unit(self, unit: bytes, error: ProxyError) -> None:
        """Answer a unit that no backend can run with the error, as a server would: the
        error, then (after the rest of the group up to Sync is skipped) ReadyForQuery."""
        stash = self._stash
        self._stash = stash[len(unit) :] if stash.startswith(unit) else stash
        self._reply_error(unit, error)
        self.resume()

    def _reply_error(self, unit: bytes, error: ProxyError) -> None:
        if error.fatal:
            self.fail(error)
            return
        frames, _ = wire.split_messages(unit)
        if self.status == TX_IN_BLOCK:
            self.status = TX_FAILED  # (a transaction whose BEGIN is still deferred)
        reply = error.to_wire()
        if frames and frames[-1][0] in (F_QUERY, F_SYNC, F_FUNCTION_CALL):
            reply += wire.ready_for_query(self.status)
        else:
            self._skip_to_sync = True  # the rest of the group arrives later
        self.transport.write(reply)

    def _attach(self, conn: ServerConnection, backend: BackendState, unit: bytes, facts: UnitFacts) -> None:
        conn.attach(self, self.transport.write)
        conn.last_client_pid = self.process_id  # (a notification it sends names this client)
        self.server = conn
        self.backend = backend
        self._unit_key = (backend.name, "primary" if backend.role is Role.PRIMARY else "replica")
        self._fresh = True
        load = self.app.load
        load[backend.name] = load.get(backend.name, 0) + 1
        if self._write_paused:
            conn.transport.pause_reading()
        if conn.settings_key != self.settings_key:
            conn.settings_key = self.settings_key
            conn.swallow(wire.query(self.replay_sql()), self._replayed, ahead=True)
        if self._deferred_begin is not None:
            conn.swallow(wire.query(self._deferred_begin), self._began, ahead=True)
            self._deferred_begin = None
        self._retry_data = unit if (backend.role is Role.REPLICA and self.status == TX_IDLE
                                    and self.app.config.routing.retry_reads_on_replica_error) else None

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
                load = self.app.load
                name = backend.name
                load[name] = load.get(name, 1) - 1 or 0
            self.backend = None
        self._open = None
        if self._write_paused and server.transport is not None and not server.closed:
            server.transport.resume_reading()

    def _release(self) -> None:
        """The unit is over and nothing is in flight: give the connection back."""
        server = self.server
        self._detach(server)
        if self.app.session_pooling and not server.closed:
            return  # stays in self.owned
        server.pool.release(server)

    # --- forwarding --------------------------------------------------------------------

    def _boundary(self, buf: bytes, frames: list, i: int) -> Boundary:
        """May the unit starting at frames[i] run on the attached connection?"""
        if self._fresh:
            self._fresh = False
            return Boundary.GO
        server = self.server
        if not server.steps:
            if self.status != TX_IDLE or self.pins:
                return Boundary.GO
            return Boundary.ROUTE
        if server.steps[-1].callback == self._commit_lsns_read:
            return Boundary.WAIT  # the unit is routed afresh once the token has arrived
        if self.backend.role is Role.PRIMARY or self.pins:
            return Boundary.GO
        scan = self._scan_unit(buf, frames, i)
        if scan is None:
            return Boundary.WAIT
        facts = self._unit_facts(scan[1], scan[2])
        if facts.writes or facts.hint is Role.PRIMARY or self.route_primary:
            return Boundary.WAIT  # never follow a replica with a write: let it drain
        return Boundary.GO

    def _new_step(self) -> Step:
        step = ForwardStep()
        step.backend, step.role = self._unit_key
        step.t0 = perf_counter()
        if self._retry_data is not None:
            step.retry = self._retry_data  # the unit's bytes, to re-send if the replica refuses it
            self._retry_data = None
        if self._retry_skip:
            step.skip, self._retry_skip = self._retry_skip, 0
        self.server.steps.append(step)
        self._open = step
        return step

    def _forward(self, buf: bytes, frames: list, first: int) -> int | None:
        """Forward the complete client messages from frames[first] to the attached server.
        Returns None when all were forwarded, else the index of the first one that must
        wait."""
        server = self.server
        out: list[bytes] = []
        run = frames[first][1]  # start of a run of bytes forwarded unchanged
        step = self._open
        if step is not None and step.retry is not None:
            self._keep_for_retry(step, buf, frames, first)
        stop = None
        query_analysis: Analysis | None = None
        for i in range(first, len(frames)):
            t, s, e = frames[i]
            if step is not None and step.left_open and t in _MAY_WRITE and self._leaves_replica(step, buf, t, s, e):
                # A statement that needs the primary, in a group left open on a replica (a
                # Flush, or its end still to come): the proxy ends the group there with a
                # Sync of its own (its ReadyForQuery is not forwarded) and routes the rest
                # afresh once it is answered. Sent on, the replica would refuse it, and
                # COPY data pipelined behind it would be lost with the refusal.
                out.append(buf[run:s])
                out.append(wire.SYNC)
                run = s
                step.closed = step.extended = step.quiet_ready = True
                step.retry = None
                self._open = step = None
                stop = i
                break
            if step is None and t in OPENS_STEP:
                if t == F_SYNC and server.copy_in_absorb and self._copy_done:
                    server.copy_in_absorb = False  # answered by the step that ran the COPY
                    self._copy_done = False
                    continue
                b = self._boundary(buf, frames, i)
                if b is not Boundary.GO:
                    stop = i
                    if b is Boundary.ROUTE:
                        self._release()
                    break
                if t == F_QUERY:
                    query_analysis = self._query_analysis(buf, s, e)
                    answer = self._own_answer(query_analysis) if query_analysis.effects else None
                    if answer is not None:
                        # SET/SHOW pgsplit.* on an attached connection (in a transaction,
                        # or behind units in flight): answered in its turn.
                        out.append(buf[run:s])
                        run = e
                        if answer.error is not None and self.status != TX_IDLE:
                            out.append(commands.raise_on_server(answer.error))
                            self._new_step().closed = True
                            self._open = None
                        else:
                            reply = local.simple(answer, 0)[:-6]  # ReadyForQuery comes in turn
                            local_step = LocalStep(reply)
                            self._flush_out(server, out, buf, run, run)
                            out = []
                            server.push(local_step)
                        continue
                step = self._new_step()
            try:
                if t == F_EXECUTE:
                    step.sent += 1
                    if self._bound_copy:
                        self._copy_done = False
                elif t == F_SYNC:
                    step.closed = step.extended = True
                    self._open = step = None
                elif t == F_BIND:
                    portal, name, off = wire.parse_bind_names(buf[s + 5 : e])
                    if name:
                        st = self.stmts.get(name)
                        if st is not None:
                            self._note_analysis(step, st.analysis)
                            a = st.analysis
                            if step.sent == 0 and (a.executes or a.effects) and self._sql_statements_used(a):
                                run = self._prepare_sql(server, st.analysis, step, out, buf, run, s)
                            if st.local:
                                return self._local_statement_error(buf, s)
                            run = self._use_statement(step, st, out, buf, run, s)
                            out.append(buf[run:s])
                            out.append(wire.build_bind(portal, st.server_name, memoryview(buf)[s + 5 + off : e]))
                            run = e
                            self._bound_copy = st.analysis.is_copy_in
                        else:
                            self._bound_copy = False
                    elif self._unnamed is not None:
                        self._note_analysis(step, self._unnamed)
                        self._bound_copy = self._unnamed.is_copy_in
                    step.sent += 1
                elif t == F_PARSE:
                    name, sql, params = wire.parse_parse(buf[s + 5 : e])
                    if not wire.param_types_ok(params):
                        raise wire.ProtocolViolation("invalid Parse message")
                    analysis = self._classify(sql)
                    self._note_analysis(step, analysis)
                    if step.sent == 0 and (analysis.executes or analysis.effects) and self._sql_statements_used(analysis):
                        run = self._prepare_sql(server, analysis, step, out, buf, run, s)
                    if name:
                        st = self.register_statement(name, sql, params)
                        sname = st.server_name
                        out.append(buf[run:s])
                        run = e
                        if sname in server.prepared:
                            server.prepared.move_to_end(sname)
                            server.add_edit(step, step.sent, wire.PARSE_COMPLETE)
                        else:
                            out.append(self._register(step, sname))
                            out.append(st.parse)
                            step.sent += 1
                    else:
                        self._unnamed = analysis
                        step.sent += 1
                elif t == F_DESCRIBE or t == F_CLOSE:
                    kind, name = wire.parse_target(buf[s + 5 : e])
                    if kind == _STATEMENT_KIND and name:
                        if t == F_CLOSE:
                            # Statements stay prepared on the server for other clients;
                            # the client's name is forgotten and CloseComplete is its answer.
                            self.stmts.pop(name, None)
                            out.append(buf[run:s])
                            run = e
                            server.add_edit(step, step.sent, wire.CLOSE_COMPLETE)
                            continue
                        st = self.stmts.get(name)
                        if st is not None:
                            run = self._use_statement(step, st, out, buf, run, s)
                            out.append(buf[run:s])
                            out.append(wire.build_target(F_DESCRIBE, kind, st.server_name))
                            run = e
                    step.sent += 2 if (t == F_DESCRIBE and kind == _STATEMENT_KIND) else 1
                elif t == F_QUERY:
                    if query_analysis is None:  # a Query that closes an open extended group
                        query_analysis = self._query_analysis(buf, s, e)
                    analysis, query_analysis = query_analysis, None
                    self._note_analysis(step, analysis)
                    if step.sent == 0 and (analysis.executes or analysis.effects) and self._sql_statements_used(analysis):
                        run = self._prepare_sql(server, analysis, step, out, buf, run, s)
                    step.closed = True
                    self._open = step = None
            except wire.ProtocolViolation:
                # A body the proxy cannot read goes to the server unchanged: PostgreSQL
                # answers it (ERROR 08P01) and skips to the Sync, as without the proxy.
                if t == F_QUERY:
                    step.closed = True
                    self._open = step = None
                else:
                    step.sent += 1
                continue
            if t == F_COPY_DONE or t == F_COPY_FAIL:
                self._copy_done = True
            elif t == F_FLUSH and step is not None:
                step.left_open = True  # the group stays open, its replies out: see _leaves_replica
            elif t == F_FUNCTION_CALL:
                step.writes = True
                step.closed = True
                self._open = step = None
            elif t == F_TERMINATE:
                out.append(buf[run:s])
                run = e
                self._flush_out(server, out, buf, run, s)
                self.close("client sent Terminate")
                return None
        end = frames[stop][1] if stop is not None else frames[-1][2]
        self._flush_out(server, out, buf, run, end)
        if self._open is not None:
            self._open.left_open = True  # the rest of its group comes later: see _leaves_replica
        return stop

    def _leaves_replica(self, step: Step, buf: bytes, t: int, s: int, e: int) -> bool:
        """The Query, Parse or Bind at `s` needs the primary, and the group it would join
        is open on a replica with nothing gone wrong in it yet."""
        if self.backend is None or self.backend.role is not Role.REPLICA or step.error is not None or self.pins:
            return False
        try:
            analysis = self._message_analysis(buf, t, s, e)
        except wire.ProtocolViolation:
            return False
        if analysis is None:
            return False
        facts = self._unit_facts([analysis], False)
        return facts.writes or facts.hint is Role.PRIMARY

    def _query_analysis(self, buf: bytes, s: int, e: int) -> Analysis:
        try:
            return self._classify(wire.parse_query(buf[s + 5 : e]))
        except wire.ProtocolViolation:
            return MALFORMED

    def _message_analysis(self, buf: bytes, t: int, s: int, e: int) -> Analysis | None:
        """The analysis of the statement a Query, Parse or Bind at `s` runs."""
        if t == F_QUERY:
            analysis = self._classify(wire.parse_query(buf[s + 5 : e]))
        elif t == F_PARSE:
            analysis = self._classify(wire.parse_parse(buf[s + 5 : e])[1])
        else:
            name = wire.parse_bind_names(buf[s + 5 : e])[1]
            st = self.stmts.get(name) if name else None
            analysis = st.analysis if st is not None else None
        return analysis

    def _own_answer(self, analysis: Analysis) -> local.Answer | None:
        """The proxy's answer to a Query with pgsplit statements, else None. In a failed
        transaction the server answers (with "current transaction is aborted")."""
        own = [eff for eff in analysis.effects if eff.kind.startswith("pgsplit_")]
        if not own or self.status == TX_FAILED:
            return None
        if len(own) != analysis.statements:
            return local.Answer(error=commands.NotAlone(
                "pgsplit commands (SET/RESET/SHOW pgsplit.*) must be sent as statements of their own"))
        return self.app.commands.evaluate(self, own)

    def _keep_for_retry(self, step: Step, buf: bytes, frames: list, first: int) -> None:
        """More messages of an open retry-able unit (sent after a Flush): keep them too."""
        end = frames[self._unit_last(frames, first)][2]
        step.retry += buf[frames[first][1] : end]
        if len(step.retry) > RETRY_MAX_BYTES:
            step.retry = None

    def _flush_out(self, server: ServerConnection, out: list[bytes], buf: bytes, run: int, end: int) -> None:
        if not out:
            if run == 0 and end == len(buf):
                server.send(buf)
            elif end > run:
                server.send(buf[run:end])
            return
        if end > run:
            out.append(buf[run:end])
        server.send(b"".join(out))

    def _register(self, step: Step, name: bytes) -> bytes:
        """`name`'s Parse goes out next in `step`. Returns the Closes to write just before
        it: the least recently used statements beyond the connection's bound
        (`pool.max_prepared_statements`), their CloseCompletes dropped."""
        prepared = self.server.prepared
        closes = b""
        if len(prepared) >= prepared.limit:
            closes = self._close_oldest(step)
        prepared.add(name)
        if step.parses is None:
            step.parses = []
        step.parses.append((step.sent, name))
        return closes

    def _close_oldest(self, step: Step) -> bytes:
        server = self.server
        out = []
        if step.closes is None:
            step.closes = []
        for name in server.prepared.make_room():
            out.append(_close(name))
            server.add_edit(step, step.sent, None)
            step.closes.append((step.sent, name))  # (an error before it: still prepared)
            step.sent += 1
        return b"".join(out)

    def _use_statement(self, step: Step, st: Stmt, out: list[bytes], buf: bytes, run: int, s: int) -> int:
        """`st` is used by the message at `s`: prepared here first if the connection does
        not have it, else marked as used last. Returns the new start of the unchanged run."""
        prepared = self.server.prepared
        if st.server_name in prepared:
            prepared.move_to_end(st.server_name)
            return run
        self._inject_parse(step, st, out, buf, run, s)
        return s

    def _inject_parse(self, step: Step, st: Stmt, out: list[bytes], buf: bytes, run: int, s: int) -> None:
        """Prepare a statement the client made elsewhere, just before its first use here;
        the ParseComplete it causes is dropped (an anchor), a failure reaches the client
        where its Bind/Describe would have failed."""
        out.append(buf[run:s])
        out.append(self._prepare_here(step, st))
        out.append(st.parse)

    def _prepare_here(self, step: Step, st: Stmt) -> bytes:
        """Account for `st`'s Parse going out in `step` ahead of its use: its
        ParseComplete is dropped, the name is prepared on this connection. Returns the
        Closes to write just before the Parse (`_register`)."""
        closes = self._register(step, st.server_name)
        self.server.add_edit(step, step.sent, None)
        step.sent += 1
        return closes

    def _note_analysis(self, step: Step, analysis: Analysis) -> None:
        if analysis.route is _WRITE or analysis.tx is TxControl.BEGIN:
            step.writes = True
        if (analysis.effects or analysis.pins or analysis.unpins or analysis.tx is not None
                or analysis.mentions_sync_commit):
            if step.analyses is None:
                step.analyses = []
            step.analyses.append(analysis)

    def _prepare_sql(self, server: ServerConnection, analysis: Analysis, step: Step, out: list[bytes],
                     buf: bytes, run: int, s: int) -> int:
        """SQL EXECUTE (in a Query, or in a Parse) of a statement the client PREPAREd on
        another connection: prepare it here first, in a step of the proxy's own placed
        just before the client's, its bytes just before the message at `s`. Returns the
        new start of the unchanged run."""
        for name in self._sql_statements_used(analysis):
            text = self.sql_prepared.get(name)
            if text is None or server.sql_prepared.get(name) == text:
                continue
            sql = (f'DEALLOCATE "{name}";\n' if name in server.sql_prepared else "") + text
            prepare = SwallowStep()
            server.steps.insert(server.steps.index(step), prepare)
            out.append(buf[run:s])
            out.append(wire.query(sql))
            run = s
            server.sql_prepared[name] = text
        return run

    def _sql_statements_used(self, analysis: Analysis) -> tuple[str, ...]:
        """The client's SQL-prepared statements that `analysis` runs (EXECUTE), or names
        again (PREPARE of a name it has: PostgreSQL refuses it with 42P05, DEALLOCATE):
        the server connection must have them, as the client's own server would."""
        names = analysis.executes
        for eff in analysis.effects:
            if eff.kind in ("prepare", "deallocate") and eff.name in self.sql_prepared:
                names += (eff.name,)
        return names

    def _local_statement_error(self, buf: bytes, s: int) -> int | None:
        self.fail(ProtocolViolation("a pgsplit command cannot be prepared together with other statements"))
        return None

    # --- replies -------------------------------------------------------------------------

    def unit_ready(self, server: ServerConnection, step: Step) -> None:
        """Called by the server connection at the ReadyForQuery that ends a step."""
        self.status = step.status
        if step.kind is _FORWARD:
            self._record(step.backend, step.role, "write" if step.writes else "read", perf_counter() - step.t0)
            if (step.writes or step.analyses or step.status != TX_IDLE or self._tx_wrote or self._tx_effects
                    or self._tx_failed):
                self._after_unit(step)
            if step.retrying:
                self._retry(server, step)
                return
        self._settle(server)

    def _settle(self, server: ServerConnection) -> None:
        """Nothing more in flight on the attached connection: give it back if the session
        is idle, and go on with the bytes that waited."""
        if server is not self.server or server.steps or self._open is not None:
            return
        if self.status == TX_IDLE and not self.pins and self._routing is None:
            self._release()
        self.resume()

    def _after_unit(self, step: Step) -> None:
        status = step.status
        ok = step.error is None
        if step.writes and step.role == "primary":
            self._tx_wrote = True
        if step.analyses and any(a.mentions_sync_commit for a in step.analyses):
            self._tx_async = True
        if status == TX_IDLE and self._tx_wrote:
            # A unit or transaction that wrote has ended (committed, or rolled back: a
            # token that covers a rollback costs one LSN fetch, a missing one a stale read).
            self._tx_wrote = False
            self._note_commit()
        if status == TX_FAILED:
            self._tx_failed = True
        analyses = step.analyses
        if analyses:
            in_tx = status != TX_IDLE
            for a in analyses:
                if ok:
                    for u in a.unpins:
                        self._unpin(u)
                    self.pins |= a.pins
                if a.effects:
                    if in_tx:
                        a = self._apply_untransactional(a, ok)
                        if a.effects:
                            self._tx_effects.append((a, ok))
                    elif ok:
                        self._apply_effects(a, self.server)
        if status == TX_IDLE and (self._tx_effects or self._tx_failed):
            committed = ok and not self._tx_failed and not any(
                a.tx is TxControl.ROLLBACK for a in (analyses or ()))
            if committed:
                for a, a_ok in self._tx_effects:
                    if a_ok:
                        self._apply_effects(a, self.server)
            self._tx_effects = []
            self._tx_failed = False

    def _note_commit(self) -> None:
        self.commit_async = self._tx_async or (
            self.async_commit if self.async_commit is not None else self.async_default)
        self._tx_async = False
        self.commit_pending = True
        self.commit_ticket = self.app.lsn_fetcher.ticket()
        self.commit_time = self.transport.get_extra_info("loop", None) and 0.0 or asyncio.get_running_loop().time()

    def _unpin(self, unpin: Unpin) -> None:
        if unpin is Unpin.DISCARD_ALL:
            self.pins.clear()
        elif unpin is Unpin.UNLISTEN_ALL:
            self.pins.discard(Pin.LISTEN)
        elif unpin is Unpin.ADVISORY_UNLOCK_ALL:
            self.pins.discard(Pin.ADVISORY_LOCK)
        elif unpin is Unpin.DISCARD_TEMP:
            self.pins.discard(Pin.TEMP_TABLE)
        elif unpin is Unpin.CLOSE_ALL:
            self.pins.discard(Pin.HOLD_CURSOR)

    def _apply_untransactional(self, analysis: Analysis, ok: bool) -> Analysis:
        """PREPARE and DEALLOCATE inside a transaction hold whether it commits or not:
        applied now. Returns the analysis with the effects that wait for the commit."""
        now = [eff for eff in analysis.effects if eff.kind in _UNTRANSACTIONAL]
        if not now:
            return analysis
        if ok:
            self._apply_effects(replace(analysis, effects=tuple(now)), self.server)
        return replace(analysis, effects=tuple(eff for eff in analysis.effects if eff.kind not in _UNTRANSACTIONAL))

    def _apply_effects(self, analysis: Analysis, server: ServerConnection | None) -> None:
        """The session effects of statements that succeeded: run by `server`, or answered
        here (None), when only the proxy's side of the session changes."""
        changed = False
        # What `server` carries on top of its own login values: a RESET puts it
        # back at those, not at the values this client logged in with (replayed as SETs).
        on_server = dict(self.settings)
        for eff in analysis.effects:
            kind = eff.kind
            if kind == "set" and eff.name:
                if eff.name in _RESETS_ROLE:
                    self.settings.pop("role", None)  # SET SESSION AUTHORIZATION resets the role
                    on_server.pop("role", None)
                self.settings[eff.name] = on_server[eff.name] = eff.text
                changed = True
                if eff.name == "default_transaction_read_only":
                    self.default_read_only = (eff.value or "").lower() in ("on", "true", "1", "yes")
                elif eff.name == "synchronous_commit":
                    # A value that is not a plain constant (DEFAULT) counts as off: the
                    # insert position covers either kind of commit.
                    self.async_commit = (eff.value or "off").lower() in ("off", "false", "0", "no")
            elif kind == "reset" and eff.name:
                if eff.name in _RESETS_ROLE:
                    self.settings.pop("role", None)
                    on_server.pop("role", None)
                on_server.pop(eff.name, None)
                startup = self.startup_settings.get(eff.name)
                if startup is None:
                    self.settings.pop(eff.name, None)
                else:
                    self.settings[eff.name] = startup
                changed = True
                if eff.name == "default_transaction_read_only":
                    self.default_read_only = False
                elif eff.name == "synchronous_commit":
                    self.async_commit = self._startup_async_commit
            elif kind in ("reset_all", "discard_all"):
                # RESET ALL keeps the role and session authorization; DISCARD ALL does not
                kept = {} if kind == "discard_all" else {
                    k: v for k, v in self.settings.items() if k in _NOT_RESET_BY_ALL}
                on_server.clear()
                on_server.update(kept)
                self.settings = dict(self.startup_settings)
                self.settings.update(kept)
                self.default_read_only = False
                self.async_commit = self._startup_async_commit
                changed = True
                if kind == "discard_all":
                    self.stmts.clear()
                    self.sql_prepared.clear()
                    self.sql_prepared_analysis.clear()
                    if server is not None:
                        server.forget_statements()
            elif kind == "prepare" and eff.name:
                self.sql_prepared[eff.name] = eff.text
                if server is not None:
                    server.sql_prepared[eff.name] = eff.text
                inner = self.app.classifier.classify(eff.text)
                self.sql_prepared_analysis[eff.name] = inner
            elif kind == "deallocate" and eff.name:
                self.sql_prepared.pop(eff.name, None)
                self.sql_prepared_analysis.pop(eff.name, None)
                if server is not None:
                    server.sql_prepared.pop(eff.name, None)
            elif kind == "deallocate_all":
                self.sql_prepared.clear()
                self.sql_prepared_analysis.clear()
                if server is not None:
                    server.forget_statements()
        if changed:
            self._settings_changed()
            if server is not None:
                # The server ran them itself; where that left it other than the session's
                # settings, the next unit that gets it (this session's too) replays them.
                server.settings_key = tuple(sorted(on_server.items()))

    def _retry(self, server: ServerConnection, step: Step) -> None:
        """A replica refused an autocommit read (read-only or recovery conflict) before
        anything reached the client: run it again on the primary."""
        self.app.metrics.retries.labels(reason=step.retry_reason or "?").inc()
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
        in_tx = self.status != TX_IDLE or self._open is not None
        first = pending[0] if pending else None
        self._detach(server)
        self.owned.pop(server.backend, None)
        pool.discard(server)
        if self.state is not State.READY:
            return
        if (first is not None and first.retry is not None and not first.rows_out and len(pending) == 1
                and not self._tx_effects and self.status == TX_IDLE):
            # A read that could run elsewhere: it does if the backend failed. One lost
            # connection is not that (the unit may have ended its own server, or someone
            # terminated this one): the monitor checks the backend first, so such a unit
            # neither runs again on every backend in turn nor takes them out of rotation.
            backend = self.app.topology.current.backend(server.backend)
            if backend is not None and not backend.up:
                self._retry_lost_read(server.backend, first)
            else:
                self._routing = self.app.spawn(self._check_lost_read(server.backend, server.lost_reason, first))
            return
        self._lost_units(server.backend, server.lost_reason, pending, in_tx)

    def _retry_lost_read(self, backend: str, step: Step) -> None:
        log.info("server %s lost during a read; retrying it elsewhere", backend)
        self.app.metrics.retries.labels(reason="server_lost").inc()
        self._requeue(step.retry)
        self._retry_skip = step.delivered
        self.resume()

    async def _check_lost_read(self, backend: str, reason: str | None, step: Step) -> None:
        """The client's bytes wait in the stash (as while routing) until the check says."""
        try:
            failed = not await self.app.check_backend(backend)
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
        if self.pins:
            # What the session kept on that server (temporary tables, LISTEN, advisory
            # locks, WITH HOLD cursors) is gone: carrying on elsewhere would hide that.
            error = ServerLost(f"{lost}; this session's server-side state (temporary tables, LISTEN, "
                               "advisory locks, WITH HOLD cursors) is gone with it")
            error.fatal = True
            self.fail(error)
            return
        if pending:
            # Each unit in flight gets its error and its ReadyForQuery, in order. A write's
            # outcome is unknown: it may have committed before the connection went.
            ready = wire.ready_for_query(TX_IDLE)
            self.transport.write(b"".join(ServerLost(
                f"{lost} while a write was in flight; its outcome is unknown: it may or may not have committed"
                if s.writes else f"{lost} during the query").to_wire() + ready for s in pending))
            self.status = TX_IDLE
        self.resume()

    def cancel(self) -> asyncio.Task | None:
        """A CancelRequest with this session's key arrived: cancel this client's unit in
        flight, if any (nothing in flight, or only the proxy's own requests: dropped).
        Returns the task that sends it to the server."""
        server = self.server
        if server is None or not any(step.kind is _FORWARD for step in server.steps):
            return None
        return self.app.spawn(server.pool.cancel(server))

    # --- answered by the proxy itself ----------------------------------------------------

    def _answer_locally(self, buf: bytes, frames: list, analyses: list[Analysis]) -> bool | None:
        """Units the proxy answers without a server: pgsplit commands, a BEGIN whose
        routing waits for the transaction's first statement, standalone DEALLOCATE."""
        if MALFORMED in analyses:
            return False  # the server answers it, as it would without the proxy
        if frames[0][0] == F_PARSE and self._prepare_locally(buf, frames):
            return True
        for a in analyses:
            if a.effects or a.tx is not None:
                return self.app.commands.answer(self, buf, frames, analyses)
        return False

    def register_statement(self, name: bytes, sql: bytes, params: bytes) -> Stmt:
        """Remember a named statement the client prepared; servers get it when needed."""
        sname = server_statement_name(sql, params)
        st = self.stmts[name] = Stmt(sname, wire.build_parse(sname, sql, params), self._classify(sql))
        return st

    def _prepare_locally(self, buf: bytes, frames: list) -> bool:
        """Named Parses and a Sync, nothing else: the statements are remembered and
        prepared on a server when first used (as PgBouncer does). No server connection
        is held for them: a client that prepares synchronously while other clients of
        the same thread hold the pool's connections (pgbench -M prepared) cannot
        deadlock on the pool."""
        if frames[-1][0] != F_SYNC or len(frames) < 2:
            return False
        parses = []
        for t, s, e in frames[:-1]:
            if t != F_PARSE:
                return False
            name, sql, params = wire.parse_parse(buf[s + 5 : e])
            if not name or not wire.param_types_ok(params):
                return False  # (a malformed one is the server's to refuse)
            parses.append((name, sql, params))
        for name, sql, params in parses:
            if any(eff.kind.startswith("pgsplit_") for eff in self._classify(sql).effects):
                return False  # answered by the proxy on each execution, see Commands
        for name, sql, params in parses:
            self.register_statement(name, sql, params)
        self.transport.write(wire.PARSE_COMPLETE * len(parses) + wire.ready_for_query(self.status))
        return True

    def write_local(self, reply: bytes) -> None:
        self.transport.write(reply)
