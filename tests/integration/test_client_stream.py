"""The client byte stream under pressure, against the real sandbox cluster: messages that
arrive while the proxy waits for a reply (COPY data pipelined behind its COPY), messages
larger than the proxy's buffers, and clients that go away at any point.

Each test bounds every wait: a hang fails it with a named timeout instead of stalling the
suite. Where a test checks that the proxy kept serving, a second client logs in and runs
a statement meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import threading
import time
import uuid

import asyncpg
import pytest
import psycopg

from helpers import wait_until
from loadtest.harness import ProxyProcess, config_text
from rawclient import RawClient, message, query_message

APP_PASSWORD = "app-secret"


def table_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def create_table(cluster, table: str, columns: str, rows: str = "") -> None:
    """A table of user app's, made on the primary and replayed by the replicas."""
    cluster.sql(cluster.primary, f"CREATE TABLE {table} ({columns}); ALTER TABLE {table} OWNER TO app"
                + (f"; INSERT INTO {table} VALUES {rows}" if rows else ""), dbname="app")
    cluster.wait_caught_up()


def logged_in(proxy, timeout: float = 20) -> RawClient:
    client = RawClient("127.0.0.1", proxy.port, timeout=timeout)
    client.login("app", APP_PASSWORD, "app")
    return client


def read_until_ready(client: RawClient) -> list[tuple[str, bytes]]:
    out = []
    while True:
        t, body = client.read_message()
        out.append((t, body))
        if t == "Z":
            return out


def copy_data(line: str) -> bytes:
    return message(b"d", line.encode())


def parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def describe_statement(name: str) -> bytes:
    return message(b"D", b"S" + name.encode() + b"\0")


FLUSH = message(b"H")
SYNC = message(b"S")


def server_connections(cluster, application_name_like: str = "%") -> int:
    """Client backends of user app on the primary (the proxy's pooled connections)."""
    return cluster.sql(cluster.primary, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                        "AND backend_type = 'client backend'")[0][0]


# --- COPY data pipelined behind its COPY -----------------------------------------------------


async def test_asyncpg_copy_records_behind_a_read_on_a_replica(make_proxy, cluster):
    """asyncpg prepares its introspection query with Parse/Describe/Flush (a read: it goes
    to a replica), then writes the COPY Query, its CopyData and CopyDone without waiting
    for CopyInResponse. The COPY must run on the primary with its data."""
    proxy = make_proxy(routing={"consistency": "eventual"})
    table = table_name("apgcopy")
    create_table(cluster, table, "id int, note text")
    conn = await asyncio.wait_for(asyncpg.connect(proxy.dsn(), timeout=10), 15)
    try:
        for round_ in range(3):
            records = [(round_ * 10 + i, f"r{i}") for i in range(1 + round_ * 2)]
            result = await asyncio.wait_for(conn.copy_records_to_table(table, records=records), 10)
            assert result == f"COPY {len(records)}"
        assert await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {table}"), 10) in (0, 1, 3, 6, 9)
        await asyncio.wait_for(conn.close(), 10)
    finally:
        if not conn.is_closed():
            conn.terminate()
    assert cluster.sql(cluster.primary, f"SELECT count(*) FROM {table}", dbname="app") == [(9,)]


async def test_asyncpg_copy_that_times_out_leaves_a_working_connection(make_proxy, cluster):
    """A COPY whose data source stalls: asyncpg's timeout sends CopyFail and a cancel; the
    session answers the next statement and closes promptly, as directly on PostgreSQL."""
    proxy = make_proxy()
    table = table_name("stall")
    create_table(cluster, table, "id int")

    async def stalling():
        yield b"1\n"
        await asyncio.sleep(30)

    conn = await asyncio.wait_for(asyncpg.connect(proxy.dsn(), timeout=10), 15)
    try:
        started = time.monotonic()
        try:
            await conn.copy_to_table(table, source=stalling(), timeout=2)
        except TimeoutError:
            pass
        assert time.monotonic() - started < 8
        assert await asyncio.wait_for(conn.fetchval("SELECT 42"), 10) == 42
        await asyncio.wait_for(conn.close(), 10)
    finally:
        if not conn.is_closed():
            conn.terminate()
    assert cluster.sql(cluster.primary, f"SELECT count(*) FROM {table}", dbname="app") == [(0,)]


