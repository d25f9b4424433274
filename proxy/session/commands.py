"""Units the proxy answers itself, without a server.

Owns: `SET/RESET/SHOW pgsplit.*` (route, consistency, min_lsn, last_lsn), a lone `BEGIN`
whose routing waits for the transaction's first statement (so `SET TRANSACTION READ ONLY`
can still send it to a replica), the `COMMIT`/`ROLLBACK` of such a transaction when
nothing ran in it, and a standalone `DEALLOCATE` (prepared statements live on the proxy's
side of the session). Answers work in simple and extended protocol. It works on the
session's parts (its transaction, carried state and token) through their methods.
Must not know: servers, pools.
"""

from __future__ import annotations

import enum
from typing import Protocol

from proxy import wire
from proxy.errors import (
    CannotConnectNow, FeatureNotSupported, InvalidParameterValue, InvalidSqlStatementName, ProxyError, UndefinedObject,
)
from proxy.session import replies
from proxy.session.carried import CarriedState
from proxy.session.consistency import SessionToken
from proxy.session.host import SessionHost, TokenUnavailable
from proxy.session.transaction import Transaction
from router.classify.analysis import Analysis, TxControl
from router.lsn import format_lsn, parse_lsn
from router.pg import quote_literal
from router.topology import BackendState

ROUTES = ("primary", "auto")
CONSISTENCY = ("session", "global", "token", "eventual")
SETTINGS = ("route", "consistency", "min_lsn")
SHOWABLE = SETTINGS + ("last_lsn", "backend")


_BEGIN_REPLY = replies.simple(replies.Answer(tag="BEGIN"), wire.TX_IN_BLOCK)


class Answered(enum.Enum):
    YES = "answered"
    NO = "the unit goes to a server"
    LATER = "answered once what it waits for is done (the unit waits in the stash)"


class Session(Protocol):
    """The parts of a session its commands read and change."""

    host: SessionHost
    tx: Transaction
    carried: CarriedState
    token: SessionToken
    route_primary: bool
    backend: BackendState | None

    def classify(self, sql: bytes) -> Analysis: ...

    def register_statement(self, name: bytes, sql: bytes, params: bytes): ...

    def write_local(self, reply: bytes) -> None: ...

    def run_before(self, unit: bytes, wait) -> None: ...


def defer_begin(session: Session, sql: bytes) -> None:
    """Answer a lone BEGIN (`sql`) of an idle session: it goes to a server ahead of the
    transaction's first statement, which decides where the transaction runs."""
    session.tx.begin_answered(sql)
    session.write_local(_BEGIN_REPLY)


class NotAlone(FeatureNotSupported):
    fatal = False


def _is_own(eff) -> bool:
    return eff.kind.startswith("pgsplit_")


