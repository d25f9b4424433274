"""A migration's plan: what `start` would do, and what stops it.

Owns: the facts `plan` gathers from both sides (`ClusterFacts`, once per server;
`DatabaseFacts` and `TableFacts`, per database), `assess`, the pure function from those
facts to a `Plan` of `Blocker`s and notes, and `BlockedError`, `start`'s refusal; what
the cutover will refuse (`cutover_blockers`: the preflight's own `build_report`, on the
facts the cutover will find, not a copy of its checks).
Must not know: how the schema is copied or the replication started (copy.py), how a
started migration is followed (status.py, watch.py).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import asyncpg

from ops import schema
from ops.cutover.preflight import (
    PreflightFacts,
    ReplicationFacts,
    ServerState,
    build_report,
    record_schemas,
)
from ops.migrate.control import (
    SOURCE,
    TARGET,
    MigrateError,
    connection,
    databases_or_default,
    server_version,
    slot_name_for,
    subscription_row,
)
from ops.migrate.programs import find_client_bindir
from ops.text import human_bytes
from router.pg import USER_SCHEMA_SQL, Endpoint, major_version
from router.pg import databases as connectable_databases

__all__ = [
    "BlockedError",
    "Blocker",
    "ClusterFacts",
    "DatabaseFacts",
    "DatabasePlan",
    "Plan",
    "TableFacts",
    "assess",
    "plan",
]


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
    """What `start` would do and what stops it (``blockers``; `start` refuses while any),
    and what the cutover's preflight will refuse once the migration runs as planned
    (``cutover_blockers``: its own checks, ops.cutover.preflight's `build_report`)."""

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
    cutover_blockers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.blockers and not self.cutover_blockers

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
                         f"({human_bytes(db.table_bytes)}), {len(db.sequences)} sequences"
                         + ("" if db.target_exists else "; created on the target")
                         + ("; already started" if db.started else ""))
            for line in db.schema_diff[:50]:
                lines.append(f"    schema: {line}")
            if len(db.schema_diff) > 50:
                lines.append(f"    schema: ... {len(db.schema_diff) - 50} more differences")
        lines.append("blockers:" if not self.ok else "blockers: none")
        lines += [f"  - {b}" for b in self.blockers]
        lines += [f"  - the cutover will refuse: {b}" for b in self.cutover_blockers]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

