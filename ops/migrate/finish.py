"""Ending a migration, and the way back: the forward subscription disabled (while a
cutover's clients wait) or dropped (after), enabled again on a rollback, and the reverse
replication from the new cluster to the old one.

Owns: `finish`, `enable`, `reverse` (whole, or the target's half: publication and slot),
`drop_slots`.
Must not know: the cutover's steps (ops.cutover calls these in its order).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import asyncpg

from ops.migrate.control import (
    SOURCE,
    TARGET,
    Connections,
    MigrateError,
    allow_writes,
    connection,
    databases_or_default,
    execute,
    slot_name_for,
    subscription_row,
)
from router.pg import Endpoint, quote_ident, quote_literal

__all__ = ["drop_slots", "enable", "finish", "reverse"]

_PUBLICATION_SQL = "SELECT puballtables FROM pg_publication WHERE pubname = $1"
_WORKERS_SQL = "SELECT count(*) FROM pg_stat_subscription WHERE subid = $1 AND pid IS NOT NULL"
_SLOT_SQL = "SELECT slot_type FROM pg_replication_slots WHERE slot_name = $1"


async def _drop_subscription(conn: asyncpg.Connection, name: str, db: str,
                             side: str) -> list[str]:
    """Disable and drop subscription ``name`` (and its slot on the publisher). When the
    publisher cannot be reached, detach the slot first and say it was left behind."""
    sub = await subscription_row(conn, name)
    obj = f"subscription {name} (database {db})"
    if sub is None:
        return [f"{side} {obj}: already gone"]
    if sub["subenabled"]:
        await execute(conn, f"ALTER SUBSCRIPTION {quote_ident(name)} DISABLE", side, obj)
    try:
        await conn.execute(f"DROP SUBSCRIPTION {quote_ident(name)}", timeout=60)
        return [f"{side} {obj}: dropped (with slot {sub['subslotname']} on the publisher)"]
    except (asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        # the usual reason: the publisher is unreachable, so its slot cannot be dropped
        await execute(conn, f"ALTER SUBSCRIPTION {quote_ident(name)} SET (slot_name = NONE)",
                      side, obj)
        await execute(conn, f"DROP SUBSCRIPTION {quote_ident(name)}", side, obj)
        return [f"{side} {obj}: dropped, but its slot {sub['subslotname']} was left on the "
                f"publisher ({exc or type(exc).__name__}): drop it there with "
                f"pg_drop_replication_slot('{sub['subslotname']}'), it holds back WAL"]


async def _drop_publication(conn: asyncpg.Connection, name: str, db: str,
                            side: str) -> list[str]:
    obj = f"publication {name} (database {db})"
    if await conn.fetchval(_PUBLICATION_SQL, name) is None:
        return [f"{side} {obj}: already gone"]
    # a fenced side (default_transaction_read_only) still takes this control DDL
    await allow_writes(conn)
    await execute(conn, f"DROP PUBLICATION {quote_ident(name)}", side, obj)
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
    for db in databases_or_default(source, databases):
        async with connection(target, TARGET, db, connections=connections) as tconn:
            if drop:
                notes += await _drop_subscription(tconn, name, db, TARGET)
            elif not wait:
                await allow_writes(tconn)
                await execute(tconn, f"ALTER SUBSCRIPTION {quote_ident(name)} DISABLE", TARGET,
                              f"subscription {name} (database {db})")
                notes.append(f"{TARGET} subscription {name} (database {db}): disabled")
            else:
                notes += await _disable_subscription(tconn, name, db, timeout)
        if drop and drop_publication:
            try:
                async with connection(source, SOURCE, db, connections=connections) as sconn:
                    notes += await _drop_publication(sconn, name, db, SOURCE)
            except MigrateError as exc:
                notes.append(f"{exc} (publication {name} left on the source)")
    return notes


async def _disable_subscription(conn: asyncpg.Connection, name: str, db: str,
                                timeout: float) -> list[str]:
    sub = await subscription_row(conn, name)
    obj = f"subscription {name} (database {db})"
    if sub is None:
        raise MigrateError(TARGET, obj, "does not exist")
    if sub["subenabled"]:
        await allow_writes(conn)
        await execute(conn, f"ALTER SUBSCRIPTION {quote_ident(name)} DISABLE", TARGET, obj)
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
    for db in databases_or_default(source, databases):
        async with connection(target, TARGET, db, connections=connections) as tconn:
            sub = await subscription_row(tconn, name)
            obj = f"subscription {name} (database {db})"
            if sub is None:
                raise MigrateError(TARGET, obj, "does not exist")
            if not sub["subenabled"]:
                await allow_writes(tconn)
                await execute(tconn, f"ALTER SUBSCRIPTION {quote_ident(name)} ENABLE", TARGET, obj)
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
    for db in databases_or_default(source, databases):
        slot = slot_name_for(name, db)
        if not subscribe:
            async with connection(target, TARGET, db, connections=connections) as tconn:
                notes += await _reverse_slot(tconn, name, db, slot, forward_name, timeout)
            continue
        async with connection(target, TARGET, db, connections=connections) as tconn:
            slot_exists = await _reverse_publication(tconn, name, db, slot, forward_name, notes)
        async with connection(source, SOURCE, db, connections=connections) as sconn:
            notes += await _reverse_subscription(sconn, target, name, db, slot, slot_exists,
                                                 target_conninfo, timeout)
    return notes


async def _reverse_publication(tconn: asyncpg.Connection, name: str, db: str, slot: str,
                               forward_name: str, notes: list[str]) -> bool:
    """The target's half of `reverse`, once the forward subscription is not enabled: the
    publication (noted in ``notes`` when created); whether the slot exists already."""
    state = await tconn.fetchrow(_REVERSE_STATE_SQL, name, slot, forward_name)
    if state["forward_enabled"]:
        raise MigrateError(TARGET, f"subscription {forward_name} (database {db})",
                           "is still enabled: finish() it before reverse(), or "
                           "changes would replicate in a circle")
    if state["pub"] is None:
        await allow_writes(tconn)
        await execute(tconn, f"CREATE PUBLICATION {quote_ident(name)} FOR ALL TABLES",
                      TARGET, f"publication {name} (database {db})")
        notes.append(f"{TARGET} publication {name} (database {db}): created")
    elif not state["pub"]:
        raise MigrateError(TARGET, f"publication {name} (database {db})",
                           "exists but is not FOR ALL TABLES")
    # made by an earlier reverse(subscribe=False): the subscription streams from it
    return state["slot"] is not None


async def _reverse_subscription(sconn: asyncpg.Connection, target: Endpoint, name: str, db: str,
                                slot: str, slot_exists: bool, target_conninfo: str | None,
                                timeout: float) -> list[str]:
    """The source's half of `reverse`: its subscription to the target's publication, on
    the target's slot (created with it unless it exists)."""
    if await subscription_row(sconn, name) is not None:
        return [f"{SOURCE} subscription {name} (database {db}): exists"]
    conninfo = (target_conninfo.replace("{database}", db) if target_conninfo
                else target.conninfo(db))
    await allow_writes(sconn)
    await execute(sconn,
                  f"CREATE SUBSCRIPTION {quote_ident(name)} CONNECTION {quote_literal(conninfo)}"
                  f" PUBLICATION {quote_ident(name)} WITH (slot_name = {quote_literal(slot)},"
                  f" copy_data = false, create_slot = {'false' if slot_exists else 'true'})",
                  SOURCE, f"subscription {name} (database {db})", timeout=timeout)
    return [f"{SOURCE} subscription {name} (database {db}): created, slot "
            f"{slot} on the target"
            + (" (it was there already)" if slot_exists else "")]


