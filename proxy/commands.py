"""Units the proxy answers itself, without a server.

Owns: `SET/RESET/SHOW pgsplit.*` (route, consistency, min_lsn, last_lsn), a lone `BEGIN`
whose routing waits for the transaction's first statement (so `SET TRANSACTION READ ONLY`
can still send it to a replica), the `COMMIT`/`ROLLBACK` of such a transaction when
nothing ran in it, and a standalone `DEALLOCATE` (prepared statements live on the proxy's
side of the session). Answers work in simple and extended protocol.
Must not know: servers, pools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy import local, wire
from proxy.errors import CannotConnectNow, FeatureNotSupported, InvalidParameterValue, ProxyError, UndefinedObject
from router.classify.analysis import Analysis, TxControl
from router.lsn import format_lsn, parse_lsn
from router.monitor.probe import PollError

if TYPE_CHECKING:  # pragma: no cover
    from proxy.session import ClientSession

ROUTES = ("primary", "auto")
CONSISTENCY = ("session", "global", "token", "eventual")
SETTINGS = ("route", "consistency", "min_lsn")
SHOWABLE = SETTINGS + ("last_lsn", "backend")


_BEGIN_REPLY = local.simple(local.Answer(tag="BEGIN"), wire.TX_IN_BLOCK)


def defer_begin(session: "ClientSession", sql: bytes) -> None:
    """Answer a lone BEGIN (`sql`) of an idle session: it goes to a server ahead of the
    transaction's first statement, which decides where the transaction runs."""
    session._deferred_begin = sql
    session.status = wire.TX_IN_BLOCK
    session.write_local(_BEGIN_REPLY)


class NotAlone(FeatureNotSupported):
    fatal = False


