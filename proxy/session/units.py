"""Units of work in the client's byte stream, without I/O.

Owns: where a unit ends (a Query, or extended-protocol messages up to Sync; a unit still
arriving is routed before its end when it is long or nothing more has come), the two
shapes the per-unit path recognises (a lone Query; Bind, [Describe,] Execute, Sync of a
prepared statement, or the same behind an unnamed Parse), what a unit tells the router
(`UnitFacts`), and whether a unit may join the connection its session has attached
(`Boundary`). Functions of bytes, frames and the session's statements only: each can be
fed bytes in a test.
Must not know: servers, pools, sockets.
"""

from __future__ import annotations

import enum
from typing import Callable

from proxy import wire
from proxy.session.carried import Stmt
from router.classify.analysis import Analysis, Route, TxControl
from router.policy import UnitFacts
from router.topology import Role

F_BIND, F_CLOSE, F_DESCRIBE, F_EXECUTE = wire.F_BIND, wire.F_CLOSE, wire.F_DESCRIBE, wire.F_EXECUTE
F_FLUSH, F_PARSE, F_QUERY, F_SYNC = wire.F_FLUSH, wire.F_PARSE, wire.F_QUERY, wire.F_SYNC
F_TERMINATE, F_FUNCTION_CALL = wire.F_TERMINATE, wire.F_FUNCTION_CALL

UNIT_END = frozenset({F_QUERY, F_SYNC, F_FLUSH, F_FUNCTION_CALL, F_TERMINATE})
OPENS_STEP = frozenset({F_PARSE, F_BIND, F_DESCRIBE, F_EXECUTE, F_CLOSE, F_QUERY, F_SYNC, F_FUNCTION_CALL})
MAX_UNROUTED = 1 << 20  # a unit larger than this is routed before its Sync arrives
FRAME_BATCH = 4096  # messages framed at a time (a longer unit is routed as a large one)
STATEMENT_KIND = 0x53  # 'S' in Close/Describe
# A message whose body the proxy cannot read (a string without its terminator, a Bind cut
# short...): its unit goes to the primary unchanged, and PostgreSQL answers it (ERROR 08P01,
# the session goes on), as it would without the proxy.
MALFORMED = Analysis(Route.WRITE, parse_error=True, reason="malformed message")
_DESCRIBE_PORTAL = b"D\0\0\0\x06P\0"  # Describe of the unnamed portal

Classify = Callable[[bytes], Analysis]


class Boundary(enum.Enum):
    """May the next unit run on the connection the session has attached?"""

    GO = 0  # yes
    WAIT = 1  # not yet: wait for more bytes or for the units in flight to finish
    ROUTE = 2  # no: give the connection back and route the unit afresh


def is_lone_query(data: bytes) -> bool:
    """`data` is exactly one whole Query message."""
    n = len(data)
    if n < 6 or data[0] != F_QUERY or data[-1] != 0:
        return False
    length = data[1]  # (compiled, a 64-bit integer before it is shifted: units.pxd)
    return (length << 24 | data[2] << 16 | data[3] << 8 | data[4]) == n - 1


def needs_tracking(a: Analysis) -> bool:
    """Statements that an idle session's unit cannot send on the fast case: transaction
    control, and those that are not `Analysis.plain` (SET and other effects, pins, SQL
    EXECUTE, COPY FROM, several statements, synchronous_commit, DDL): the general path
    follows what they do. Inside a transaction only the latter count."""
    return a.tx is not None or not a.plain


class Extended:
    """A Bind-Execute-Sync unit (`extended_unit`): its analysis and, for a Bind of a
    prepared statement, the pieces to rebuild the Bind with the server's name."""

    __slots__ = ("analysis", "stmt", "described", "portal", "bind_rest", "tail", "sql")

    def __init__(self, analysis: Analysis | None, stmt: Stmt | None, described: bool,
                 portal: bytes = b"", bind_rest: bytes = b"", tail: bytes = b"", sql: bytes = b""):
        self.analysis = analysis  # None until the caller has classified `sql`
        self.stmt = stmt  # None: behind an unnamed Parse, whose text is `sql`
        self.sql = sql
        self.described = described
        self.portal = portal
        self.bind_rest = bind_rest  # the Bind's body after the portal and statement names
        self.tail = tail  # [Describe,] Execute, Sync


