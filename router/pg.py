"""Talking SQL to a server as a client: the account, the login, the goodbye, the quoting.

Owns: `Endpoint` (a server address and the account used there), `connect` (one asyncpg
login bounded by the endpoint's connect timeout), `close` (a goodbye bounded in time, the
socket dropped when the goodbye fails), SQL and conninfo quoting, `major_version`,
`error_text`, the catalog filter for the application's schemas, and the list of databases.
Every module that opens its own control connections uses these: the monitor here in
router/ and everything in ops/ (router/ must not import ops/, so this base lives here).
Must not know: what the connections are for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from router.tls import ServerTls

__all__ = [
    "USER_SCHEMA_SQL",
    "Endpoint",
    "close",
    "conninfo_value",
    "connect",
    "databases",
    "error_text",
    "major_version",
    "quote_ident",
    "quote_literal",
    "quote_qualified",
]

# Objects of these schemas are PostgreSQL's own, never the application's: pg_catalog,
# information_schema, and the toast and temporary schemas (pg_toast*, pg_temp_*). A
# condition on `n.nspname` (pg_namespace aliased n).
USER_SCHEMA_SQL = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
                   "AND n.nspname !~ '^pg_(toast|temp_)'")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How this process reaches one server: its address and the account it logs in with.
    ``database`` is the one used for cluster-wide questions."""

    host: str
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    database: str = "postgres"
    connect_timeout_s: float = 10.0
    tls: ServerTls = ServerTls()

    def at(self, host: str, port: int, tls: ServerTls | None = None) -> Endpoint:
        """The same account on another server (with that server's TLS settings)."""
        return dataclasses.replace(self, host=host, port=port, tls=self.tls if tls is None else tls)

    def conninfo(self, database: str | None = None, *, password: bool = True,
                 **extra: str) -> str:
        """libpq key/value connection string: with the password, what a subscription on
        the other side uses when it is not told otherwise (its sslmode as strict as can be
        said there: the CA file is this machine's); without, for client programs here
        (which get the password from PGPASSWORD, out of sight of ps, and the TLS files)."""
        params: dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user,
                                  "dbname": database or self.database}
        tls = self.tls
        if password and self.password is not None:
            params["password"] = self.password
        mode = tls.subscription_sslmode() if password else tls.sslmode
        if mode != "prefer":  # (libpq's default)
            params["sslmode"] = mode
        if not password:
            for key in ("sslrootcert", "sslcert", "sslkey"):
                if getattr(tls, key) is not None:
                    params[key] = getattr(tls, key)
        params.update(extra)
        return " ".join(f"{k}={conninfo_value(str(v))}" for k, v in params.items())

    def where(self, database: str | None = None) -> str:
        return f"{self.host}:{self.port}/{database or self.database}"


async def connect(ep: Endpoint, *, application_name: str, database: str | None = None,
                  settings: Mapping[str, str] | None = None) -> asyncpg.Connection:
    """One login to ``database`` (default the endpoint's), the whole of it (TCP, TLS,
    authentication) within ``ep.connect_timeout_s``; ``settings`` go in the startup
    packet, next to the application_name that tells these connections apart in
    pg_stat_activity."""
    return await asyncpg.connect(
        host=ep.host, port=ep.port, user=ep.user, password=ep.password,
        database=database or ep.database, timeout=ep.connect_timeout_s, ssl=ep.tls.for_asyncpg(),
        server_settings={"application_name": application_name, **(settings or {})})


async def close(conn: asyncpg.Connection | None, timeout: float) -> None:
    """Say goodbye within ``timeout``; a connection that cannot (broken, or the server
    does not answer) is dropped without one. Never raises."""
    if conn is None or conn.is_closed():
        return
    try:
        await conn.close(timeout=timeout)
    except Exception:  # noqa: BLE001  a broken connection: just drop it
        conn.terminate()


def error_text(exc: BaseException) -> str:
    """An error for an operator: a server's with its SQLSTATE, any other by its text (or
    its type, when it has none)."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.sqlstate} {exc}"
    return str(exc) or type(exc).__name__


def major_version(version_num: int) -> int:
    """server_version_num -> major version: 150004 -> 15, 90624 -> 9.6 as 906. Two servers
    run the same major version when these are equal; to order versions, compare
    server_version_num (906 is older than 15)."""
    return version_num // 10000 if version_num >= 100000 else version_num // 100


_DATABASES_SQL = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
_DATABASES_BUT_POSTGRES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                               "AND datname <> 'postgres' ORDER BY 1")


async def databases(conn: asyncpg.Connection, *, with_postgres: bool) -> list[str]:
    """The databases of the server that take connections, templates left out. A cutover
    moves every one of them (``with_postgres``); a migration carries by default only the
    application's, less ``postgres`` (PostgreSQL's own)."""
    sql = _DATABASES_SQL if with_postgres else _DATABASES_BUT_POSTGRES_SQL
    return [r[0] for r in await conn.fetch(sql)]


def conninfo_value(value: str) -> str:
    """Quote a libpq conninfo value (libpq-connect.html#LIBPQ-CONNSTRING-KEYWORD-VALUE)."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings is on since 9.1; E'' would
    still do, but DDL such as CREATE SUBSCRIPTION takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def quote_qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"