def answer(session: Session, buf: bytes, frames: list, analyses: list[Analysis]) -> Answered:
    """Answer the unit if it is the proxy's to answer."""
    own = [eff for a in analyses for eff in a.effects if _is_own(eff)]
    tx = session.tx
    if own and session.token.pending and any(
            e.kind == "pgsplit_show" and (e.name or "").lower() == "last_lsn" for e in own):
        # The token must cover the commit that just finished: fetch it, then answer.
        session.run_before(bytes(buf[frames[0][1] : frames[-1][2]]), _fetch_token(session))
        return Answered.LATER
    if own:
        if any(a.statements != sum(1 for e in a.effects if _is_own(e)) for a in analyses):
            reply = replies.Answer(error=NotAlone(
                "pgsplit commands (SET/RESET/SHOW pgsplit.*) must be sent as statements of their own"))
        else:
            reply = evaluate(session, own)
        if reply.error is not None and tx.status != wire.TX_IDLE:
            return Answered.NO  # in a transaction the server must fail too: see raise_on_server
        _reply(session, buf, frames, reply)
        return Answered.YES
    if (analyses and frames[0][0] != wire.F_QUERY and tx.status == wire.TX_IDLE and not session.carried.pins
            and all(a.tx is TxControl.BEGIN and a.statements == 1 for a in analyses)):
        return _begin_extended(session, buf, frames)
    if len(frames) != 1 or frames[0][0] != wire.F_QUERY or len(analyses) != 1:
        return Answered.NO
    a = analyses[0]
    if a.statements != 1:
        return Answered.NO
    if a.tx is TxControl.BEGIN and tx.status == wire.TX_IDLE and not session.carried.pins:
        t, s, e = frames[0]
        defer_begin(session, wire.parse_query(buf[s + 5 : e]))
        return Answered.YES
    if tx.deferred_begin is not None and a.tx in (TxControl.COMMIT, TxControl.ROLLBACK):
        tx.end_answered()
        tag = "COMMIT" if a.tx is TxControl.COMMIT else "ROLLBACK"
        session.write_local(replies.simple(replies.Answer(tag=tag), wire.TX_IDLE))
        return Answered.YES
    if a.effects and all(e.kind in ("deallocate", "deallocate_all") for e in a.effects):
        eff = a.effects[0]
        carried = session.carried
        if eff.kind == "deallocate" and eff.name not in carried.sql_prepared and eff.name.encode() not in carried.stmts:
            reply = replies.Answer(error=_undefined_prepared(eff.name))
        else:
            session.carried.apply(a, None)  # the server, if one is attached, never saw it
            reply = replies.Answer(tag="DEALLOCATE ALL" if eff.kind == "deallocate_all" else "DEALLOCATE")
        session.write_local(replies.simple(reply, tx.status))
        return Answered.YES
    return Answered.NO


def own_answer(session: Session, analysis: Analysis) -> replies.Answer | None:
    """The proxy's answer to a Query with pgsplit statements, else None. In a failed
    transaction the server answers (with "current transaction is aborted")."""
    own = [eff for eff in analysis.effects if _is_own(eff)]
    if not own or session.tx.status == wire.TX_FAILED:
        return None
    if len(own) != analysis.statements:
        return replies.Answer(error=NotAlone(
            "pgsplit commands (SET/RESET/SHOW pgsplit.*) must be sent as statements of their own"))
    return evaluate(session, own)


def answers_each_time(analysis: Analysis) -> bool:
    """A statement with pgsplit commands: the proxy answers it at each execution, so it
    is never prepared on a server."""
    return any(_is_own(eff) for eff in analysis.effects)


def _begin_extended(session: Session, buf: bytes, frames: list) -> Answered:
    """A BEGIN in extended protocol (a driver's prepared "BEGIN"): answered here like
    a simple-query BEGIN, its routing deferred to the transaction's first statement."""
    begin = None
    types = []
    for t, s, e in frames:
        body = buf[s + 5 : e]
        kind = 0
        if t == wire.F_PARSE:
            name, sql, params = wire.parse_parse(body)
            begin = sql
            if name:
                session.register_statement(name, sql, params)
        elif t == wire.F_BIND:
            _, name, _ = wire.parse_bind_names(body)
            st = session.carried.stmts.get(name) if name else None
            if st is not None:
                begin = wire.parse_parse(st.parse[5:])[1]
        elif t in (wire.F_DESCRIBE, wire.F_CLOSE):
            kind, _ = wire.parse_target(body)
        elif t not in (wire.F_EXECUTE, wire.F_SYNC, wire.F_FLUSH):
            return Answered.NO
        types.append((t, kind))
    executes = any(t == wire.F_EXECUTE for t, _ in types)
    # asyncpg prepares with Parse/Describe/Flush: those replies need no Sync.
    if begin is None or types[-1][0] != (wire.F_SYNC if executes else types[-1][0]):
        return Answered.NO
    if executes:
        session.tx.begin_answered(begin)
    session.write_local(replies.extended(replies.Answer(tag="BEGIN"), types, session.tx.status))
    return Answered.YES


def evaluate(session: Session, effects) -> replies.Answer:
    """Run pgsplit statements; the answer of the last one (or the first error)."""
    reply = replies.Answer(tag="SET")
    for eff in effects:
        reply = _run(session, eff)
        if reply.error is not None:
            break
    return reply


async def _fetch_token(session: Session) -> None:
    try:
        await session.host.consistency.token_for(session.token)
    except TokenUnavailable as exc:
        raise CannotConnectNow(f"the primary's WAL position is unavailable: {exc}") from None


