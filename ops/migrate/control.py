"""What every phase of a migration shares: the errors that name a side, the control
connections to the two sides, and the names a migration gives its objects.

Owns: `MigrateError` (side, object, problem) and `CatchUpTimeout`; `connection`, one
control connection for one question, and `Connections`, kept open across the calls of a
cutover's pause; `slot_name_for`, `publisher_conninfo`, `databases_of`; the subscription
lookup and the statement runner that every phase uses.
Must not know: the phases themselves (plan, copy, status, verify, handover).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence

import asyncpg

from router import pg
from router.lsn import parse_lsn
from router.pg import Endpoint, conninfo_value

__all__ = [
    "APPLICATION_NAME",
    "LOCAL",
    "SOURCE",
    "TARGET",
    "CatchUpTimeout",
    "Connections",
    "MigrateError",
    "allow_writes",
    "connection",
    "databases_of",
    "databases_or_default",
    "execute",
    "lsn_of",
    "open_connection",
    "publisher_conninfo",
    "server_version",
    "slot_name_for",
    "subscription_row",
]

APPLICATION_NAME = "pgsplit-migrate"
SOURCE, TARGET, LOCAL = "source", "target", "local"


# --------------------------------------------------------------------------- errors


class MigrateError(RuntimeError):
    """A migration step failed; ``side`` is "source", "target" or "local" (this machine's
    client programs), ``object`` names what failed (a table, a slot, a database...)."""

    def __init__(self, side: str, obj: str, problem: str) -> None:
        self.side = side
        self.object = obj
        self.problem = problem
        super().__init__(f"{side} {obj}: {problem}")


class CatchUpTimeout(MigrateError, TimeoutError):
    """`logical_catch_up` ran out of time before the subscription applied the LSN."""


# --------------------------------------------------------------------------- names and connections


def publisher_conninfo(fragment: str, user: str, password: str | None) -> str:
    """A subscription's CONNECTION from libpq key/value pairs that say where (host, port,
    sslmode...): the account added, ``{database}`` for the database (each one's name
    replaces it, as `start`'s ``source_conninfo`` and `reverse`'s ``target_conninfo``
    expect)."""
    params = [fragment.strip(), f"user={conninfo_value(user)}"]
    if password is not None:
        params.append(f"password={conninfo_value(password)}")
    params.append("dbname={database}")
    return " ".join(params)


async def databases_of(ep: Endpoint) -> list[str]:
    """The databases a migration carries by default: those of the server that take
    connections, less the templates and ``postgres`` (PostgreSQL's own)."""
    async with connection(ep, SOURCE) as conn:
        return await pg.databases(conn, with_postgres=False)


def slot_name_for(name: str, database: str) -> str:
    """The replication slot of migration ``name`` for ``database``: replication slot
    names are [a-z0-9_], at most 63 bytes, and unique in the source cluster."""
    raw = re.sub(r"[^a-z0-9_]", "_", f"{name}_{database}".lower())
    if len(raw) > 63:
        raw = raw[:54] + "_" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return raw


async def open_connection(ep: Endpoint, side: str, database: str | None,
                          settings: Mapping[str, str] | None,
                          application_name: str = APPLICATION_NAME) -> asyncpg.Connection:
    """A connection to ``database``; without one, to the endpoint's own database for a
    cluster-wide question, or to ``postgres`` when that one does not exist (yet: a
    target database that `start` will create)."""
    dbs = [database] if database else list(dict.fromkeys([ep.database, "postgres"]))
    for db in dbs:
        try:
            return await pg.connect(ep, application_name=application_name, database=db,
                                    settings=settings)
        except asyncpg.InvalidCatalogNameError as exc:
            if db != dbs[-1]:
                continue
            raise MigrateError(side, f"database {ep.where(db)}", "does not exist") from exc
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            raise MigrateError(side, f"database {ep.where(db)}",
                               f"cannot connect: {exc or type(exc).__name__}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


# Connections opened with default_transaction_read_only off in their startup packet: a
# fence (ALTER SYSTEM + reload) does not override a client's own setting, so the control
# statements on them need no SET first (a round trip less to a far server).
_WRITABLE: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


async def allow_writes(conn: asyncpg.Connection) -> None:
    """Control DDL and setval must work on a fenced side (default_transaction_read_only)."""
    if conn not in _WRITABLE:
        await conn.execute("SET default_transaction_read_only = off")


class Connections:
    """Control connections kept open across calls, one per (endpoint, database): the
    cutover runs `logical_catch_up`, `sync_sequences`, `finish` and `reverse` back to
    back while clients wait, and a login to a server in another region costs several
    round trips. Open them before the pause (`open`, then `prepare_cutover`); pass
    ``connections=`` to those functions; `close` at the end. A connection found closed
    is opened again. They are opened writable (default_transaction_read_only off): they
    carry control statements only, and must keep working on a fenced side."""

    def __init__(self, application_name: str = APPLICATION_NAME) -> None:
        self.application_name = application_name
        self._conns: dict[tuple[Endpoint, str | None], asyncpg.Connection] = {}

    async def get(self, ep: Endpoint, side: str,
                  database: str | None = None) -> asyncpg.Connection:
        conn = self._conns.get((ep, database))
        if conn is None or conn.is_closed():
            conn = await open_connection(ep, side, database, {"default_transaction_read_only": "off"},
                                         self.application_name)
            _WRITABLE.add(conn)
            self._conns[(ep, database)] = conn
        return conn

    async def open(self, ep: Endpoint, side: str, databases: Sequence[str | None]) -> None:
        await asyncio.gather(*(self.get(ep, side, db) for db in databases))

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            await pg.close(conn, 2)


@contextlib.asynccontextmanager
async def connection(ep: Endpoint, side: str, database: str | None = None,
                     settings: Mapping[str, str] | None = None,
                     connections: Connections | None = None
                     ) -> AsyncIterator[asyncpg.Connection]:
    """`open_connection`, closed on the way out; from ``connections`` (kept open) when given."""
    if connections is not None and settings is None:
        yield await connections.get(ep, side, database)
        return
    conn = await open_connection(ep, side, database, settings)
    try:
        yield conn
    finally:
        await pg.close(conn, 5)


async def server_version(conn: asyncpg.Connection) -> tuple[int, str]:
    """(server_version_num, server_version) of the connected server."""
    row = await conn.fetchrow("SELECT current_setting('server_version_num')::int AS num, "
                              "current_setting('server_version') AS text")
    return row["num"], row["text"]


def lsn_of(value: int | str | None) -> int | None:
    """An LSN from a query: asyncpg decodes pg_lsn as int, ``::text`` gives '0/16B3748'."""
    if value is None or isinstance(value, int):
        return value
    return parse_lsn(value)


def databases_or_default(source: Endpoint, databases: Sequence[str] | None) -> list[str]:
    """The databases asked for, or the source endpoint's own; each at most once."""
    dbs = list(databases) if databases else [source.database]
    if len(set(dbs)) != len(dbs):
        raise ValueError(f"databases listed twice: {dbs}")
    return dbs


SUBSCRIPTION_SQL = """
    SELECT s.oid, s.subenabled, s.subslotname, s.subpublications FROM pg_subscription s
    JOIN pg_database d ON d.oid = s.subdbid
    WHERE s.subname = $1 AND d.datname = current_database()"""


async def subscription_row(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    """The subscription ``name`` of the connected database (pg_subscription is shared)."""
    return await conn.fetchrow(SUBSCRIPTION_SQL, name)


async def execute(conn: asyncpg.Connection, sql: str, side: str, obj: str,
                  timeout: float | None = None) -> None:
    """Run a control statement; a failure is a `MigrateError` naming ``side`` and ``obj``."""
    try:
        await conn.execute(sql, timeout=timeout)
    except asyncio.TimeoutError:
        # not the statement: a CREATE SUBSCRIPTION carries a password
        raise MigrateError(side, obj, f"{sql.split(' ', 2)[0]} {sql.split(' ', 2)[1]} "
                                      f"timed out after {timeout:g}s") from None
    except asyncpg.PostgresError as exc:
        raise MigrateError(side, obj, f"{exc.sqlstate}: {exc}") from exc
