"""Real clients through pgsplit against the real sandbox cluster: psql, pgbench (simple,
extended and prepared protocol), asyncpg, psycopg 3; a cancel through the proxy; a large
result streamed through a proxy process whose memory must stay bounded.

Protocol-fidelity tests pin their session to the primary (`SET pgsplit.route = 'primary'`)
so that what they check does not depend on replica lag; routing has its own tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import os
import socket
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerrors

from helpers import async_wait_until, wait_until
from loadtest.harness import ProxyProcess, config_text
from rawclient import RawClient, query_message


def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def running_on_any_node(cluster, marker: str) -> list[tuple]:
    rows = []
    for node in cluster.nodes:
        rows += cluster.sql(node, "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                                  "AND query LIKE %s AND pid <> pg_backend_pid()", f"%{marker}%")
    return rows


# --- psql and pgbench ------------------------------------------------------------------------


def test_psql_c(proxy):
    url = proxy.dsn()
    out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", "SELECT 6 * 7", url],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "42\n", "")
    # several statements in one -c (one Query message), with a write and a read-back
    table = table_name("psql")
    sql = (f"CREATE TABLE {table} (a int); INSERT INTO {table} SELECT generate_series(1, 10); "
           f"SELECT sum(a) FROM {table}; DROP TABLE {table}")
    out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, url],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (
        0, "CREATE TABLE\nINSERT 0 10\n55\nDROP TABLE\n", ""), out
    # an error is reported as PostgreSQL words it
    out = subprocess.run(["psql", "-X", "-c", "SELECT 1/0", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "ERROR:  division by zero" in out.stderr, out.stderr


def test_pgbench_simple_extended_prepared(proxy, cluster):
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(proxy.port), "PGUSER": "app",
           "PGPASSWORD": "app-secret", "PGDATABASE": "app", "PGSSLMODE": "disable"}
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q"], env=env, capture_output=True, text=True,
                          timeout=90)
    assert init.returncode == 0, init.stderr
    assert "done in" in init.stderr, init.stderr
    assert cluster.sql(cluster.primary, "SELECT count(*) FROM pgbench_accounts", dbname="app") == [(100000,)]
    clients, per_client = 4, 50
    for mode in ("simple", "extended", "prepared"):
        run = subprocess.run(["pgbench", "-n", "-M", mode, "-c", str(clients), "-j", "2",
                              "-t", str(per_client)], env=env, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, (mode, run.stdout, run.stderr)
        total = clients * per_client
        assert f"number of transactions actually processed: {total}/{total}" in run.stdout, (mode, run.stdout)
        assert "number of failed transactions: 0 (0.000%)" in run.stdout, (mode, run.stdout)
    # every transaction of the three runs happened once, in full (no lost or doubled writes)
    sums = cluster.sql(cluster.primary, """
        SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(delta) FROM pgbench_history),
               (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
               (SELECT sum(tbalance) FROM pgbench_tellers)""", dbname="app")[0]
    assert sums[0] == 3 * clients * per_client, sums
    assert sums[1] == sums[2] == sums[3] == sums[4], sums


# --- asyncpg ---------------------------------------------------------------------------------


async def asyncpg_connect(proxy) -> asyncpg.Connection:
    conn = await asyncpg.connect(proxy.dsn(), timeout=10)
    await conn.execute("SET pgsplit.route = 'primary'")
    return conn


async def test_asyncpg_fetch_and_prepared_statements(proxy):
    conn = await asyncpg_connect(proxy)
    try:
        rows = await conn.fetch("SELECT g, g::text || 'x' AS s, NULL::int AS n FROM generate_series(1, 3) g")
        assert [tuple(r) for r in rows] == [(1, "1x", None), (2, "2x", None), (3, "3x", None)]
        assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
        assert await conn.fetchrow("SELECT $1::text AS t, $2::numeric AS n, $3::timestamptz AS ts",
                                   "héllo", decimal.Decimal("1.50"),
                                   dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)) == (
            "héllo", decimal.Decimal("1.50"), dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
        double = await conn.prepare("SELECT $1::int * 2 AS d")
        triple = await conn.prepare("SELECT $1::int * 3 AS t")
        for i in range(20):  # many units: the statements must survive server changes
            assert await double.fetchval(i) == 2 * i
            assert await triple.fetchval(i) == 3 * i
            assert await conn.fetchval("SELECT $1::text", str(i)) == str(i)
        assert [a.name for a in double.get_attributes()] == ["d"]
        assert [t.name for t in triple.get_parameters()] == ["int4"]
        # an error inside the extended protocol leaves the connection usable
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("SELECT 1 / $1::int", 0)
        assert await double.fetchval(21) == 42
    finally:
        await conn.close()


async def test_asyncpg_executemany_copy_and_cursor(proxy):
    conn = await asyncpg_connect(proxy)
    table = table_name("apg")
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(i, f"n{i}") for i in range(1, 501)])
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 500
        result = await conn.copy_records_to_table(
            table, records=[(i, f"c{i}") for i in range(501, 2501)], columns=["id", "note"])
        assert result == "COPY 2000"
        assert await conn.fetchrow(f"SELECT count(*), sum(id), max(note) FROM {table}") == (
            2500, 2500 * 2501 // 2, "n99")
        # a cursor inside a transaction
        async with conn.transaction():
            seen = [r["id"] async for r in conn.cursor(f"SELECT id FROM {table} ORDER BY id", prefetch=64)]
            assert seen == list(range(1, 2501))
            cur = await conn.cursor(f"SELECT id, note FROM {table} WHERE id > $1 ORDER BY id", 100)
            assert [tuple(r) for r in await cur.fetch(3)] == [(101, "n101"), (102, "n102"), (103, "n103")]
            assert await cur.forward(100) == 100
            assert tuple(await cur.fetchrow()) == (204, "n204")
        # executemany with a failing row: all or nothing
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", [(9001, "a"), (1, "dup")])
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id = 9001") == 0
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_asyncpg_listen_notify(proxy):
    listener = await asyncpg.connect(proxy.dsn(), timeout=10)
    notifier = await asyncpg.connect(proxy.dsn(), timeout=10)
    got: list[tuple[str, str]] = []
    try:
        await listener.add_listener("pgsplit_chan", lambda _c, _pid, channel, payload: got.append((channel, payload)))
        await notifier.execute("NOTIFY pgsplit_chan, 'hello'")
        await notifier.fetchval("SELECT pg_notify('pgsplit_chan', $1)", "world")
        # the listener is idle: notifications arrive between units, without a query
        await async_wait_until(lambda: len(got) >= 2, timeout=5, message="two notifications")
        assert got == [("pgsplit_chan", "hello"), ("pgsplit_chan", "world")]
        # the listening session still works, and keeps listening after a query
        assert await listener.fetchval("SELECT 7") == 7
        await notifier.execute("NOTIFY pgsplit_chan, 'again'")
        await async_wait_until(lambda: len(got) >= 3, timeout=5, message="a third notification")
        assert got[2] == ("pgsplit_chan", "again")
    finally:
        await listener.close()
        await notifier.close()


def test_notifications_carry_the_pid_the_client_was_given(proxy):
    """A notification from the client's own session carries the backend pid the client
    knows (the proxy's, from its BackendKeyData), as drivers compare it to tell their own
    notifications from others); another session's carries that session's (the client
    that last used the server connection that sent it)."""
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn, \
            psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as other:
        conn.execute("LISTEN pid_chan")
        conn.execute("NOTIFY pid_chan, 'mine'")  # delivered before the unit's ReadyForQuery
        other.execute("NOTIFY pid_chan, 'theirs'")
        conn.execute("SELECT 1")  # (between units: delivered on the idle connection too)
        got = {n.payload: n.pid for n in conn.notifies(timeout=5, stop_after=2)}
        assert got["mine"] == conn.info.backend_pid
        assert got["theirs"] == other.info.backend_pid


# --- psycopg 3 -------------------------------------------------------------------------------


def psycopg_connect(proxy, **kw) -> psycopg.Connection:
    conn = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10, **kw)
    conn.execute("SET pgsplit.route = 'primary'")
    return conn


VALUES = (42, "héllo wörld", decimal.Decimal("12345.678"),
          dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc), b"\x00\x01\xffbytes",
          [1, 2, None, 4], None, True, 3.5)
VALUES_SQL = ("SELECT %s::int, %s::text, %s::numeric, %s::timestamptz, %s::bytea, %s::int[], "
              "%s::int, %s::bool, %s::float8")


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_psycopg_text_and_binary_results(proxy, binary):
    with psycopg_connect(proxy) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        cur = conn.cursor(binary=binary)
        row = cur.execute(VALUES_SQL, VALUES).fetchone()
        assert row == VALUES
        assert cur.pgresult.fformat(0) == (1 if binary else 0)
        # server-side prepared (psycopg prepares after 5 executions) with the same result
        for i in range(8):
            assert cur.execute("SELECT %s::int + 1", (i,), prepare=i > 2).fetchone() == (i + 1,)
        rows = cur.execute("SELECT g, repeat('r', g) FROM generate_series(1, 300) g").fetchall()
        assert rows == [(g, "r" * g) for g in range(1, 301)]


def test_psycopg_pipeline_mode(proxy):
    table = table_name("pipe")
    with psycopg_connect(proxy) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        try:
            with conn.pipeline() as p:
                curs = []
                for i in range(50):
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
                    curs.append(conn.execute("SELECT %s::int * 10", (i,)))
                count = conn.execute(f"SELECT count(*) FROM {table}")
                p.sync()
                assert [c.fetchone() for c in curs] == [(i * 10,) for i in range(50)]
                assert count.fetchone() == (50,)
            # an error in the middle of a pipeline: the rest of that batch is skipped, later work is fine
            with pytest.raises(pgerrors.UniqueViolation):
                with conn.pipeline():
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1000, "ok"))
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, "dup"))
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1001, "skipped"))
            with conn.pipeline():
                after = conn.execute(f"SELECT count(*), max(id) FROM {table}")
            assert after.fetchone() == (50, 49)
            # a transaction in pipeline mode
            with conn.pipeline(), conn.transaction():
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (2000, "tx"))
                inside = conn.execute(f"SELECT v FROM {table} WHERE id = 2000")
            assert inside.fetchone() == ("tx",)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_psycopg_copy(proxy):
    table = table_name("copy")
    with psycopg_connect(proxy) as conn:
        conn.execute(f"CREATE TABLE {table} (id int, note text, data bytea)")
        try:
            cur = conn.cursor()
            with cur.copy(f"COPY {table} (id, note, data) FROM STDIN") as copy:
                for i in range(3000):
                    copy.write_row((i, f"note {i}\twith tab", bytes([i % 256])))
            assert cur.rowcount == 3000
            with cur.copy(f"COPY {table} (id, note) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                copy.write_row((5000, "binary row"))
            rows = []
            with cur.copy(f"COPY (SELECT id, note, data FROM {table} ORDER BY id) TO STDOUT") as copy:
                rows = list(copy.rows())
            assert len(rows) == 3001
            assert rows[7] == ("7", "note 7\twith tab", "\\x07")
            assert rows[-1] == ("5000", "binary row", None)
            with cur.copy(f"COPY (SELECT id FROM {table} WHERE id < 3) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4"])
                assert sorted(copy.rows()) == [(0,), (1,), (2,)]
            # a COPY that fails on the server (bad data) leaves the session usable
            with pytest.raises(pgerrors.InvalidTextRepresentation):
                with cur.copy(f"COPY {table} (id) FROM STDIN") as copy:
                    copy.write("not a number\n")
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (3001,)
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_psycopg_libpq18_asks_for_protocol_3_2(proxy):
    """libpq 18 with max_protocol_version=latest asks for 3.2; against PostgreSQL 15 it is
    told 3.0 (NegotiateProtocolVersion) and continues. Through the proxy it must too."""
    # psycopg[binary] >= 3.3.9 (pyproject.toml) bundles libpq 18
    assert psycopg.pq.version() >= 180000, f"libpq {psycopg.pq.version()}: install psycopg[binary] >= 3.3.9"
    with psycopg.connect(proxy.dsn(max_protocol_version="latest"), autocommit=True, connect_timeout=10) as conn:
        assert conn.pgconn.protocol_version == 3
        assert conn.execute("SELECT 'negotiated'").fetchone() == ("negotiated",)


# --- cancel ----------------------------------------------------------------------------------


def test_cancel_pg_sleep_through_the_proxy(proxy, cluster):
    marker = f"cancel_{uuid.uuid4().hex[:8]}"
    with psycopg_connect(proxy) as conn:
        cancelled_at: list[float] = []

        def cancel_when_running() -> None:
            wait_until(lambda: running_on_any_node(cluster, marker), timeout=10)
            cancelled_at.append(time.monotonic())
            conn.cancel_safe(timeout=5)

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        try:
            with pytest.raises(pgerrors.QueryCanceled) as info:
                conn.execute(f"SELECT pg_sleep(10) /* {marker} */")
            failed_at = time.monotonic()
        finally:
            canceller.join(15)
        assert cancelled_at, "the query never showed up on a backend"
        assert failed_at - cancelled_at[0] < 1.0, failed_at - cancelled_at[0]
        assert info.value.sqlstate == "57014"
        assert str(info.value).startswith("canceling statement due to user request")
        assert not running_on_any_node(cluster, marker)
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)


async def test_asyncpg_timeout_cancels_through_the_proxy(proxy, cluster):
    marker = f"apgcancel_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg_connect(proxy)
    try:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval(f"SELECT pg_sleep(10) /* {marker} */", timeout=0.5)
        # asyncpg cancels the statement and waits for it before the connection is usable
        assert await conn.fetchval("SELECT 'after timeout'") == "after timeout"
        assert time.monotonic() - t0 < 2.0
        assert not await asyncio.to_thread(running_on_any_node, cluster, marker)
    finally:
        await conn.close()


# --- a large result, streamed with bounded memory ------------------------------------------------


# loadtest.harness.ProxyProcess.start() leaves its log file object to the garbage collector
def test_200mb_result_streams_with_bounded_proxy_memory(cluster):
    """A 200 MB result read by a client that stalls, then reads slowly: the proxy must
    apply backpressure to the server instead of buffering the result."""
    row_bytes, rows = 1000, 200_000
    with ProxyProcess(config_text({"main": cluster})) as proc:
        client = RawClient("127.0.0.1", proc.port, timeout=30)
        try:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.login("app", "app-secret", "app")
            assert client.scalar("SELECT 1") == "1"
            baseline = proc.rss_bytes()
            client.send(query_message(
                f"SELECT g, repeat('x', {row_bytes}) FROM generate_series(1, {rows}) g"))
            peak = baseline
            # stall: a proxy without flow control would read the whole result now
            stall_end = time.monotonic() + 3.0
            while time.monotonic() < stall_end:
                peak = max(peak, proc.rss_bytes())
                time.sleep(0.1)
            data_rows, received, complete = 0, 0, None
            next_sample = 0
            while True:
                t, body = client.read_message()
                received += 5 + len(body)
                if t == "D":
                    data_rows += 1
                elif t == "C":
                    complete = body.rstrip(b"\0").decode()
                elif t == "Z":
                    break
                elif t == "E":
                    raise AssertionError(f"error in the result: {body!r}")
                if received >= next_sample:
                    peak = max(peak, proc.rss_bytes())
                    next_sample += 8 << 20
                    time.sleep(0.02)  # a slow reader
            assert (data_rows, complete) == (rows, f"SELECT {rows}")
            assert received > 200_000_000
            growth = peak - baseline
            assert growth < 50 << 20, (
                f"proxy RSS grew by {growth / 2**20:.0f} MiB while streaming {received / 2**20:.0f} MiB "
                f"(baseline {baseline / 2**20:.0f} MiB)\n{proc.log()[-3000:]}")
            assert client.scalar("SELECT 'still fine'") == "still fine"
        finally:
            client.close()