def _reply(session: Session, buf: bytes, frames: list, reply: replies.Answer) -> None:
    t0 = frames[0][0]
    if t0 == wire.F_QUERY:
        session.write_local(replies.simple(reply, session.tx.status))
        return
    types = []
    for t, s, e in frames:
        kind = 0
        if t in (wire.F_DESCRIBE, wire.F_CLOSE):
            kind, _ = wire.parse_target(buf[s + 5 : e])
        elif t == wire.F_PARSE:
            name, sql, params = wire.parse_parse(buf[s + 5 : e])
            if name:
                session.carried.answered_here(name, session.classify(sql))
        types.append((t, kind))
    session.write_local(replies.extended(reply, types, session.tx.status))


def _run(session: Session, eff) -> replies.Answer:
    name = (eff.name or "").lower()
    if eff.kind == "pgsplit_show":
        if name not in SHOWABLE:
            return replies.Answer(error=_unknown(name))
        return replies.Answer(tag="SHOW", columns=(name,), rows=((_show(session, name),),))
    if name not in SETTINGS:
        return replies.Answer(error=_unknown(name))
    if eff.kind == "pgsplit_reset":
        value = None
    else:
        value = (eff.value or "").strip()
    try:
        _set(session, name, value)
    except ProxyError as exc:
        return replies.Answer(error=exc)
    return replies.Answer(tag="RESET" if value is None else "SET")


def _show(session: Session, name: str) -> str:
    token = session.token
    if name == "route":
        return "primary" if session.route_primary else "auto"
    if name == "consistency":
        return token.mode
    if name == "min_lsn":
        return format_lsn(token.min_lsn) if token.min_lsn is not None else ""
    if name == "last_lsn":
        return format_lsn(token.lsn) if token.lsn is not None else "0/0"
    if name == "backend":
        return session.backend.name if session.backend is not None else ""
    raise AssertionError(name)


def _set(session: Session, name: str, value: str | None) -> None:
    token = session.token
    if name == "route":
        value = (value or "auto").lower()
        if value not in ROUTES:
            raise _invalid(name, value, ROUTES)
        session.route_primary = value == "primary"
    elif name == "consistency":
        value = (value or session.host.config.routing.consistency).lower()
        if value not in CONSISTENCY:
            raise _invalid(name, value, CONSISTENCY)
        token.mode = value
    elif name == "min_lsn":
        if not value:
            token.min_lsn = None
            return
        try:
            token.min_lsn = parse_lsn(value)
        except ValueError:
            raise InvalidParameterValue(
                f'invalid value for parameter "pgsplit.min_lsn": "{value}"',
                hint="an LSN looks like 0/16B3748, as SHOW pgsplit.last_lsn returns it",
            ) from None


def _unknown(name: str) -> ProxyError:
    return UndefinedObject(
        f'unrecognized configuration parameter "pgsplit.{name}"',
        hint="pgsplit knows: " + ", ".join(f"pgsplit.{n}" for n in SHOWABLE),
    )


def _invalid(name: str, value: str, allowed: tuple[str, ...]) -> ProxyError:
    return InvalidParameterValue(
        f'invalid value for parameter "pgsplit.{name}": "{value}"',
        hint="Available values: " + ", ".join(allowed) + ".",
    )


def _undefined_prepared(name: str | None) -> ProxyError:
    return InvalidSqlStatementName(f'prepared statement "{name}" does not exist')


def raise_on_server(error: ProxyError) -> bytes:
    """A Query that makes the server raise this error: inside a transaction block the
    client's error must abort the server's transaction too, as PostgreSQL's own would."""
    parts = [f"ERRCODE = {quote_literal(error.sqlstate)}", f"MESSAGE = {quote_literal(error.message)}"]
    if error.detail:
        parts.append(f"DETAIL = {quote_literal(error.detail)}")
    if error.hint:
        parts.append(f"HINT = {quote_literal(error.hint)}")
    return wire.query("DO $pgsplit$ BEGIN RAISE EXCEPTION USING " + ", ".join(parts) + "; END $pgsplit$")
