"""Read-your-writes checker: many sessions write through pgsplit and read back at once.

Each of N concurrent asyncpg sessions loops: write, then read the write back at once, and
counts a *stale read* when the read does not see it. The write kinds rotate:

- ``insert``: an autocommit INSERT of a unique row (the read asks whether the row exists);
- ``update``: an UPDATE of the session's own counter row to its next value (the read must
  see that value);
- ``tx``: BEGIN; INSERT of a unique row; COMMIT (the read asks whether the row exists).

Every read asks ``pg_is_in_recovery()`` in the same statement, so the checker knows how
many reads replicas served. Each connection runs ``SET pgsplit.consistency = '<mode>'``.

``--cross-connection``: every writer has a partner connection that does the read. In
``token`` mode the writer runs ``SHOW pgsplit.last_lsn`` after its write and the reader
``SET pgsplit.min_lsn = '<that>'`` before reading (unless ``--no-min-lsn``).

``--read-heavy``: after each write and its read-back, 9 more reads of other sessions'
older rows (rows at least ~1 s old, picked at random; some rows are seeded at setup), so
1 write : 10 reads. The share of reads replicas served shows whether consistency quietly
sends everything to the primary. A missing older row is reported as ``old_missing``, not
as a stale read (no mode promises another session's writes to a reader).

With ``--admin URL`` the proxy's ``/metrics`` are scraped before and after the run: the
deltas of ``pgsplit_consistency_waits_total`` (immediate / waited / fallback), of the
``pgsplit_consistency_wait_seconds`` histogram and of ``pgsplit_units_total``.

The checker makes its own tables (as the connecting user, through the proxy, named
``cc_<time>_<random>_rows`` / ``_counters``), waits until the replicas have them, and drops
them at the end (``--keep-tables`` keeps them).

Command line::

    python -m loadtest.consistency --dsn URL [--admin URL] --sessions 16 --pairs 5000 \\
        --mode session|global|token|eventual [--cross-connection] [--no-min-lsn] \\
        [--read-heavy] [--seconds N] [--json]

Exit status: 0 when no read was stale and nothing failed, 1 otherwise (stale reads or
errors), 2 when the check could not run (setup failed).

Library: ``await run_check(dsn, sessions=16, pairs=5000, mode="session", ...)`` returns a
:class:`CheckResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import random
import re
import secrets
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

__all__ = ["CheckResult", "MODES", "KINDS", "run_check", "scrape_metrics", "main"]

MODES = ("session", "global", "token", "eventual")
KINDS = ("insert", "update", "tx")
ID_STRIDE = 1_000_000_000  # row ids: session * ID_STRIDE + sequence
SAMPLES = 20  # stale reads / errors kept as examples
_LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


# --------------------------------------------------------------------------- result


@dataclass
class CheckResult:
    mode: str
    sessions: int
    cross_connection: bool
    set_min_lsn: bool
    read_heavy: bool
    table: str = ""
    pairs: int = 0  # write-then-read pairs completed (write and read both succeeded)
    stale: int = 0  # pairs whose read did not see the write
    stale_by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    pairs_by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    reads: int = 0  # every read: read-backs and (read-heavy) reads of older rows
    reads_on_replica: int = 0
    pair_reads_on_replica: int = 0
    old_reads: int = 0  # read-heavy: reads of other sessions' older rows
    old_missing: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    stale_samples: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    read_latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p99, max of read-backs
    # From /metrics (deltas over the run), when an admin URL was given:
    immediate: int | None = None
    waits: int | None = None  # outcome="waited": a replica reached the token in time
    fallbacks: int | None = None  # outcome="fallback": the primary served the read
    wait_histogram: dict[str, int] | None = None  # le -> cumulative count
    wait_seconds_sum: float | None = None
    wait_count: int | None = None
    units: dict[str, int] | None = None  # "role/kind" -> units the proxy served

    @property
    def replica_share(self) -> float:
        return self.reads_on_replica / self.reads if self.reads else 0.0

    @property
    def ok(self) -> bool:
        return self.stale == 0 and self.errors == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["replica_share"] = round(self.replica_share, 4)
        d["ok"] = self.ok
        d["elapsed"] = round(self.elapsed, 3)
        return d

    def summary(self) -> str:
        flags = [f"mode={self.mode}", f"sessions={self.sessions}"]
        if self.cross_connection:
            flags.append("cross-connection" + ("" if self.set_min_lsn or self.mode != "token" else " (no min_lsn)"))
        if self.read_heavy:
            flags.append("read-heavy")
        rate = self.pairs / self.elapsed if self.elapsed else 0.0
        kinds = ", ".join(f"{k} {self.stale_by_kind[k]}/{self.pairs_by_kind[k]}" for k in KINDS)
        lines = [
            " ".join(flags) + f"  (tables {self.table}_*)",
            f"pairs {self.pairs} in {self.elapsed:.2f} s ({rate:.0f}/s); stale {self.stale} ({kinds}); "
            f"errors {self.errors}",
            f"reads {self.reads}, on replicas {self.reads_on_replica} ({100 * self.replica_share:.1f}%); "
            f"read-backs on replicas {self.pair_reads_on_replica}/{self.pairs}",
        ]
        if self.read_heavy:
            lines.append(f"older-row reads {self.old_reads}, missing {self.old_missing}")
        if self.read_latency_ms:
            lat = self.read_latency_ms
            lines.append(f"read-back latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                         f"max {lat['max']:.1f} ms")
        if self.immediate is not None:
            lines.append(f"proxy consistency outcomes: immediate {self.immediate}, waited {self.waits}, "
                         f"fallback {self.fallbacks}")
            if self.wait_count:
                mean = 1000 * (self.wait_seconds_sum or 0.0) / self.wait_count
                hist = " ".join(f"<={le}:{n}" for le, n in (self.wait_histogram or {}).items())
                lines.append(f"proxy waits {self.wait_count}, mean {mean:.1f} ms; cumulative {hist}")
            if self.units:
                lines.append("proxy units: " + ", ".join(f"{k} {n}" for k, n in sorted(self.units.items())))
        if self.error_kinds:
            lines.append("errors by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(self.error_kinds.items())))
            lines += [f"  {e}" for e in self.error_samples[:5]]
        for s in self.stale_samples[:5]:
            lines.append(f"  stale: {s}")
        lines.append("OK: no stale reads, no errors" if self.ok else "NOT OK")
        return "\n".join(lines)


# --------------------------------------------------------------------------- metrics

_SAMPLE_RE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition -> {(name, frozenset(labels)): value}."""
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = frozenset(_LABEL_RE.findall(m.group(2) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


async def scrape_metrics(admin_url: str, timeout: float = 10.0) -> dict[tuple[str, frozenset], float]:
    url = admin_url.rstrip("/") + "/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode()

    return parse_metrics(await asyncio.to_thread(get))


def _apply_metric_deltas(result: CheckResult, before: dict, after: dict) -> None:
    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    result.immediate = int(delta("pgsplit_consistency_waits_total", outcome="immediate"))
    result.waits = int(delta("pgsplit_consistency_waits_total", outcome="waited"))
    result.fallbacks = int(delta("pgsplit_consistency_waits_total", outcome="fallback"))
    buckets = sorted(
        ((dict(labels)["le"], after[(name, labels)] - before.get((name, labels), 0.0))
         for (name, labels) in after if name == "pgsplit_consistency_wait_seconds_bucket"),
        key=lambda kv: math.inf if kv[0] == "+Inf" else float(kv[0]),
    )
    result.wait_histogram = {le: int(n) for le, n in buckets}
    result.wait_seconds_sum = round(delta("pgsplit_consistency_wait_seconds_sum"), 6)
    result.wait_count = int(delta("pgsplit_consistency_wait_seconds_count"))
    units: dict[str, int] = {}
    for (name, labels), value in after.items():
        if name != "pgsplit_units_total":
            continue
        d = value - before.get((name, labels), 0.0)
        if d:
            lab = dict(labels)
            key = f"{lab.get('role', '?')}/{lab.get('kind', '?')}"
            units[key] = units.get(key, 0) + int(d)
    result.units = units


# --------------------------------------------------------------------------- the check


class _Run:
    def __init__(self, dsn: str, result: CheckResult, *, pairs: int | None, deadline: float | None,
                 reads_per_write: int, old_age_s: float, command_timeout: float):
        self.dsn = dsn
        self.result = result
        self.mode = result.mode
        self.pairs_limit = pairs
        self.deadline = deadline
        self.reads_per_write = reads_per_write
        self.old_age_s = old_age_s
        self.command_timeout = command_timeout
        self.claimed = 0
        self.latencies: list[float] = []
        # read-heavy: rows whose write completed, in completion order
        self.written_t: list[float] = []
        self.written: list[tuple[int, int]] = []  # (row id, session)
        t = result.table
        self.rows = f"{t}_rows"
        self.counters = f"{t}_counters"
        self.sql_insert = f"INSERT INTO {self.rows} (id, session, kind) VALUES ($1, $2, $3)"
        self.sql_update = f"UPDATE {self.counters} SET val = $1 WHERE session = $2"
        self.sql_read_row = f"SELECT EXISTS (SELECT 1 FROM {self.rows} WHERE id = $1), pg_is_in_recovery()"
        self.sql_read_counter = (f"SELECT (SELECT val FROM {self.counters} WHERE session = $1), "
                                 "pg_is_in_recovery()")

    async def connect(self, mode: str | None = None) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.dsn, timeout=self.command_timeout,
                                     command_timeout=self.command_timeout)
        await conn.execute(f"SET pgsplit.consistency = '{mode or self.mode}'")
        return conn

    def claim(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.pairs_limit is not None and self.claimed >= self.pairs_limit:
            return False
        self.claimed += 1
        return True

    def error(self, where: str, exc: BaseException) -> None:
        r = self.result
        r.errors += 1
        name = type(exc).__name__
        r.error_kinds[name] = r.error_kinds.get(name, 0) + 1
        if len(r.error_samples) < SAMPLES:
            r.error_samples.append(f"{where}: {name}: {exc}")

    # -- setup / teardown

    async def setup(self, sessions: int, seed_rows: int) -> None:
        conn = await self.connect("session")
        try:
            await conn.execute(
                f"CREATE TABLE {self.rows} (id bigint PRIMARY KEY, session int NOT NULL, kind text NOT NULL, "
                "created_at timestamptz NOT NULL DEFAULT clock_timestamp());"
                f"CREATE TABLE {self.counters} (session int PRIMARY KEY, val bigint NOT NULL)")
            await conn.execute(
                f"INSERT INTO {self.counters} SELECT s, 0 FROM generate_series(0, $1::int - 1) s", sessions)
            if seed_rows:
                # Seeds: session -1, ids below every session's.
                await conn.execute(
                    f"INSERT INTO {self.rows} (id, session, kind) SELECT -g, -1, 'seed' "
                    "FROM generate_series(1, $1::int) g", seed_rows)
                for i in range(1, seed_rows + 1):
                    self.written_t.append(-math.inf)
                    self.written.append((-i, -1))
            lsn = await conn.fetchval("/* pgsplit:primary */ SELECT pg_current_wal_lsn()::text")
        finally:
            await conn.close()
        await self.wait_replicated(lsn)

    async def wait_replicated(self, lsn: str, timeout: float = 30.0, in_a_row: int = 12) -> None:
        """Until `in_a_row` consecutive eventual-mode reads (spread over the replicas in
        rotation by the proxy's balancing) come from a server that has replayed `lsn`."""
        conn = await self.connect("eventual")
        try:
            deadline = time.monotonic() + timeout
            good = 0
            last = None
            while good < in_a_row:
                last = await conn.fetchrow(
                    "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, true)", lsn)
                good = good + 1 if last[1] else 0
                if good < in_a_row:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the replicas did not replay the checker's tables (up to {lsn}) "
                                           f"in {timeout:g}s; last answer {tuple(last)}")
                    await asyncio.sleep(0.01 if last[1] else 0.05)
        finally:
            await conn.close()

    async def teardown(self) -> None:
        conn = await self.connect("session")
        try:
            await conn.execute(f"DROP TABLE IF EXISTS {self.rows}, {self.counters}")
        finally:
            await conn.close()

    # -- one session

    async def session(self, idx: int, cross: bool, set_min_lsn: bool, read_heavy: bool) -> None:
        writer = reader = None
        expected = 0  # this session's counter value
        seq = 0
        resync = False
        consecutive_errors = 0
        try:
            writer = await self.connect()
            reader = await self.connect() if cross else writer
            while self.claim():
                seq += 1
                kind = KINDS[(seq + idx) % 3]
                rid = idx * ID_STRIDE + seq
                stage = "write"
                try:
                    writer, reader = await self._reconnected(writer, reader, cross)
                    if resync:
                        expected = await writer.fetchval(
                            f"/* pgsplit:primary */ SELECT val FROM {self.counters} WHERE session = $1", idx)
                        resync = False
                    # -- the write
                    if kind == "update":
                        resync = True  # until the UPDATE is known to have committed
                    await self._write(writer, kind, rid, idx, expected)
                    if kind == "update":
                        expected += 1
                        resync = False
                    if read_heavy and kind != "update":
                        self.written_t.append(time.monotonic())
                        self.written.append((rid, idx))
                    if cross and self.mode == "token" and set_min_lsn:
                        stage = "hand over the token"
                        await self._hand_over_token(writer, reader)
                    # -- the read-back
                    stage = "read"
                    await self._read_back(reader, idx, kind, rid, expected)
                    # -- read-heavy: reads of other sessions' older rows
                    if read_heavy:
                        stage = "read an older row"
                        for _ in range(self.reads_per_write - 1):
                            await self.read_old(reader, idx)
                    consecutive_errors = 0
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    self.error(f"session {idx} {kind} {stage}", exc)
                    consecutive_errors += 1
                    if consecutive_errors >= 50:
                        self.error(f"session {idx}", RuntimeError("50 errors in a row: session stops"))
                        return
        except Exception as exc:  # noqa: BLE001
            self.error(f"session {idx} connect", exc)
        finally:
            for c in {id(writer): writer, id(reader): reader}.values():
                if c is not None and not c.is_closed():
                    try:
                        await asyncio.wait_for(c.close(), 5)
                    except Exception:  # noqa: BLE001 - closing is best effort
                        c.terminate()

    async def _reconnected(self, writer: asyncpg.Connection, reader: asyncpg.Connection,
                           cross: bool) -> tuple[asyncpg.Connection, asyncpg.Connection]:
        """The session's connections, a closed one replaced (with one connection, both)."""
        if writer.is_closed():
            writer = await self.connect()
            if not cross:
                reader = writer
        if reader.is_closed():
            reader = await self.connect()
        return writer, reader

    async def _write(self, writer: asyncpg.Connection, kind: str, rid: int, idx: int,
                     expected: int) -> None:
        if kind == "insert":
            await writer.execute(self.sql_insert, rid, idx, kind)
        elif kind == "update":
            await writer.execute(self.sql_update, expected + 1, idx)
        else:
            async with writer.transaction():
                await writer.execute(self.sql_insert, rid, idx, kind)

    async def _hand_over_token(self, writer: asyncpg.Connection, reader: asyncpg.Connection) -> None:
        """The writer's commit LSN, set as the reader's minimum (the token mode)."""
        lsn = await writer.fetchval("SHOW pgsplit.last_lsn")
        if not isinstance(lsn, str) or not _LSN_RE.match(lsn):
            raise ValueError(f"SHOW pgsplit.last_lsn returned {lsn!r}")
        await reader.execute(f"SET pgsplit.min_lsn = '{lsn}'")

    async def _read_back(self, reader: asyncpg.Connection, idx: int, kind: str, rid: int,
                         expected: int) -> None:
        """Read what the session just wrote and count the read: fresh or stale, where it ran."""
        r = self.result
        t0 = time.perf_counter()
        if kind == "update":
            got, on_replica = await reader.fetchrow(self.sql_read_counter, idx)
            fresh = got == expected
        else:
            got, on_replica = await reader.fetchrow(self.sql_read_row, rid)
            fresh = bool(got)
        self.latencies.append(time.perf_counter() - t0)
        r.pairs += 1
        r.pairs_by_kind[kind] += 1
        r.reads += 1
        if on_replica:
            r.reads_on_replica += 1
            r.pair_reads_on_replica += 1
        if not fresh:
            r.stale += 1
            r.stale_by_kind[kind] += 1
            if len(r.stale_samples) < SAMPLES:
                r.stale_samples.append({
                    "session": idx, "kind": kind, "id": rid if kind != "update" else None,
                    "expected": expected if kind == "update" else True, "got": got,
                    "on_replica": on_replica})

    async def read_old(self, reader: asyncpg.Connection, idx: int) -> None:
        r = self.result
        n = bisect.bisect_right(self.written_t, time.monotonic() - self.old_age_s)
        if n == 0:
            return
        for _ in range(4):  # another session's row, if one is quickly found
            rid, owner = self.written[random.randrange(n)]
            if owner != idx:
                break
        got, on_replica = await reader.fetchrow(self.sql_read_row, rid)
        r.reads += 1
        r.old_reads += 1
        if on_replica:
            r.reads_on_replica += 1
        if not got:
            r.old_missing += 1


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


async def run_check(dsn: str, *, sessions: int = 16, pairs: int | None = 5000, mode: str = "session",
                    cross_connection: bool = False, set_min_lsn: bool = True, read_heavy: bool = False,
                    admin_url: str | None = None, seconds: float | None = None,
                    reads_per_write: int = 10, old_age_s: float = 1.0, seed_rows: int | None = None,
                    command_timeout: float = 15.0, keep_tables: bool = False,
                    table: str | None = None) -> CheckResult:
    """Run the check through the proxy at `dsn` and return the counts.

    Stops after `pairs` write-then-read pairs (over all sessions) or after `seconds`,
    whichever comes first (at least one of them must be given). Errors do not stop the
    run: they are counted (`errors`, `error_kinds`, `error_samples`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if sessions < 1:
        raise ValueError("sessions must be at least 1")
    if pairs is None and seconds is None:
        raise ValueError("give pairs, seconds or both")
    if (pairs is not None and pairs < 1) or (seconds is not None and seconds <= 0):
        raise ValueError("pairs must be at least 1 and seconds positive")
    if reads_per_write < 1:
        raise ValueError("reads_per_write must be at least 1")
    if table is None:
        table = f"cc_{time.strftime('%Y%m%d%H%M%S')}_{secrets.token_hex(3)}"
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,50}", table):
        raise ValueError(f"bad table name prefix {table!r}")
    result = CheckResult(mode=mode, sessions=sessions, cross_connection=cross_connection,
                         set_min_lsn=set_min_lsn, read_heavy=read_heavy, table=table)
    run = _Run(dsn, result, pairs=pairs, deadline=None, reads_per_write=reads_per_write,
               old_age_s=old_age_s, command_timeout=command_timeout)
    if seed_rows is None:
        seed_rows = 20 * sessions if read_heavy else 0
    try:
        await run.setup(sessions, seed_rows)
        before = await scrape_metrics(admin_url) if admin_url else None
        t0 = time.monotonic()
        run.deadline = t0 + seconds if seconds is not None else None
        await asyncio.gather(*(run.session(i, cross_connection, set_min_lsn, read_heavy)
                               for i in range(sessions)))
        result.elapsed = time.monotonic() - t0
        if admin_url:
            _apply_metric_deltas(result, before, await scrape_metrics(admin_url))
    finally:
        if not keep_tables:
            try:
                await run.teardown()
            except Exception as exc:  # noqa: BLE001 - the result matters more than the cleanup
                run.error("teardown", exc)
    lat = sorted(run.latencies)
    if lat:
        result.read_latency_ms = {"p50": round(1000 * _percentile(lat, 0.5), 3),
                                  "p99": round(1000 * _percentile(lat, 0.99), 3),
                                  "max": round(1000 * lat[-1], 3)}
    return result


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.consistency",
        description="Read-your-writes checker for pgsplit: N sessions write and read back at once "
                    "through the proxy and count stale reads.",
        epilog="Exit status: 0 no stale read and no error, 1 stale reads or errors, 2 setup failed.",
    )
    parser.add_argument("--dsn", required=True, help="the proxy's connection URL (postgresql://user:pw@host:port/db)")
    parser.add_argument("--admin", default=None, metavar="URL",
                        help="the proxy's admin URL (e.g. http://127.0.0.1:9930) for /metrics deltas")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent writer sessions (default 16)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="write-then-read pairs over all sessions (default 5000, or unlimited with --seconds)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--mode", choices=MODES, default="session", help="SET pgsplit.consistency (default session)")
    parser.add_argument("--cross-connection", action="store_true",
                        help="read on a partner connection (token mode: hand the LSN over with "
                             "SHOW pgsplit.last_lsn / SET pgsplit.min_lsn)")
    parser.add_argument("--no-min-lsn", action="store_true",
                        help="with --cross-connection in token mode: do not SET pgsplit.min_lsn")
    parser.add_argument("--read-heavy", action="store_true",
                        help="1 write : 10 reads, 9 of them of other sessions' rows at least 1 s old")
    parser.add_argument("--keep-tables", action="store_true", help="do not drop the checker's tables")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    pairs = args.pairs if args.pairs is not None else (None if args.seconds is not None else 5000)
    try:
        result = asyncio.run(run_check(
            args.dsn, sessions=args.sessions, pairs=pairs, mode=args.mode,
            cross_connection=args.cross_connection, set_min_lsn=not args.no_min_lsn,
            read_heavy=args.read_heavy, admin_url=args.admin, seconds=args.seconds,
            keep_tables=args.keep_tables))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError) as exc:
        print(f"consistency check could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
