"""The replies of one server connection, cut into steps at ReadyForQuery.

Owns: the kinds of step, the reply loop (`ReplyStream.data_received`, the hot path's
reply side) and what a server connection may call on the session it is lent to
(`StepOwner`). Separate from proxy.server.connection, which logs in and writes requests:
this half only reads replies and hands them on, so it can be read (and tested) as one
loop over one queue.

Every request group the proxy sends (a client's unit, or something the proxy injects
itself) has a step in `steps`, in send order; replies arrive strictly in that order, and
a ReadyForQuery ends the step at the head. A ForwardStep's replies stream to the client it
belongs to, framed (type byte + length) but not decoded; a SwallowStep's replies are the
proxy's own business (settings replay, control queries) and never reach a client; a
LocalStep is the proxy's own answer, emitted when its turn comes.

Inside a ForwardStep the proxy may have dropped a client message (a Parse of a statement
the server already has: the client still expects ParseComplete) or injected one (a Parse
of a statement the client prepared on another connection: its ParseComplete must not
reach the client). Both are edits at a reply position: replies are counted by
"completions" (one per Parse/Bind/Close/Execute/Describe-portal, two per
Describe-statement) so the position is known exactly, even when the edit is added while
replies already flow.

Must not know: routing, pools, the client's protocol state.
"""

from __future__ import annotations

import enum
import logging
import re
from collections import deque
from collections.abc import Mapping
from typing import Any, Callable, Protocol

from proxy import wire

log = logging.getLogger("pgsplit.backend")

# Errors of a replica after which a read runs elsewhere: 25006 read-only transaction,
# 40001 recovery conflict, 57P01/57P02/57P03 shutting down, crashed, not accepting.
RETRYABLE = frozenset({"25006", "40001", "57P01", "57P02", "57P03"})

def _table(types) -> bytes:
    """A lookup table by message type byte: 1 for the given types."""
    table = bytearray(256)
    for t in types:
        table[t] = 1
    return bytes(table)


# Replies that need more than framing inside a ForwardStep.
SPECIAL = _table((wire.B_ERROR, wire.B_PARAMETER_STATUS, wire.B_COPY_IN, wire.B_NOTIFICATION))

# Replies that complete one request (see module docstring); ErrorResponse is handled apart.
COMPLETES = _table(b"123CIstTn")

_Z, _E, _S, _D, _G = wire.B_READY, wire.B_ERROR, wire.B_PARAMETER_STATUS, wire.B_DATA_ROW, wire.B_COPY_IN
_A = wire.B_NOTIFICATION

# A client's named statement as the servers know it (proxy.server.prepared.StatementNames).
_SERVER_STATEMENT = re.compile(rb"pgsplit_[0-9a-f]{20}(?:_[0-9]+)?")
# Where PostgreSQL raises "cached plan must not change result type" (0A000; the routine
# field is never translated): the statement fails so until it is prepared again.
_STALE_PLAN_ROUTINE = "RevalidateCachedQuery"


class StepKind(enum.Enum):
    FORWARD = "forward"  # replies go to the client
    SWALLOW = "swallow"  # replies are the proxy's own
    LOCAL = "local"  # no server round trip: the proxy's own answer, emitted in order


_FORWARD, _SWALLOW, _LOCAL = StepKind.FORWARD, StepKind.SWALLOW, StepKind.LOCAL


class Step:
    """What the reply loop reads of any step, whatever its kind. Compiled, a step is a C
    struct (replies.pxd): every field is set here, there are no class-level defaults.
    `kind` is a field, the cheapest read for the loop that tests it at every message."""

    def __init__(self, kind: StepKind) -> None:
        self.kind = kind
        self.status = 0  # the transaction status its ReadyForQuery reported
        self.closed = False  # its Sync/Query has been sent
        self.error: dict[str, str] | None = None  # the fields of its first ErrorResponse
        self.callback: Callable[[Any], None] | None = None  # (SwallowStep's: run at its ReadyForQuery)
        self.t0 = 0.0  # when it was sent (perf_counter; 0 if untimed): units stuck on a down backend are found by it


