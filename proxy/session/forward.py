"""Forwarding a unit on the general path.

Owns (as a part of ClientSession): walking the frames of the client's bytes unit by unit,
starting a unit (answered here, routed now, or routed in a task while it waits), whether
a unit may join the connection attached (`_boundary`), and forwarding its messages one by
one: statement names rewritten to the proxy's, statements prepared where first used
(proxy.session.statements), pgsplit commands answered in their turn, a group left open on
a replica ended before a write.
Must not know: the process (only proxy.session.host), how replies are cut into steps.
"""

from __future__ import annotations

from time import perf_counter

from proxy import wire
from proxy.server.connection import ServerConnection
from proxy.server.replies import ForwardStep, LocalStep, Step, StepKind
from proxy.errors import ProtocolViolation
from proxy.session import commands, replies
from proxy.session.commands import Answered
from proxy.session.statements import Statements
from proxy.session.stream import State
from proxy.session.units import (
    MALFORMED, OPENS_STEP, STATEMENT_KIND, Boundary, binds_earlier_unnamed, needs_tracking, scan_unit, unit_bytes,
    unit_last,
)
from router.classify.analysis import Analysis
from router.topology import Role

F_BIND, F_CLOSE, F_DESCRIBE, F_EXECUTE = wire.F_BIND, wire.F_CLOSE, wire.F_DESCRIBE, wire.F_EXECUTE
F_FLUSH, F_PARSE, F_QUERY, F_SYNC = wire.F_FLUSH, wire.F_PARSE, wire.F_QUERY, wire.F_SYNC
F_TERMINATE, F_FUNCTION_CALL = wire.F_TERMINATE, wire.F_FUNCTION_CALL
F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL = wire.F_COPY_DATA, wire.F_COPY_DONE, wire.F_COPY_FAIL
TX_IDLE = wire.TX_IDLE

_FORWARD = StepKind.FORWARD
_READY = State.READY
_PRIMARY, _REPLICA = Role.PRIMARY, Role.REPLICA  # (read once: through the enum class each read costs)
_MAY_WRITE = frozenset({F_QUERY, F_PARSE, F_BIND})
_ENDS_GROUP = frozenset({F_QUERY, F_SYNC, F_FUNCTION_CALL})
_RUNS = frozenset({F_QUERY, F_EXECUTE, F_FUNCTION_CALL})  # (a unit without one only prepares or describes)
_IGNORED_WHEN_IDLE = frozenset({F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_FLUSH})
RETRY_MAX_BYTES = 1 << 20  # a larger unit is not kept for a retry
STREAM_MIN = 1 << 20  # a Bind longer than this passes through as it arrives (_stream_bind)


