"""Read-your-writes through pgsplit, measured with the consistency checker
(loadtest/consistency.py) on the real sandbox cluster.

With a 200 ms apply delay on both replicas a read that follows a write at once can only
be fresh if the proxy waits for a replica at the session's token or sends the read to the
primary; `eventual` mode (and `token` mode without the hand-over) must show stale reads in
the same setup, so the checker is shown to be able to catch them. Without delay, a
read-heavy mix must still be served mostly by replicas: consistency must not quietly send
everything to the primary.

Each checker run makes its own tables (cc_<time>_<random>_*), so runs never see each
other's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from loadtest.consistency import CheckResult, run_check
from loadtest.sandbox import Cluster
from router.lsn import format_lsn, parse_lsn
from helpers import wait_until
from rawclient import RawClient, message
from where import metric_value, retries

ROOT = Path(__file__).resolve().parents[2]
DELAY_MS = 200
WAIT_MS = 20  # consistency_wait_ms: short, so runs are not dominated by waits


@pytest.fixture
def apply_delay(cluster: Cluster) -> Iterator[int]:
    """recovery_min_apply_delay = 200 ms on both replicas for one test; 0 again after."""
    try:
        for r in cluster.replicas:
            cluster.set_apply_delay(r, DELAY_MS)
        yield DELAY_MS
    finally:
        for r in cluster.replicas:
            cluster.set_apply_delay(r, 0)
        cluster.wait_caught_up()


def replicas_caught_up(cluster: Cluster, proxy) -> None:
    """Until every replica has replayed what the primary has written now, and the proxy's
    monitor has seen it (so a token up to here lets a replica serve)."""
    lsn = parse_lsn(cluster.wait_caught_up())
    wait_until(lambda: proxy.call(lambda: all(
        r.replay_lsn is not None and r.replay_lsn >= lsn for r in proxy.proxy.topology.current.replicas)),
        timeout=10, message=f"the proxy to see the replicas at {format_lsn(lsn)}")


def describe(res: CheckResult) -> str:
    return "\n" + res.summary()


def assert_no_errors(res: CheckResult, pairs: int) -> None:
    print(describe(res))  # the record (pytest -s)
    assert res.errors == 0, describe(res)
    assert res.pairs == pairs, describe(res)
    assert all(n > 0 for n in res.pairs_by_kind.values()), describe(res)


# --- 200 ms apply delay on both replicas ------------------------------------------------------


async def test_session_mode_no_stale_reads_under_apply_delay(make_proxy, apply_delay):
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=5000, mode="session", admin_url=proxy.admin_url)
    assert_no_errors(res, 5000)
    assert res.stale == 0, describe(res)
    # Every read-back carried a token: the proxy recorded an outcome for it, and the waits
    # were bounded by consistency_wait_ms (not by the 200 ms delay).
    assert res.immediate + res.waits + res.fallbacks >= res.pairs, describe(res)
    assert res.wait_count > 0 and res.wait_seconds_sum / res.wait_count < 0.1, describe(res)


async def test_session_mode_read_after_explicit_transaction(make_proxy, apply_delay, cluster):
    """The write of an explicit transaction (BEGIN / INSERT / COMMIT as separate
    statements) must count: the read right after COMMIT sees the row. The session's earlier
    write (its token already taken by a read) is replayed everywhere first, so that old
    token alone would let a replica without the transaction serve the read."""
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    conn = await asyncpg.connect(proxy.dsn(), timeout=10, command_timeout=10)
    table = "cc_explicit_tx"
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY)")
        await conn.execute(f"INSERT INTO {table} VALUES (1)")
        # A read takes the session's token for that insert; then every replica gets it.
        assert (await conn.fetchval(f"SELECT count(*) FROM {table}")) == 1
        replicas_caught_up(cluster, proxy)
        stale = []
        await conn.execute("BEGIN")
        await conn.execute(f"INSERT INTO {table} VALUES (2)")
        await conn.execute("COMMIT")
        seen, on_replica = await conn.fetchrow(f"SELECT count(*), pg_is_in_recovery() FROM {table}")
        if seen != 2:
            stale.append(f"BEGIN / INSERT / COMMIT: read saw {seen} of 2 rows (on a replica: {on_replica})")
        replicas_caught_up(cluster, proxy)
        async with conn.transaction():  # asyncpg: BEGIN, extended-protocol INSERT, COMMIT
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", 3)
        seen, on_replica = await conn.fetchrow(f"SELECT count(*), pg_is_in_recovery() FROM {table}")
        if seen != 3:
            stale.append(f"asyncpg transaction(): read saw {seen} of 3 rows (on a replica: {on_replica})")
        assert not stale, "stale reads right after COMMIT:\n" + "\n".join(stale)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_an_autocommit_write_brings_its_own_token(make_proxy, apply_delay):
    """The WAL position is read on the write's own connection, right behind it: the read
    that follows needs no LSN fetch of its own, and is still never stale (a token taken
    too early would let a 200 ms-delayed replica serve it)."""
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    conn = await asyncpg.connect(proxy.dsn(), timeout=10, command_timeout=10)
    table = "cc_own_token"
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY)")
        await conn.fetchval(f"SELECT count(*) FROM {table}")
        fetches = proxy.call(lambda: proxy.proxy.lsn_fetcher.queries_sent)
        stale = []
        for i in range(1, 21):
            await conn.execute(f"INSERT INTO {table} VALUES ({i})")  # simple protocol, autocommit
            seen = await conn.fetchval(f"SELECT count(*) FROM {table}")
            if seen != i:
                stale.append((i, seen))
        assert stale == [], f"stale reads (rows written, rows seen): {stale}"
        assert proxy.call(lambda: proxy.proxy.lsn_fetcher.queries_sent) == fetches
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def waited(proxy, outcome: str = "waited") -> float:
    text = proxy.call(lambda: proxy.proxy.metrics.exposition().decode())
    return metric_value(text, "pgsplit_consistency_waits_total", {"outcome": outcome})


def fallbacks(proxy) -> float:
    return waited(proxy, "fallback")


async def replica_connections_open(conn) -> set[int]:
    """Reads before the session's first write (no token), so that both replicas' pools
    have a connection: the short path takes only a pooled connection idle at that moment.
    The ports of the replicas that served them."""
    ports = set()
    for _ in range(10):
        port, on_replica = await (await conn.execute("SELECT inet_server_port(), pg_is_in_recovery()")).fetchone()
        if on_replica:
            ports.add(port)
    return ports


async def write_then_read(proxy, table: str, n: int) -> list[tuple[int, int, bool]]:
    """n times: an autocommit INSERT, then at once a count of the rows on the same
    session; (rows written, rows seen, seen on a replica) for each. psycopg sends each
    statement as an unnamed Parse, Bind, Describe, Execute, Sync: the short path's shape."""
    async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert len(await replica_connections_open(conn)) == 2, "reads without a token reached no replica"
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        out = []
        for i in range(1, n + 1):
            await conn.execute(f"INSERT INTO {table} VALUES ({i})")
            seen, on_replica = await (await conn.execute(f"SELECT count(*), pg_is_in_recovery() FROM {table}")).fetchone()
            out.append((i, seen, on_replica))
        await conn.execute(f"DROP TABLE {table}")
        return out


