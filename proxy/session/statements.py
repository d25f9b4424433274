"""The client's prepared statements, and putting them on the attached server connection.

Owns (as a part of ClientSession): remembering the named statements a client prepares (a
group of named Parses and a Sync is answered here, no server needed), preparing one where
it is first used (its ParseComplete dropped: an anchor of the step), making afresh one the
client Parses where the connection has it already (after DDL the old one may fail), keeping each
connection within its bound of prepared statements (the least recently used closed
first), preparing the client's SQL-prepared statements ahead of the unit that EXECUTEs
them, and noting on a step what the session must learn from its end (writes, effects,
transaction control).
Must not know: routing, the process.
"""

from __future__ import annotations

from proxy import wire
from proxy.server.connection import ServerConnection
from proxy.server.replies import Step, SwallowStep
from proxy.session import commands
from proxy.session.carried import Stmt
from proxy.session.recovery import Recovery
from proxy.session.units import STATEMENT_KIND
from router.classify.analysis import Analysis, Route, TxControl

_WRITE = Route.WRITE


def close_statement(server_name: bytes) -> bytes:
    return wire.build_target(wire.F_CLOSE, STATEMENT_KIND, server_name)


class Statements(Recovery):
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    def _register(self, step: Step, name: bytes) -> bytes:
        """`name`'s Parse goes out next in `step`. Returns the Closes to write just before
        it: the least recently used statements beyond the connection's bound
        (`pool.max_prepared_statements`), their CloseCompletes dropped."""
        if step.error is not None:  # the server skips the rest of the group: nothing changes there
            return b""
        prepared = self.server.prepared
        closes = b""
        if len(prepared) >= prepared.limit:
            closes = self._close_oldest(step)
        prepared.add(name)
        if step.parses is None:
            step.parses = []
        step.parses.append((step.sent, name))
        return closes

    def _reprepare(self, step: Step, name: bytes) -> bytes:
        """The client's own Parse of a statement this connection has (from this client or
        another): closed first, so that the Parse makes it afresh, as the client's own
        server would. One prepared before DDL changed the columns it returns would fail
        the client's Describe and Binds with 0A000 ("cached plan must not change result
        type") after the client did what PostgreSQL asks: prepare it again."""
        prepared = self.server.prepared
        if name not in prepared or step.error is not None:
            return b""
        prepared.discard(name)
        return self._close_here(step, name)

    def _close_oldest(self, step: Step) -> bytes:
        return b"".join(self._close_here(step, name) for name in self.server.prepared.make_room())

    def _close_here(self, step: Step, name: bytes) -> bytes:
        """A Close of `name` (forgotten by the connection already) going out in `step`:
        its CloseComplete is dropped."""
        self.server.add_edit(step, step.sent, None)
        if step.closes is None:
            step.closes = []
        step.closes.append((step.sent, name))  # (an error before it: still prepared)
        step.sent += 1
        return close_statement(name)

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
                or analysis.mentions_sync_commit or analysis.changes_schema):
            if step.analyses is None:
                step.analyses = []
            step.analyses.append(analysis)

    def _prepare_sql(self, server: ServerConnection, analysis: Analysis, step: Step, out: list[bytes],
                     buf: bytes, run: int, s: int) -> int:
        """SQL EXECUTE (in a Query, or in a Parse) of a statement the client PREPAREd on
        another connection: prepare it here first, in a step of the proxy's own placed
        just before the client's, its bytes just before the message at `s`. Returns the
        new start of the unchanged run."""
        for sql in self.carried.sql_prepares_for(server, analysis):
            prepare = SwallowStep()
            server.steps.insert(server.steps.index(step), prepare)
            out.append(buf[run:s])
            out.append(wire.query(sql))
            run = s
        return run

    def register_statement(self, name: bytes, sql: bytes, params: bytes) -> Stmt:
        """Remember a named statement the client prepared; servers get it when needed."""
        return self.carried.register(name, sql, params, self.classify(sql))

    def _prepare_locally(self, buf: bytes, frames: list) -> bool:
        """Named Parses and a Sync, nothing else: the statements are remembered and
        prepared on a server when first used (as PgBouncer does). No server connection
        is held for them: a client that prepares synchronously while other clients of
        the same thread hold the pool's connections (pgbench -M prepared) cannot
        deadlock on the pool."""
        if frames[-1][0] != wire.F_SYNC or len(frames) < 2:
            return False
        parses = []
        for t, s, e in frames[:-1]:
            if t != wire.F_PARSE:
                return False
            name, sql, params = wire.parse_parse(buf[s + 5 : e])
            if not name or not wire.param_types_ok(params):
                return False  # (a malformed one is the server's to refuse)
            parses.append((name, sql, params))
        for name, sql, params in parses:
            if commands.answers_each_time(self.classify(sql)):
                return False  # answered by the proxy on each execution
        for name, sql, params in parses:
            self.register_statement(name, sql, params)
        self.transport.write(wire.PARSE_COMPLETE * len(parses) + wire.ready_for_query(self.tx.status))
        return True
