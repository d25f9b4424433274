"""Checking a migration's copy: both sides' rows compared, chunk by chunk.

Owns: `verify` (row counts and a checksum per chunk of keys, ranges that differ read again
once the target has caught up, optionally with the table's writes held for a moment), the
SQL it sends (`source_chunk_sql`, `range_sql`), and its `VerifyReport` of `TableCheck`s and
`RangeDiff`s.
Must not know: how the migration was started or is ended; it only waits for the
subscription (`logical_catch_up`) before it reads a range again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ops.migrate.control import SOURCE, TARGET, MigrateError, connection, databases_or_default
from ops.migrate.handover import logical_catch_up
from router.pg import USER_SCHEMA_SQL, Endpoint, quote_ident, quote_qualified

__all__ = ["RangeDiff", "TableCheck", "VerifyReport", "range_sql", "source_chunk_sql", "verify"]

# Settings that make a value's text form the same on both sides (verify hashes text).
_STABLE_TEXT_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, MDY",
                         "IntervalStyle": "postgres", "extra_float_digits": "1",
                         "bytea_output": "hex"}


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
    row = ", ".join(f"t.{quote_ident(c)}" for c in columns)
    return f"('x' || substr(md5(ROW({row})::text), 1, 16))::bit(64)::bigint::numeric"


def _key_condition(keys: Sequence[str], op: str, first_param: int) -> str:
    cols = ", ".join(f"t.{quote_ident(k)}" for k in keys)
    params = ", ".join(f"${first_param + i}" for i in range(len(keys)))
    return f"({cols}) {op} ({params})" if len(keys) > 1 else f"{cols} {op} {params}"


def source_chunk_sql(table: str, keys: Sequence[str], columns: Sequence[str],
                     after: bool) -> str:
    """The next chunk on the source: up to $1 rows in key order after the key in $2...
    (when ``after``); returns their count, hash sum and the last key."""
    order = ", ".join(f"t.{quote_ident(k)}" for k in keys)
    order_desc = ", ".join(f"{quote_ident(k)} DESC" for k in keys)
    where = f"WHERE {_key_condition(keys, '>', 2)}" if after else ""
    key_list = ", ".join(f"t.{quote_ident(k)}" for k in keys)
    last = ", ".join(f"l.{quote_ident(k)}" for k in keys)
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
    WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND {USER_SCHEMA_SQL}
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
    for db in databases_or_default(source, databases):
        async with connection(source, SOURCE, db, _STABLE_TEXT_SETTINGS) as sconn, \
                connection(target, TARGET, db, _STABLE_TEXT_SETTINGS) as tconn:
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
                    quote_qualified(*s_tables[full]), chunk_rows, rechecks, recheck_timeout,
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
    if not keys:
        (sn, sh), (tn, th) = await asyncio.gather(side_range(sconn, None, None),
                                                  side_range(tconn, None, None))
        results: list[list[Any]] = [[None, None, sn, sh, tn, th]]
    else:
        results = await _compare_chunks(sconn, tconn, table, keys, columns, chunk_rows, side_range)
    await _recheck(source, target, name, db, sconn, tconn, table, results, rechecks, recheck_timeout,
                   hold_writes, side_range)
    diffs = tuple(RangeDiff(r[0], r[1], r[2], r[4]) for r in results if r[2:4] != r[4:6])
    return TableCheck(db, full, tuple(keys), sum(r[2] for r in results),
                      sum(r[4] for r in results), len(results), diffs, tuple(problems))


# side_range(conn, lo, hi) -> (rows, hash sum) of the keys in (lo, hi]
_SideRange = Callable[..., Awaitable[tuple[int, int]]]


async def _compare_chunks(sconn: asyncpg.Connection, tconn: asyncpg.Connection, table: str,
                          keys: list[str], columns: list[str], chunk_rows: int,
                          side_range: _SideRange) -> list[list[Any]]:
    """The table in chunks of ``chunk_rows`` keys, bounds from the source, each chunk's
    count and hash sum on both sides."""
    results: list[list[Any]] = []
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
    return results


async def _recheck(source: Endpoint, target: Endpoint, name: str, db: str,
                   sconn: asyncpg.Connection, tconn: asyncpg.Connection, table: str,
                   results: list[list[Any]], rechecks: int, recheck_timeout: float,
                   hold_writes: bool, side_range: _SideRange) -> None:
    """Read each differing range again (in ``results``, in place), the target once it has
    applied what the source had (see `verify`)."""
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