def test_copy_pipelined_behind_a_flushed_read(make_proxy, cluster):
    """The same bytes by hand: Parse/Describe/Flush of a read, then COPY + data + CopyDone
    in one write. The client sees the read's replies, then the COPY's, as from PostgreSQL."""
    proxy = make_proxy(routing={"consistency": "eventual"})
    table = table_name("rawcopy")
    create_table(cluster, table, "id int")
    with logged_in(proxy) as client:
        client.send(parse("intro", "SELECT 1") + describe_statement("intro") + FLUSH)
        assert [client.read_message()[0] for _ in range(3)] == ["1", "t", "T"]
        client.send(query_message(f"COPY {table} FROM STDIN") + copy_data("1\n") + copy_data("2\n")
                    + message(b"c"))
        replies = read_until_ready(client)
        assert [t for t, _ in replies] == ["G", "C", "Z"], replies
        assert replies[1][1] == b"COPY 2\0"
    assert cluster.sql(cluster.primary, f"SELECT count(*) FROM {table}", dbname="app") == [(2,)]


def test_failed_copy_with_many_rows_behind_it_stays_linear(make_proxy, cluster):
    """A COPY whose first row is bad, 100,000 more rows, CopyDone and a Query pipelined
    behind it: the error, then the Query's answer, promptly; meanwhile other clients log in."""
    proxy = make_proxy()
    table = table_name("badcopy")
    create_table(cluster, table, "id int")
    rows = 100_000
    with logged_in(proxy, timeout=30) as client:
        # the error comes back while the rows are still on their way: they arrive after
        # the COPY has ended, as a client that writes without reading sends them
        client.send(query_message(f"COPY {table} FROM STDIN") + copy_data("not a number\n"))
        first = read_until_ready(client)
        assert [t for t, _ in first][-2:] == ["E", "Z"], first
        started = time.monotonic()
        client.send(b"".join(copy_data(f"{i}\n") for i in range(rows)) + message(b"c")
                    + query_message("SELECT 'after the copy'"))
        second = read_until_ready(client)
        assert [t for t, _ in second] == ["T", "D", "C", "Z"], second
        assert b"after the copy" in second[1][1]
        elapsed = time.monotonic() - started
        with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as other:
            assert other.execute("SELECT 1").fetchone() == (1,)
    assert elapsed < 20, f"the pipelined COPY took {elapsed:.1f} s"
    assert cluster.sql(cluster.primary, f"SELECT count(*) FROM {table}", dbname="app") == [(0,)]


# --- messages larger than the proxy's buffers ----------------------------------------------


async def test_large_query_text_and_bind_parameter(make_proxy):
    """A 5 MB query text and a 20 MB bytea parameter pass, as PostgreSQL takes them."""
    proxy = make_proxy(pool={"size": 1})
    text = "x" * (5 << 20)
    with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as conn:
        conn.execute("SET statement_timeout = '60s'")
        assert conn.execute(f"SELECT length('{text}')").fetchone() == (len(text),)
        blob = bytes(range(256)) * (20 * 4096)
        assert conn.execute("SELECT length(%b)", [blob], prepare=False).fetchone() == (len(blob),)
        assert conn.execute("SELECT md5(%b)", [blob], prepare=True).fetchone()[0] == __import__(
            "hashlib").md5(blob).hexdigest()
    conn2 = await asyncio.wait_for(asyncpg.connect(proxy.dsn(), timeout=10), 15)
    try:
        assert await asyncio.wait_for(conn2.fetchval("SELECT length($1::bytea)", blob), 30) == len(blob)
        assert await asyncio.wait_for(conn2.fetchval("SELECT 42"), 10) == 42
    finally:
        await asyncio.wait_for(conn2.close(), 10)