class Commands:
    def __init__(self, app):
        self.app = app

    def answer(self, session: "ClientSession", buf: bytes, frames: list, analyses: list[Analysis]) -> bool | None:
        """Answer the unit if it is the proxy's to answer: True when answered, False to
        route it, None when the answer comes later (the unit waits in the stash)."""
        own = [eff for a in analyses for eff in a.effects if eff.kind.startswith("pgsplit_")]
        if own and session.commit_pending and any(
                e.kind == "pgsplit_show" and (e.name or "").lower() == "last_lsn" for e in own):
            # The token must cover the commit that just finished: fetch it, then answer.
            session._routing = self.app.spawn(self._fetch_token(session, bytes(buf[frames[0][1] : frames[-1][2]])))
            return None
        if own:
            if any(a.statements != sum(1 for e in a.effects if e.kind.startswith("pgsplit_")) for a in analyses):
                answer = local.Answer(error=NotAlone(
                    "pgsplit commands (SET/RESET/SHOW pgsplit.*) must be sent as statements of their own"))
            else:
                answer = self.evaluate(session, own)
            if answer.error is not None and session.status != wire.TX_IDLE:
                return False  # in a transaction the server must fail too: see ClientSession._forward
            self._reply(session, buf, frames, answer)
            return True
        if (analyses and frames[0][0] != wire.F_QUERY and session.status == wire.TX_IDLE and not session.pins
                and all(a.tx is TxControl.BEGIN and a.statements == 1 for a in analyses)):
            return self._begin_extended(session, buf, frames)
        if len(frames) != 1 or frames[0][0] != wire.F_QUERY or len(analyses) != 1:
            return False
        a = analyses[0]
        if a.statements != 1:
            return False
        if a.tx is TxControl.BEGIN and session.status == wire.TX_IDLE and not session.pins:
            t, s, e = frames[0]
            defer_begin(session, wire.parse_query(buf[s + 5 : e]))
            return True
        if session._deferred_begin is not None and a.tx in (TxControl.COMMIT, TxControl.ROLLBACK):
            session._deferred_begin = None
            session.status = wire.TX_IDLE
            tag = "COMMIT" if a.tx is TxControl.COMMIT else "ROLLBACK"
            session.write_local(local.simple(local.Answer(tag=tag), wire.TX_IDLE))
            return True
        if a.effects and all(e.kind in ("deallocate", "deallocate_all") for e in a.effects):
            eff = a.effects[0]
            if eff.kind == "deallocate" and eff.name not in session.sql_prepared:
                answer = local.Answer(error=_undefined_prepared(eff.name))
            else:
                session._apply_effects(a, None)  # the server, if one is attached, never saw it
                answer = local.Answer(tag="DEALLOCATE ALL" if eff.kind == "deallocate_all" else "DEALLOCATE")
            session.write_local(local.simple(answer, session.status))
            return True
        return False

    def _begin_extended(self, session: "ClientSession", buf: bytes, frames: list) -> bool:
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
                st = session.stmts.get(name) if name else None
                if st is not None:
                    begin = wire.parse_parse(st.parse[5:])[1]
            elif t in (wire.F_DESCRIBE, wire.F_CLOSE):
                kind, _ = wire.parse_target(body)
            elif t not in (wire.F_EXECUTE, wire.F_SYNC, wire.F_FLUSH):
                return False
            types.append((t, kind))
        executes = any(t == wire.F_EXECUTE for t, _ in types)
        # asyncpg prepares with Parse/Describe/Flush: those replies need no Sync.
        if begin is None or types[-1][0] != (wire.F_SYNC if executes else types[-1][0]):
            return False
        if executes:
            session._deferred_begin = begin
            session.status = wire.TX_IN_BLOCK
        session.write_local(local.extended(local.Answer(tag="BEGIN"), types, session.status))
        return True

    def evaluate(self, session: "ClientSession", effects) -> local.Answer:
        """Run pgsplit statements; the answer of the last one (or the first error)."""
        answer = local.Answer(tag="SET")
        for eff in effects:
            answer = self._run(session, eff)
            if answer.error is not None:
                break
        return answer

    async def _fetch_token(self, session: "ClientSession", unit: bytes) -> None:
        try:
            await self.app.lsn_token(session)
        except (PollError, ConnectionError, OSError, TimeoutError) as exc:
            session._routing = None
            session._refuse_unit(unit, CannotConnectNow(f"the primary's WAL position is unavailable: {exc}"))
            return
        except ProxyError as exc:
            session._routing = None
            session._refuse_unit(unit, exc)
            return
        session._routing = None
        session.resume()

    def _reply(self, session: "ClientSession", buf: bytes, frames: list, answer: local.Answer) -> None:
        t0 = frames[0][0]
        if t0 == wire.F_QUERY:
            session.write_local(local.simple(answer, session.status))
            return
        types = []
        for t, s, e in frames:
            kind = 0
            if t in (wire.F_DESCRIBE, wire.F_CLOSE):
                kind, _ = wire.parse_target(buf[s + 5 : e])
            elif t == wire.F_PARSE:
                name, sql, params = wire.parse_parse(buf[s + 5 : e])
                if name:
                    from proxy.session import Stmt  # a statement answered here each time

                    session.stmts[name] = Stmt(b"", b"", session._classify(sql), local=True)
            types.append((t, kind))
        session.write_local(local.extended(answer, types, session.status))

    def _run(self, session: "ClientSession", eff) -> local.Answer:
        name = (eff.name or "").lower()
        if eff.kind == "pgsplit_show":
            if name not in SHOWABLE:
                return local.Answer(error=_unknown(name))
            return local.Answer(tag="SHOW", columns=(name,), rows=((self._show(session, name),),))
        if name not in SETTINGS:
            return local.Answer(error=_unknown(name))
        if eff.kind == "pgsplit_reset":
            value = None
        else:
            value = (eff.value or "").strip()
        try:
            self._set(session, name, value)
        except ProxyError as exc:
            return local.Answer(error=exc)
        return local.Answer(tag="RESET" if value is None else "SET")

    def _show(self, session: "ClientSession", name: str) -> str:
        if name == "route":
            return "primary" if session.route_primary else "auto"
        if name == "consistency":
            return session.consistency
        if name == "min_lsn":
            return format_lsn(session.min_lsn) if session.min_lsn is not None else ""
        if name == "last_lsn":
            return format_lsn(session.token) if session.token is not None else "0/0"
        if name == "backend":
            return session.backend.name if session.backend is not None else ""
        raise AssertionError(name)

    def _set(self, session: "ClientSession", name: str, value: str | None) -> None:
        if name == "route":
            value = (value or "auto").lower()
            if value not in ROUTES:
                raise _invalid(name, value, ROUTES)
            session.route_primary = value == "primary"
        elif name == "consistency":
            value = (value or self.app.config.routing.consistency).lower()
            if value not in CONSISTENCY:
                raise _invalid(name, value, CONSISTENCY)
            session.consistency = value
        elif name == "min_lsn":
            if not value:
                session.min_lsn = None
                return
            try:
                session.min_lsn = parse_lsn(value)
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
    err = UndefinedObject(f'prepared statement "{name}" does not exist')
    err.sqlstate = "26000"
    return err


def raise_on_server(error: ProxyError) -> bytes:
    """A Query that makes the server raise this error: inside a transaction block the
    client's error must abort the server's transaction too, as PostgreSQL's own would."""
    def lit(v: str) -> str:
        return "'" + v.replace("'", "''") + "'"

    parts = [f"ERRCODE = {lit(error.sqlstate)}", f"MESSAGE = {lit(error.message)}"]
    if error.detail:
        parts.append(f"DETAIL = {lit(error.detail)}")
    if error.hint:
        parts.append(f"HINT = {lit(error.hint)}")
    return wire.query("DO $pgsplit$ BEGIN RAISE EXCEPTION USING " + ", ".join(parts) + "; END $pgsplit$")