class BlockedError(MigrateError):
    """`start` refused: the plan has blockers (``plan.blockers``)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        first = plan.blockers[0]
        more = f" (and {len(plan.blockers) - 1} more)" if len(plan.blockers) > 1 else ""
        super().__init__(first.side, first.object, first.reason + more)


_TABLES_SQL = f"""
    SELECT n.nspname AS schema, c.relname AS name, c.relkind::text,
           c.relpersistence::text, c.relreplident::text,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
               AS has_pk,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
               AS has_replident_index,
           pg_table_size(c.oid) AS bytes
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMA_SQL}
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
    ORDER BY 1, 2"""

# Roles the schema dump names: owners and grantees of the database's objects.
_ROLES_SQL = f"""
    WITH owners AS (
        SELECT c.relowner AS r FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {USER_SCHEMA_SQL}
        UNION SELECT n.nspowner FROM pg_namespace n WHERE {USER_SCHEMA_SQL}
        UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE {USER_SCHEMA_SQL}
        UNION SELECT t.typowner FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE {USER_SCHEMA_SQL}
        UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relacl IS NOT NULL AND {USER_SCHEMA_SQL}
        UNION SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace n
            WHERE n.nspacl IS NOT NULL AND {USER_SCHEMA_SQL}
        UNION SELECT datdba FROM pg_database WHERE datname = current_database()
    )
    SELECT DISTINCT a.rolname FROM owners o JOIN pg_authid a ON a.oid = o.r
    WHERE a.rolname !~ '^pg_' ORDER BY 1"""

_SEQUENCES_SQL = """
    SELECT schemaname || '.' || sequencename AS name FROM pg_sequences
    WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"""


@dataclass(frozen=True, slots=True)
class ClusterFacts:
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
    connectable: tuple[str, ...] = ()  # what a cutover compares: templates left out, postgres in


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


def assess(name: str, source: ClusterFacts, target: ClusterFacts,
           databases: Sequence[DatabaseFacts], missing: Sequence[str] = (),
           dump_bindir: str | None = None, dump_problem: Blocker | None = None,
           prints: Mapping[str, Mapping[str, schema.Fingerprint]] | None = None,
           servers: tuple[str, str] = ("source", "target")) -> Plan:
    """The plan from the facts (pure; `plan` gathers them). ``missing``: requested
    databases the source does not have. ``prints``: every connectable database's
    fingerprint on both sides, as the cutover takes them (``{"source": {db: print},
    "target": {...}}``), for `cutover_blockers`; ``servers`` names the two primaries in
    those lines."""
    blockers: list[Blocker] = []
    notes: list[str] = []
    s_major, t_major = major_version(source.version_num), major_version(target.version_num)
    if source.wal_level != "logical":
        blockers.append(Blocker(SOURCE, "wal_level",
                                f"is {source.wal_level!r}, logical replication needs "
                                "'logical' (ALTER SYSTEM SET wal_level = logical, then "
                                "restart)"))
    if dump_problem is not None:
        blockers.append(dump_problem)
    if t_major != s_major and target.version_num < source.version_num:
        notes.append(f"the target ({target.version}) is older than the source "
                     f"({source.version}): the schema dump may use syntax the target "
                     "does not accept")
    elif t_major != s_major:
        notes.append(f"major version upgrade {s_major} -> {t_major} (logical replication; "
                     "a physical standby cannot do this)")
    blockers += [Blocker(SOURCE, f"database {db}", "does not exist") for db in missing]
    plans = [_assess_database(name, f, source, target, blockers, notes) for f in databases]
    new_slots = sum(1 for p in plans if not p.started)  # one per database not started yet
    for setting, free in (("max_replication_slots", source.free_slots),
                          ("max_wal_senders", source.free_senders)):
        if new_slots > free:
            blockers.append(Blocker(SOURCE, setting, f"{free} free, {new_slots} needed "
                                                     "(one per database)"))
    return Plan(name=name, source_version=source.version, target_version=target.version,
                source_major=s_major, target_major=t_major, wal_level=source.wal_level,
                dump_major=major_version(max(source.version_num, target.version_num)),
                dump_bindir=dump_bindir,
                databases=tuple(plans), blockers=tuple(blockers), notes=tuple(notes),
                cutover_blockers=() if prints is None else cutover_blockers(
                    name, source, target, plans, prints, servers))


def cutover_blockers(name: str, source: ClusterFacts, target: ClusterFacts,
                     plans: Sequence[DatabasePlan],
                     prints: Mapping[str, Mapping[str, schema.Fingerprint]],
                     servers: tuple[str, str] = ("source", "target")) -> tuple[str, ...]:
    """What the cutover's preflight will refuse once this migration runs as planned: its
    own checks (`build_report`, not a copy of them) on the facts it will find then. Every
    planned database subscribed, its tables copied, no lag; its target schema the
    source's (start copies it) unless started already (then as it is: drift counts).
    What no start changes stays as it is now: databases outside the migration
    (``postgres`` too) with tables on the source, schemas that differ there."""
    carried = [p.database for p in plans]
    target_prints = dict(prints["target"])
    for p in plans:
        if not p.started and p.database in prints["source"]:
            target_prints[p.database] = prints["source"][p.database]
    facts = PreflightFacts(
        ServerState(servers[0], servers[0], reachable=True, version=source.version,
                    version_num=source.version_num),
        ServerState(servers[1], servers[1], reachable=True, version=target.version,
                    version_num=target.version_num),
        ReplicationFacts("logical", status="streaming", subscription=name, databases=carried))
    record_schemas(facts, {"source": prints["source"], "target": target_prints})
    return tuple(build_report(facts, max_lag_bytes=0).blockers)


def _assess_database(name: str, f: DatabaseFacts, source: ClusterFacts, target: ClusterFacts,
                     blockers: list[Blocker], notes: list[str]) -> DatabasePlan:
    """One database's part of `assess`: its plan; its blockers and notes added to those
    given."""
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
    if f.publication_all_tables is False:
        blockers.append(Blocker(SOURCE, f"publication {name} (database {db})",
                                "exists but is not FOR ALL TABLES"))
    if f.sequences:
        notes.append(f"{db}: {len(f.sequences)} sequences are not replicated: "
                     "sync_sequences() at the cutover moves the target's past the "
                     "source's")
    if f.large_objects:
        notes.append(f"{db}: {f.large_objects} large objects are not replicated")
    return DatabasePlan(
        database=db, tables=tuple(t.name for t in f.tables),
        tables_without_identity=no_identity, unlogged_tables=unlogged,
        sequences=f.sequences, source_extensions=tuple(e for e, _ in f.extensions),
        missing_extensions=missing_ext, missing_roles=missing_roles,
        table_bytes=sum(t.bytes for t in f.tables),
        target_exists=db in target.databases, target_has_tables=target_has_tables,
        schema_diff=diff, started=f.started)


async def _cluster_facts(conn: asyncpg.Connection) -> ClusterFacts:
    num, text = await server_version(conn)
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
    return ClusterFacts(num, text, row["wal_level"], row["free_slots"], row["free_senders"],
                        frozenset(row["slots"]), frozenset(row["roles"]),
                        frozenset(row["extensions"]), frozenset(row["databases"]),
                        tuple(await connectable_databases(conn, with_postgres=True)))


async def _cutover_prints(source: Endpoint, target: Endpoint, s_facts: ClusterFacts,
                          t_facts: ClusterFacts) -> dict[str, dict[str, schema.Fingerprint]]:
    """Every database's fingerprint on both sides, as the cutover's preflight takes them."""
    take = schema.fingerprint_for(major_version(s_facts.version_num),
                                  major_version(t_facts.version_num))
    prints: dict[str, dict[str, schema.Fingerprint]] = {SOURCE: {}, TARGET: {}}
    for side, ep, facts in ((SOURCE, source, s_facts), (TARGET, target, t_facts)):
        for db in facts.connectable:
            async with connection(ep, side, db) as conn:
                prints[side][db] = await take(conn)
    return prints


async def _database_facts(source: Endpoint, target: Endpoint, name: str, db: str,
                          on_target: bool) -> DatabaseFacts:
    async with connection(source, SOURCE, db) as conn:
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
            source_schema=await schema.comparable_fingerprint(conn))
    if not on_target:
        return facts
    async with connection(target, TARGET, db) as conn:
        return replace(facts, target_schema=await schema.comparable_fingerprint(conn),
                       started=await subscription_row(conn, name) is not None)


async def plan(source: Endpoint, target: Endpoint, *, name: str = "pgsplit",
               databases: Sequence[str] | None = None,
               bindir: str | os.PathLike[str] | None = None,
               servers: tuple[str, str] | None = None) -> Plan:
    """Look at both sides and say what `start` would do and what blocks it (`assess`),
    and what the cutover will refuse (`cutover_blockers`; ``servers`` names the two
    primaries there, host:port by default).

    Blockers: the source's ``wal_level`` is not ``logical``; too few free replication
    slots or WAL senders on the source; a table with neither a primary key nor a replica
    identity (its UPDATEs and DELETEs cannot be replicated: with a FOR ALL TABLES
    publication the source would even refuse them); an extension installed on the
    source that the target cannot install; a role owning or granted objects that the
    target lacks; a target database whose tables differ from the source's; a leftover
    slot of the same name; a missing source database; no pg_dump/psql of the newer major
    version on this machine. What the cutover will refuse (``cutover_blockers``, which do
    not stop `start`): a database with tables on the source that the migration does not
    carry (``postgres`` too), schemas that differ outside it, drift inside it.
    """
    dbs = databases_or_default(source, databases)
    async with connection(source, SOURCE) as sconn, connection(target, TARGET) as tconn:
        s_facts = await _cluster_facts(sconn)
        t_facts = await _cluster_facts(tconn)
    dump_bindir, dump_problem = None, None
    try:
        # runs `pg_dump --version` of each candidate: not on the event loop's thread
        dump_bindir = str(await asyncio.to_thread(
            find_client_bindir, major_version(max(s_facts.version_num, t_facts.version_num)),
            bindir))
    except MigrateError as exc:
        dump_problem = Blocker(exc.side, exc.object, exc.problem)
    present = [db for db in dbs if db in s_facts.databases]
    facts = [await _database_facts(source, target, name, db, db in t_facts.databases)
             for db in present]
    prints = await _cutover_prints(source, target, s_facts, t_facts)
    return assess(name, s_facts, t_facts, facts, [db for db in dbs if db not in present],
                  dump_bindir, dump_problem, prints,
                  servers or (f"{source.host}:{source.port}", f"{target.host}:{target.port}"))