async def _reverse_slot(conn: asyncpg.Connection, name: str, db: str, slot: str,
                        forward_name: str, timeout: float) -> list[str]:
    """The target's half of `reverse` in two statements (each a round trip to a far
    target, while clients wait): the publication, then the slot, created only while the
    forward subscription is not enabled."""
    notes: list[str] = []
    obj = f"publication {name} (database {db})"
    await allow_writes(conn)
    try:
        await conn.execute(f"CREATE PUBLICATION {quote_ident(name)} FOR ALL TABLES")
        notes.append(f"{TARGET} {obj}: created")
    except asyncpg.DuplicateObjectError:
        if not await conn.fetchval(_PUBLICATION_SQL, name):
            raise MigrateError(TARGET, obj, "exists but is not FOR ALL TABLES") from None
    except asyncpg.PostgresError as exc:
        raise MigrateError(TARGET, obj, f"{exc.sqlstate}: {exc}") from exc
    # execute(): the simple protocol, one round trip; its tag says whether a row came
    tag = await conn.execute(
        f"SELECT pg_create_logical_replication_slot({quote_literal(slot)}, 'pgoutput') "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        f"WHERE s.subname = {quote_literal(forward_name)} AND d.datname = current_database() "
        "AND s.subenabled) "
        f"AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {quote_literal(slot)})",
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
    async with connection(ep, side, connections=connections) as conn:
        dropped = [r[0] for r in await conn.fetch(
            "SELECT slot_name::text, pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = ANY($1::name[]) AND NOT active", list(slots))]
    return [f"{side} replication slot {s}: dropped" for s in dropped]