async def test_a_read_after_a_write_waits_for_replay_on_the_replica(make_proxy, cluster):
    """No replica is known to have the write yet when the read comes: it goes to a
    replica behind a query that waits there (at most consistency_wait_ms) until the
    replica has replayed the session's writes, and is served there, fresh."""
    cluster.wait_caught_up()
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": 200})
    waits = waited(proxy)
    rows = await write_then_read(proxy, "cc_replay_wait", 20)
    assert [(i, seen) for i, seen, _ in rows if seen != i] == [], rows
    on_replica = sum(1 for _, _, r in rows if r)
    assert on_replica >= 18, rows  # (a replica slower than 200 ms at times: the primary serves)
    assert waited(proxy) - waits >= on_replica - 2, "reads served by replicas without a replay check"
    assert retries(proxy, "replica_behind") == 20 - on_replica


def named_group(name: str, sql: str, describe: bool) -> bytes:
    """Parse of a named statement, its Bind, [Describe,] Execute and Sync in one write: the
    first use of a statement as drivers send it, a shape the short way does not take."""
    n = name.encode()
    return (message(b"P", n + b"\0" + sql.encode() + b"\0\0\0") + message(b"B", b"\0" + n + b"\0\0\0\0\0\0\0")
            + (message(b"D", b"P\0") if describe else b"") + message(b"E", b"\0\0\0\0\0") + message(b"S"))