def extended_unit(data: bytes, stmts: dict[bytes, Stmt]) -> Extended | None:
    """`data` as Bind, [Describe portal,] Execute, Sync of a statement the session
    prepared (libpq sends the Describe: psql, pgbench, psycopg; asyncpg does not), or the
    same behind an unnamed Parse (libpq's PQexecParams; its analysis is left to the
    caller). None for anything else."""
    t = data[0]
    if t != F_BIND and t != F_PARSE:
        return None
    n = len(data)
    start_b = 0
    if t == F_PARSE:
        if n < 7:
            return None
        start_b = data[1]  # (compiled, a 64-bit integer before it is shifted: units.pxd)
        start_b = 1 + (start_b << 24 | data[2] << 16 | data[3] << 8 | data[4])
        if data[5] != 0 or start_b + 7 > n or data[start_b] != F_BIND \
                or data[start_b + 5 : start_b + 7] != b"\0\0":  # unnamed portal and statement
            return None
    if start_b + 5 > n:
        return None
    end_b = data[start_b + 1]
    end_b = start_b + 1 + (end_b << 24 | data[start_b + 2] << 16 | data[start_b + 3] << 8 | data[start_b + 4])
    described = data[end_b : end_b + 7] == _DESCRIBE_PORTAL
    x = end_b + 7 if described else end_b  # the Execute
    if x + 15 != n or data[x] != F_EXECUTE or data[x + 10] != F_SYNC \
            or data[x + 1 : x + 5] != b"\0\0\0\x09" or data[-4:] != b"\0\0\0\x04":
        return None
    if t == F_PARSE:
        end_sql = data.find(b"\0", 6, start_b)
        if end_sql < 0:
            return None
        return Extended(None, None, described, sql=data[6:end_sql])
    try:
        portal, name, off = wire.parse_bind_names(data[5:end_b])
    except wire.ProtocolViolation:
        return None
    stmt = stmts.get(name) if name else None
    if stmt is None or stmt.local:
        return None
    return Extended(stmt.analysis, stmt, described, portal, data[5 + off : end_b], data[end_b:])


def scan_unit(buf: bytes, frames: list, i: int, classify: Classify, stmts: dict[bytes, Stmt],
              unnamed: Analysis | None) -> tuple[int, list[Analysis], bool] | None:
    """(index of the unit's last frame, analyses, uses FunctionCall) for the unit that
    starts at frames[i]; None if its end has not arrived yet. `unnamed`: the analysis of
    the unnamed statement a Bind may use."""
    analyses: list[Analysis] = []
    fcall = False
    for j in range(i, len(frames)):
        t, s, e = frames[j]
        try:
            if t == F_QUERY:
                analyses.append(classify(wire.parse_query(buf[s + 5 : e])))
            elif t == F_PARSE:
                name, sql, _ = wire.parse_parse(buf[s + 5 : e])
                a = classify(sql)
                analyses.append(a)
                if not name:
                    unnamed = a
            elif t == F_BIND:
                _, stmt, _ = wire.parse_bind_names(buf[s + 5 : e])
                st = stmts.get(stmt) if stmt else None
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


def unit_facts(analyses: list[Analysis], fcall: bool, sql_prepared: dict[str, Analysis],
               default_read_only: bool) -> UnitFacts:
    """What the router needs to know of a unit: whether it writes, and its hint.
    `sql_prepared`: the analyses of the session's SQL-prepared statements (an EXECUTE of
    a read is a read)."""
    writes = fcall
    hint = None
    for a in analyses:
        if a.hint is not None and hint is None:
            hint = Role.PRIMARY if a.hint is Route.WRITE else Role.REPLICA
        if a.route is Route.WRITE:
            if a.executes and len(a.executes) == 1 and a.statements == 1:
                prepared = sql_prepared.get(a.executes[0])
                if prepared is not None and prepared.route is Route.READ:
                    continue
            writes = True
        elif a.tx is TxControl.BEGIN and not default_read_only:
            writes = True
    return UnitFacts(writes=writes, hint=hint)


def binds_earlier_unnamed(buf: bytes, frames: list, i: int, last: int) -> bool:
    """The unit binds the unnamed statement without a Parse of it before: the statement
    comes from an earlier group (libpq's PQprepare with an empty name, then
    PQexecPrepared), so the unit's bytes alone cannot run again on another connection."""
    parsed = False
    for j in range(i, last + 1):
        t, s, e = frames[j]
        if t == F_PARSE and buf[s + 5] == 0:
            parsed = True
        elif t == F_BIND and not parsed:
            try:
                if not wire.parse_bind_names(buf[s + 5 : e])[1]:
                    return True
            except wire.ProtocolViolation:
                continue
    return False


def unit_last(frames: list, last: int) -> int:
    """The index of the last frame of the unit that ends at (or after) frames[last]: its
    Sync (or Query), which may come after the Flush it was routed at; as far as has
    arrived if it has not."""
    for j in range(last, len(frames)):
        t = frames[j][0]
        if t == F_SYNC or t == F_QUERY or t == F_FUNCTION_CALL:
            return j
    return len(frames) - 1


def unit_bytes(buf: bytes, frames: list, i: int, last: int) -> bytes:
    start, end = frames[i][1], frames[unit_last(frames, last)][2]
    return buf if start == 0 and end == len(buf) else buf[start:end]


def reply_shape(buf: bytes, frames: list) -> list[tuple[int, int]]:
    """[(message type, Describe/Close kind or 0)] of an extended-protocol group, the
    shape of the reply the proxy composes for it (proxy.session.replies.extended)."""
    return [(t, buf[s + 5] if t in (F_DESCRIBE, F_CLOSE) else 0) for t, s, e in frames]