class Forwarding(Statements):
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    def _walk(self, buf: bytes, frames: list) -> int:
        """Run the units of `frames`; returns the index of the first frame that must
        wait (len(frames) when all went)."""
        i = 0
        nf = len(frames)
        while i < nf and self.state is _READY and self._routing is None:
            if self._skip_to_sync:
                i = self._skip_group(frames, i)
                continue
            if self.server is None:
                dataplane = self.host.dataplane
                if dataplane.holding:  # a cutover is in progress: wait for it
                    dataplane.hold_session(self)
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
        scan = scan_unit(buf, frames, i, self.classify, self.carried.stmts, self._unnamed)
        if scan is None:
            return -1
        last, analyses, fcall = scan
        tx = self.tx
        if tx.aborted is not None:
            end = unit_last(frames, last)
            self._answer_aborted(buf[frames[i][1] : frames[end][2]], analyses)
            return end + 1
        answered = self._answer_locally(buf, frames[i : last + 1], analyses)
        if answered is Answered.YES:
            return last + 1
        if answered is Answered.LATER:
            return -1
        facts = self._unit_facts(analyses, fcall)
        unit = unit_bytes(buf, frames, i, last)
        rerunnable = not binds_earlier_unnamed(buf, frames, i, last)
        whole = (rerunnable and tx.status == TX_IDLE and tx.deferred_begin is None
                 and frames[last][0] in _ENDS_GROUP and len(unit) <= RETRY_MAX_BYTES
                 and not any(needs_tracking(a) for a in analyses)
                 and any(frames[j][0] in _RUNS for j in range(i, last + 1)))
        if self._route_now(facts, unit, whole):
            if not rerunnable:
                self._retry_data = None
            return i
        self._routing = self.host.spawn(self._route_later(facts, unit, rerunnable))
        return -1

    def _boundary(self, buf: bytes, frames: list, i: int) -> Boundary:
        """May the unit starting at frames[i] run on the attached connection?"""
        if self._fresh:
            self._fresh = False
            return Boundary.GO
        server = self.server
        if not server.steps:
            if self.tx.status != TX_IDLE or self.carried.pins:
                return Boundary.GO
            return Boundary.ROUTE
        if server.steps[-1].callback == self._commit_lsns_read:
            return Boundary.WAIT  # the unit is routed afresh once the token has arrived
        if self.backend.role is _PRIMARY or self.carried.pins:
            return Boundary.GO
        if any(s.kind is _FORWARD and s.retry is not None for s in server.steps):
            # A read that the replica may still refuse runs again on the primary and gives
            # this connection back: a unit sent behind it here would be lost with it.
            return Boundary.WAIT
        scan = scan_unit(buf, frames, i, self.classify, self.carried.stmts, self._unnamed)
        if scan is None:
            return Boundary.WAIT
        facts = self._unit_facts(scan[1], scan[2])
        if facts.writes or facts.hint is _PRIMARY or self.route_primary:
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
        wait. Each message type's work is a handler of its own (`_BY_TYPE`); the bytes
        no handler changes go out as they came, in runs."""
        server = self.server
        out: list[bytes] = []
        run = frames[first][1]  # start of a run of bytes forwarded unchanged
        step = self._open
        if step is not None and step.retry is not None:
            self._keep_for_retry(step, buf, frames, first)
        stop = None
        by_type = _BY_TYPE
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
            query = None
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
                    query = self._query_analysis(buf, s, e)
                    if query.effects and self._answered_in_turn(query, server, out, buf, run, s):
                        run = e
                        continue
                step = self._new_step()
            handler = by_type.get(t)
            if handler is None:
                continue
            try:
                run = handler(self, step, buf, s, e, out, run, query)
            except wire.ProtocolViolation:
                # A body the proxy cannot read goes to the server unchanged: PostgreSQL
                # answers it (ERROR 08P01) and skips to the Sync, as without the proxy.
                if t == F_QUERY:
                    step.closed = True
                    self._open = None
                else:
                    step.sent += 1
            if run < 0:
                return None  # the session ended
            step = self._open
            if step is None and self._lsn_after:  # (see _route_now)
                out.append(buf[run:e])
                out.append(self._commit_lsns_behind())
                run = e
        end = frames[stop][1] if stop is not None else frames[-1][2]
        self._flush_out(server, out, buf, run, end)
        if self._open is not None:
            self._open.left_open = True  # the rest of its group comes later: see _leaves_replica
        return stop

    def _answered_in_turn(self, query: Analysis, server: ServerConnection, out: list[bytes], buf: bytes,
                          run: int, s: int) -> bool:
        """SET/SHOW pgsplit.* on an attached connection (in a transaction, or behind units
        in flight): answered in its turn. False when the Query is not the proxy's."""
        answer = commands.own_answer(self, query)
        if answer is None:
            return False
        out.append(buf[run:s])
        if answer.error is not None and self.tx.status != TX_IDLE:
            out.append(commands.raise_on_server(answer.error))
            self._new_step().closed = True
            self._open = None
        else:
            reply = replies.simple(answer, 0)[:-6]  # ReadyForQuery comes in turn
            local_step = LocalStep(reply)
            self._flush_out(server, out, buf, s, s)
            out.clear()
            server.push(local_step)
        return True

    # --- one handler per message type: (step, buf, s, e, out, run, query) -> run --------------
    # `run` is where the bytes forwarded unchanged start; a handler that rewrites the
    # message appends what precedes it and its own bytes to `out` and moves `run` past it.
    # -1: the session ended.

    def _on_execute(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        step.sent += 1
        if self._bound_copy:
            self._copy_done = False
        return run

    def _on_sync(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        step.closed = step.extended = True
        self._open = None
        return run

    def _on_bind(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        portal, name, off = wire.parse_bind_names(buf[s + 5 : e])
        if name:
            st = self.carried.stmts.get(name)
            if st is not None:
                a = st.analysis
                self._note_analysis(step, a)
                if step.sent == 0 and (a.executes or a.effects) and self.carried.sql_statements_used(a):
                    run = self._prepare_sql(self.server, a, step, out, buf, run, s)
                if st.local:
                    self.fail(ProtocolViolation("a pgsplit command cannot be prepared together with other statements"))
                    return -1
                run = self._use_statement(step, st, out, buf, run, s)
                out.append(buf[run:s])
                out.append(wire.build_bind(portal, st.server_name, memoryview(buf)[s + 5 + off : e]))
                run = e
                self._bound_copy = a.is_copy_in
            else:
                self._bound_copy = False
        elif self._unnamed is not None:
            self._note_analysis(step, self._unnamed)
            self._bound_copy = self._unnamed.is_copy_in
        step.sent += 1
        return run

    def _on_parse(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        name, sql, params = wire.parse_parse(buf[s + 5 : e])
        if not wire.param_types_ok(params):
            raise wire.ProtocolViolation("invalid Parse message")
        analysis = self.classify(sql)
        self._note_analysis(step, analysis)
        server = self.server
        if step.sent == 0 and (analysis.executes or analysis.effects) and self.carried.sql_statements_used(analysis):
            run = self._prepare_sql(server, analysis, step, out, buf, run, s)
        if not name:
            self._unnamed = analysis
            step.sent += 1
            return run
        st = self.register_statement(name, sql, params)
        out.append(buf[run:s])
        out.append(self._reprepare(step, st.server_name) + self._register(step, st.server_name))
        out.append(st.parse)
        step.sent += 1
        return e

    def _on_describe_or_close(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int,
                              query) -> int:
        t = buf[s]
        kind, name = wire.parse_target(buf[s + 5 : e])
        if kind == STATEMENT_KIND and name:
            if t == F_CLOSE:
                # Statements stay prepared on the server for other clients; the client's
                # name is forgotten and CloseComplete is its answer.
                self.carried.stmts.pop(name, None)
                out.append(buf[run:s])
                self.server.add_edit(step, step.sent, wire.CLOSE_COMPLETE)
                return e
            st = self.carried.stmts.get(name)
            if st is not None:
                run = self._use_statement(step, st, out, buf, run, s)
                out.append(buf[run:s])
                out.append(wire.build_target(F_DESCRIBE, kind, st.server_name))
                run = e
        step.sent += 2 if (t == F_DESCRIBE and kind == STATEMENT_KIND) else 1
        return run

    def _on_query(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        if query is None:  # a Query that closes an open extended group
            query = self._query_analysis(buf, s, e)
        self._note_analysis(step, query)
        if step.sent == 0 and (query.executes or query.effects) and self.carried.sql_statements_used(query):
            run = self._prepare_sql(self.server, query, step, out, buf, run, s)
        step.closed = True
        self._open = None
        return run

    def _on_copy_end(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        self._copy_done = True
        return run

    def _on_flush(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        if step is not None:
            step.left_open = True  # the group stays open, its replies out: see _leaves_replica
        return run

    def _on_function_call(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int,
                          query) -> int:
        step.writes = True
        step.closed = True
        self._open = None
        return run

    def _on_terminate(self, step: Step, buf: bytes, s: int, e: int, out: list[bytes], run: int, query) -> int:
        out.append(buf[run:s])
        self._flush_out(self.server, out, buf, e, s)
        self.close("client sent Terminate")
        return -1

    def _leaves_replica(self, step: Step, buf: bytes, t: int, s: int, e: int) -> bool:
        """The Query, Parse or Bind at `s` needs the primary, and the group it would join
        is open on a replica with nothing gone wrong in it yet."""
        if self.backend is None or self.backend.role is not _REPLICA or step.error is not None or self.carried.pins:
            return False
        try:
            analysis = self._message_analysis(buf, t, s, e)
        except wire.ProtocolViolation:
            return False
        if analysis is None:
            return False
        facts = self._unit_facts([analysis], False)
        return facts.writes or facts.hint is _PRIMARY

    def _query_analysis(self, buf: bytes, s: int, e: int) -> Analysis:
        try:
            return self.classify(wire.parse_query(buf[s + 5 : e]))
        except wire.ProtocolViolation:
            return MALFORMED

    def _message_analysis(self, buf: bytes, t: int, s: int, e: int) -> Analysis | None:
        """The analysis of the statement a Query, Parse or Bind at `s` runs."""
        if t == F_QUERY:
            analysis = self.classify(wire.parse_query(buf[s + 5 : e]))
        elif t == F_PARSE:
            analysis = self.classify(wire.parse_parse(buf[s + 5 : e])[1])
        else:
            name = wire.parse_bind_names(buf[s + 5 : e])[1]
            st = self.carried.stmts.get(name) if name else None
            analysis = st.analysis if st is not None else None
        return analysis

    def _stream_bind(self, buf: bytes, pos: int) -> bool:
        """A Bind too large to hold whole (a big bytea parameter): its head goes out at
        once with the proxy's statement name, and the rest passes through as it arrives
        (`_skip`), so the proxy holds no more of it than a read brings. It continues the
        group open on the attached connection (behind its Parse, or a prepare's Flush), or
        starts its unit, routed from its statement's analysis. False (it is gathered whole
        and forwarded as usual) for anything else."""
        head = self._long_bind(buf, pos)
        if head is None:
            return False
        length, portal, name, off, st, analysis = head
        end = min(pos + 1 + length, len(buf))
        step = self._open
        if step is None:
            # (an unnamed statement prepared in an earlier unit: the general path's)
            if st is None or not self._route_long_bind(buf, pos, end, analysis):
                return False
            step = self._open
        elif (step.left_open and self._leaves_replica(step, buf, F_BIND, pos, end)) or any(
                s is not step and s.kind is _FORWARD for s in self.server.steps):
            # (a unit ahead of it may still be retried elsewhere, its connection released
            # with this message half written)
            return False
        out: list[bytes] = []
        server_name = name
        if analysis is not None:
            self._note_analysis(step, analysis)
            self._bound_copy = analysis.is_copy_in
        else:
            self._bound_copy = False
        if st is not None:
            self._use_statement(step, st, out, buf, pos, pos)
            server_name = st.server_name
        step.sent += 1
        step.retry = None  # (too large to keep for a retry)
        step.left_open = True  # the rest of its group comes later: a write in it leaves a replica
        out.append(wire.bind_head(portal, server_name, length - 4 - off))
        out.append(buf[pos + 5 + off :])
        self.server.send(b"".join(out))
        self._skip = pos + 1 + length - len(buf)
        self._skip_to = self.server
        return True

    def _long_bind(self, buf: bytes, pos: int) -> tuple | None:
        """(length, portal, statement name, offset of the rest, the client's statement or
        None, its analysis or None) of a Bind at `pos` long enough to stream whose names
        have arrived; None otherwise, or when binding it has effects the proxy tracks."""
        if buf[pos] != F_BIND or len(buf) - pos < 5:
            return None
        length = wire.header_length(buf, pos)
        if length < STREAM_MIN:
            return None
        try:
            portal, name, off = wire.parse_bind_names(buf[pos + 5 : min(pos + 1 + length, len(buf))])
        except wire.ProtocolViolation:
            return None  # (its names have not all arrived)
        st = self.carried.stmts.get(name) if name else None
        if st is not None and st.local:
            return None
        analysis = st.analysis if st is not None else (self._unnamed if not name else None)
        if analysis is not None and (analysis.executes or analysis.effects):
            return None
        return length, portal, name, off, st, analysis

    def _route_long_bind(self, buf: bytes, pos: int, end: int, analysis: Analysis | None) -> bool:
        """A long Bind of a named statement starts its unit (prepared earlier, run alone): route it
        from its statement's analysis now, as `_start_unit` would once the whole unit had
        arrived, and open its step. False where only the general path may decide (a
        token to fetch, a wait, no idle connection, a cutover holding units...)."""
        tx = self.tx
        if (analysis is None or needs_tracking(analysis) or self._skip_to_sync or self._routing is not None
                or tx.aborted is not None):
            return False
        if self.server is not None:
            if self.server.steps or self._boundary(buf, [(F_BIND, pos, end)], 0) is not Boundary.GO:
                return False
        else:
            if self.host.dataplane.holding:
                return False
            if not self._route_now(self._unit_facts([analysis], False), b"", False):
                return False
            self._retry_data = None
            self._fresh = False
        self._new_step()
        return True

    def _keep_for_retry(self, step: Step, buf: bytes, frames: list, first: int) -> None:
        """More messages of an open retry-able unit (sent after a Flush): keep them too."""
        end = frames[unit_last(frames, first)][2]
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

    def _answer_locally(self, buf: bytes, frames: list, analyses: list[Analysis]) -> Answered:
        """Units the proxy answers without a server: pgsplit commands, a BEGIN whose
        routing waits for the transaction's first statement, standalone DEALLOCATE."""
        if MALFORMED in analyses:
            return Answered.NO  # the server answers it, as it would without the proxy
        if frames[0][0] == F_PARSE and self._prepare_locally(buf, frames):
            return Answered.YES
        for a in analyses:
            if a.effects or a.tx is not None:
                return commands.answer(self, buf, frames, analyses)
        return Answered.NO


_BY_TYPE = {
    F_EXECUTE: Forwarding._on_execute, F_SYNC: Forwarding._on_sync, F_BIND: Forwarding._on_bind,
    F_PARSE: Forwarding._on_parse, F_DESCRIBE: Forwarding._on_describe_or_close,
    F_CLOSE: Forwarding._on_describe_or_close, F_QUERY: Forwarding._on_query,
    F_COPY_DONE: Forwarding._on_copy_end, F_COPY_FAIL: Forwarding._on_copy_end, F_FLUSH: Forwarding._on_flush,
    F_FUNCTION_CALL: Forwarding._on_function_call, F_TERMINATE: Forwarding._on_terminate,
}
