"""Handing a migration over to a cutover, while the cutover's clients wait: the target's
sequences moved past the source's, the wait until the subscription has applied the
source's final LSN, and the statements prepared for both beforehand.

Owns: `sync_sequences` (and the pure `sequence_target_value`, `sequence_is_past`),
`logical_catch_up`, `prepare_cutover`.
Must not know: the cutover's steps (ops.cutover calls these); how the forward replication
ends or the reverse begins (finish.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from ops.migrate.control import (
    SOURCE,
    TARGET,
    CatchUpTimeout,
    Connections,
    MigrateError,
    allow_writes,
    connection,
    databases_or_default,
    lsn_of,
    slot_name_for,
)
from router.lsn import format_lsn, parse_lsn
from router.pg import Endpoint, quote_qualified

__all__ = [
    "SequenceSync",
    "logical_catch_up",
    "prepare_cutover",
    "sequence_is_past",
    "sequence_target_value",
    "sync_sequences",
]

_ORIGIN_SQL = "SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = $1"
_SETVAL_SQL = ("SELECT setval(u.seq::regclass, u.v, true) "
               "FROM unnest($1::text[], $2::bigint[]) AS u(seq, v)")


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
    for db in databases_or_default(source, databases):
        async with connection(source, SOURCE, db, connections=connections) as sconn:
            src = await sconn.fetch(_SEQUENCE_VALUES_SQL)
        async with connection(target, TARGET, db, connections=connections) as tconn:
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
            names = [quote_qualified(*m.sequence.split(".", 1)) for m in moves]
            values = [m.target_after for m in moves]
            try:
                await allow_writes(tconn)
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
    dbs = databases_or_default(source, databases)
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
            tconn = await stack.enter_async_context(connection(target, TARGET, db,
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
        sconn = await stack.enter_async_context(connection(source, SOURCE,
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
                confirmed = positions[slot] = lsn_of(rows[slot])
                remote = lsn_of(remote)
                if (confirmed is not None and confirmed >= lsn) or \
                        (remote is not None and remote >= lsn):
                    done.add(db)
            if len(done) == len(slots):
                return
            await asyncio.sleep(poll_interval)


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