class ForwardStep(Step):
    """The replies to one of the client's units, streamed to the client."""

    def __init__(self) -> None:
        Step.__init__(self, _FORWARD)
        # Reply accounting, in completions (module docstring), not bytes or messages
        self.done = 0  # completions received
        self.sent = 0  # completions requested so far
        # (completion index, bytes to insert before its reply | None = drop that reply)
        self.edits: list[tuple[int, bytes | None]] | None = None
        self.parses: list[tuple[int, bytes]] | None = None  # statements this step prepares, at their index
        self.closes: list[tuple[int, bytes]] | None = None  # statements it closes (the bound), at their index
        self.extended = False  # closed by Sync rather than Query
        self.rows_seen = False
        self.rows_out = False  # a DataRow reached the client (retry-able steps only): no retry then
        self.retry: bytes | None = None  # the unit's bytes, kept to re-send it elsewhere
        self.retrying = False
        self.retry_reason: str | None = None  # why it runs again elsewhere: a SQLSTATE, or "replica_behind"
        self.cancelled = False  # the client cancelled it while it was to run again: it must not
        self.quiet_ready = False  # its ReadyForQuery answers a Sync of the proxy's own: not forwarded
        self.left_open = False  # a Flush in it, or a read ended before its end: the group goes on later
        self.delivered = 0  # bytes of replies that reached the client (retry-able steps only)
        self.skip = 0  # a retried unit's leading reply bytes the client already has
        # The unit of work it answers (set by the session)
        self.backend = ""
        self.role = ""
        self.writes = False
        self.analyses: list | None = None  # analyses with effects, pins or transaction control


class SwallowStep(Step):
    """The replies to a request of the proxy's own (settings replay, replay waits,
    commit-LSN reads, prepares it slips in); they never reach a client."""

    def __init__(self, callback: Callable[[SwallowStep], None] | None = None) -> None:
        Step.__init__(self, _SWALLOW)
        self.closed = True  # written whole
        self.rows: list[bytes] | None = None  # DataRow bodies, kept when asked
        self.lsn = 0  # the LSN a replay check waits for
        self.server: Any = None  # the connection, for a callback that needs it
        self.callback = callback


class LocalStep(Step):
    """The proxy's own answer to a unit, emitted (with a ReadyForQuery) when the units
    before it have been answered: no server round trip."""

    def __init__(self, payload: bytes) -> None:
        Step.__init__(self, _LOCAL)
        self.payload = payload


class NamedStatement(Protocol):
    server_name: bytes  # the proxy's name for it on the servers


class StepOwner(Protocol):
    """What a server connection may call on the session it is lent to. The replies
    themselves go to the client through the `write` callable the owner hands over when
    it attaches (its transport's, bound once: no extra call per reply batch)."""

    stmts: Mapping[bytes, NamedStatement]  # the client's named statements, by its names

    def unit_ready(self, conn: Any, step: Step) -> None:
        """A step this session waits for has ended (its ReadyForQuery)."""

    def server_lost(self, conn: Any, exc: Exception | None, pending: list[ForwardStep]) -> None:
        """The connection died; `pending` are the client's units it had not finished."""

    def pause_reading(self, reason: str) -> None:
        """Stop reading the client: the server does not keep up with what it sends."""

    def resume_reading(self, reason: str) -> None: ...


