"""Server connection pooling through pgsplit, on the real sandbox cluster.

Many clients share a few server connections (transaction mode: a connection is lent for one
unit of work), so what a client set up on one server connection must follow it to the next:
named prepared statements (asyncpg, psycopg 3 with prepare_threshold=0, pgbench -M prepared)
and SET values. Pools are bounded per (backend, user, database), and a client that waits too
long for one gets a clear error while the others carry on. `pool.mode = "session"` (a server
connection per client and backend, kept for the session) must pass the same basic cases.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from loadtest.sandbox import Cluster
from rawclient import RawClient, message
from where import WHERE_SQL, UnitCounter, on

MODES = ["transaction", "session"]
BENCH_DB = "pl_bench"


def asyncpg_dsn(proxy, dbname: str = "app") -> str:
    return f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/{dbname}"


def replica_names(cluster: Cluster) -> set[str]:
    return {r.name for r in cluster.replicas}


# --- pgbench: 200 clients over 20 server connections ----------------------------------------


@pytest.fixture(scope="module")
def bench_db(cluster: Cluster) -> str:
    """A database of its own for pgbench (other tests' pgbench tables stay untouched)."""
    if not cluster.sql(cluster.primary, "SELECT 1 FROM pg_database WHERE datname = %s", BENCH_DB):
        cluster.sql(cluster.primary, f"CREATE DATABASE {BENCH_DB} OWNER app")
    cluster.wait_caught_up()
    return BENCH_DB


def pgbench(proxy, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGPASSWORD": "app-secret", "PGSSLMODE": "disable"}
    cmd = ["pgbench", "-h", "127.0.0.1", "-p", str(proxy.port), "-U", "app", *args, BENCH_DB]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def summary(out: subprocess.CompletedProcess) -> dict[str, int]:
    text = out.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    assert processed is not None and failed is not None, (out.stdout, out.stderr)
    return {"processed": int(processed.group(1)), "failed": int(failed.group(1))}


class ActivitySampler:
    """Largest number of server sessions of user app on the bench database, per node, and
    of client sessions in the proxy, sampled every 50 ms in a thread."""

    def __init__(self, cluster: Cluster, proxy):
        self.cluster, self.proxy = cluster, proxy
        self.max_servers: Counter = Counter()
        self.max_clients = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        conns = {n.name: psycopg.connect(n.local_conninfo(), autocommit=True) for n in self.cluster.nodes}
        try:
            while not self._stop.is_set():
                for name, conn in conns.items():
                    n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                     "AND datname = %s", (BENCH_DB,)).fetchone()[0]
                    self.max_servers[name] = max(self.max_servers[name], n)
                self.max_clients = max(self.max_clients, len(self.proxy.proxy.sessions))
                self._stop.wait(0.05)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            for conn in conns.values():
                conn.close()

    def __enter__(self) -> "ActivitySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error


def run_bench(proxy, cluster: Cluster, *args: str, clients: int, transactions: int) -> tuple[dict, ActivitySampler, Counter]:
    # A count per client, not a duration: pgbench's -T clock includes connecting 200
    # clients (SCRAM each), which alone takes seconds on a busy 2-core machine.
    counter = UnitCounter(proxy)
    with ActivitySampler(cluster, proxy) as sampler:
        out = pgbench(proxy, "-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-t", str(transactions),
                      *args, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "error" not in out.stderr.lower(), out.stderr[-2000:]
    return summary(out), sampler, counter.roles()


def test_pgbench_200_clients_over_a_pool_of_20(make_proxy, cluster, bench_db) -> None:
    proxy = make_proxy(pool={"size": 20})
    init = pgbench(proxy, "-i", "-s", "2", "-q", timeout=120)
    assert init.returncode == 0, (init.stdout, init.stderr)
    cluster.wait_caught_up()
    assert cluster.sql(cluster.replicas[0], "SELECT count(*) FROM pgbench_accounts", dbname=BENCH_DB) == [(200000,)]

    for name, args in (("select-only", ("-S",)), ("tpcb-like", ())):
        result, sampler, roles = run_bench(proxy, cluster, *args, clients=200, transactions=10)
        print(f"\n{name}: {result}, units by role {dict(roles)}, server sessions (max per node) "
              f"{dict(sampler.max_servers)}, client sessions (max) {sampler.max_clients}")
        assert result["failed"] == 0 and result["processed"] == 2000, result
        assert sampler.max_clients >= 200, sampler.max_clients  # all 200 connected at once
        for node, n in sampler.max_servers.items():
            assert n <= 20, (node, n)  # one pool of 20 per backend (monitor: user postgres)
        if name == "select-only":
            assert roles["replica"] > 0.9 * sum(roles.values()), roles
        else:
            assert roles["primary"] > 0.9 * sum(roles.values()), roles
            assert sampler.max_servers[cluster.primary.name] >= 2, sampler.max_servers
    # tpcb-like keeps its books balanced (every transaction whole, none applied twice)
    sums = cluster.sql(cluster.primary, """
        SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
               (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)
        """, dbname=BENCH_DB)[0]
    assert len(set(sums)) == 1, sums


def test_pgbench_session_mode(make_proxy, cluster, bench_db) -> None:
    proxy = make_proxy(pool={"size": 20, "mode": "session"})
    if not cluster.sql(cluster.primary, "SELECT to_regclass('pgbench_accounts') IS NOT NULL", dbname=BENCH_DB)[0][0]:
        init = pgbench(proxy, "-i", "-s", "2", "-q", timeout=120)
        assert init.returncode == 0, (init.stdout, init.stderr)
    cluster.wait_caught_up()
    for name, args in (("select-only", ("-S",)), ("tpcb-like", ())):
        result, sampler, roles = run_bench(proxy, cluster, *args, clients=10, transactions=50)
        print(f"\nsession mode {name}: {result}, units by role {dict(roles)}")
        assert result["failed"] == 0 and result["processed"] > 10, result
        for node, n in sampler.max_servers.items():
            assert n <= 20, (node, n)


# --- prepared statements across server connections ------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_asyncpg_prepared_statement_alternates_primary_and_replica(make_proxy, cluster, mode) -> None:
    # transaction mode: 4 clients over 2 server connections per backend, so a statement
    # runs on connections where another client (or nobody yet) prepared it
    proxy = make_proxy(pool={"size": 2 if mode == "transaction" else 8, "mode": mode})
    primary_port = cluster.primary.port

    async def client(n: int) -> Counter:
        conn = await asyncpg.connect(asyncpg_dsn(proxy), ssl=False, timeout=10)
        served: Counter = Counter()
        try:
            stmt = await conn.prepare("SELECT pg_is_in_recovery(), inet_server_port(), $1::int * 2 + $2::int")
            for i in range(50):
                if i % 2:
                    async with conn.transaction():
                        row = await stmt.fetchrow(i, n)
                    assert tuple(row) == (False, primary_port, 2 * i + n), row
                else:
                    row = await stmt.fetchrow(i, n)
                    assert row[0] is True and row[2] == 2 * i + n, row
                served[on(cluster, tuple(row))] += 1
            # the statement object still describes itself right
            assert [a.name for a in stmt.get_attributes()] == ["pg_is_in_recovery", "inet_server_port", "?column?"]
        finally:
            await conn.close(timeout=5)
        return served

    results = await asyncio.gather(*(client(n) for n in range(4)))
    total = sum(results, Counter())
    print(f"\n{mode}: {dict(total)}")
    assert total[cluster.primary.name] == 4 * 25
    assert sum(total[r] for r in replica_names(cluster)) == 4 * 25


@pytest.mark.parametrize("mode", MODES)
async def test_psycopg_prepared_statements_alternate_primary_and_replica(make_proxy, cluster, mode) -> None:
    proxy = make_proxy(pool={"size": 2 if mode == "transaction" else 8, "mode": mode})
    primary_port = cluster.primary.port

    async def client(n: int) -> Counter:
        served: Counter = Counter()
        async with await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True, prepare_threshold=0,
                                                         connect_timeout=10) as conn:
            sql = "SELECT pg_is_in_recovery(), inet_server_port(), %s::int * 2 + %s::int"
            for i in range(50):
                if i % 2:
                    async with conn.transaction():
                        row = await (await conn.execute(sql, (i, n))).fetchone()
                    assert row == (False, primary_port, 2 * i + n), row
                else:
                    row = await (await conn.execute(sql, (i, n))).fetchone()
                    assert row[0] is True and row[2] == 2 * i + n, row
                served[on(cluster, row)] += 1
        return served

    results = await asyncio.gather(*(client(n) for n in range(4)))
    total = sum(results, Counter())
    print(f"\n{mode}: {dict(total)}")
    assert total[cluster.primary.name] == 4 * 25
    assert sum(total[r] for r in replica_names(cluster)) == 4 * 25


def test_prepared_statement_first_used_inside_a_transaction(make_proxy, cluster) -> None:
    # A named statement prepared (the proxy answers the Parse itself) and first run inside
    # a transaction, on a server connection that has never seen it: the proxy prepares it
    # there ahead of the Bind and drops that ParseComplete, so the client sees exactly what
    # PostgreSQL would answer. libpq's shape: Bind, Describe portal, Execute, Sync.
    proxy = make_proxy(pool={"size": 2})
    offset = int(time.time() * 1000) % 100000
    sql = f"SELECT $1::int + {offset}, pg_is_in_recovery()"  # a text no server has prepared yet

    def run(value: bytes) -> bytes:  # Bind s1 (one text parameter), Describe portal, Execute, Sync
        bind = b"\0s1\0" + b"\0\0" + b"\0\1" + len(value).to_bytes(4, "big") + value + b"\0\0"
        return message(b"B", bind) + message(b"D", b"P\0") + message(b"E", b"\0\0\0\0\0") + message(b"S")

    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", "app-secret", "app")
        client.send(message(b"P", b"s1\0" + sql.encode() + b"\0" + b"\0\0") + message(b"S"))
        assert [client.read_message()[0] for _ in range(2)] == ["1", "Z"]
        assert client.query("BEGIN").status == "T"
        assert client.scalar("SELECT pg_is_in_recovery()") == "f"  # attached to the primary
        for value in (b"41", b"7"):  # prepared there by the first, already there for the second
            client.send(run(value))
            replies = [client.read_message() for _ in range(5)]
            assert [t for t, _ in replies] == ["2", "T", "D", "C", "Z"], replies
            assert replies[2][1] == (b"\0\2" + len(str(int(value) + offset)).to_bytes(4, "big")
                                     + str(int(value) + offset).encode() + b"\0\0\0\1f"), replies[2]
            assert replies[4][1] == b"T"
        assert client.query("COMMIT").status == "I"


# --- SET follows the client -----------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_schema(cluster: Cluster) -> Iterator[None]:
    p = cluster.primary
    cluster.sql(p, "CREATE SCHEMA IF NOT EXISTS pl_custom", user="app", dbname="app")
    cluster.sql(p, "CREATE TABLE IF NOT EXISTS pl_custom.pl_only (x text)", user="app", dbname="app")
    cluster.sql(p, "TRUNCATE pl_custom.pl_only", user="app", dbname="app")
    cluster.sql(p, "INSERT INTO pl_custom.pl_only VALUES ('custom')", user="app", dbname="app")
    cluster.wait_caught_up()
    yield


@pytest.mark.parametrize("mode", MODES)
async def test_set_search_path_follows_the_client(make_proxy, cluster, custom_schema, mode) -> None:
    proxy = make_proxy(pool={"size": 2 if mode == "transaction" else 8, "mode": mode})
    custom_path = "pl_custom, public"
    default_path = '"$user", public'

    async def client(custom: bool, log: list) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(proxy), ssl=False, timeout=10)
        try:
            if custom:
                await conn.execute(f"SET search_path = {custom_path}")  # one unit (simple Query)
            want = custom_path if custom else default_path
            for i in range(15):
                assert await conn.fetchval("SHOW search_path") == want
                row = await conn.fetchrow(
                    "SELECT current_setting('search_path'), to_regclass('pl_only')::text, "
                    "inet_server_port(), pg_backend_pid()")
                assert row[0] == want and row[1] == ("pl_only" if custom else None), (custom, row)
                log.append((custom, row[2], row[3]))
                if custom:
                    assert await conn.fetchval("SELECT x FROM pl_only") == "custom"
                    # the primary too (a hint), e.g. for a write that follows
                    w = await conn.fetchrow("/* pgsplit:primary */ SELECT current_setting('search_path'), "
                                            "inet_server_port(), pg_backend_pid()")
                    assert w[0] == want and w[1] == cluster.primary.port, w
                    log.append((custom, w[1], w[2]))
                else:
                    with pytest.raises(asyncpg.UndefinedTableError):
                        await conn.fetchval("SELECT x FROM pl_only")
        finally:
            await conn.close(timeout=5)

    logs: list[list] = [[] for _ in range(5)]
    await asyncio.gather(*(client(i < 3, logs[i]) for i in range(5)))
    used_by_custom = {(port, pid) for log in logs[:3] for _, port, pid in log}
    used_by_plain = {(port, pid) for log in logs[3:] for _, port, pid in log}
    print(f"\n{mode}: custom clients used {len(used_by_custom)} server connections, plain clients "
          f"{len(used_by_plain)}, shared {len(used_by_custom & used_by_plain)}")
    for log in logs[:3]:
        assert len({(port, pid) for _, port, pid in log}) >= 2, log  # it did move
    if mode == "transaction":
        # the same server connections served both kinds of clients: values were replayed
        # on the way in, and did not leak to the next client on the way out
        assert used_by_custom & used_by_plain


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_set_inside_a_transaction_follows_only_if_committed(make_proxy, cluster, end) -> None:
    # The SET runs inside a transaction on the primary; the reads after it run on replica
    # connections, where the proxy replays the session's settings: those of a committed
    # transaction, never those of one rolled back.
    proxy = make_proxy(pool={"size": 2})
    conn = await asyncpg.connect(asyncpg_dsn(proxy), ssl=False, timeout=10)
    try:
        default = await conn.fetchval("SHOW work_mem")
        await conn.execute("BEGIN")
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        await conn.execute("SET work_mem = '7MB'")
        assert await conn.fetchval("SELECT 1") == 1  # a plain statement between SET and the end
        await conn.execute(end)
        want = "7MB" if end == "COMMIT" else default
        for _ in range(4):
            row = await conn.fetchrow("SELECT current_setting('work_mem'), pg_is_in_recovery()")
            assert tuple(row) == (want, True), (end, tuple(row))
    finally:
        await conn.close(timeout=5)