def _peak_rss(proc: ProxyProcess) -> int:
    with open(f"/proc/{proc.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


async def test_a_100mb_bind_parameter_passes_with_bounded_proxy_memory(cluster):
    """A Bind larger than the proxy holds whole passes through as it arrives: behind its
    Parse (psycopg's Parse, Bind, Describe, Execute, Sync in one write), starting its unit
    (psycopg's prepare=True), and in a group a prepare left open (asyncpg's Parse,
    Describe, Flush, then Bind, Execute, Sync). The
    proxy's peak memory grows by much less than the message (held whole, it grew by two
    or three times its size)."""
    blob = bytes(range(256)) * (100 * 4096)  # 100 MiB
    digest = hashlib.md5(blob).hexdigest()
    with ProxyProcess(config_text({"main": cluster})) as proc:
        dsn = f"postgresql://app:app-secret@127.0.0.1:{proc.port}/app"
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            baseline = _peak_rss(proc)
            assert conn.execute("SELECT md5(%b)", [blob]).fetchone() == (digest,)
            # prepared first (Parse, Sync), then run alone: the Bind starts its unit
            assert conn.execute("SELECT md5(%b) AS again", [blob], prepare=True).fetchone() == (digest,)
            assert conn.execute("SELECT 2").fetchone() == (2,)
        aconn = await asyncpg.connect(dsn, timeout=10)
        try:
            stmt = await aconn.prepare("SELECT md5($1::bytea)")
            assert await asyncio.wait_for(stmt.fetchval(blob), 60) == digest
            assert await aconn.fetchval("SELECT 3") == 3
        finally:
            await aconn.close(timeout=10)
        grown = _peak_rss(proc) - baseline
        assert grown < 40 << 20, f"the proxy's peak memory grew by {grown >> 20} MiB for a 100 MiB message"


def test_client_leaving_mid_message_releases_its_server(make_proxy, cluster):
    """A client that goes away halfway through a large message, inside a transaction that
    holds a row lock: its server connection, transaction and lock go within seconds, and
    the pool's one connection serves the next client."""
    proxy = make_proxy(pool={"size": 1, "acquire_timeout_s": 20})
    table = table_name("leave")
    create_table(cluster, table, "id int PRIMARY KEY, v int", "(1, 0)")
    for cut in (4 << 20, 9 << 20):
        client = logged_in(proxy)
        client.send(query_message("BEGIN"))
        read_until_ready(client)
        client.send(query_message(f"UPDATE {table} SET v = v + 1 WHERE id = 1"))
        read_until_ready(client)
        big = query_message("SELECT length('" + "y" * (12 << 20) + "')")
        client.sock.settimeout(10)
        client.send(big[:cut])
        client.close()
        started = time.monotonic()
        with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as other:
            other.execute("SET statement_timeout = '15s'")
            other.execute("SET pgsplit.route = 'primary'")
            other.execute(f"UPDATE {table} SET v = v + 10 WHERE id = 1")
        assert time.monotonic() - started < 15
    assert cluster.sql(cluster.primary, f"SELECT v FROM {table}", dbname="app") == [(20,)]


def test_client_leaving_while_its_reading_is_paused(make_proxy, cluster):
    """A client whose unit waits on a lock while it keeps sending (the proxy stops reading
    it) and then is killed: noticed within seconds, its statement cancelled, although the
    event loop does not watch a socket it does not read."""
    proxy = make_proxy(pool={"size": 2, "acquire_timeout_s": 20})
    table = table_name("paused")
    create_table(cluster, table, "id int PRIMARY KEY, v int", "(1, 0)")
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as holder:
        holder.execute("SET pgsplit.route = 'primary'")
        holder.execute(f"SELECT * FROM {table} WHERE id = 1 FOR UPDATE")  # holds the row lock
        client = logged_in(proxy)
        client.send(query_message(f"UPDATE {table} SET v = 5 WHERE id = 1"))  # waits on the lock
        # many more units behind it: the proxy holds them, then stops reading this client
        filler = query_message("SELECT 1") * 1_200_000
        client.sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while sent < len(filler) and time.monotonic() < deadline:
            try:
                sent += client.sock.send(filler[sent : sent + 65536])
            except BlockingIOError:
                time.sleep(0.05)
        assert sent < len(filler), "the proxy never stopped reading the client"
        # The client is killed: its kernel resets the connection. (A FIN queued behind
        # bytes the proxy has not read cannot be seen until they are read; PostgreSQL
        # is in the same position with a client that fills its input and leaves.)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

        def waiting_update() -> int:
            return cluster.sql(cluster.primary, "SELECT count(*) FROM pg_stat_activity "
                                                f"WHERE query LIKE 'UPDATE {table}%' AND state = 'active'")[0][0]

        wait_until(lambda: waiting_update() == 0, timeout=10, message="the left client's UPDATE still waits")
        holder.rollback()
    assert cluster.sql(cluster.primary, f"SELECT v FROM {table}", dbname="app") == [(0,)]


# --- cancel requests ---------------------------------------------------------------------------


def cancel_request(port: int, key: tuple[int, bytes]) -> None:
    """A CancelRequest for `key` on a connection of its own (no reply; the proxy closes)."""
    pid, secret = key
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!iii", 16, 80877102, pid) + secret)
        try:
            sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            pass


def test_cancels_never_reach_another_clients_query(make_proxy):
    """Client a cancels its own short queries over and over, at any moment; client b runs
    its statements on the same (only) server connection meanwhile. None of b's is
    cancelled: a cancel reaches only the unit of the client that sent it, and one that
    arrives when the unit has ended is dropped."""
    proxy = make_proxy(pool={"size": 1, "acquire_timeout_s": 30})
    stop = time.monotonic() + 12
    b_done, b_cancelled, a_cancelled, cancels = [0], [], [0], [0]

    def run_b() -> None:
        with psycopg.connect(proxy.dsn(), connect_timeout=10, autocommit=True) as conn:
            conn.execute("SET pgsplit.route = 'primary'")
            while time.monotonic() < stop:
                try:
                    conn.execute("SELECT pg_sleep(0.002)")
                    b_done[0] += 1
                except psycopg.errors.QueryCanceled as exc:
                    b_cancelled.append(str(exc))

    b = threading.Thread(target=run_b)
    b.start()
    try:
        with logged_in(proxy) as a:
            a.query("SET pgsplit.route = 'primary'")
            key = a.backend_key

            def cancel_a() -> None:
                while time.monotonic() < stop and cancels[0] < 2000:
                    cancel_request(proxy.port, key)
                    cancels[0] += 1

            canceller = threading.Thread(target=cancel_a)
            canceller.start()
            try:
                while time.monotonic() < stop:
                    result = a.query("SELECT pg_sleep(0.01)")
                    if result.errors:
                        assert result.errors[0]["C"] == "57014", result.errors
                        a_cancelled[0] += 1
            finally:
                canceller.join(timeout=20)
    finally:
        b.join(timeout=30)
    assert cancels[0] > 200 and b_done[0] > 100, (cancels, b_done)
    assert a_cancelled[0] > 0, "no cancel reached the client that sent it"
    assert b_cancelled == [], f"{len(b_cancelled)} of the other client's statements were cancelled"


async def test_asyncpg_statement_after_a_timeout_is_not_cancelled(make_proxy):
    """asyncpg's timeout cancels the statement and waits for its cancel connection to end
    before it sends the next one: that next statement must not be what gets cancelled."""
    proxy = make_proxy()
    conn = await asyncio.wait_for(asyncpg.connect(proxy.dsn(), timeout=10), 15)
    try:
        await conn.execute("SET pgsplit.route = 'primary'")
        cancelled = 0
        for _ in range(30):
            with contextlib.suppress(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(1)", timeout=0.05)
            try:
                assert await asyncio.wait_for(conn.fetchval("SELECT 42"), 10) == 42
            except asyncpg.QueryCanceledError:
                cancelled += 1
        assert cancelled == 0, f"{cancelled} of 30 statements after a timeout were cancelled"
    finally:
        await asyncio.wait_for(conn.close(), 10)


@pytest.mark.parametrize("in_transaction", [False, True])
def test_extended_messages_without_sync_run_as_they_come(proxy, in_transaction):
    """libpq's pipeline mode sends Bind/Describe/Execute without a Sync (nor a Flush) until
    the application asks for one; PostgreSQL runs each message as it comes, and an error
    reaches the client at once (the server flushes it): psycopg's pipeline waits for it.
    The proxy must not hold the messages back waiting for the group's end."""
    with logged_in(proxy) as client:
        if in_transaction:
            client.send(query_message("BEGIN"))
            read_until_ready(client)
        bind = message(b"B", b"\0\0\0\0\0\0\0\0")
        execute = message(b"E", b"\0\0\0\0\0")
        client.send(parse("", "SELECT 40 + 2") + bind + execute + parse("", "SELECT 1 / 0") + bind + execute)
        replies = [client.read_message() for _ in range(6)]  # (1 / 0 fails at its Bind: planning)
        assert [t for t, _ in replies] == ["1", "2", "D", "C", "1", "E"], replies
        assert b"C22012" in replies[-1][1]
        client.send(SYNC)
        assert [t for t, _ in read_until_ready(client)] == ["Z"]
