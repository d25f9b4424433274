"""Choosing a server connection for a unit, and the fast case of forwarding one.

Owns (as a part of ClientSession): routing a unit of any shape now (`_route_now`: decide,
borrow, attach, and the replay check ahead of a read or the commit's LSN read behind a
write when read-your-writes needs them) or in a task while its bytes wait (`_route_later`:
fetch the token, wait for a replica, wait for a pool connection); the fast case
(`_common_unit`): a lone Query or a Bind-Execute-Sync, recognised once, routed by
`_route_now` and sent in one write, or sent on the attached connection inside a
transaction; a cancel for a unit that waits for its route; and the answers for a unit
that cannot run (no backend, a transaction the proxy rolled back).
Must not know: the process (only proxy.session.host), how replies are cut into steps.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter

from proxy import wire
from proxy.wire import F_QUERY
from proxy.server.connection import ServerConnection
from proxy.server.replies import Step, StepKind
from proxy.errors import (
    ConnectionFailure, InFailedSqlTransaction, ProxyError, QueryCanceled, RoutingError, ServerError,
)
from proxy.session import commands, replies, units
from proxy.session.consistency import TOKEN_MODES, outcome
from proxy.session.forward import Forwarding
from proxy.session.host import TokenUnavailable
from proxy.session.statements import close_statement
from proxy.session.stream import State
from proxy.session.units import Extended, extended_unit, is_lone_query
from router.classify.analysis import Analysis, Route, TxControl
from router.lsn import COMMIT_LSN_SQL, REPLAY_WAIT_SQL, CommitLsns, format_lsn, parse_lsn
from router.policy import Decision, SessionFacts, UnitFacts, decide_route, replica_to_check
from router.topology import BackendState, Role

_PLAIN_SESSION = SessionFacts()  # (the common case, not built anew per unit)
log = logging.getLogger("pgsplit.session")

TX_IDLE, TX_IN_BLOCK = wire.TX_IDLE, wire.TX_IN_BLOCK
_WRITE = Route.WRITE
_READ_UNIT = UnitFacts(False, None)
_WRITE_UNIT = UnitFacts(True, None)
_COMMIT_LSNS = wire.query(COMMIT_LSN_SQL)
# The replay check ahead of a read (router.lsn.REPLAY_WAIT_SQL), prepared once per server
# connection under a name no client statement gets (theirs are "pgsplit_" + hex digits).
_REPLAY_WAIT = b"pgsplit_replay_wait"
_REPLAY_WAIT_PARSE = wire.build_parse(_REPLAY_WAIT, REPLAY_WAIT_SQL.encode())
_EXECUTE_SYNC = wire.message(wire.F_EXECUTE, b"\0\0\0\0\0") + wire.SYNC  # unnamed portal, all rows


def _cancelled() -> QueryCanceled:
    return QueryCanceled("canceling statement due to user request")


def _replay_wait_request(conn: ServerConnection, lsn: int, timeout_ms: int) -> bytes:
    """Bind and Execute of the replay check for `lsn` (prepared here first if need be)."""
    parse = b""
    prepared = conn.prepared
    if _REPLAY_WAIT in prepared:
        prepared.move_to_end(_REPLAY_WAIT)
    else:  # (first in its own request group: nothing before it can keep the Closes from running)
        parse = b"".join(close_statement(name) for name in prepared.make_room()) + _REPLAY_WAIT_PARSE
        prepared.add(_REPLAY_WAIT)
    # no parameter format codes (all text), the parameters, no result format codes (text)
    rest = b"\0\0" + wire.text_values([format_lsn(lsn), str(timeout_ms)]) + b"\0\0"
    return parse + wire.build_bind(b"", _REPLAY_WAIT, rest) + _EXECUTE_SYNC


class Routing(Forwarding):
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    # --- the fast case ---------------------------------------------------------------------

    def _send_unit(self, conn: ServerConnection, data: bytes, analysis: Analysis, ext: "Extended | None",
                   trailer: bytes = b"") -> Step:
        """Write a lone Query (`ext` None) or a Bind-Execute-Sync to the attached
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

    def _common_unit(self, data: bytes) -> bool:
        """The fast case of forwarding a unit: a lone Query or a Bind-Execute-Sync whose
        statement is `Analysis.plain`, framed without the general path's message walk.
        From an idle session (or the first statement of a transaction whose BEGIN the
        proxy answered: it goes to the primary, the BEGIN ahead of it) it is routed by
        `_route_now`, as every unit is, and sent in one write; inside the transaction of
        the attached connection, with nothing in flight, it is sent there (COMMIT and
        ROLLBACK too: their analysis goes with the step). False (nothing done) for
        anything else, and when `_route_now` cannot route it at once: the general path
        (proxy.session.forward) then handles it from scratch."""
        server = self.server
        if server is None:
            # Nothing unusual about the session: idle, or in a transaction the proxy has
            # answered BEGIN for and not yet routed (not declared read only); unpinned,
            # nothing held or pending.
            tx = self.tx
            if tx.deferred_begin is None:
                if tx.status != TX_IDLE:  # (a transaction the proxy rolled back is one too)
                    return False
            elif self.carried.default_read_only:
                return False
            if (self.carried.pins or self._routing is not None or self._skip or self._skip_to_sync
                    or self._retry_skip or self.host.session_pooling or self.host.dataplane.holding):
                return False
        elif (self.tx.status != TX_IN_BLOCK or server.steps or self._open is not None or self._skip
                or self._skip_to_sync or self._routing is not None):
            return False
        # The two shapes, recognised once: (analysis, None) for a lone Query, (analysis,
        # its parts) for a Bind-Execute-Sync (units.extended_unit).
        if data[0] == F_QUERY:
            if not is_lone_query(data):
                return False
            analysis = self.classify(data[5:-1])
            ext = None
        else:
            ext = extended_unit(data, self.carried.stmts)
            if ext is None:
                return False
            analysis = ext.analysis
            if analysis is None:  # behind an unnamed Parse
                analysis = ext.analysis = self.classify(ext.sql)
        if not analysis.plain:  # (units.needs_tracking, on the hot path)
            return False
        if server is not None:
            self._fresh = False
            step = self._send_unit(server, data, analysis, ext)
            if analysis.tx is not None:  # COMMIT, ROLLBACK, SAVEPOINT...: seen at its ReadyForQuery
                self._note_analysis(step, analysis)
            return True
        if analysis.tx is not None or analysis.hint is not None:
            if (analysis.tx is TxControl.BEGIN and ext is None and self.tx.deferred_begin is None
                    and analysis.hint is None):
                commands.defer_begin(self, wire.parse_query(data[5:]))  # as the general path would
                return True
            return False
        # (in a transaction whose BEGIN the proxy answered, the unit goes to the primary)
        if not self._route_now(_WRITE_UNIT if (self.tx.deferred_begin is not None or analysis.route is _WRITE)
                               else _READ_UNIT, data, True):
            return False
        self._fresh = False
        lsns = self._lsn_after
        self._send_unit(self.server, data, analysis, ext, _COMMIT_LSNS if lsns else b"")
        if lsns:
            self._commit_lsns_behind()
        return True

    def _route_now(self, facts: UnitFacts, unit: bytes, whole: bool) -> bool:
        """Route a new unit of an idle session (or of a transaction whose BEGIN the proxy
        answered) and attach a connection for it, now: the one place every unit, of any
        shape, is routed without waiting. False when it must wait (a token to fetch, a
        replica to wait for, no idle connection) or cannot run (its error is raised
        there): `_route_later` then routes it.

        `whole`: the unit is all here, ends its group, and `needs_tracking` finds none of
        its statements (outside a transaction). Then read-your-writes needs no round trip
        of its own: a read that no replica is known to be safe for goes to one behind
        a check that waits there until it has replayed the session's writes (at most
        consistency_wait_ms; the read runs again on the primary if that was not enough),
        and a write's WAL position is read right behind it on its connection, in the same
        write (`_lsn_after`, for the sender), so that the next read has its token."""
        token, fetch = self.token.read_requirement(facts.writes)
        if fetch:
            return False
        host = self.host
        decision = self._decide(facts, token)
        backend = decision.backend
        check = decision.wait_lsn
        if check is not None:
            if not whole:
                return False
            backend = replica_to_check(host.topology.current, host.load, self.units + 1)
        if backend is None:
            return False
        conn = self._borrow_now(backend)
        if conn is None:
            return False
        self.units += 1  # (the tie-breaker between equally loaded replicas)
        if token is not None and check is None:
            self._count_read(decision, False)
        lsns = whole and facts.writes and self.tx.deferred_begin is None and self.token.mode in TOKEN_MODES
        self._attach(conn, backend, unit, facts)
        if check is not None:
            wait = conn.swallow(_replay_wait_request(conn, check, host.config.routing.consistency_wait_ms),
                                self._replay_checked, rows=True, ahead=True)
            wait.server, wait.lsn, wait.t0 = conn, check, perf_counter()
            self._retry_data = unit
        elif lsns:
            self._lsn_after = True
        return True

    def _commit_lsns_behind(self) -> bytes:
        """The read of the commit's LSN that goes out right behind the unit just sent
        (`_route_now`), in its write: its step, queued behind the unit's. Returns its bytes."""
        self._lsn_after = False
        server = self.server
        server.swallow(_COMMIT_LSNS, self._commit_lsns_read, rows=True, written=True).server = server
        return _COMMIT_LSNS

    def _replay_checked(self, wait: Step) -> None:
        """The replay check ahead of a read: the replica has the session's writes (it is
        noted, for the reads after it), or the read behind it, whose replies have not
        reached the client, runs again on the primary."""
        server = wait.server
        replayed = None
        if wait.error is None and wait.rows:
            text = wire.parse_data_row(wait.rows[0])[0]
            replayed = None if text is None else parse_lsn(text.decode())
        consistency = self.host.consistency
        if wait.error is not None:
            # dropped where the proxy could not see it: prepared again next time
            server.prepared.discard(_REPLAY_WAIT)
        if replayed is not None and replayed >= wait.lsn:
            consistency.replayed(server.backend, replayed)
            consistency.count(outcome(True, True), perf_counter() - wait.t0)
        elif server.steps and server.steps[0].kind is StepKind.FORWARD and server.steps[0].retry is not None:
            read = server.steps[0]  # (when the connection is lost, the wait itself heads the queue)
            read.retrying = True
            read.retry_reason = "replica_behind"
            self._force_primary_next = True
            consistency.count(outcome(False, True))

    def _commit_lsns_read(self, step: Step) -> None:
        server = step.server
        if step.error is None and step.rows:
            flush, insert = wire.parse_data_row(step.rows[0])
            lsn = CommitLsns(parse_lsn(flush.decode()), parse_lsn(insert.decode())).covering(self.token.commit_async)
            self.token.learned(lsn)
            if not self.host.config.routing.consistency_wait_ms:
                # Reads never wait on a replica (nor check one): the monitor asks the
                # replicas to report its replay, so that they serve the reads after it.
                self.host.consistency.want(lsn)
        if not server.closed:
            self._settle(server)

    def _count_read(self, decision: Decision, waited: bool, waited_s: float | None = None) -> None:
        """A read that carried a token was routed."""
        backend = decision.backend
        self.host.consistency.count(outcome(backend is not None and backend.role is Role.REPLICA, waited), waited_s)

    # --- classification ------------------------------------------------------------------

    def classify(self, sql: bytes) -> Analysis:
        classifier = self.host.classifier
        if sql == self._memo_sql and self._memo_version == classifier.version:
            return self._memo_analysis
        analysis = classifier.classify(sql.decode("utf-8", "replace"))
        self._memo_sql = sql
        self._memo_analysis = analysis
        self._memo_version = classifier.version
        return analysis

    def _unit_facts(self, analyses: list[Analysis], fcall: bool) -> UnitFacts:
        carried = self.carried
        facts = units.unit_facts(analyses, fcall, carried.sql_prepared_analysis, carried.default_read_only)
        if self.tx.deferred_begin is not None and not facts.writes:
            # The transaction's first statement: it runs on the primary unless the
            # transaction was declared read only.
            if not (carried.default_read_only or any(a.tx is TxControl.SET_TX_READ_ONLY for a in analyses)):
                return UnitFacts(writes=True, hint=facts.hint)
        return facts

    # --- routing a new unit ----------------------------------------------------------------

    def _decide(self, facts: UnitFacts, token: int | None, allow_wait: bool = True) -> Decision:
        """`_force_primary_next` holds until a connection is attached (`_attach`): a unit
        that has to wait for one is still sent to the primary."""
        host = self.host
        force_primary = bool(self.carried.pins) or self.route_primary or self._force_primary_next
        session = _PLAIN_SESSION if token is None and not force_primary else SessionFacts(force_primary, token)
        return decide_route(facts, session, host.topology.current, host.load, tiebreak=self.units + 1,
                            allow_wait=allow_wait and token is not None  # (only a token can wait)
                            and host.config.routing.consistency_wait_ms > 0)

    def _borrow_now(self, backend: BackendState) -> ServerConnection | None:
        if self.owned:
            owned = self.owned.get(backend.name)
            if owned is not None and not owned.closed:
                return owned
        pool = self._pools.get(backend.name)
        if (pool is None or pool.closed or pool.address.port != backend.port or pool.address.host != backend.host
                or pool.address.tls is not backend.tls):  # (a reload: new settings, new connections)
            pool = self._pools[backend.name] = self.host.pool_for(backend, self.user, self.database)
        conn = pool.try_acquire()
        if conn is not None and self.host.session_pooling:
            self.owned[backend.name] = conn
        return conn

    async def _route_later(self, facts: UnitFacts, unit: bytes, rerunnable: bool = True) -> None:
        """The slow path of routing: fetch the LSN token, wait for a replica, wait for a
        pool connection. The unit's bytes wait in the stash meanwhile. `rerunnable`: its
        bytes alone may run again elsewhere (units.binds_earlier_unnamed)."""
        host = self.host
        try:
            try:
                token, fetch = self.token.read_requirement(facts.writes)
                if fetch:
                    try:
                        token = await host.consistency.token_for(self.token)
                    except TokenUnavailable as exc:
                        # Without the token no replica is known to be safe: the primary serves.
                        log.info("session %s: LSN token unavailable (%s); reading from the primary",
                                 self.process_id, exc)
                        self._force_primary_next = True
                decision = self._decide(facts, token)
                if decision.wait_lsn is not None:
                    # (only with consistency_wait_ms > 0: the policy offers no wait otherwise)
                    lsn = decision.wait_lsn
                    t0 = perf_counter()
                    await host.consistency.wait_for_replica(lsn)
                    decision = self._decide(facts, lsn, allow_wait=False)
                    self._count_read(decision, True, perf_counter() - t0)
                elif token is not None and decision.error is None:
                    self._count_read(decision, False)
                for attempt in range(3):
                    if decision.error is not None:
                        raise RoutingError(*decision.error)
                    backend = decision.backend
                    conn = self.owned.get(backend.name)
                    if conn is not None and not conn.closed:
                        break
                    try:
                        conn = await host.pool_for(backend, self.user, self.database).acquire()
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
                    if host.session_pooling:
                        self.owned[backend.name] = conn
                    break
            except ProxyError as exc:
                self._routing = None
                self._refuse_unit(unit, exc)
                return
            if self.state is not State.READY:
                conn.pool.release(conn)
                return
            if self._cancel_pending:
                conn.pool.release(conn)
                self._routing = None
                self._refuse_unit(unit, _cancelled())
                return
            self._routing = None
            self.units += 1
            self._attach(conn, backend, unit, facts)
            if not rerunnable:
                self._retry_data = None
            self.resume()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - a bug; keep the other sessions alive
            log.exception("routing failed in session %s", self.process_id)
            self._routing = None
            self.close(f"internal error while routing: {exc}")

    def run_before(self, unit: bytes, wait) -> None:
        """The unit (waiting in the stash) goes on once `wait` (a coroutine) is done; a
        ProxyError it raises is the unit's answer."""
        self._routing = self.host.spawn(self._run_before(unit, wait))

    async def _run_before(self, unit: bytes, wait) -> None:
        try:
            await wait
            if self._cancel_pending:
                raise _cancelled()
        except ProxyError as exc:
            self._routing = None
            self._refuse_unit(unit, exc)
            return
        self._routing = None
        self.resume()

    # --- units that cannot run ---------------------------------------------------------------

    def _refuse_unit(self, unit: bytes, error: ProxyError) -> None:
        """Answer a unit that no backend can run with the error, as a server would: the
        error, then (after the rest of the group up to Sync is skipped) ReadyForQuery."""
        self._cancel_pending = False
        stash = self._stash
        self._stash = stash[len(unit) :] if stash.startswith(unit) else stash
        self._reply_error(unit, error)
        self.resume()

    def _reply_error(self, unit: bytes, error: ProxyError) -> None:
        if error.fatal:
            self.fail(error)
            return
        frames, _ = wire.split_messages(unit)
        self.tx.error_answered()  # (fails a transaction whose BEGIN is still deferred)
        reply = error.to_wire()
        if frames and frames[-1][0] in (wire.F_QUERY, wire.F_SYNC, wire.F_FUNCTION_CALL):
            reply += wire.ready_for_query(self.tx.status)
        else:
            self._skip_to_sync = True  # the rest of the group arrives later
        self.transport.write(reply)

    def _answer_aborted(self, unit: bytes, analyses: list[Analysis]) -> None:
        """A unit of a transaction the proxy rolled back: its end is answered here, and
        anything else fails as in a failed transaction block."""
        if len(analyses) == 1 and analyses[0].statements == 1 and analyses[0].tx in (
                TxControl.COMMIT, TxControl.ROLLBACK):
            self.tx.rollback_answered()
            frames, _ = wire.split_messages(unit)
            if frames[0][0] == wire.F_QUERY:
                self.transport.write(replies.simple(replies.Answer(tag="ROLLBACK"), TX_IDLE))
            else:
                self.transport.write(replies.extended(replies.Answer(tag="ROLLBACK"),
                                                      units.reply_shape(unit, frames), TX_IDLE))
            return
        self._reply_error(unit, InFailedSqlTransaction(
            "current transaction is aborted, commands ignored until end of transaction block", detail=self.tx.aborted))
