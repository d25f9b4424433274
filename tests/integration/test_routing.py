"""Read/write splitting, lag filtering and split brain through pgsplit, on a real cluster.

Every routing check asks the backend where the statement ran, in the statement itself
(`pg_is_in_recovery()`, `inet_server_port()`), and counts the units the proxy served by
role around it (tests/integration/where.py). Both matter: a write that reached a replica
and was retried on the primary after 25006 still answers "primary", so writes are also
checked for "no unit on a replica, no retry".

Statements go through two real drivers: psycopg 3 (simple protocol: no parameters, so one
Query message) and asyncpg (extended protocol, named prepared statements). Tests that break
the shared cluster (pause, kill, stop a replica) put it back in `finally`; destructive ones
(primary down, promotion) run on a throwaway cluster of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import asyncpg
import psycopg
import pytest

from helpers import async_wait_until, wait_until
from loadtest.sandbox import Cluster
from where import WHERE_SQL, metric_value, metrics_text, on, retries, routed

INTERVAL_MS = 100
SMALL_LAG = 64 * 1024


# --- clients --------------------------------------------------------------------------------


class Client:
    """One client connection; `rows(sql)` runs a statement and returns its rows."""

    kind = "?"

    async def rows(self, sql: str) -> list[tuple]:
        raise NotImplementedError

    async def row(self, sql: str) -> tuple:
        rows = await self.rows(sql)
        assert len(rows) == 1, rows
        return rows[0]

    async def close(self) -> None:
        raise NotImplementedError


class PsycopgClient(Client):
    """psycopg 3, autocommit; statements without parameters go as a simple Query."""

    kind = "psycopg"

    def __init__(self, conn: psycopg.AsyncConnection):
        self.conn = conn

    async def rows(self, sql: str) -> list[tuple]:
        cur = await self.conn.execute(sql)
        return await cur.fetchall() if cur.description is not None else []

    async def close(self) -> None:
        await self.conn.close()


class AsyncpgClient(Client):
    """asyncpg: extended protocol, every statement prepared under a name (its cache)."""

    kind = "asyncpg"

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn

    async def rows(self, sql: str) -> list[tuple]:
        return [tuple(r) for r in await self.conn.fetch(sql)]

    async def close(self) -> None:
        await self.conn.close(timeout=5)


Connect = Callable[..., Awaitable[Client]]


async def connect(proxy, kind: str) -> Client:
    if kind == "psycopg":
        return PsycopgClient(await psycopg.AsyncConnection.connect(proxy.dsn(), autocommit=True,
                                                                  connect_timeout=10))
    conn = await asyncpg.connect(f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app",
                                 ssl=False, timeout=10)
    return AsyncpgClient(conn)


@pytest.fixture
async def clients() -> AsyncIterator[Connect]:
    """connect(proxy, kind="psycopg"|"asyncpg") -> Client, all closed at the end."""
    opened: list[Client] = []

    async def make(proxy, kind: str = "psycopg") -> Client:
        c = await connect(proxy, kind)
        opened.append(c)
        return c

    yield make
    for c in opened:
        with contextlib.suppress(Exception):
            await c.close()


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


def replica_names(cluster: Cluster) -> set[str]:
    return {r.name for r in cluster.replicas}


# --- shared schema --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema(cluster: Cluster) -> Iterator[None]:
    """Tables and routines of the routing tests, owned by app, replayed on both replicas."""
    p = cluster.primary
    for stmt in [
        "CREATE TABLE IF NOT EXISTS rt_items (id bigserial PRIMARY KEY, v text, on_replica boolean)",
        "CREATE SEQUENCE IF NOT EXISTS rt_seq",
        "INSERT INTO rt_items (v) VALUES ('seed')",
        "CREATE OR REPLACE PROCEDURE rt_where(INOUT r boolean) LANGUAGE plpgsql "
        "AS $$ BEGIN r := pg_is_in_recovery(); END $$",
        "CREATE TABLE IF NOT EXISTS rt_fill (id bigserial PRIMARY KEY, pad text)",
    ]:
        cluster.sql(p, stmt, user="app", dbname="app")
    cluster.wait_caught_up()
    yield


async def read_on(client: Client, cluster: Cluster) -> str:
    """Node that served a plain autocommit read."""
    return on(cluster, await client.row(WHERE_SQL))


async def until_replica_read(client: Client, cluster: Cluster, timeout: float = 5.0) -> str:
    """Plain reads until one is served by a replica (after an unpin, a write's token may
    make the first read wait for, or fall back from, the replicas); returns the node."""
    return await async_wait_until(lambda: _replica_or_none(client, cluster), timeout=timeout,
                                  message="a plain read served by a replica")


async def _replica_or_none(client: Client, cluster: Cluster) -> str | None:
    name = await read_on(client, cluster)
    return name if name in replica_names(cluster) else None


# --- plain reads and writes -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_autocommit_read_runs_on_a_replica(proxy, cluster, clients, kind) -> None:
    c = await clients(proxy, kind)
    await c.row("SELECT 1")  # asyncpg: nothing else to warm up; psycopg: the same
    with routed(proxy, primary=0, replica=None) as counter:
        row = await c.row(WHERE_SQL)
    assert row[0] is True, row
    assert on(cluster, row) in replica_names(cluster)
    assert counter.roles()["replica"] >= 1


# (id, setup statement or None, statement, expected rows or None (not checked), check)
# A check is SQL run on the primary afterwards (as superuser) that must return [(True,)].
WRITE_FORMS = [
    ("insert", None,
     "INSERT INTO rt_items (v, on_replica) VALUES ('ins', pg_is_in_recovery()) RETURNING pg_is_in_recovery()",
     [(False,)], None),
    ("update", None,
     "UPDATE rt_items SET v = v WHERE id = (SELECT min(id) FROM rt_items) RETURNING pg_is_in_recovery()",
     [(False,)], None),
    ("delete", "INSERT INTO rt_items (v) VALUES ('{tag}')",
     "DELETE FROM rt_items WHERE v = '{tag}' RETURNING pg_is_in_recovery()", [(False,)], None),
    ("merge", None,
     "MERGE INTO rt_items t USING (SELECT min(id) AS id FROM rt_items) s ON t.id = s.id "
     "WHEN MATCHED THEN UPDATE SET v = t.v", None, None),
    ("select-for-update", None,
     "SELECT pg_is_in_recovery() FROM rt_items WHERE id = (SELECT min(id) FROM rt_items) FOR UPDATE",
     [(False,)], None),
    ("select-for-share", None,
     "SELECT pg_is_in_recovery() FROM rt_items WHERE id = (SELECT min(id) FROM rt_items) FOR SHARE",
     [(False,)], None),
    ("select-into", None, "SELECT pg_is_in_recovery() AS r INTO rt_into_{tag}", None,
     "SELECT r = false FROM rt_into_{tag}"),
    ("create-table-as", None, "CREATE TABLE rt_ctas_{tag} AS SELECT pg_is_in_recovery() AS r", None,
     "SELECT r = false FROM rt_ctas_{tag}"),
    ("writable-cte", None,
     "WITH ins AS (INSERT INTO rt_items (v) VALUES ('cte') RETURNING id) SELECT pg_is_in_recovery() FROM ins",
     [(False,)], None),
    ("ddl", None, "CREATE TABLE rt_ddl_{tag} (a int)", None,
     "SELECT count(*) = 1 FROM pg_tables WHERE tablename = 'rt_ddl_{tag}'"),
    ("call", None, "CALL rt_where(NULL)", [(False,)], None),
    ("do", None,
     "DO $$ BEGIN INSERT INTO rt_items (v, on_replica) VALUES ('do-{tag}', pg_is_in_recovery()); END $$",
     None, "SELECT on_replica = false FROM rt_items WHERE v = 'do-{tag}'"),
    ("explain-analyze-insert", None, "EXPLAIN ANALYZE INSERT INTO rt_items (v) VALUES ('explain-{tag}')",
     None, "SELECT count(*) = 1 FROM rt_items WHERE v = 'explain-{tag}'"),
    ("nextval", None, "SELECT pg_is_in_recovery(), nextval('rt_seq') > 0", [(False, True)], None),
    ("setval", None, "SELECT pg_is_in_recovery(), setval('rt_seq', 1000)", [(False, 1000)], None),
    ("currval", "SELECT nextval('rt_seq')", "SELECT pg_is_in_recovery(), currval('rt_seq') > 0",
     [(False, True)], None),
    ("lastval", "SELECT nextval('rt_seq')", "SELECT pg_is_in_recovery(), lastval() > 0", [(False, True)], None),
    ("set_config", None,
     "SELECT pg_is_in_recovery(), set_config('application_name', 'rt-{tag}', true)",
     [(False, "rt-{tag}")], None),
    ("txid_current", None, "SELECT pg_is_in_recovery(), txid_current() > 0", [(False, True)], None),
    ("pg_current_xact_id", None, "SELECT pg_is_in_recovery(), pg_current_xact_id()::text <> ''",
     [(False, True)], None),
    ("advisory-xact-lock", None, "SELECT pg_is_in_recovery(), pg_advisory_xact_lock(777)::text",
     [(False, "")], None),
    ("pg_notify", None, "SELECT pg_is_in_recovery(), pg_notify('rt_nobody', 'x')::text", [(False, "")], None),
    ("notify", None, "NOTIFY rt_nobody, 'x'", None, None),
]


def _fmt(value, tag: str):
    if isinstance(value, str):
        return value.replace("{tag}", tag)
    if isinstance(value, list):
        return [tuple(_fmt(v, tag) for v in row) for row in value]
    return value


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("form", WRITE_FORMS, ids=[f[0] for f in WRITE_FORMS])
async def test_write_forms_run_on_the_primary(proxy, cluster, clients, schema, form, kind) -> None:
    name, setup, sql, expected, check = form
    tag = uuid.uuid4().hex[:8]
    c = await clients(proxy, kind)
    if setup is not None:
        await c.rows(_fmt(setup, tag))
    # asyncpg: Parse/Describe/Flush then Bind/Execute/Sync (one unit), or two units when its
    # setup statement was the same text: at least one unit, none on a replica
    with routed(proxy, primary=1 if kind == "psycopg" else None, replica=0, retried=0) as counter:
        rows = await c.rows(_fmt(sql, tag))
    assert counter.roles()["primary"] >= 1
    if expected is not None:
        assert rows == _fmt(expected, tag), (name, rows)
    if check is not None:
        assert cluster.sql(cluster.primary, _fmt(check, tag), dbname="app") == [(True,)], name


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_copy_from_runs_on_the_primary(proxy, cluster, clients, schema, kind) -> None:
    tag = uuid.uuid4().hex[:8]
    c = await clients(proxy, kind)
    data = f"copy-{tag}\n".encode() * 5
    with routed(proxy, primary=None, replica=0, retried=0) as counter:
        if isinstance(c, PsycopgClient):
            async with c.conn.cursor() as cur:
                async with cur.copy("COPY rt_items (v) FROM STDIN") as copy:
                    await copy.write(data)
        else:
            await c.conn.copy_to_table("rt_items", source=io.BytesIO(data), columns=["v"], format="text")
    assert counter.roles()["primary"] >= 1
    assert cluster.sql(cluster.primary, "SELECT count(*) FROM rt_items WHERE v = %s", f"copy-{tag}",
                       dbname="app") == [(5,)]


# --- transactions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_explicit_transaction_runs_on_the_primary(proxy, cluster, clients, kind) -> None:
    c = await clients(proxy, kind)
    with routed(proxy, replica=0, retried=0):
        await c.rows("BEGIN")
        first = await c.row(WHERE_SQL + ", pg_backend_pid()")
        second = await c.row(WHERE_SQL + ", pg_backend_pid()")
        await c.rows("COMMIT")
    assert on(cluster, first) == cluster.primary.name
    assert first == second  # one server connection for the whole transaction


async def test_transaction_in_one_query_runs_on_the_primary(proxy, cluster, clients) -> None:
    c = await clients(proxy, "psycopg")
    async with c.conn.cursor() as cur:
        with routed(proxy, primary=1, replica=0, retried=0):
            await cur.execute("BEGIN; SELECT pg_is_in_recovery(), inet_server_port(); COMMIT")
        results = []
        while True:
            if cur.description is not None:
                results += await cur.fetchall()
            if not cur.nextset():
                break
    assert len(results) == 1 and on(cluster, results[0]) == cluster.primary.name


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("opening", [
    ["BEGIN READ ONLY"],
    ["START TRANSACTION READ ONLY"],
    ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"],
    ["BEGIN", "SET TRANSACTION READ ONLY"],
    ["SET default_transaction_read_only = on", "BEGIN"],
], ids=["begin-read-only", "start-transaction-read-only", "begin-rr-read-only",
        "set-transaction-read-only", "default-transaction-read-only"])
async def test_read_only_transaction_runs_on_a_replica(proxy, cluster, clients, opening, kind) -> None:
    c = await clients(proxy, kind)
    with routed(proxy, primary=0, retried=0):
        for stmt in opening:
            await c.rows(stmt)
        first = await c.row(WHERE_SQL + ", pg_backend_pid(), current_setting('transaction_read_only')")
        second = await c.row(WHERE_SQL + ", pg_backend_pid(), current_setting('transaction_read_only')")
        await c.rows("COMMIT")
    assert on(cluster, first) in replica_names(cluster), first
    assert first == second and first[3] == "on"


async def test_asyncpg_readonly_transaction_runs_on_a_replica(proxy, cluster, clients) -> None:
    c = await clients(proxy, "asyncpg")
    with routed(proxy, primary=0, retried=0):
        async with c.conn.transaction(readonly=True):
            row = tuple(await c.conn.fetchrow(WHERE_SQL))
    assert on(cluster, row) in replica_names(cluster)
    with routed(proxy, replica=0, retried=0):
        async with c.conn.transaction():
            row = tuple(await c.conn.fetchrow(WHERE_SQL))
    assert on(cluster, row) == cluster.primary.name


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_first_statement_of_a_transaction_runs_inside_it(proxy, cluster, clients, schema, kind, end) -> None:
    # The proxy answers BEGIN itself and sends it ahead of the transaction's first
    # statement: that statement must be part of the transaction (undone by ROLLBACK), and
    # see the transaction's start time, not its own.
    c = await clients(proxy, kind)
    tag = f"first-{uuid.uuid4().hex[:8]}"
    with routed(proxy, replica=0, retried=0):
        await c.rows("BEGIN")
        await c.rows(f"INSERT INTO rt_items (v, on_replica) VALUES ('{tag}', pg_is_in_recovery())")
        in_tx = await c.row("SELECT now() <> statement_timestamp(), pg_current_xact_id_if_assigned() IS NOT NULL")
        await c.rows(end)
    assert in_tx == (True, True), in_tx
    kept = cluster.sql(cluster.primary, f"SELECT count(*) FROM rt_items WHERE v = '{tag}'", user="app", dbname="app")
    assert kept == [(1 if end == "COMMIT" else 0,)], (end, kept)


@pytest.mark.parametrize("mode", ["ACCESS SHARE", "EXCLUSIVE"])
@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_lock_in_a_transaction_runs_on_the_primary(proxy, cluster, clients, schema, kind, mode) -> None:
    # ACCESS SHARE is allowed on a standby too: only the answer tells where it ran.
    c = await clients(proxy, kind)
    with routed(proxy, replica=0, retried=0):
        await c.rows("BEGIN")
        await c.rows(f"LOCK TABLE rt_items IN {mode} MODE")
        row = await c.row(WHERE_SQL)
        await c.rows("COMMIT")
    assert on(cluster, row) == cluster.primary.name


# --- session state that pins ----------------------------------------------------------------


async def test_listen_notify_pin_and_deliver(proxy, cluster, clients) -> None:
    listener = await clients(proxy, "psycopg")
    notifier = await clients(proxy, "psycopg")
    with routed(proxy, primary=1, replica=0, retried=0):
        await listener.rows("LISTEN rt_chan")
    # pinned: plain reads now run on the primary, on the listening server connection
    pids = set()
    for _ in range(3):
        row = await listener.row(WHERE_SQL + ", pg_backend_pid()")
        assert on(cluster, row) == cluster.primary.name
        pids.add(row[2])
    assert len(pids) == 1
    listening = cluster.sql(cluster.primary, "SELECT pid FROM pg_stat_activity WHERE pid = %s", next(iter(pids)))
    assert listening, "the listening server connection is gone"
    with routed(proxy, primary=1, replica=0, retried=0):
        await notifier.rows("NOTIFY rt_chan, 'hello'")
    got = [n async for n in listener.conn.notifies(timeout=5, stop_after=1)]
    assert [(n.channel, n.payload) for n in got] == [("rt_chan", "hello")]
    with routed(proxy, primary=1, replica=0):
        await listener.rows("UNLISTEN *")
    assert await until_replica_read(listener, cluster) in replica_names(cluster)


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_advisory_lock_pins_until_unlock_all(proxy, cluster, clients, kind) -> None:
    key = 4200 + (kind == "asyncpg")
    c = await clients(proxy, kind)
    other = await clients(proxy, kind)

    def holders() -> list[tuple]:
        return cluster.sql(cluster.primary, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' "
                                            "AND objid = %s AND granted", key)

    with routed(proxy, primary=1 if kind == "psycopg" else None, replica=0, retried=0):
        await c.rows(f"SELECT pg_advisory_lock({key})")
    assert len(holders()) == 1
    holder = holders()[0][0]
    for _ in range(4):
        row = await c.row(WHERE_SQL + ", pg_backend_pid()")
        assert on(cluster, row) == cluster.primary.name, row
        assert row[2] == holder  # the very connection that holds the lock
        # another session works meanwhile and cannot get the lock (nor that connection)
        assert await other.row(f"SELECT pg_try_advisory_lock({key}), pg_backend_pid() <> {holder}") == (False, True)
    await c.rows("SELECT pg_advisory_unlock_all()")
    assert holders() == []
    assert await until_replica_read(c, cluster) in replica_names(cluster)


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_temp_table_pins_the_session(proxy, cluster, clients, schema, kind) -> None:
    c = await clients(proxy, kind)
    busy = await clients(proxy, kind)
    with routed(proxy, replica=0, retried=0):
        await c.rows("CREATE TEMP TABLE rt_tmp (answer int)")
        await c.rows("INSERT INTO rt_tmp VALUES (42)")
    for _ in range(4):
        await busy.rows("SELECT 1")  # other traffic through the pools meanwhile
        await busy.rows("INSERT INTO rt_items (v) VALUES ('busy')")
        row = await c.row(WHERE_SQL + ", (SELECT answer FROM rt_tmp)")
        assert on(cluster, row) == cluster.primary.name and row[2] == 42, row
    await c.rows("DISCARD TEMP")
    assert await until_replica_read(c, cluster) in replica_names(cluster)


# --- hints and overrides --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_hints(proxy, cluster, clients, kind) -> None:
    c = await clients(proxy, kind)
    for _ in range(3):
        row = await c.row("/* pgsplit:primary */ " + WHERE_SQL)
        assert on(cluster, row) == cluster.primary.name
        row = await c.row("/* pgsplit:replica */ " + WHERE_SQL)
        assert on(cluster, row) in replica_names(cluster)


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_set_pgsplit_route(proxy, cluster, clients, kind) -> None:
    c = await clients(proxy, kind)
    await c.rows("SET pgsplit.route = 'primary'")
    assert await c.row("SHOW pgsplit.route") == ("primary",)
    with routed(proxy, replica=0):
        for _ in range(3):
            assert await read_on(c, cluster) == cluster.primary.name
    await c.rows("SET pgsplit.route = 'auto'")
    assert await c.row("SHOW pgsplit.route") == ("auto",)
    assert await read_on(c, cluster) in replica_names(cluster)


# --- volatile user functions (catalog) ------------------------------------------------------


def _volatile_known(proxy, name: str) -> bool:
    return name in proxy.call(lambda: proxy.proxy.classifier.volatile_functions)


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("monitor", [{}, {"dbname": "app"}], ids=["monitor-default", "monitor-dbname-app"])
async def test_volatile_user_function_runs_on_the_primary(make_proxy, cluster, clients, monitor, kind) -> None:
    """With the default config (the monitor logs in to database "postgres") too: the
    functions clients call live in their own database."""
    p = cluster.primary
    cluster.sql(p, "CREATE OR REPLACE FUNCTION app_touch() RETURNS boolean LANGUAGE sql VOLATILE "
                   "AS 'SELECT pg_is_in_recovery()'", dbname="app")
    cluster.sql(p, "CREATE OR REPLACE FUNCTION app_peek() RETURNS boolean LANGUAGE sql STABLE "
                   "AS 'SELECT pg_is_in_recovery()'", dbname="app")
    cluster.sql(p, "GRANT EXECUTE ON FUNCTION app_touch(), app_peek() TO app", dbname="app")
    cluster.wait_caught_up()
    # (the STABLE read follows a "write", so it waits for a replica to replay it: room for
    # a loaded machine, where 50 ms could send it to the primary)
    proxy = make_proxy(routing={"catalog_refresh_s": 0.5, "consistency_wait_ms": 5000}, monitor=monitor)
    # The catalog of a database is read when the first client of it logs in.
    c = await clients(proxy, kind)
    assert _volatile_known(proxy, "app_touch")
    assert not _volatile_known(proxy, "app_peek")
    for _ in range(3):
        with routed(proxy, replica=0, retried=0):
            assert await c.row("SELECT app_touch(), inet_server_port()") == (False, p.port)
            assert await c.row("SELECT public.app_touch()") == (False,)
        assert await c.row("SELECT app_peek()") == (True,)


async def test_function_made_volatile_later_is_routed_to_the_primary_in_a_running_session(
        make_proxy, cluster, clients) -> None:
    """A session that already ran a statement keeps no stale routing for it after the
    catalog refresh finds its function volatile (same text, simple protocol)."""
    p = cluster.primary
    cluster.sql(p, "CREATE OR REPLACE FUNCTION app_flip() RETURNS boolean LANGUAGE sql STABLE "
                   "AS 'SELECT pg_is_in_recovery()'", dbname="app")
    cluster.wait_caught_up()
    # [monitor] dbname = "app": the catalog of the database the clients use (see the test
    # above for the default, which reads another database's catalog)
    proxy = make_proxy(routing={"catalog_refresh_s": 0.5}, monitor={"dbname": "app"})
    c = await clients(proxy, "psycopg")
    try:
        assert await c.row("SELECT app_flip()") == (True,)  # STABLE: a replica
        cluster.sql(p, "ALTER FUNCTION app_flip() VOLATILE", dbname="app")
        cluster.wait_caught_up()
        wait_until(lambda: _volatile_known(proxy, "app_flip"), timeout=5,
                   message="the catalog refresh to list app_flip as volatile")
        fresh = await clients(proxy, "psycopg")
        assert await fresh.row("SELECT app_flip()") == (False,)  # a new session: the primary
        assert await c.row("SELECT app_flip()") == (False,), \
            "the session that ran this text before the refresh still sends it to a replica"
    finally:
        cluster.sql(p, "ALTER FUNCTION app_flip() STABLE", dbname="app")


# --- unparsable SQL and the 25006 retry -----------------------------------------------------


# A text the classifier's no-parse prefilter proves to be a lone SELECT without function
# calls, locking or INTO ("SELECT * FROM", "SELECT 1 +") cannot write whatever it turns out
# to be, so it may be answered by a replica: the syntax error is the same. Everything else
# that does not parse goes to the primary (design.md: "unparsable goes to the primary").
@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
@pytest.mark.parametrize("sql, near, primary", [
    ("SELEC pg_is_in_recovery()", 'syntax error at or near "SELEC"', 1),
    ("INSERT INTO rt_items VALUES (", "syntax error at end of input", 1),
    ("SELECT * FROM", "syntax error at end of input", None),
    ("SELECT 1 +", "syntax error at end of input", None),
], ids=["selec", "insert-cut", "select-from-nothing", "select-cut"])
async def test_unparsable_sql_goes_to_the_primary(proxy, cluster, clients, kind, sql, near, primary) -> None:
    c = await clients(proxy, kind)
    with routed(proxy, primary=primary, replica=0 if primary else None, retried=0):
        with pytest.raises((psycopg.Error, asyncpg.PostgresError)) as info:
            await c.rows(sql)
    assert sqlstate(info.value) == "42601"
    assert near in str(info.value)

    # The session carries on, its reads on the replicas. (The failed statement went to
    # the primary as a write: the next read may wait for a replica to replay the
    # primary's position, and under load fall back to the primary once.)
    async def on_a_replica() -> bool:
        return await read_on(c, cluster) in replica_names(cluster)

    await async_wait_until(on_a_replica, timeout=5, message="a read on a replica")


@pytest.mark.parametrize("kind", ["psycopg", "asyncpg"])
async def test_write_forced_to_a_replica_is_retried_on_the_primary(proxy, cluster, clients, schema, kind) -> None:
    tag = f"retry-{kind}-{uuid.uuid4().hex[:8]}"
    c = await clients(proxy, kind)
    before = metric_value(metrics_text(proxy), "pgsplit_retries_total", {"reason": "25006"})
    with routed(proxy, primary=None, replica=None, retried=1) as counter:
        row = await c.row(f"/* pgsplit:replica */ INSERT INTO rt_items (v, on_replica) "
                          f"VALUES ('{tag}', pg_is_in_recovery()) RETURNING pg_is_in_recovery(), inet_server_port()")
    assert on(cluster, row) == cluster.primary.name
    roles = counter.roles()
    assert roles["replica"] >= 1 and roles["primary"] >= 1, roles
    assert cluster.sql(cluster.primary, "SELECT count(*), bool_and(NOT on_replica) FROM rt_items WHERE v = %s",
                       tag, dbname="app") == [(1, True)]
    after = metric_value(metrics_text(proxy), "pgsplit_retries_total", {"reason": "25006"})
    assert after - before == 1
    # the session carries on normally
    assert await read_on(c, cluster) in (replica_names(cluster) | {cluster.primary.name})


# --- balancing ------------------------------------------------------------------------------


async def _concurrent_reads(proxy, cluster, n_clients: int, per_client: int, sleep_s: float) -> Counter:
    """n_clients asyncpg sessions each run per_client reads at once; node -> count."""
    conns = [await connect(proxy, "asyncpg") for _ in range(n_clients)]
    served: Counter = Counter()
    sql = f"SELECT pg_is_in_recovery(), inet_server_port() FROM pg_sleep({sleep_s})"

    async def work(c: Client) -> None:
        for _ in range(per_client):
            served[on(cluster, await c.row(sql))] += 1

    try:
        await asyncio.gather(*(work(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return served


async def test_concurrent_reads_balance_across_both_replicas(proxy, cluster) -> None:
    served = await _concurrent_reads(proxy, cluster, 8, 20, 0.003)
    print(f"\nconcurrent reads: {dict(served)}")
    assert set(served) == replica_names(cluster), served
    assert min(served.values()) >= 0.25 * sum(served.values()), served


async def test_sequential_reads_use_both_replicas(proxy, cluster, clients) -> None:
    """One client, one read at a time: no replica has a unit outstanding, so the tie is
    broken by the session's counter and both replicas serve."""
    c = await clients(proxy, "psycopg")
    served: Counter = Counter()
    for _ in range(20):
        served[await read_on(c, cluster)] += 1
    print(f"\nsequential reads: {dict(served)}")
    assert set(served) == replica_names(cluster), served
    assert min(served.values()) >= 5, served