class ReplyStream:
    """The reply half of a server connection (a base of ServerConnection): the queue of
    steps and the loop that cuts replies into them. `data_received` is the hot reply
    loop, flat on purpose: one pass over the bytes of a read, with no call per ordinary
    message.

    It reads these fields of the connection: `prepared`, `after_sync`, `ahead`, `closed`,
    `backend`, `process_id`, `pool`, and `_login` (replies while it logs in go to its
    `_login_received`); it calls its `swallow`."""

    def __init__(self) -> None:
        self.steps: deque[Step] = deque()
        self.status = wire.TX_IDLE
        self.params: dict[str, str] = {}  # the server's ParameterStatus values
        self.copy_in_absorb = False  # an extended COPY swallowed the Sync sent after Execute
        self.owner: StepOwner | None = None  # the session it is lent to
        self._write: Callable[[bytes], None] | None = None  # where the owner's client gets its replies
        self._held = b""  # a message cut short, kept until its rest arrives
        self._skip = 0  # bytes of a long message still to come, streamed as they arrive

    def attach(self, owner: StepOwner, write: Callable[[bytes], None]) -> None:
        """Lend the connection to `owner`; replies for its client go to `write`."""
        self.owner = owner
        self._write = write

    def detach(self, owner: StepOwner) -> None:
        """`owner` gives the connection up (nothing if it is no longer `owner`'s)."""
        if self.owner is owner:
            self.owner = None
            self._write = None

    # --- the reply loop ----------------------------------------------------------------

    def add_edit(self, step: ForwardStep, index: int, insert: bytes | None) -> None:
        """Drop the reply completing `index` (insert=None), or insert bytes before it."""
        if step.edits is None:
            step.edits = []
        step.edits.append((index, insert))
        if insert is not None and step.done == index and self.steps and self.steps[0] is step:
            # Everything before it has been answered: the client may be waiting (Flush).
            self._emit_inserts(step)

    def _emit_inserts(self, step: ForwardStep) -> None:
        edits = step.edits
        while edits and edits[0][0] == step.done and edits[0][1] is not None:
            self._to_client(edits.pop(0)[1], step)

    def _to_client(self, data: bytes, step: ForwardStep) -> None:
        write = self._write
        if write is not None and data:
            if step.retry is not None:
                step.delivered += len(data)
                step.rows_out = step.rows_seen  # rows seen so far are in these bytes
            if step.skip:  # a retried unit: the client already has these bytes
                cut = min(step.skip, len(data))
                step.skip -= cut
                data = data[cut:]
                if not data:
                    return
            write(data)

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
        # The step as a ForwardStep, None for another kind (compiled, a typed view: its
        # fields are read as C fields; replies.pxd)
        fwd = step if step.kind is _FORWARD else None
        if pos >= n:  # all of it continues one long message
            self._skip = pos - n
            if fwd is not None and not fwd.retrying:
                self._to_client(data, fwd)
            return
        self._skip = 0
        emit = 0  # data[emit:pos] still to be forwarded (FORWARD) or dropped (SWALLOW)
        end = pos
        while True:
            if pos + 5 > n:
                break
            t = data[pos]
            # The length by its bytes (compiled, four C loads; int.from_bytes is a call). The
            # high byte goes through `end` first: compiled, that is a 64-bit integer, and
            # shifting a C int by 24 would overflow (a length >= 2**31 would go negative).
            end = data[pos + 1]
            end = pos + 1 + (end << 24 | data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4])
            if fwd is not None:
                if t == _Z:
                    if end > n:
                        break
                    if fwd.edits:
                        if emit < pos and not fwd.retrying:
                            self._to_client(data[emit:pos], fwd)
                        emit = pos
                        self._emit_inserts(fwd)
                    if not fwd.retrying:
                        if fwd.quiet_ready:
                            if emit < pos:
                                self._to_client(data[emit:pos], fwd)
                        else:
                            self._to_client(data[emit:end] if emit or end != n else data, fwd)
                    emit = pos = end
                    self.status = fwd.status = data[end - 1]
                    steps.popleft()
                    owner = self.owner
                    if owner is not None:
                        owner.unit_ready(self, fwd)
                    step = self._next_step(data, pos, n)
                    if step is None:
                        return
                    fwd = step if step.kind is _FORWARD else None
                    continue
                if fwd.edits or SPECIAL[t]:
                    if end > n:
                        break
                    if t == _E and fwd.retry is not None and self._refused(fwd, data, pos, end):
                        emit = pos = end  # the replies so far are dropped with it
                        continue
                    if emit < pos and not fwd.retrying:
                        self._to_client(data[emit:pos], fwd)
                    emit = pos
                    if self._forward_special(fwd, t, data, pos, end):
                        emit = end  # dropped
                elif end > n:
                    break  # an ordinary message cut short: streamed through below
                elif t == _D:
                    fwd.rows_seen = True
                else:
                    fwd.done += COMPLETES[t]
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
                    fwd = step if step.kind is _FORWARD else None
                    continue
                self._swallowed(step, t, data[pos + 5 : end])
                emit = end
            pos = end
        # Out of complete messages: forward or drop what precedes the incomplete one.
        if fwd is not None and not fwd.retrying:
            if pos + 5 <= n and data[pos] not in (_Z, _E, _S, _G, _A) and not fwd.edits and fwd.retry is None:
                # An ordinary message cut short (a big DataRow, or a read that ended
                # mid-message): what has come goes through now, the rest as it arrives.
                self._to_client(data[emit:] if emit else data, fwd)
                self._skip = end - n
                if data[pos] == _D:
                    fwd.rows_seen = True
                else:
                    fwd.done += COMPLETES[data[pos]]
                return
            if emit < pos:
                self._to_client(data[emit:pos], fwd)
        self._held = data[pos:]

    def _next_step(self, data: bytes, pos: int, n: int) -> Step | None:
        """After a ReadyForQuery: the proxy's own answers queued next go out now; None
        when nothing is in flight any more (what is left of `data` is unsolicited)."""
        steps = self.steps
        if steps and steps[0].kind is _LOCAL:
            self._run_locals()
        if steps:
            return steps[0]
        if pos < n:
            self._unsolicited(data[pos:], 0)
        return None

    def _forward_special(self, step: ForwardStep, t: int, data: bytes, pos: int, end: int) -> bool:
        """Slow path for a message inside a ForwardStep. Returns True if it is dropped."""
        edits = step.edits
        if edits:
            self._emit_inserts(step)
        if t == _E:
            body = data[pos + 5 : end]
            renamed = self._client_names(body) if b"pgsplit_" in body else None
            fields = wire.parse_fields(renamed or body)
            if step.error is None and not step.retrying:  # (being re-sent: what it gets here is void)
                step.error = fields
            if edits:
                del edits[:]  # the server skips everything up to Sync
            if step.parses or step.closes:
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
            if edits and edits[0][0] == index and edits[0][1] is None:
                edits.pop(0)
                if edits:
                    self._emit_inserts(step)
                return True
            if edits:
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
        stmts = self.owner.stmts if self.owner is not None else None
        if not stmts:
            return None
        names = {st.server_name: name for name, st in stmts.items()}
        renamed = _SERVER_STATEMENT.sub(lambda m: names.get(m.group(), m.group()), body)
        return renamed if renamed != body else None

    def _drop_stale_statements(self) -> None:
        """A statement's plan no longer gives the result type it was prepared with (a
        column's type changed): the server fails it until it is prepared again, for
        every client that shares it here. The error does not say which statement, so all
        the proxy prepared here are closed, forgotten and retired: each is prepared again
        where next used, and a driver's re-prepare (asyncpg's) gets a fresh statement on
        whichever connection it runs next, not one left stale there. The Closes go behind
        the requests sent so far, or, when the failed unit still owes its Sync (cut at a
        Flush, as asyncpg's Parse/Describe), right behind that Sync."""
        if self.closed or not self.prepared or self.after_sync:
            return
        names = self.prepared.retire_all()
        closes = b"".join(wire.message(wire.F_CLOSE, b"S" + name + b"\0") for name in names)
        log.info("backend %s: a cached plan changed its result type; %d prepared statement(s) closed there",
                 self.backend, len(names))
        if all(s.closed for s in self.steps):
            self.swallow(closes + wire.SYNC, self._statements_dropped)
            return
        # the open unit is the last one: nothing follows it yet
        self.steps.append(SwallowStep(self._statements_dropped))
        self.after_sync = closes + wire.SYNC
        self.ahead += wire.FLUSH  # so that `send` looks for the Sync

    def _statements_dropped(self, step: SwallowStep) -> None:
        # The client's units waited for this step too; go on as after one of theirs.
        if self.owner is not None and not self.closed:
            self.owner.unit_ready(self, step)

    def _skipped_statements(self, step: ForwardStep) -> None:
        """An error in `step`: the server skips the rest of it, so the Parses queued at or
        after it prepared nothing, and the Closes did not close."""
        done = step.done
        for index, name in step.parses or ():
            if index >= done:
                self.prepared.discard(name)
        for index, name in step.closes or ():
            if index >= done:
                self.prepared.add(name)
        step.parses = step.closes = None

    def _refused(self, step: ForwardStep, data: bytes, pos: int, end: int) -> bool:
        """A replica's error for a unit that can still run elsewhere: nothing of it has
        reached the client, so it is dropped and the session re-sends the unit."""
        if step.rows_out or step.retrying:
            return False  # (rows only seen, still in this chunk, are dropped with the error)
        step.error = wire.parse_fields(data[pos + 5 : end])
        code = step.error.get("C")
        if code in RETRYABLE:
            step.retrying = True
            step.retry_reason = code
            if step.parses or step.closes:
                self._skipped_statements(step)
        return step.retrying

    def _emit_after(self, step: ForwardStep, data: bytes, pos: int, end: int) -> None:
        """Forward one completing message, then any inserts due right after it."""
        if not step.retrying:
            self._to_client(data[pos:end], step)
        self._emit_inserts(step)

    def _swallowed(self, step: SwallowStep, t: int, body: bytes) -> None:
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
        while steps and steps[0].kind is _LOCAL:
            step = steps.popleft()
            step.status = self.status  # as the units before it left the transaction
            if self._write is not None:
                self._write(step.payload + wire.ready_for_query(step.status))
            if self.owner is not None:
                self.owner.unit_ready(self, step)

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
        if self._write is not None and frames:
            out = whole[frames[0][1] : frames[-1][2]]
            if any(t == _A for t, s, e in frames):
                out = b"".join(self._notification(whole[s:e]) if t == _A else whole[s:e] for t, s, e in frames)
            self._write(out)

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

