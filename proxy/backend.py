"""One connection to a backend server: login, then a response stream cut into steps.

Owns: the startup/authentication exchange with a backend, and the reply side of the hot
path. Every request group the proxy sends (a client's unit, or something the proxy injects
itself) has a Step in `steps`, in send order; replies arrive strictly in that order, and a
ReadyForQuery ends the step at the head. A FORWARD step's replies stream to the client it
belongs to, framed (type byte + length) but not decoded; a SWALLOW step's replies are the
proxy's own business (settings replay, control queries) and never reach a client.

Inside a FORWARD step the proxy may have dropped a client message (a Parse of a statement
the server already has: the client still expects ParseComplete) or injected one (a Parse of
a statement the client prepared on another connection: its ParseComplete must not reach the
client). Both are anchored to a reply position: replies are counted by "completions" (one
per Parse/Bind/Close/Execute/Describe-portal, two per Describe-statement) so the position
is known exactly, even when the anchor is added while replies already flow.

Must not know: routing, pools, the client's protocol state.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from proxy import wire
from proxy.auth import BackendAuth
from proxy.errors import ConnectionFailure, ProxyError, ServerError
from proxy.prepared import PreparedStatements

if TYPE_CHECKING:  # pragma: no cover
    from proxy.session import ClientSession

log = logging.getLogger("pgsplit.backend")

# Errors of a replica after which a read runs elsewhere: 25006 read-only transaction,
# 40001 recovery conflict, 57P01/57P02/57P03 shutting down, crashed, not accepting.
RETRYABLE = frozenset({"25006", "40001", "57P01", "57P02", "57P03"})

# Replies that need more than framing inside a FORWARD step.
SPECIAL = bytearray(256)
for _t in (wire.B_ERROR, wire.B_PARAMETER_STATUS, wire.B_COPY_IN, wire.B_NOTIFICATION):
    SPECIAL[_t] = 1
SPECIAL = bytes(SPECIAL)

# Replies that complete one request (see module docstring); ErrorResponse is handled apart.
COMPLETES = bytearray(256)
for _t in b"123CIstTn":
    COMPLETES[_t] = 1
COMPLETES = bytes(COMPLETES)

_Z, _E, _S, _D, _G = wire.B_READY, wire.B_ERROR, wire.B_PARAMETER_STATUS, wire.B_DATA_ROW, wire.B_COPY_IN
_A = wire.B_NOTIFICATION

# A client's named statement as the servers know it (proxy.session.server_statement_name).
_SERVER_STATEMENT = re.compile(rb"pgsplit_[0-9a-f]{20}")
# Where PostgreSQL raises "cached plan must not change result type" (0A000; the routine
# field is never translated): the statement fails so until it is prepared again.
_STALE_PLAN_ROUTINE = "RevalidateCachedQuery"


class StepKind(enum.Enum):
    FORWARD = "forward"  # replies go to the client
    SWALLOW = "swallow"  # replies are the proxy's own
    LOCAL = "local"  # no server round trip: the proxy's own answer, emitted in order


class Step:
    """The replies to one request group, up to and including its ReadyForQuery.

    One is built per unit of work, so it sets only what differs from the class defaults
    (no __slots__: an instance dict with two entries is cheaper to build than 20 slots).
    """

    # Reply accounting
    done = 0  # completions received
    sent = 0  # completions requested so far
    anchors: list[tuple[int, bytes | None]] | None = None  # (index, bytes to insert | None = drop)
    regs: list[tuple[int, bytes]] | None = None  # statements this step prepares, at their index
    closes: list[tuple[int, bytes]] | None = None  # statements this step closes (the bound), at their index
    error: dict[str, str] | None = None
    status = 0
    extended = False  # closed by Sync rather than Query
    closed = False  # its Sync/Query has been sent
    wrote = False  # some reply already reached the client
    rows_seen = False
    rows_out = False  # a DataRow reached the client (retry-able steps only): no retry then
    retry: bytes | None = None  # the unit's bytes, kept to re-send it elsewhere
    retrying = False
    quiet_ready = False  # its ReadyForQuery answers a Sync of the proxy's own: not forwarded
    left_open = False  # a Flush in it, or a read ended before its end: the group goes on later
    delivered = 0  # bytes of replies that reached the client (retry-able steps only)
    skip = 0  # a retried unit's leading reply bytes the client already has
    rows: list[bytes] | None = None  # SWALLOW: DataRow bodies kept when asked
    lsn = 0  # SWALLOW: the LSN a replay check waits for
    payload = b""  # LOCAL: the answer to emit (its ReadyForQuery is added then)
    callback: Callable[["Step"], None] | None = None
    server: "ServerConnection | None" = None  # SWALLOW: the connection, for a callback that needs it
    # The unit of work a FORWARD step answers (set by the session)
    backend = ""
    role = ""
    writes = False
    t0 = 0.0
    analyses: list | None = None  # analyses with effects, pins or transaction control

    def __init__(self, kind: StepKind, callback: Callable[["Step"], None] | None = None):
        self.kind = kind
        if callback is not None:
            self.callback = callback


_FORWARD = StepKind.FORWARD
# The settings_key of a connection whose settings no session can rely on (a settings replay
# failed, and was undone as a whole): the next unit there replays its own.
UNKNOWN_SETTINGS = (("", "unknown"),)


class ServerConnection(asyncio.Protocol):
    """A logged-in server connection; lent to one client session at a time."""

    lost_reason: str | None = None  # why the proxy cut it (its client is told)

    def __init__(self, backend: str, host: str, port: int, user: str, database: str):
        self.backend = backend
        self.host = host
        self.port = port
        self.user = user
        self.database = database
        self.transport: asyncio.Transport | None = None
        self.client: ClientSession | None = None
        self.steps: deque[Step] = deque()
        self.params: dict[str, str] = {}
        self.process_id = 0
        self.secret_key = b""
        self.status = wire.TX_IDLE
        self.prepared = PreparedStatements()  # server-side names of statements prepared here
        self.sql_prepared: dict[str, str] = {}  # SQL PREPARE name -> statement text
        self.settings_key: tuple = ()  # the client settings this connection carries
        self.created = time.monotonic()
        self.last_used = self.created
        self.generation = 0
        self.closed = False
        self.copy_in_absorb = False  # an extended COPY swallowed the Sync sent after Execute
        self.cancels = 0  # cancel requests for it in flight (proxy.pool.Pool.cancel)
        self.last_client_pid = 0  # the pid the client it was last lent to was given
        self.release_after_cancel = False  # given back while one was: back in the pool after it
        self.ahead = b""  # requests swallowed `ahead`, written with the next `send`
        self.after_sync = b""  # requests to write right behind the open unit's Sync (see send)
        self.pool = None  # the pool that owns it (proxy.pool sets it)
        self.on_lost: Callable[["ServerConnection", Exception | None], None] | None = None
        self._held = b""
        self._skip = 0
        self._login: asyncio.Future | None = None
        self._framer: wire.Framer | None = None
        self._auth: BackendAuth | None = None
        self._login_error: dict[str, str] | None = None

    # --- login -----------------------------------------------------------------------

    async def login(self, password: str | None, params: dict[str, str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._login = loop.create_future()
        self._framer = wire.Framer()
        self._auth = BackendAuth(self.user, password)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: self, self.host, self.port)
                startup = {"user": self.user, "database": self.database, **params}
                self.transport.write(wire.startup_message(startup))
                await self._login
        except TimeoutError:
            self.close()
            raise ConnectionFailure(
                f"could not connect to backend {self.backend} ({self.host}:{self.port}): timeout after {timeout:g}s"
            ) from None
        except OSError as exc:
            self.close()
            raise ConnectionFailure(
                f"could not connect to backend {self.backend} ({self.host}:{self.port}): {exc.strerror or exc}"
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            self._framer = None
            self._auth = None
        self._login = None

    def _login_received(self, data: bytes) -> None:
        fut = self._login
        try:
            for t, body in self._framer.feed(data):
                if t == wire.B_AUTH:
                    code, payload = wire.parse_auth(body)
                    reply = self._auth.respond(code, payload)
                    if reply:
                        self.transport.write(reply)
                elif t == _S:
                    name, value = wire.parse_parameter_status(body)
                    self.params[name] = value
                elif t == wire.B_BACKEND_KEY:
                    self.process_id, self.secret_key = wire.parse_backend_key(body)
                elif t == _E:
                    raise ServerError(wire.parse_fields(body), fatal=True)
                elif t == _Z:
                    self.status = body[0]
                    rest = self._framer.take_rest()
                    if not fut.done():
                        fut.set_result(None)
                    if rest:  # nothing should follow, but never lose bytes
                        self._login = None
                        self.data_received(rest)
                    return
                # NoticeResponse and NegotiateProtocolVersion need no answer here.
        except (ProxyError, wire.ProtocolViolation, ValueError) as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, ProxyError) else ProxyError(str(exc)))

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._login is not None and not self._login.done():
            self._login.set_exception(
                ConnectionFailure(f"backend {self.backend} closed the connection during login")
            )
            return
        if not was_closed and self.on_lost is not None:
            self.on_lost(self, exc)
        for step in self.steps:
            if step.kind is StepKind.SWALLOW and step.callback is not None:
                step.error = step.error or {"C": "08006", "M": f"server connection to {self.backend} lost"}
                step.status = 0
                step.callback(step)
        client = self.client
        pending = [s for s in self.steps if s.kind is StepKind.FORWARD]
        self.steps.clear()
        if client is not None:
            client.server_lost(self, exc, pending)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(wire.TERMINATE)
            except Exception:  # pragma: no cover - already broken
                pass
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- requests ----------------------------------------------------------------------

    def push(self, step: Step) -> None:
        """Queue a step whose request bytes the caller writes (or has written)."""
        steps = self.steps
        steps.append(step)
        if step.kind is StepKind.LOCAL and len(steps) == 1:
            self._run_locals()

    def swallow(self, request: bytes, callback: Callable[[Step], None] | None = None, *, rows: bool = False,
                ahead: bool = False, written: bool = False) -> Step:
        """Send a request of the proxy's own; its replies never reach a client. `ahead`:
        it prepares the unit about to be sent, and goes out with it in one write (`send`).
        `written`: the caller wrote it already, behind the unit just queued, in that
        unit's write."""
        step = Step(StepKind.SWALLOW, callback)
        step.closed = True
        if rows:
            step.rows = []
        self.steps.append(step)
        if ahead:
            self.ahead += request
        elif not written:
            self.send(request)
        return step

    def forget_statements(self) -> None:
        """The server session dropped every prepared statement (a client's DISCARD ALL or
        DEALLOCATE ALL ran here): each is prepared again when next needed, other clients'
        included."""
        self.prepared.clear()
        self.sql_prepared.clear()

    def drop_sql_statements(self) -> None:
        """The connection goes back to its pool: the statements a client PREPAREd here in
        SQL are that client's (another one could EXECUTE them, or fail to PREPARE its own
        under the same name). A DEALLOCATE of each is queued `ahead`, so it goes out in
        the next borrower's first write, before its unit; the client that prepared them
        prepares them again where it needs them."""
        for name in self.sql_prepared:
            self.swallow(wire.query('DEALLOCATE "' + name.replace('"', '""') + '"'), ahead=True)
        self.sql_prepared.clear()

    def send(self, data: bytes) -> None:
        """Write requests; those swallowed `ahead` go first, in the same write (one
        syscall, and the server reads them together). Every write of requests comes
        here, so the bytes keep the order of the steps."""
        if self.ahead:
            ahead, self.ahead = self.ahead, b""
            if self.after_sync:
                data = self._behind_sync(data)
            data = ahead + data
        self.transport.write(data)

    def _behind_sync(self, data: bytes) -> bytes:
        """`after_sync` goes right behind the first Sync in `data` (the open unit's own),
        or waits for a later write (`ahead` holds a Flush, harmless, to be called again)."""
        try:
            frames, _ = wire.split_messages(data, valid_types=wire.FRONTEND_TYPES)
        except wire.ProtocolViolation:  # a long CopyData's rest: no Sync in it
            frames = []
        for t, _s, e in frames:
            if t == wire.F_SYNC:
                data, self.after_sync = data[:e] + self.after_sync + data[e:], b""
                return data
        self.ahead = wire.FLUSH
        return data

    def add_anchor(self, step: Step, index: int, insert: bytes | None) -> None:
        """Drop the reply completing `index` (insert=None), or insert bytes before it."""
        if step.anchors is None:
            step.anchors = []
        step.anchors.append((index, insert))
        if insert is not None and step.done == index and self.steps and self.steps[0] is step:
            # Everything before it has been answered: the client may be waiting (Flush).
            self._emit_inserts(step)

    def _emit_inserts(self, step: Step) -> None:
        anchors = step.anchors
        while anchors and anchors[0][0] == step.done and anchors[0][1] is not None:
            self._to_client(anchors.pop(0)[1], step)

    # --- replies -----------------------------------------------------------------------

    def _to_client(self, data: bytes, step: Step) -> None:
        client = self.client
        if client is not None and data:
            if step.retry is not None:
                step.delivered += len(data)
                step.rows_out = step.rows_seen  # rows seen so far are in these bytes
            if step.skip:  # a retried unit: the client already has these bytes
                cut = min(step.skip, len(data))
                step.skip -= cut
                data = data[cut:]
                if not data:
                    return
            step.wrote = True
            client.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._login is not None:
            self._login_received(data)
            return
        if self._held:
            data = self._held + data
            self._held = b""
        n = len(data)
        pos = self._skip
        steps = self.steps
        if not steps:
            self._unsolicited(data, pos)
            return
        step = steps[0]
        if pos >= n:  # all of it continues one long message
            self._skip = pos - n
            if step.kind is StepKind.FORWARD and not step.retrying:
                self._to_client(data, step)
            return
        self._skip = 0
        emit = 0  # data[emit:pos] still to be forwarded (FORWARD) or dropped (SWALLOW)
        while True:
            if pos + 5 > n:
                break
            t = data[pos]
            end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if step.kind is _FORWARD:
                if t == _Z:
                    if end > n:
                        break
                    if step.anchors:
                        if emit < pos and not step.retrying:
                            self._to_client(data[emit:pos], step)
                        emit = pos
                        self._emit_inserts(step)
                    if not step.retrying:
                        if step.quiet_ready:
                            if emit < pos:
                                self._to_client(data[emit:pos], step)
                        else:
                            self._to_client(data[emit:end] if emit or end != n else data, step)
                    emit = pos = end
                    self.status = step.status = data[end - 1]
                    steps.popleft()
                    client = self.client
                    if client is not None:
                        client.unit_ready(self, step)
                    step = self._next_step(data, pos, n)
                    if step is None:
                        return
                    continue
                if step.anchors or SPECIAL[t]:
                    if end > n:
                        break
                    if t == _E and step.retry is not None and self._refused(step, data, pos, end):
                        emit = pos = end  # the replies so far are dropped with it
                        continue
                    if emit < pos and not step.retrying:
                        self._to_client(data[emit:pos], step)
                    emit = pos
                    if self._forward_special(step, t, data, pos, end):
                        emit = end  # dropped
                elif end > n:
                    break  # an ordinary message cut short: streamed through below
                elif t == _D:
                    step.rows_seen = True
                else:
                    step.done += COMPLETES[t]
            else:  # SWALLOW: keep what the proxy asked for, drop the rest
                if end > n:
                    break
                if t == _Z:
                    self.status = step.status = data[end - 1]
                    steps.popleft()
                    emit = pos = end
                    if step.callback is not None:
                        step.callback(step)
                    step = self._next_step(data, pos, n)
                    if step is None:
                        return
                    continue
                self._swallowed(step, t, data[pos + 5 : end])
                emit = end
            pos = end
        # Out of complete messages: forward or drop what precedes the incomplete one.
        if step.kind is StepKind.FORWARD and not step.retrying:
            if pos + 5 <= n and data[pos] not in (_Z, _E, _S, _G, _A) and not step.anchors and step.retry is None:
                # An ordinary message cut short (a big DataRow, or a read that ended
                # mid-message): what has come goes through now, the rest as it arrives.
                self._to_client(data[emit:] if emit else data, step)
                self._skip = end - n
                if data[pos] == _D:
                    step.rows_seen = True
                else:
                    step.done += COMPLETES[data[pos]]
                return
            if emit < pos:
                self._to_client(data[emit:pos], step)
        self._held = data[pos:]

    def _next_step(self, data: bytes, pos: int, n: int) -> Step | None:
        """After a ReadyForQuery: the proxy's own answers queued next go out now; None
        when nothing is in flight any more (what is left of `data` is unsolicited)."""
        steps = self.steps
        if steps and steps[0].kind is StepKind.LOCAL:
            self._run_locals()
        if steps:
            return steps[0]
        if pos < n:
            self._unsolicited(data[pos:], 0)
        return None

    def _forward_special(self, step: Step, t: int, data: bytes, pos: int, end: int) -> bool:
        """Slow path for a message inside a FORWARD step. Returns True if it is dropped."""
        anchors = step.anchors
        if anchors:
            self._emit_inserts(step)
        if t == _E:
            body = data[pos + 5 : end]
            renamed = self._client_names(body) if b"pgsplit_" in body else None
            fields = wire.parse_fields(renamed or body)
            if step.error is None:
                step.error = fields
            if anchors:
                del anchors[:]  # the server skips everything up to Sync
            if step.regs or step.closes:
                self._skipped_statements(step)
            if fields.get("R") == _STALE_PLAN_ROUTINE:
                self._drop_stale_statements()
            if renamed:
                if not step.retrying:
                    self._to_client(wire.message(_E, renamed), step)
                return True
            return step.retrying
        if t == _S:
            name, value = wire.parse_parameter_status(data[pos + 5 : end])
            self.params[name] = value
            return step.retrying
        if t == _A:
            if not step.retrying:
                self._to_client(self._notification(data[pos:end]), step)
            return True
        if t == _G and step.extended and step.closed:
            # COPY FROM STDIN started by Execute: the server ignores the Sync that followed
            # it and answers the Sync sent after CopyDone instead (protocol 55.2.6).
            self.copy_in_absorb = True
        c = COMPLETES[t]
        if c:
            index = step.done
            step.done += 1
            if anchors and anchors[0][0] == index and anchors[0][1] is None:
                anchors.pop(0)
                if anchors:
                    self._emit_inserts(step)
                return True
            if anchors:
                self._emit_after(step, data, pos, end)
                return True
        elif t == _D:
            step.rows_seen = True
        return step.retrying

    def _client_names(self, body: bytes) -> bytes | None:
        """An ErrorResponse that names the proxy's statement (`prepared statement
        "pgsplit_..." does not exist`, a Bind's parameter count...), naming the client's
        own instead, as PostgreSQL would have; None when it names none of the client's.
        (A client that prepared the same text under two names may see either.)"""
        stmts = getattr(self.client, "stmts", None)
        if not stmts:
            return None
        names = {st.server_name: name for name, st in stmts.items()}
        renamed = _SERVER_STATEMENT.sub(lambda m: names.get(m.group(), m.group()), body)
        return renamed if renamed != body else None

    def _drop_stale_statements(self) -> None:
        """A statement's plan no longer gives the result type it was prepared with (a
        column's type changed): the server fails it until it is prepared again, for
        every client that shares it here. The error does not say which statement, so all
        the proxy prepared here are closed and forgotten, and each is prepared again where
        next used (a driver's re-prepare, as asyncpg's, then works). The Closes go behind
        the requests sent so far, or, when the failed unit still owes its Sync (cut at a
        Flush, as asyncpg's Parse/Describe), right behind that Sync."""
        if self.closed or not self.prepared or self.after_sync:
            return
        closes = b"".join(wire.message(wire.F_CLOSE, b"S" + name + b"\0") for name in self.prepared)
        log.info("backend %s: a cached plan changed its result type; %d prepared statement(s) closed there",
                 self.backend, len(self.prepared))
        self.prepared.clear()
        if all(s.closed for s in self.steps):
            self.swallow(closes + wire.SYNC, self._statements_dropped)
            return
        step = Step(StepKind.SWALLOW, self._statements_dropped)
        step.closed = True
        self.steps.append(step)  # the open unit is the last one: nothing follows it yet
        self.after_sync = closes + wire.SYNC
        self.ahead += wire.FLUSH  # so that `send` looks for the Sync

    def _statements_dropped(self, step: Step) -> None:
        # The client's units waited for this step too; go on as after one of theirs.
        if self.client is not None and not self.closed:
            self.client.unit_ready(self, step)

    def _skipped_statements(self, step: Step) -> None:
        """An error in `step`: the server skips the rest of it, so the Parses queued at or
        after it prepared nothing, and the Closes did not close."""
        done = step.done
        for index, name in step.regs or ():
            if index >= done:
                self.prepared.discard(name)
        for index, name in step.closes or ():
            if index >= done:
                self.prepared.add(name)
        step.regs = step.closes = None

    def _refused(self, step: Step, data: bytes, pos: int, end: int) -> bool:
        """A replica's error for a unit that can still run elsewhere: nothing of it has
        reached the client, so it is dropped and the session re-sends the unit."""
        if step.rows_out or step.retrying:
            return False  # (rows only seen, still in this chunk, are dropped with the error)
        step.error = wire.parse_fields(data[pos + 5 : end])
        if step.error.get("C") in RETRYABLE:
            step.retrying = True
            if step.regs or step.closes:
                self._skipped_statements(step)
        return step.retrying

    def _emit_after(self, step: Step, data: bytes, pos: int, end: int) -> None:
        """Forward one completing message, then any inserts anchored right after it."""
        if not step.retrying:
            self._to_client(data[pos:end], step)
        self._emit_inserts(step)

    def _swallowed(self, step: Step, t: int, body: bytes) -> None:
        if t == _E:
            if step.error is None:
                step.error = wire.parse_fields(body)
        elif t == _S:
            name, value = wire.parse_parameter_status(body)
            self.params[name] = value
        elif t == _D and step.rows is not None:
            step.rows.append(body)

    def _run_locals(self) -> None:
        steps = self.steps
        while steps and steps[0].kind is StepKind.LOCAL:
            step = steps.popleft()
            step.status = self.status  # as the units before it left the transaction
            self._to_client(step.payload + wire.ready_for_query(step.status), step)
            if self.client is not None:
                self.client.unit_ready(self, step)

    def _unsolicited(self, data: bytes, pos: int) -> None:
        """Bytes with no step waiting: asynchronous messages (NOTIFY, notices, parameter
        changes) on an idle connection. A pinned session still gets them."""
        buf = data[pos:] if pos else data
        frames, used = wire.split_messages(self._held + buf if self._held else buf)
        whole = self._held + buf if self._held else buf
        self._held = whole[used:]
        for t, s, e in frames:
            if t == _S:
                name, value = wire.parse_parameter_status(whole[s + 5 : e])
                self.params[name] = value
            elif t == _E:
                fields = wire.parse_fields(whole[s + 5 : e])
                log.info("backend %s sent an error outside any query: %s", self.backend, fields.get("M"))
        if self.client is not None and frames:
            out = whole[frames[0][1] : frames[-1][2]]
            if any(t == _A for t, s, e in frames):
                out = b"".join(self._notification(whole[s:e]) if t == _A else whole[s:e] for t, s, e in frames)
            self.client.transport.write(out)

    def _notification(self, message: bytes) -> bytes:
        """A NotificationResponse for the client carries the pid its sender's client was
        given, as it would directly (drivers compare it with their own to tell their own
        notifications apart, or with another connection's): the server connection that
        sent it is this one, or one of the same pool, and the client is the one that used
        it last."""
        pid = int.from_bytes(message[5:9], "big")
        sender = self if pid == self.process_id else self.pool.by_process_id(pid) if self.pool else None
        if sender is None or not sender.last_client_pid:
            return message
        return message[:5] + sender.last_client_pid.to_bytes(4, "big") + message[9:]


async def open_connection(
    backend: str, host: str, port: int, user: str, database: str, password: str | None,
    *, params: dict[str, str] | None = None, timeout: float = 5.0,
) -> ServerConnection:
    conn = ServerConnection(backend, host, port, user, database)
    await conn.login(password, params or {}, timeout)
    return conn


async def send_cancel(host: str, port: int, process_id: int, secret_key: bytes, timeout: float = 5.0) -> None:
    """Send a CancelRequest on a fresh connection (protocol 55.2.8); no reply comes."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(wire.cancel_request(process_id, secret_key))
            await writer.drain()
            await reader.read()  # the server closes the connection when done
        finally:
            writer.close()
