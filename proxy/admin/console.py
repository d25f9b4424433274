"""The admin console over the PostgreSQL protocol: `psql -p 6432 -U <admin> pgsplit`, as
PgBouncer's, PgCat's and PgDog's users are used to.

Owns: a console session after the listener has authenticated it (a [[users]] user named
in [admin] console_users asking for database [admin] console_database): the simple-query
loop, the commands and their answers. A console session never borrows a server
connection: no byte of it reaches a backend. The SHOW rows are built by proxy.admin.show;
PAUSE, RESUME, RELOAD and the cutover and migration states are AdminOps' (the HTTP API's
operations, so both give the same results).

Protocol: simple Query only. An extended-protocol message gets one 0A000 error (an ERROR:
the session goes on) and the messages up to its Sync are dropped, a FunctionCall among
them (then ReadyForQuery), as PostgreSQL does after an error; a lone Flush is answered
with nothing. Commands are case-insensitive, several in one Query run in order up to the
first error. The login's rights are checked again at each command (a reload may have
revoked them). A client that does not read its answers stops the console (see run()).
Must not know: the handshake (proxy.listener), sessions' internals beyond what SHOW
CLIENTS reads, HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Protocol

from proxy import wire
from proxy.admin import reload, show
from proxy.admin.operations import AdminOps
from proxy.errors import FeatureNotSupported, InvalidAuthorization, InvalidSyntax, ObjectNotInPrerequisiteState, ProtocolViolation, ProxyError
from proxy.server.pool import Pools
from proxy.session.client import ClientSession
from proxy.session.stream import State
from proxy.version import version
from router.topology import TopologyHolder

log = logging.getLogger("pgsplit.console")

MAX_QUERY = 64 * 1024  # a console command is a few words; a longer message is a client's mistake
RELOAD_TIMEOUT_S = 30.0  # a reload reads a file and re-points the monitor: seconds at most
PAUSE_GRACE_S = 5.0  # PAUSE waits for cutover.pause_timeout_s, the drain's own bound, and this
SERVER_VERSION = "16.0 (pgsplit admin console)"  # what drivers parse; no backend is asked

# The extended protocol's messages: refused, then dropped up to Sync.
_EXTENDED = frozenset((wire.F_PARSE, wire.F_BIND, wire.F_DESCRIBE, wire.F_EXECUTE, wire.F_CLOSE))
# Outside COPY PostgreSQL ignores these; so does the console.
_IGNORED = frozenset((wire.F_COPY_DATA, wire.F_COPY_DONE, wire.F_COPY_FAIL))

COMMANDS = {
    "SHOW HELP": "this list",
    "SHOW CLIENTS": "client connections of the listener: user, database, state, address, since when",
    "SHOW SERVERS": "pooled server connections: backend, state, server process, since when",
    "SHOW POOLS": "per (database, user, backend): clients holding and waiting, server connections",
    "SHOW STATS": "per database since the start: transactions, queries, query time",
    "SHOW DATABASES": "databases clients use or [databases] names: limits and connections",
    "SHOW CONFIG": "the effective config, secrets masked, and what a RELOAD can change",
    "SHOW VERSION": "pgsplit's version",
    "SHOW BACKENDS": "the active cluster's backends: role, up, lag, rotation, load",
    "SHOW CONSISTENCY": "read-your-writes: reads served at once, after a wait, or on the primary",
    "SHOW CUTOVER": "the active cluster, a pause or cutover in progress, the last cutover",
    "SHOW MIGRATION": "watched online migrations: lag, tables by copy state, drift",
    "PAUSE": "hold new units of work until RESUME, once those in flight are done (at most cutover.pause_timeout_s)",
    "RESUME": "let the held units go",
    "RELOAD": "read the config file again, as SIGHUP and POST /v1/reload do",
}


class ConsoleHost(Protocol):
    """What the console reads of the process (proxy.app.Proxy)."""

    config: Any  # proxy.config.Config in force
    sessions: Collection[ClientSession]
    pools: Pools
    topology: TopologyHolder
    metrics: Any  # metrics.Metrics
    admin_ops: AdminOps
    dataplane: Any  # proxy.dataplane.DataPlane: `holding` while paused, the sessions it `held`

    def spawn(self, coro: Coroutine) -> asyncio.Task: ...


def startup_parameters(params: dict[str, str]) -> dict[str, str]:
    """The ParameterStatus set a console client is shown (drivers need these few)."""
    return {"server_version": SERVER_VERSION, "server_encoding": "UTF8", "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY", "integer_datetimes": "on", "standard_conforming_strings": "on",
            "TimeZone": "UTC", "is_superuser": "off", "application_name": params.get("application_name", "")}


def statements(sql: str) -> list[str]:
    """The commands of one Query string: split at semicolons (no command has a quoted
    part), blanks dropped, words normalized to single spaces."""
    return [" ".join(part.split()) for part in sql.split(";") if part.strip()]


def table(columns: list[str], rows: list[list[show.Value]], tag: str = "SHOW") -> bytes:
    """RowDescription (text columns), DataRows, CommandComplete."""
    out = [wire.row_description(columns)]
    out += [wire.data_row([show.text(v) for v in row]) for row in rows]
    out.append(wire.command_complete(tag))
    return b"".join(out)


class Console:
    def __init__(self, host: ConsoleHost, session: ClientSession):
        self.host = host
        self.session = session
        self.shows: dict[str, Callable[[], show.Table]] = {
            "SHOW HELP": lambda: show.help_table(COMMANDS),
            "SHOW CLIENTS": self.clients,
            "SHOW SERVERS": self.servers,
            "SHOW POOLS": self.pools,
            "SHOW STATS": lambda: show.stats(host.metrics.units.databases),
            "SHOW DATABASES": self.databases,
            "SHOW CONFIG": lambda: show.config(host.config.redacted_dict(), reload.restart_only_keys()),
            "SHOW VERSION": lambda: show.version(version()),
            "SHOW BACKENDS": lambda: show.backends(host.admin_ops.status()),
            "SHOW CONSISTENCY": lambda: show.consistency(host.config.routing.consistency,
                                                         host.config.routing.consistency_wait_ms,
                                                         host.metrics.units.consistency),
            "SHOW CUTOVER": lambda: show.cutover(host.admin_ops.cutover_state()),
            "SHOW MIGRATION": lambda: show.migrations(show.MigrationInfo(**m) for m in host.admin_ops.migrations()),
        }

    # --- the protocol loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Answer the client until it sends Terminate or goes away (the inbox then raises
        EOFError, and the session's end cancels this task wherever it waits).

        Flow control: a client that does not read its answers stops the console. Before
        each message, and between the commands of one Query, the console waits while the
        client's write buffer is above its high-water mark (its input is not read
        meanwhile); the unread input is bounded by the session (CONSOLE_INBOX_MAX). The
        wait ends when the client reads, or when it goes away (the session's end)."""
        session = self.session
        inbox = session.inbox
        log.info("admin console session %s opened by %s from %s", session.process_id, session.user, session.peer)
        skipping = False  # an extended-protocol message was refused: drop up to Sync
        while True:
            await session.writable()
            t, body = await inbox.message(MAX_QUERY, "in the admin console")  # (08P01 past the limit)
            session.console_input_taken()
            if t == wire.F_QUERY:
                if not skipping:
                    try:
                        sql = wire.parse_query(body).decode("utf-8", "replace")
                    except wire.ProtocolViolation as exc:
                        raise ProtocolViolation(str(exc)) from None
                    await self.query(sql)
                    if session.state is State.CLOSED:  # (a fatal error ended it)
                        return
                    self.write(wire.ready_for_query())
            elif t == wire.F_SYNC:
                skipping = False
                self.write(wire.ready_for_query())
            elif t == wire.F_TERMINATE:
                session.close("client sent Terminate")
                return
            elif t == wire.F_FLUSH:
                pass  # nothing is pending: nothing to send (PostgreSQL answers a lone Flush with nothing)
            elif t in _EXTENDED:
                if not skipping:
                    skipping = True
                    self.write(self.extended_refusal().to_wire())
            elif t == wire.F_FUNCTION_CALL:
                if not skipping:  # (in skip mode it is dropped up to Sync like the rest)
                    self.write(self.extended_refusal().to_wire() + wire.ready_for_query())
            elif t not in _IGNORED:
                raise ProtocolViolation(f"invalid frontend message type {t} in the admin console")

    def write(self, data: bytes) -> None:
        transport = self.session.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    @staticmethod
    def extended_refusal() -> ProxyError:
        error = FeatureNotSupported(
            "the pgsplit admin console takes simple queries only (the extended query protocol is not supported)",
            hint="send the command as a plain query: psql does; asyncpg's execute() without arguments does; "
                 "psycopg's execute() without parameters does, with prepare_threshold=None")
        error.fatal = False  # an ERROR, not a FATAL: the session goes on (0A000 is fatal by default)
        return error

    async def query(self, sql: str) -> None:
        """One Query message's answers: each command's, up to the first error, written as
        each is done (waiting while the client does not read)."""
        commands = statements(sql)
        if not commands:
            self.write(wire.EMPTY_QUERY)
            return
        for index, command in enumerate(commands):
            if index:
                await self.session.writable()
            try:
                self.write(await self.command(command))
            except ProxyError as exc:
                self.write(exc.to_wire())
                if exc.fatal:
                    self.session.close(exc.message)
                return
            except Exception as exc:  # a bug in one command must not end the admin's session
                log.exception("admin console command %r failed", command)
                self.write(ProxyError(f"internal error in {command}: {exc!r}").to_wire())
                return

    # --- the commands -------------------------------------------------------------------------------

    def still_admin(self) -> None:
        """The login's rights are checked again at each command: a reload that took the
        user out of [admin] console_users or out of [[users]] ends its console (FATAL 28000)."""
        config = self.host.config
        user = self.session.user
        if user not in config.admin.console_users or all(u.name != user for u in config.users):
            raise InvalidAuthorization(f'user "{user}" may no longer use the pgsplit admin console: '
                                       "it is not in [admin] console_users (or not a [[users]] name) any more")

    async def command(self, command: str) -> bytes:
        self.still_admin()
        key = command.upper()
        build = self.shows.get(key)
        if build is not None:
            return table(*build())
        ops = self.host.admin_ops
        if key == "PAUSE":
            bound = self.host.config.cutover.pause_timeout_s + PAUSE_GRACE_S
            result = await self.bounded(ops.pause(), bound, "PAUSE")
            log.info("traffic paused from the admin console by %s", self.session.user)
            return (wire.notice_response("00000", f"paused: units in flight drained in "
                                                  f"{result['drain_seconds'] * 1000:.1f} ms")
                    + wire.command_complete("PAUSE"))
        if key == "RESUME":
            result = await self.bounded(ops.resume(), RELOAD_TIMEOUT_S, "RESUME")
            return (wire.notice_response("00000", f"resumed after {result['pause_seconds']:.3f} s "
                                                  f"({result['units_held']} units held)")
                    + wire.command_complete("RESUME"))
        if key == "RELOAD":
            result = await self.bounded(ops.reload(), RELOAD_TIMEOUT_S, "RELOAD")
            text = "reloaded: " + (", ".join(result["applied"]) or "no change")
            if result["needs_restart"]:
                text += "; needs a restart to take effect: " + ", ".join(result["needs_restart"])
            return wire.notice_response("00000", text) + wire.command_complete("RELOAD")
        raise InvalidSyntax(f'syntax error: unknown admin console command "{command}"',
                            hint="commands: " + ", ".join(COMMANDS) + " (SHOW HELP describes them)")

    async def bounded(self, operation: Coroutine[Any, Any, dict], seconds: float, name: str) -> dict:
        """Run an admin operation in a task of the process, so that a client leaving does not
        cut it in half (a reload's swap, a pause taking effect), and wait at most `seconds`
        for it. A refused operation (ValueError: not paused, one already in progress, an
        invalid file) is a 55000 error with its message; so is a timeout of the operation's
        own (TimeoutError), told apart from the console's wait running out."""

        async def outcome() -> tuple[dict | None, ValueError | TimeoutError | None]:
            try:
                return await operation, None
            except (ValueError, TimeoutError) as exc:
                return None, exc

        task = self.host.spawn(outcome())
        try:
            async with asyncio.timeout(seconds):
                result, refused = await asyncio.shield(task)
        except TimeoutError:
            raise ObjectNotInPrerequisiteState(
                f"{name} did not finish within {seconds:g} s; it goes on in the proxy "
                "(SHOW CUTOVER tells when it is done)") from None
        if isinstance(refused, TimeoutError):
            raise ObjectNotInPrerequisiteState(f"{name} failed: a step of it timed out"
                                               + (f" ({refused})" if str(refused) else ""))
        if refused is not None:
            raise ObjectNotInPrerequisiteState(str(refused))
        return result

    # --- what SHOW reads off the process ---------------------------------------------------------------

    def _live_sessions(self) -> list[ClientSession]:
        return [s for s in list(self.host.sessions) if s.state is not State.CLOSED]

    def clients(self) -> show.Table:
        infos = []
        paused = self.host.dataplane.held  # sessions whose next unit waits for RESUME (or a cutover)
        for s in self._live_sessions():
            held = _held(s)
            first = held[0] if held else None
            addr, port = _address(s.transport, "peername")
            local_addr, local_port = _address(s.transport, "sockname")
            infos.append(show.ClientInfo(
                user=s.user, database=s.database,
                state=show.client_state(login=s.state is State.HANDSHAKE, console=s.state is State.CONSOLE,
                                        waiting=s.waiting or s in paused, has_server=bool(held)),
                addr=addr, port=port, local_addr=local_addr, local_port=local_port, connect_time=s.connected_at,
                tls=s.tls, application_name=s.application_name, prepared_statements=len(s.stmts), id=s.process_id,
                backend=first.backend if first else None, server_pid=first.process_id if first else None))
        return show.clients(infos)

    def servers(self) -> show.Table:
        wall, mono = time.time(), time.monotonic()
        infos = []
        for pool in self.host.pools:
            for state, conns in (("idle", list(pool.idle)), ("active", list(pool.busy))):
                for conn in conns:
                    local_addr, local_port = _address(conn.transport, "sockname")
                    owner = conn.owner
                    infos.append(show.ServerInfo(
                        user=pool.user, database=pool.database, backend=pool.address.backend, state=state,
                        addr=conn.host, port=conn.port, local_addr=local_addr, local_port=local_port,
                        connect_time=wall - (mono - conn.created), remote_pid=conn.process_id,
                        tls=conn.transport is not None and conn.transport.get_extra_info("ssl_object") is not None,
                        prepared_statements=len(conn.prepared),
                        client_id=getattr(owner, "process_id", None) if owner is not None else None))
        return show.servers(infos)

    def pools(self) -> show.Table:
        roles = {b.name: b.role.value for b in self.host.topology.current.backends}
        infos = [show.PoolInfo(database=p.database, user=p.user, backend=p.address.backend,
                               role=roles.get(p.address.backend), sv_active=len(p.busy), sv_idle=len(p.idle),
                               sv_login=p.opening, cl_waiting=len(p.waiters), pool_size=p.size)
                 for p in self.host.pools]
        holders: dict[tuple[str, str, str], int] = {}
        for s in self._live_sessions():
            for backend in {conn.backend for conn in _held(s)}:
                key = (s.database, s.user, backend)
                holders[key] = holders.get(key, 0) + 1
        return show.pools(infos, holders, self.host.config.pool.mode)

    def databases(self) -> show.Table:
        config = self.host.config
        sessions = [s for s in self._live_sessions() if s.state is not State.HANDSHAKE]
        pools = list(self.host.pools)
        names = set(config.databases) | {p.database for p in pools} | {s.database for s in sessions}
        infos = []
        for name in names:
            limit = config.databases.get(name)
            infos.append(show.DatabaseInfo(
                name=name, max_client_connections=limit.max_client_connections if limit is not None else None,
                current_client_connections=sum(1 for s in sessions if s.database == name),
                current_connections=sum(len(p.idle) + len(p.busy) for p in pools if p.database == name),
                console=name == config.admin.console_database))
        return show.databases(infos, config.pool.size, config.pool.mode, self.host.dataplane.holding)


def _held(session: ClientSession) -> list:
    """The server connections a client holds: the attached one, and in session pooling the
    ones it keeps per backend."""
    held = [session.server] if session.server is not None else []
    return held + [conn for conn in session.owned.values() if conn is not session.server]


def _address(transport: Any, which: str) -> tuple[str, int | None]:
    where = transport.get_extra_info(which) if transport is not None else None
    if isinstance(where, tuple) and len(where) >= 2:
        return str(where[0]), int(where[1])
    return str(where or ""), None
