"""A started migration at one moment: where each table's initial copy is and how far the
subscriber is behind.

Owns: `status` (one look at both sides: a `Status` of `SubscriptionStatus` per database
and `TableCopy` per table, with rates and an ETA from the look before) and the pure
arithmetic behind it (`with_rates`, `estimate_eta`, `lag_seconds_from`).
Must not know: how the migration was started (copy.py) or is ended (finish.py); watching
it over time is watch.py's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ops.migrate.control import (
    SOURCE,
    TARGET,
    MigrateError,
    connection,
    databases_or_default,
    lsn_of,
    slot_name_for,
    subscription_row,
)
from ops.text import human_bytes
from router.lsn import format_lsn
from router.pg import USER_SCHEMA_SQL, Endpoint

__all__ = [
    "COPY_STATES",
    "IN_FLIGHT_S",
    "Status",
    "SubscriptionStatus",
    "TableCopy",
    "estimate_eta",
    "lag_seconds_from",
    "status",
    "with_rates",
]

# pg_subscription_rel.srsubstate (catalogs/pg-subscription-rel.html)
COPY_STATES = {"i": "initialize", "d": "data copy", "f": "finished copy",
               "s": "synchronized", "r": "ready"}


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
    eta_seconds: float | None = None  # until copied and caught up, at the current rates (estimate_eta)

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
                 + f", lag {human_bytes(self.lag_bytes)}"
                 + (f" / {self.lag_seconds:.1f}s" if self.lag_seconds is not None else "")
                 + (f", ETA {self.eta_seconds:.0f}s" if self.eta_seconds is not None else "")]
        if self.copy_bytes_per_s is not None:
            lines.append(f"  copy {human_bytes(self.copy_bytes_per_s)}/s, apply "
                         f"{human_bytes(self.apply_bytes_per_s or 0)}/s, source WAL "
                         f"{human_bytes(self.source_wal_bytes_per_s or 0)}/s")
        for d in self.databases:
            lines.append(f"  {d.database}: subscription {d.subscription} "
                         f"{'enabled' if d.enabled else 'DISABLED'}, worker "
                         f"{'running' if d.worker_running else 'NOT RUNNING'}, "
                         f"copied {human_bytes(d.copy_done_bytes)} of "
                         f"{human_bytes(d.copy_total_bytes)}")
            for t in d.tables:
                if t.state != "r":
                    lines.append(f"    {t.table}: {t.state_name} "
                                 f"({human_bytes(t.copied_bytes)} of "
                                 f"{human_bytes(t.source_bytes)})")
        return "\n".join(lines)


def _rate(now: float | int, before: float | int, dt: float) -> float:
    return max(0.0, (now - before) / dt) if dt > 0 else 0.0


# A subscriber less than this behind in time (`lag_seconds_from`: the walsender's
# replay_lag; without one, the age of the subscriber's last report) keeps pace with the
# source: its lag is WAL in flight, not a backlog.
IN_FLIGHT_S = 1.0


def estimate_eta(remaining_copy_bytes: int, copy_rate: float | None, lag_bytes: int,
                 apply_rate: float | None, wal_rate: float | None,
                 lag_seconds: float | None = None) -> float | None:
    """Seconds until the copy is done and the target has what the source has now, at the
    current rates: the copy left at the copy rate, then the lag.

    A lag under `IN_FLIGHT_S` in time (``lag_seconds``) is WAL in flight to a subscriber
    that keeps pace: what the source writes now is applied ``lag_seconds`` later, so that
    is its part. Dividing it by (apply rate - source WAL rate) instead, as for a backlog,
    divides by the difference of two nearly equal rates, each measured over one round
    (the subscriber confirms its position in steps): noise, which made 10 kB of lag
    "13 s". A larger lag is a backlog, closing at that difference; None when a needed
    rate is unknown or the gap does not close."""
    eta = 0.0
    if remaining_copy_bytes > 0:
        if not copy_rate:
            return None
        eta += remaining_copy_bytes / copy_rate
    if lag_bytes > 0:
        if lag_seconds is not None and lag_seconds < IN_FLIGHT_S:
            return eta + lag_seconds
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
    eta = estimate_eta(remaining, copy_rate, current.lag_bytes, apply_rate, wal_rate,
                       current.lag_seconds)
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
    WHERE c.relkind = 'r' AND {USER_SCHEMA_SQL}"""
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
    async with connection(target, TARGET, db, _STATUS_SETTINGS) as tconn:
        sub = await subscription_row(tconn, name)
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
    async with connection(source, SOURCE, db, _STATUS_SETTINGS) as sconn:
        src = await sconn.fetchrow(_SOURCE_SLOT_SQL, slot)
        try:
            size_rows = await sconn.fetch(_SOURCE_SIZES_SQL)
        except asyncpg.LockNotAvailableError:
            size_rows = await sconn.fetch(_SOURCE_SIZES_ESTIMATE_SQL)
        sizes = {r["name"]: r["bytes"] for r in size_rows}
    if src["confirmed"] is None and src["active"] is None:
        raise MigrateError(SOURCE, f"replication slot {slot}",
                           f"does not exist (subscription {name}, database {db})")
    source_lsn = lsn_of(src["current_lsn"])
    assert source_lsn is not None
    confirmed = lsn_of(src["confirmed"])
    received = lsn_of(apply["received_lsn"]) if apply is not None else None
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
    dbs = databases_or_default(source, databases)
    t_wall, t_mono = time.time(), time.monotonic()
    per_db = await asyncio.gather(*(_database_status(source, target, name, db) for db in dbs))
    return with_rates(Status(name=name, taken_at=t_wall, monotonic=t_mono,
                             databases=tuple(per_db)), previous)