async def test_a_unit_of_any_shape_is_routed_alike(make_proxy, cluster):
    """A write and a read in groups the short way does not take get read-your-writes
    the same way: the write's WAL position is read behind it on its own connection (no
    query of the primary's position before the read), and the read goes to a replica
    behind a replay check. Before every shape was routed by one function, such a
    write left its token to be fetched from the primary by the read after it."""
    cluster.wait_caught_up()
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": 200})
    table = "cc_any_shape"
    fetches = proxy.call(lambda: proxy.proxy.lsn_fetcher.queries_sent)
    waits = waited(proxy)
    with RawClient("127.0.0.1", proxy.port, timeout=10) as client:
        client.login("app", "app-secret", "app")
        client.query(f"DROP TABLE IF EXISTS {table}")
        client.query(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        rows = []
        for i in range(1, 11):
            client.send(named_group(f"w{i}", f"INSERT INTO {table} VALUES ({i})", False))
            assert not client.read_result().errors
            client.send(named_group(f"r{i}", f"SELECT count(*), pg_is_in_recovery() FROM {table}", True))
            result = client.read_result()
            assert not result.errors, result.errors
            rows.append((i, int(result.rows[0][0]), result.rows[0][1] == "t"))
        client.query(f"DROP TABLE {table}")
    assert [(i, seen) for i, seen, _ in rows if seen != i] == [], f"stale reads: {rows}"
    on_replica = sum(1 for _, _, r in rows if r)
    assert on_replica >= 8, rows
    assert proxy.call(lambda: proxy.proxy.lsn_fetcher.queries_sent) - fetches <= 1  # (the DDL's)
    assert waited(proxy) - waits >= on_replica - 2, "reads served by replicas without a replay check"


async def test_a_read_checked_on_a_lagging_replica_runs_again_on_the_primary(make_proxy, apply_delay):
    """With replay 200 ms behind and consistency_wait_ms 50, the replay check ahead of the
    read says the replica does not have the write: the read's rows from the replica are
    dropped before the client sees any, and it runs again on the primary."""
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": 50})
    before, fell_back = retries(proxy, "replica_behind"), fallbacks(proxy)
    rows = await write_then_read(proxy, "cc_replay_behind", 10)
    assert [(i, seen) for i, seen, _ in rows if seen != i] == [], f"stale reads: {rows}"
    assert not any(r for _, _, r in rows), rows
    # Each read was checked on a replica and run again, or (when its replica's pooled
    # connection was not idle just then) went the general way: the proxy waited, then
    # sent it to the primary. Most go the first way; how many varies with timing.
    behind = retries(proxy, "replica_behind") - before
    assert behind + fallbacks(proxy) - fell_back >= 10
    assert behind >= 3


def test_a_cancel_of_a_read_checked_on_a_lagging_replica_is_not_lost(make_proxy, apply_delay, cluster):
    """The read behind a replay check that finds the replica behind is dropped there and
    runs again on the primary. A cancel the client sends meanwhile reaches the replica's
    statement, whose replies are being dropped: the read must end cancelled, not start
    again on the primary as if the client had not asked."""
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": 50})
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS cc_cancel (id int)")
        time.sleep(0.5)
        cluster.wait_caught_up()  # (the replicas have the table: the read runs there, slowly)
        for _ in range(10):  # (reads without a token: the replicas' pools get a connection)
            conn.execute("SELECT 1")
        conn.execute("INSERT INTO cc_cancel VALUES (1)")  # the read after it needs its token
        # (the non-blocking cancel: the blocking one holds the GIL this proxy's thread needs)
        timer = threading.Timer(0.5, conn.cancel_safe, kwargs={"timeout": 10})
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):  # (a slow read: pg_sleep is volatile, a write)
            conn.execute("SELECT (SELECT count(*) FROM cc_cancel), count(*) FROM generate_series(1, 20000000)")
        timer.join()
        assert time.monotonic() - t0 < 2.5  # (run again on the primary, it ended after about 5 s)
        assert conn.execute("SELECT count(*) FROM cc_cancel").fetchone() == (1,)  # the session goes on
        conn.execute("DROP TABLE cc_cancel")