async def test_weights_favour_the_heavier_replica(make_proxy, cluster) -> None:
    proxy = make_proxy(backends={"main_replica1": {"weight": 3}, "main_replica2": {"weight": 1}})
    served = await _concurrent_reads(proxy, cluster, 12, 20, 0.005)
    print(f"\nweights 3:1 -> {dict(served)}")
    assert set(served) == {"replica1", "replica2"}, served  # the lighter one still serves at concurrency
    assert served["replica1"] >= 1.8 * served["replica2"], served


# --- lag filtering --------------------------------------------------------------------------


def _backend(proxy, name: str):
    b = proxy.proxy.topology.current.backend(name)
    assert b is not None, name
    return b


def _restore(cluster: Cluster) -> None:
    """Every node running, replay resumed, replicas streaming and caught up."""
    for node in cluster.nodes:
        if not node.is_running():
            cluster.start_node(node)
    for node in cluster.replicas:
        if cluster.sql(node, "SELECT pg_get_wal_replay_pause_state()")[0][0] != "not paused":
            cluster.resume_replay(node)
        cluster.wait_streaming(node)
    cluster.wait_caught_up()


LONG_READ = WHERE_SQL + " FROM pg_sleep(1)"


def _running(cluster: Cluster, node: str, marker: str, n: int = 1) -> bool:
    """At least n queries containing marker run on node."""
    return cluster.sql(node, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                             "AND pid <> pg_backend_pid()", f"%{marker}%")[0][0] >= n