# --- one client's DISCARD ALL / RESET ALL on a shared server connection ---------------------


@pytest.mark.parametrize("drop", ["DISCARD ALL", "DEALLOCATE ALL; SELECT 1"])
def test_a_discard_all_on_a_shared_connection_leaves_other_clients_statements_working(make_proxy, cluster,
                                                                                       drop) -> None:
    # One primary connection for both clients: a's statement is prepared on it, then b's
    # DISCARD ALL (or a DEALLOCATE ALL that reaches the server: not alone, so the proxy
    # does not answer it) drops every statement of that server session. a's next execution
    # must still work (the proxy prepares it there again), and so must b's own afterwards.
    proxy = make_proxy(pool={"size": 1})
    sql = "SELECT %s::int + 1, pg_backend_pid()"
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10) as a, \
            psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0, connect_timeout=10) as b:
        for conn in (a, b):
            conn.execute("SET pgsplit.route = 'primary'")
        first = a.execute(sql, (1,)).fetchone()
        assert first[0] == 2
        b.execute(sql, (5,)).fetchone()
        psycopg.ClientCursor(b).execute(drop)  # simple protocol: several statements may go
        again = a.execute(sql, (2,)).fetchone()
        assert again == (3, first[1])  # the same server connection, the statement prepared again
        b.execute("SET pgsplit.route = 'primary'")  # (DISCARD ALL reset it with the rest)
        assert b.execute(sql, (6,)).fetchone() == (7, first[1])