async def test_eventual_mode_shows_stale_reads_under_apply_delay(make_proxy, apply_delay):
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=1000, mode="eventual", admin_url=proxy.admin_url)
    assert_no_errors(res, 1000)
    assert res.stale > 0, describe(res)
    assert res.reads_on_replica > 0, describe(res)
    # eventual reads carry no token: nothing waits for one
    assert res.immediate + res.waits + res.fallbacks == 0, describe(res)


async def test_token_mode_cross_connection_with_min_lsn(make_proxy, apply_delay):
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=1000, mode="token", cross_connection=True,
                          set_min_lsn=True, admin_url=proxy.admin_url)
    assert_no_errors(res, 1000)
    assert res.stale == 0, describe(res)


async def test_token_mode_cross_connection_without_min_lsn_is_stale(make_proxy, apply_delay):
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=1000, mode="token", cross_connection=True,
                          set_min_lsn=False, admin_url=proxy.admin_url)
    assert_no_errors(res, 1000)
    assert res.stale > 0, describe(res)


async def test_global_mode_cross_connection(make_proxy, apply_delay):
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=1000, mode="global", cross_connection=True,
                          admin_url=proxy.admin_url)
    assert_no_errors(res, 1000)
    assert res.stale == 0, describe(res)
    assert res.immediate + res.waits + res.fallbacks >= res.pairs, describe(res)


# --- no delay: reads stay on the replicas -----------------------------------------------------


async def test_read_heavy_session_mode_reads_mostly_on_replicas(make_proxy, cluster):
    cluster.wait_caught_up()
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    res = await run_check(proxy.dsn(), sessions=16, pairs=1000, mode="session", read_heavy=True,
                          admin_url=proxy.admin_url)
    assert_no_errors(res, 1000)
    assert res.reads == 10 * res.pairs, describe(res)  # 1 write : 10 reads
    assert res.replica_share >= 0.9, describe(res)
    assert res.stale == 0, describe(res)


# --- the command line ---------------------------------------------------------------------------


def test_command_line_help():
    out = subprocess.run([sys.executable, "-m", "loadtest.consistency", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--dsn", "--admin", "--sessions", "--pairs", "--mode", "--cross-connection",
                   "--no-min-lsn", "--read-heavy", "--seconds", "--json"):
        assert option in out.stdout, option


def test_command_line_json_run(make_proxy, cluster):
    cluster.wait_caught_up()
    proxy = make_proxy(routing={"consistency": "session", "consistency_wait_ms": WAIT_MS})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    out = subprocess.run(
        [sys.executable, "-m", "loadtest.consistency", "--dsn", proxy.dsn(), "--admin", proxy.admin_url,
         "--sessions", "4", "--pairs", "300", "--mode", "session", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode in (0, 1), f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    result = json.loads(out.stdout)
    assert result["mode"] == "session" and result["sessions"] == 4
    assert result["pairs"] == 300 and result["errors"] == 0, result
    assert result["reads"] == 300 and 0 <= result["replica_share"] <= 1, result
    assert set(result["stale_by_kind"]) == {"insert", "update", "tx"}, result
    assert result["immediate"] is not None and isinstance(result["wait_histogram"], dict), result
    # the exit status follows the result: 0 only without stale reads and errors
    assert out.returncode == (0 if result["ok"] else 1), result
    assert result["ok"] == (result["stale"] == 0 and result["errors"] == 0), result
