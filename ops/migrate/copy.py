"""Starting a migration: the schema copied, then the publication and the subscription.

Owns: `start` (per database: create it on the target, copy the schema with the newer
major version's pg_dump and psql, CREATE PUBLICATION on the source, CREATE SUBSCRIPTION
on the target) and its `StartReport`.
Must not know: how the copy is followed afterwards (status.py, watch.py) or ended (finish.py).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ops import schema
from ops.migrate.control import (
    SOURCE,
    TARGET,
    MigrateError,
    connection,
    execute,
    slot_name_for,
    subscription_row,
)
from ops.migrate.plan import BlockedError, plan
from ops.migrate.programs import find_client_bindir, run_client
from router.pg import Endpoint, quote_ident, quote_literal

__all__ = ["StartReport", "start"]


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
        source_fp = await _publish(source, name, db, created)
        target_fp = await _subscribe(source, target, name, db, source_conninfo, copy_data, timeout, created)
        diffs += [f"database {db}: {line}" for line in schema.diff(source_fp, target_fp)]
    return StartReport(name=name, databases=tuple(d.database for d in p.databases),
                       schema_copied=tuple(copied), schema_seconds=t_schema,
                       created=tuple(created), schema_diff=tuple(diffs))


async def _publish(source: Endpoint, name: str, db: str, created: list[str]) -> schema.Fingerprint:
    """Step 4 of `start`: the publication in the source database (one FOR ALL TABLES that
    exists is kept); then the source's schema as it is."""
    async with connection(source, SOURCE, db) as sconn:
        pub = await sconn.fetchrow("SELECT puballtables FROM pg_publication "
                                   "WHERE pubname = $1", name)
        if pub is None:
            await execute(sconn, f"CREATE PUBLICATION {quote_ident(name)} FOR ALL TABLES",
                          SOURCE, f"publication {name} (database {db})")
            created.append(f"{SOURCE} publication {name} (database {db})")
        elif not pub["puballtables"]:
            raise MigrateError(SOURCE, f"publication {name} (database {db})",
                               "exists but is not FOR ALL TABLES")
        return await schema.comparable_fingerprint(sconn)


async def _subscribe(source: Endpoint, target: Endpoint, name: str, db: str, source_conninfo: str | None,
                     copy_data: bool, timeout: float, created: list[str]) -> schema.Fingerprint:
    """Step 5 of `start`: the subscription in the target database (one for publication
    ``name`` that exists is kept); then the target's schema as it is."""
    async with connection(target, TARGET, db) as tconn:
        sub = await subscription_row(tconn, name)
        if sub is None:
            conninfo = (source_conninfo.replace("{database}", db) if source_conninfo
                        else source.conninfo(db))
            slot = slot_name_for(name, db)
            await execute(tconn,
                          f"CREATE SUBSCRIPTION {quote_ident(name)} CONNECTION {quote_literal(conninfo)}"
                          f" PUBLICATION {quote_ident(name)} WITH (slot_name = {quote_literal(slot)},"
                          f" copy_data = {'true' if copy_data else 'false'})",
                          TARGET, f"subscription {name} (database {db})", timeout=timeout)
            created.append(f"{TARGET} subscription {name} (database {db}, "
                           f"slot {slot} on the source)")
        elif list(sub["subpublications"]) != [name]:
            raise MigrateError(TARGET, f"subscription {name} (database {db})",
                               f"exists for publications {list(sub['subpublications'])}, "
                               f"not [{name}]")
        return await schema.comparable_fingerprint(tconn)


async def _create_target_database(source: Endpoint, target: Endpoint, db: str) -> None:
    async with connection(source, SOURCE) as sconn:
        owner = await sconn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database "
                                     "WHERE datname = $1", db)
    async with connection(target, TARGET) as tconn:
        has_owner = owner is not None and await tconn.fetchval(
            "SELECT 1 FROM pg_roles WHERE rolname = $1", owner)
        sql = f"CREATE DATABASE {quote_ident(db)}"
        if has_owner:
            sql += f" OWNER {quote_ident(owner)}"
        await execute(tconn, sql, TARGET, f"database {db}")


async def _copy_schema(source: Endpoint, target: Endpoint, db: str, bindir: Path,
                       timeout: float) -> None:
    """pg_dump --schema-only | psql, through a file (the dump's errors stay apart from
    the restore's)."""
    with tempfile.TemporaryDirectory(prefix="pgsplit-migrate-") as tmp:
        dump = Path(tmp) / f"{db}.schema.sql"
        await run_client(
            [bindir / "pg_dump", "--schema-only", "--no-publications", "--no-subscriptions",
             "--file", dump, "--dbname", source.conninfo(db, password=False)],
            source.password, SOURCE, f"database {source.where(db)}",
            f"pg_dump --schema-only ({bindir})", timeout)
        await run_client(
            [bindir / "psql", "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1",
             "--single-transaction", "--file", dump, "--dbname",
             target.conninfo(db, password=False)],
            target.password, TARGET, f"database {target.where(db)}",
            f"schema restore with psql ({bindir})", timeout)