@pytest.mark.parametrize("reset", ["RESET ALL", "DISCARD ALL"])
def test_a_reset_on_a_shared_connection_does_not_drop_other_clients_settings(make_proxy, cluster, reset) -> None:
    # Both clients log in with the same application_name, so they carry the same settings;
    # b's RESET ALL puts the server connection back to the proxy's own login values, and
    # a's next unit there must get its settings replayed again.
    proxy = make_proxy(pool={"size": 1})
    dsn = proxy.dsn(application_name="pl_reset_client")
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as a, \
            psycopg.connect(dsn, autocommit=True, connect_timeout=10) as b:
        for conn in (a, b):
            conn.execute("SET pgsplit.route = 'primary'")
        show = "SELECT current_setting('application_name'), pg_backend_pid()"
        name, pid = a.execute(show).fetchone()
        assert name == "pl_reset_client"
        b.execute(reset)
        b.execute("SET pgsplit.route = 'primary'")
        for conn in (a, b):
            assert conn.execute(show).fetchone() == ("pl_reset_client", pid)


# --- waiting for a pool ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_pool_wait_timeout_is_a_clear_error(make_proxy, cluster, mode) -> None:
    proxy = make_proxy(pool={"size": 1, "acquire_timeout_s": 1, "mode": mode})
    cluster.sql(cluster.primary, "CREATE TABLE IF NOT EXISTS pl_items (v text)", user="app", dbname="app")
    holder = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    waiter = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    try:
        holder.execute("BEGIN")
        holder.execute("INSERT INTO pl_items VALUES ('holder')")  # the primary's only connection
        t0 = time.monotonic()
        with pytest.raises(psycopg.Error) as info:
            waiter.execute("INSERT INTO pl_items VALUES ('waiter')")
        took = time.monotonic() - t0
        err = info.value
        print(f"\n{mode}: waited {took:.2f} s: {err.sqlstate} {err}")
        assert err.sqlstate == "53300", (err.sqlstate, str(err))
        assert "main_primary" in str(err) and "pool" in str(err), str(err)
        assert 0.9 <= took < 3.0, took
        # the waiter's session lives on (reads use the replicas' pools) ...
        assert waiter.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        # ... and the holder's transaction carries on untouched
        assert holder.execute("SELECT pg_is_in_recovery(), count(*) >= 1 FROM pl_items "
                              "WHERE v = 'holder'").fetchone() == (False, True)
        holder.execute("COMMIT")
        if mode == "session":
            holder.close()  # in session mode the connection is the holder's until it leaves
        waiter.execute("INSERT INTO pl_items VALUES ('waiter')")
        assert cluster.sql(cluster.primary, "SELECT count(*) FROM pl_items WHERE v = 'waiter'",
                           dbname="app")[0][0] >= 1
    finally:
        holder.close()
        waiter.close()


# --- session mode: the basic routing cases --------------------------------------------------


def test_session_mode_basic_routing(make_proxy, cluster) -> None:
    proxy = make_proxy(pool={"mode": "session", "size": 5})
    cluster.sql(cluster.primary, "CREATE TABLE IF NOT EXISTS pl_items (v text)", user="app", dbname="app")
    cluster.wait_caught_up()
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        for _ in range(3):
            assert on(cluster, conn.execute(WHERE_SQL).fetchone()) in replica_names(cluster)
            assert conn.execute("INSERT INTO pl_items VALUES ('s') RETURNING pg_is_in_recovery()").fetchone() == (False,)
            with conn.transaction():
                assert on(cluster, conn.execute(WHERE_SQL).fetchone()) == cluster.primary.name
            conn.execute("BEGIN READ ONLY")
            assert on(cluster, conn.execute(WHERE_SQL).fetchone()) in replica_names(cluster)
            conn.execute("COMMIT")
            assert conn.execute("/* pgsplit:primary */ SELECT pg_is_in_recovery()").fetchone() == (False,)