def _closed(c: Client) -> bool:
    return c.conn.is_closed() if isinstance(c, AsyncpgClient) else c.conn.closed


class ReadLoad:
    """Background readers (asyncpg and psycopg sessions, each in its own loop task) that
    record every answer's node and time, and every error."""

    def __init__(self, proxy, cluster: Cluster, n: int = 4):
        self.proxy, self.cluster, self.n = proxy, cluster, n
        # half the readers spend most of their time in a query (so some are in flight on
        # any backend at any moment), half run short ones (so idle pooled connections and
        # fresh connects are exercised too)
        self.sqls = (WHERE_SQL + " FROM pg_sleep(0.005)", WHERE_SQL)
        self.served: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "ReadLoad":
        kinds = ["asyncpg", "asyncpg", "psycopg", "psycopg"] * self.n
        self._tasks = [asyncio.create_task(self._run(k, self.sqls[i % 2])) for i, k in enumerate(kinds[: self.n])]
        await async_wait_until(lambda: len(self.served) >= self.n, timeout=10, message="the readers to start")
        return self

    async def _run(self, kind: str, sql: str) -> None:
        """Read until stopped; after an error that closed the connection, reconnect (as an
        application's pool would) and carry on."""
        loop = asyncio.get_running_loop()
        c = await connect(self.proxy, kind)
        try:
            while not self._stop.is_set():
                try:
                    row = await c.row(sql)
                    self.served.append((loop.time(), on(self.cluster, row)))
                except (psycopg.Error, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                    self.errors.append((loop.time(), f"{kind}: {type(exc).__name__}: {sqlstate(exc)} {exc}"))
                    await asyncio.sleep(0.05)
                    if _closed(c):
                        with contextlib.suppress(Exception):
                            await c.close()
                        c = await connect(self.proxy, kind)
                await asyncio.sleep(0.002)
        finally:
            with contextlib.suppress(Exception):
                await c.close()

    def served_since(self, t: float) -> Counter:
        return Counter(name for at, name in self.served if at >= t)

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_lagging_replica_leaves_rotation_and_returns(make_proxy, cluster, schema) -> None:
    proxy = make_proxy(routing={"max_lag_bytes": SMALL_LAG, "monitor_interval_ms": INTERVAL_MS})
    interval = INTERVAL_MS / 1000
    loop = asyncio.get_running_loop()
    writer = await psycopg.AsyncConnection.connect(cluster.primary.local_conninfo(dbname="app"), autocommit=True)
    try:
        await asyncio.to_thread(cluster.wait_caught_up)
        await async_wait_until(lambda: _backend(proxy, "main_replica1").in_rotation, timeout=5)
        async with ReadLoad(proxy, cluster) as load:
            await asyncio.to_thread(cluster.pause_replay, "replica1")
            paused_at = (await asyncio.to_thread(
                cluster.sql, "replica1", "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"))[0][0]
            # Commit ~8 kB at a time until the primary is past the limit; note when it passed.
            passed_at = None
            for _ in range(2000):
                cur = await writer.execute(
                    "INSERT INTO rt_fill (pad) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 32) g "
                    "RETURNING (SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint)")
                lsn = (await cur.fetchone())[0]
                if lsn - paused_at > SMALL_LAG:
                    passed_at = loop.time()
                    break
            assert passed_at is not None
            await async_wait_until(lambda: not _backend(proxy, "main_replica1").in_rotation, timeout=5,
                                   interval=0.005, message="replica1 to leave rotation")
            left_after = loop.time() - passed_at
            print(f"\nreplica1 left rotation {left_after * 1000:.0f} ms after passing {SMALL_LAG} bytes of lag")
            assert left_after <= 2 * interval + 0.05, left_after
            out_at = loop.time()
            # A few MB more while it is out, in small commits (one 3 MB statement would put
            # replica2 past 64 kB for a moment too, and rightly send reads to the primary).
            for _ in range(300):
                await writer.execute("INSERT INTO rt_fill (pad) SELECT repeat(md5(g::text), 8) "
                                     "FROM generate_series(1, 32) g")
                await asyncio.sleep(0.002)  # paced, so that replica2 (on the same busy CPUs) keeps up
            written = (await (await writer.execute(
                "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")).fetchone())[0] - paused_at
            assert written > 2 * 1024 * 1024, written
            assert not _backend(proxy, "main_replica1").in_rotation
            during = load.served_since(out_at + 0.05)
            print(f"while replica1 was out ({written / 1e6:.1f} MB behind): reads served by {dict(during)}")
            assert during["replica2"] >= 0.8 * sum(during.values()) and "replica1" not in during, during
            await asyncio.to_thread(cluster.resume_replay, "replica1")
            await asyncio.to_thread(cluster.wait_caught_up)
            await async_wait_until(lambda: _backend(proxy, "main_replica1").in_rotation, timeout=10,
                                   message="replica1 to come back into rotation")
            back_at = loop.time()
            await async_wait_until(lambda: load.served_since(back_at)["replica1"] > 0, timeout=5,
                                   message="reads on replica1 again")
        assert load.errors == [], load.errors
    finally:
        await writer.close()
        await asyncio.to_thread(_restore, cluster)


async def test_a_read_whose_replica_backend_is_terminated_after_a_buffered_row_gets_the_fatal(make_proxy, cluster) -> None:
    """A server buffers rows until the statement ends; a backend terminated in between
    sends its first row and its FATAL 57P01 in one write. The replica still answers the
    monitor, so the loss is that connection's alone: the read is not re-run elsewhere (a
    read that ends its own server would end every backend in turn), the client gets the
    FATAL and its connection ends, as PostgreSQL's would, and the replica stays in
    rotation."""
    proxy = make_proxy(routing={"monitor_interval_ms": INTERVAL_MS})
    marker = f"buffered_{uuid.uuid4().hex[:8]}"
    sql = f"SELECT 1 AS n UNION ALL SELECT 2 FROM pg_sleep(1) /* {marker} */"
    conn = await asyncpg.connect(f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app", ssl=False, timeout=10)
    r0 = retries(proxy)
    try:
        read = asyncio.create_task(conn.fetch(sql))
        victims: list[tuple[str, int]] = []

        def find() -> bool:
            for node in ("replica1", "replica2"):
                victims.extend((node, pid) for (pid,) in cluster.sql(
                    node, "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND state = 'active' "
                          "AND pid <> pg_backend_pid()", f"%{marker}%"))  # (not the idle one that prepared it)
            return bool(victims)

        await async_wait_until(lambda: asyncio.to_thread(find), timeout=5, message="the read running on a replica")
        node, pid = victims[0]
        assert cluster.sql(node, "SELECT pg_terminate_backend(%s)", pid)[0][0]
        # (asyncpg's words for a FATAL followed by the end of the connection)
        with pytest.raises(asyncpg.ConnectionDoesNotExistError, match="terminating connection due to administrator"):
            await asyncio.wait_for(read, 10)
        assert retries(proxy) == r0
        assert conn.is_closed()
        assert _backend(proxy, f"main_{node}").in_rotation
    finally:
        conn.terminate()


async def test_a_server_lost_between_a_prepare_and_its_execute(make_proxy, cluster) -> None:
    """asyncpg prepares with Parse, Describe, Flush and executes later with Bind, Execute,
    Sync: its group stays open on the server connection in between, the client waiting
    for nothing. A backend terminated then (pg_terminate_backend sends FATAL 57P01 and
    ends the connection): the client gets the FATAL and its connection ends, as
    PostgreSQL's would; other sessions are served as before. (A connection lost without
    a word is answered at the execute: tests/unit/test_session_parts.py.)"""
    proxy = make_proxy(routing={"monitor_interval_ms": INTERVAL_MS})
    marker = f"open_group_{uuid.uuid4().hex[:8]}"
    dsn = f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app"
    conn = await asyncpg.connect(dsn, ssl=False, timeout=10)
    try:
        stmt = await conn.prepare(f"SELECT 1 AS n /* {marker} */")
        victims = [(node, pid) for node in ("primary", "replica1", "replica2") for (pid,) in cluster.sql(
            node, "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()", f"%{marker}%")]
        assert len(victims) == 1, victims
        node, pid = victims[0]
        assert cluster.sql(node, "SELECT pg_terminate_backend(%s)", pid)[0][0]
        await async_wait_until(conn.is_closed, timeout=5, message="the client's connection ended")
        with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
            await asyncio.wait_for(stmt.fetch(), 10)
        other = await asyncpg.connect(dsn, ssl=False, timeout=10)
        try:
            assert await asyncio.wait_for(other.fetchval("SELECT 41 + 1"), 10) == 42
        finally:
            await other.close(timeout=5)
    finally:
        conn.terminate()


async def test_a_replica_that_refuses_logins_does_not_end_client_sessions(make_proxy, cluster, clients) -> None:
    """A replica that answers the pool's login with a FATAL error (here pg_hba.conf
    rejects the user; 57P03 while it shuts down is the common case) is its own failure:
    the read goes elsewhere and the client's session carries on."""
    replica = cluster.node("replica1")
    hba = replica.datadir / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all app 127.0.0.1/32 reject\n{original}")
    cluster.sql(replica, "SELECT pg_reload_conf()")
    try:
        proxy = make_proxy(routing={"monitor_interval_ms": 2000})  # the monitor logs in as postgres: "up"
        client = await clients(proxy, "asyncpg")
        served = Counter([await read_on(client, cluster) for _ in range(20)])
        assert served["replica1"] == 0 and sum(served.values()) == 20, served
        assert served["replica2"] > 0, served
    finally:
        hba.write_text(original)
        cluster.sql(replica, "SELECT pg_reload_conf()")


@pytest.mark.parametrize("how", ["kill", "stop-fast"])
async def test_replica_lost_under_read_load(make_proxy, cluster, how) -> None:
    """SIGKILL (connections just drop, or a backend sees the postmaster die and sends
    FATAL first) and a fast shutdown (every backend sends FATAL 57P01 first): reads in
    flight on replica1 are retried elsewhere, none fails. replica2 has a tiny weight, so
    while replica1 is in rotation every read (the long ones included) runs there."""
    proxy = make_proxy(routing={"monitor_interval_ms": INTERVAL_MS}, backends={"main_replica2": {"weight": 0.001}})
    loop = asyncio.get_running_loop()
    r0 = retries(proxy)
    try:
        async with ReadLoad(proxy, cluster, n=6) as load:
            await async_wait_until(lambda: load.served_since(0)["replica1"] > 20, timeout=5)
            assert load.served_since(0)["replica2"] == 0
            # and a few long reads, so some are surely in flight on replica1 when it goes
            long_clients = [await connect(proxy, k) for k in ("asyncpg", "psycopg") * 2]
            long_reads = [asyncio.create_task(c.row(LONG_READ)) for c in long_clients]
            await async_wait_until(lambda: asyncio.to_thread(_running, cluster, "replica1", "pg_sleep(1)", 4),
                                   timeout=5, message="the long reads running on replica1")
            if how == "kill":
                await asyncio.to_thread(cluster.kill_node, "replica1")
            else:
                await asyncio.to_thread(cluster.stop_node, "replica1", "fast")
            killed_at = loop.time()
            answers = await asyncio.gather(*long_reads, return_exceptions=True)
            for c in long_clients:
                await c.close()
            failed = [f"{type(a).__name__}: {sqlstate(a)} {a}" for a in answers if isinstance(a, BaseException)]
            assert failed == [], f"long reads in flight on replica1 failed instead of being retried: {failed}"
            assert {on(cluster, a) for a in answers} <= {"replica2"}, answers
            await async_wait_until(lambda: not _backend(proxy, "main_replica1").up, timeout=5,
                                   interval=0.01, message="replica1 to be seen down")
            await async_wait_until(lambda: load.served_since(killed_at + 0.5)["replica2"] > 20, timeout=10)
            # (the long reads waited a second: replica1's connections are all gone by now)
            assert load.served_since(killed_at + 0.5)["replica1"] == 0
            await asyncio.to_thread(cluster.start_node, "replica1")
            await asyncio.to_thread(cluster.wait_streaming, "replica1")
            await async_wait_until(lambda: _backend(proxy, "main_replica1").in_rotation, timeout=10,
                                   message="replica1 back in rotation")
            back_at = loop.time()
            await async_wait_until(lambda: load.served_since(back_at)["replica1"] > 0, timeout=5,
                                   message="reads on replica1 again")
        print(f"\nreplica1 ({how}): {len(load.served)} reads, {retries(proxy) - r0:g} retried, "
              f"errors {load.errors}")
        assert load.errors == [], load.errors
    finally:
        await asyncio.to_thread(_restore, cluster)


async def test_read_needing_a_new_connection_to_a_dead_replica_goes_elsewhere(make_proxy, cluster, clients) -> None:
    """replica1 stopped before the monitor noticed (5 s interval) and before the proxy ever
    connected to it: a read routed there cannot get a server connection; it must be served
    by another backend, not fail."""
    proxy = make_proxy(routing={"monitor_interval_ms": 5000})
    try:
        await asyncio.to_thread(cluster.stop_node, "replica1")
        assert _backend(proxy, "main_replica1").in_rotation  # the proxy does not know yet
        failures = []
        served: Counter = Counter()
        for kind in ("psycopg", "asyncpg") * 3:
            c = await clients(proxy, kind)
            try:
                served[await read_on(c, cluster)] += 1
            except (psycopg.Error, asyncpg.PostgresError) as exc:
                failures.append(f"{kind}: {sqlstate(exc)} {exc}")
        print(f"\nreads with replica1 silently gone: {dict(served)}, failures {failures}")
        assert failures == [], failures
        assert "replica1" not in served
    finally:
        await asyncio.to_thread(_restore, cluster)


async def test_all_replicas_down_reads_go_to_the_primary(make_proxy, cluster, clients) -> None:
    proxy = make_proxy(routing={"monitor_interval_ms": INTERVAL_MS})
    c = await clients(proxy, "asyncpg")
    d = await clients(proxy, "psycopg")
    assert await read_on(c, cluster) in replica_names(cluster)
    try:
        await asyncio.gather(*(asyncio.to_thread(cluster.stop_node, r) for r in cluster.replicas))
        # at once, before the monitor noticed: sessions opened before read from the primary
        for client in (c, d):
            assert await read_on(client, cluster) == cluster.primary.name
        await async_wait_until(lambda: not proxy.proxy.topology.current.rotation, timeout=5)
        fresh = await clients(proxy, "psycopg")
        with routed(proxy, replica=0):
            for client in (c, d, fresh):
                assert await read_on(client, cluster) == cluster.primary.name
    finally:
        await asyncio.to_thread(_restore, cluster)
    await async_wait_until(lambda: len(proxy.proxy.topology.current.rotation) == 2, timeout=10)
    assert await until_replica_read(c, cluster) in replica_names(cluster)


# --- throwaway clusters: primary down, split brain ------------------------------------------


class Spare:
    """A throwaway cluster for destructive tests; replaced once a test broke it for good."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.broken = False

    def get(self) -> Cluster:
        if self.cluster is None or self.broken:
            self.close()
            self.cluster = Cluster(2, name=f"rtspare{uuid.uuid4().hex[:4]}").start()
            self.broken = False
        return self.cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


@pytest.fixture(scope="module")
def spare() -> Iterator[Spare]:
    s = Spare()
    yield s
    s.close()


async def test_primary_down_writes_fail_fast_reads_continue(make_proxy, spare, clients) -> None:
    sc = spare.get()
    proxy = make_proxy(clusters={"spare": sc}, routing={"monitor_interval_ms": INTERVAL_MS})
    w = await clients(proxy, "psycopg")  # this session writes before the primary goes
    await w.rows("CREATE TABLE IF NOT EXISTS pd_items (v text)")
    await w.rows("INSERT INTO pd_items VALUES ('before')")
    r = await clients(proxy, "psycopg")  # these two only read before
    a = await clients(proxy, "asyncpg")
    await asyncio.to_thread(sc.wait_caught_up)
    for client in (r, a):
        assert on(sc, await client.row(WHERE_SQL)) in replica_names(sc)
    assert await w.rows("SELECT v FROM pd_items") == [("before",)]
    replicas = replica_names(sc)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(sc.kill_node, "primary")
        for attempt in range(3):
            for client in (r, a):
                t0 = loop.time()
                with pytest.raises((psycopg.Error, asyncpg.PostgresError)) as info:
                    await client.rows("INSERT INTO pd_items VALUES ('during')")
                took = loop.time() - t0
                err = info.value
                text = str(err)
                print(f"\nwrite #{attempt} ({client.kind}) failed in {took * 1000:.0f} ms: "
                      f"{sqlstate(err)} {text.splitlines()[0]}")
                assert took < 2.0, took
                assert sqlstate(err) in ("57P03", "08006"), (sqlstate(err), text)
                assert "spare_primary" in text or f":{sc.primary.port}" in text, text
            # reads carry on, on the replicas, in the same sessions
            for client in (r, a):
                assert on(sc, await client.row(WHERE_SQL)) in replicas
            await asyncio.sleep(0.2)
        await async_wait_until(lambda: not _backend(proxy, "spare_primary").up, timeout=5)
        # a new session can log in and read while the primary is down
        fresh = await clients(proxy, "psycopg")
        assert on(sc, await fresh.row(WHERE_SQL)) in replicas
        assert await fresh.rows("SELECT v FROM pd_items") == [("before",)]
        # The session that wrote: both replicas have replayed its commit (waited for above,
        # and the monitor polled the primary's LSN after it), so it may read there too.
        assert await w.rows("SELECT v FROM pd_items") == [("before",)]
        assert on(sc, await w.row(WHERE_SQL)) in replicas
    finally:
        await asyncio.to_thread(sc.start_node, "primary")
        for rep in sc.replicas:
            await asyncio.to_thread(sc.wait_streaming, rep)
    # writes work again once the primary is back
    await async_wait_until(lambda: _backend(proxy, "spare_primary").up, timeout=10)
    await async_wait_until(lambda: _write_ok(r), timeout=10, ignore=(psycopg.Error,))


async def _write_ok(c: Client) -> bool:
    await c.rows("INSERT INTO pd_items VALUES ('after')")
    return True


async def test_split_brain_refuses_writes(make_proxy, spare, clients) -> None:
    sc = spare.get()
    proxy = make_proxy(clusters={"spare": sc}, routing={"monitor_interval_ms": INTERVAL_MS})
    c = await clients(proxy, "psycopg")
    a = await clients(proxy, "asyncpg")
    await c.rows("CREATE TABLE IF NOT EXISTS sb_items (v text)")
    await c.rows("INSERT INTO sb_items VALUES ('before')")
    assert metric_value(metrics_text(proxy), "pgsplit_split_brain") == 0.0
    await asyncio.to_thread(sc.wait_caught_up)
    loop = asyncio.get_running_loop()
    spare.broken = True  # from here on, this cluster has two primaries
    await asyncio.to_thread(sc.promote, "replica1")
    promoted_at = loop.time()
    await async_wait_until(lambda: proxy.proxy.topology.current.split_brain, timeout=5, interval=0.01,
                           message="the proxy to see the split brain")
    seen_after = loop.time() - promoted_at
    print(f"\nsplit brain seen {seen_after * 1000:.0f} ms after the promotion returned")
    assert seen_after <= 5 * INTERVAL_MS / 1000, seen_after
    for client in (c, a):
        t0 = loop.time()
        with pytest.raises((psycopg.Error, asyncpg.PostgresError)) as info:
            await client.rows("INSERT INTO sb_items VALUES ('during')")
        assert loop.time() - t0 < 2.0
        assert sqlstate(info.value) == "57P03", info.value
        assert "split brain" in str(info.value), info.value
    assert metric_value(metrics_text(proxy), "pgsplit_split_brain") == 1.0
    # reads continue, on the replica that is still one
    for client in (c, a):
        for _ in range(3):
            assert on(sc, await client.row(WHERE_SQL)) == "replica2"
    fresh = await clients(proxy, "psycopg")
    assert on(sc, await fresh.row(WHERE_SQL)) == "replica2"
    # nothing was written anywhere after the split
    for node in (sc.primary, sc.node("replica1")):
        assert sc.sql(node, "SELECT count(*) FROM sb_items WHERE v = 'during'", dbname="app") == [(0,)]
