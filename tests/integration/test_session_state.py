"""Session state on a shared server connection, on the real sandbox cluster.

Two clients share one primary server connection (pool size 1, every unit routed to the
primary). Whatever one client changes in its server session is either carried with that
client (replayed where it goes next), or keeps the server connection for it alone (pinned:
the other client waits, and gets a fresh server connection once the first has gone), or
is undone before another client gets the connection: the other client never sees it, and
the client that made it still does on its next unit.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

ROLE = "pl_state_role"
DEFAULT_PATH = '"$user", public'


def connect(proxy) -> psycopg.Connection:
    conn = psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)
    conn.execute("SET pgsplit.route = 'primary'")
    return conn


def one(conn: psycopg.Connection, sql: str):
    return conn.execute(sql).fetchone()[0]


@pytest.fixture(scope="module")
def state_role(cluster) -> str:
    if not cluster.sql(cluster.primary, "SELECT 1 FROM pg_roles WHERE rolname = %s", ROLE):
        cluster.sql(cluster.primary, f"CREATE ROLE {ROLE}")
    cluster.sql(cluster.primary, f"GRANT {ROLE} TO app")
    cluster.sql(cluster.primary, "CREATE TABLE IF NOT EXISTS pl_state_items (v int)", user="app", dbname="app")
    return ROLE


# --- carried with the session -----------------------------------------------------------------


CARRIED = {
    # (statements of client a, probe, what a sees, what b sees)
    "set_config": (["SELECT set_config('search_path', 'pg_catalog', false)"],
                   "SELECT current_setting('search_path')", "pg_catalog", DEFAULT_PATH),
    "set_config in a transaction": (
        ["BEGIN", "SELECT set_config('search_path', 'pg_catalog', false)", "COMMIT"],
        "SELECT current_setting('search_path')", "pg_catalog", DEFAULT_PATH),
    "set_config local": (
        ["BEGIN", "SELECT set_config('search_path', 'pg_catalog', true)", "COMMIT"],
        "SELECT current_setting('search_path')", DEFAULT_PATH, DEFAULT_PATH),
    "SET ROLE": ([f"SET ROLE {ROLE}"], "SELECT current_user", ROLE, "app"),
    "set_config role": ([f"SELECT set_config('role', '{ROLE}', false)"], "SELECT current_user", ROLE, "app"),
    "SET ROLE, RESET ALL": ([f"SET ROLE {ROLE}", "RESET ALL"], "SELECT current_user", ROLE, "app"),
    "SET ROLE, RESET ROLE": ([f"SET ROLE {ROLE}", "RESET ROLE"], "SELECT current_user", "app", "app"),
    "SET ROLE, DISCARD ALL": ([f"SET ROLE {ROLE}", "DISCARD ALL"], "SELECT current_user", "app", "app"),
    "SET SCHEMA": (["SET SCHEMA 'pg_catalog'"], "SELECT current_setting('search_path')", "pg_catalog",
                   DEFAULT_PATH),
}


@pytest.mark.parametrize("kind", list(CARRIED))
def test_state_a_client_sets_is_carried_and_never_seen_by_the_next(make_proxy, cluster, state_role,
                                                                   kind) -> None:
    statements, probe, a_sees, b_sees = CARRIED[kind]
    proxy = make_proxy(pool={"size": 1})
    with connect(proxy) as a, connect(proxy) as b:
        pid = one(a, "SELECT pg_backend_pid()")
        for sql in statements:
            a.execute(sql)
        if kind == "SET ROLE, DISCARD ALL":
            a.execute("SET pgsplit.route = 'primary'")  # (DISCARD ALL reset it too)
        assert (one(b, probe), one(b, "SELECT pg_backend_pid()")) == (b_sees, pid)
        b.execute("INSERT INTO pl_state_items VALUES (1)")  # public.pl_state_items, as b's path says
        assert one(a, probe) == a_sees
        assert one(b, probe) == b_sees


# --- SQL PREPARE --------------------------------------------------------------------------------


def test_a_sql_prepared_statement_never_reaches_another_client(make_proxy, cluster) -> None:
    proxy = make_proxy(pool={"size": 1})
    with connect(proxy) as a, connect(proxy) as b:
        a.execute("PREPARE pl_leak_stmt AS SELECT 'a''s'")
        assert one(a, "EXECUTE pl_leak_stmt") == "a's"
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):  # 26000, from the server
            b.execute("EXECUTE pl_leak_stmt")
        b.execute("PREPARE pl_leak_stmt AS SELECT 'b''s'")  # no 42P05: a's is not there
        assert one(b, "EXECUTE pl_leak_stmt") == "b's"
        assert one(a, "EXECUTE pl_leak_stmt") == "a's"  # prepared again for a
        assert one(b, "EXECUTE pl_leak_stmt") == "b's"
        b.execute("DEALLOCATE pl_leak_stmt")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            b.execute("EXECUTE pl_leak_stmt")
        assert one(a, "EXECUTE pl_leak_stmt") == "a's"


def test_a_prepare_in_a_rolled_back_transaction_stays_with_its_client(make_proxy, cluster) -> None:
    # PREPARE is not undone by ROLLBACK: the statement stays in a's server session.
    proxy = make_proxy(pool={"size": 1})
    with connect(proxy) as a, connect(proxy) as b:
        a.execute("BEGIN")
        a.execute("PREPARE pl_tx_stmt AS SELECT 1")
        a.execute("ROLLBACK")
        b.execute("PREPARE pl_tx_stmt AS SELECT 2")
        assert one(b, "EXECUTE pl_tx_stmt") == 2
        assert one(a, "EXECUTE pl_tx_stmt") == 1


# --- pinned: the server connection stays with the client ----------------------------------------


PINNED = {
    # (statement of client a, probe, what a sees, what b sees)
    "set_config from a column": (
        "SELECT set_config(n, v, false) FROM (VALUES ('search_path', 'pg_catalog')) AS t (n, v)",
        "SELECT current_setting('search_path')", "pg_catalog", DEFAULT_PATH),
    "set_config that may not run": (
        "SELECT set_config('search_path', 'pg_catalog', false) FROM pl_state_items LIMIT 1",
        "SELECT current_setting('search_path')", "pg_catalog", DEFAULT_PATH),
    "DECLARE WITH HOLD": ("DECLARE pl_c CURSOR WITH HOLD FOR SELECT 1",
                          "SELECT count(*)::int FROM pg_cursors WHERE name = 'pl_c'", 1, 0),
    "LISTEN": ("LISTEN pl_chan", "SELECT count(*)::int FROM pg_listening_channels()", 1, 0),
    "temp table": ("CREATE TEMP TABLE pl_tmp (a int)", "SELECT to_regclass('pl_tmp') IS NOT NULL", True, False),
    "advisory lock": ("SELECT pg_advisory_lock(4242)",
                      "SELECT count(*)::int FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                      1, 0),
}


@pytest.mark.parametrize("kind", list(PINNED))
async def test_state_that_pins_keeps_the_connection_for_its_client(make_proxy, cluster, state_role, kind) -> None:
    statement, probe, a_sees, b_sees = PINNED[kind]
    proxy = make_proxy(pool={"size": 1, "acquire_timeout_s": 20})
    dsn = f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app"
    a = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)
    b = await asyncpg.connect(dsn, timeout=10, statement_cache_size=0)
    try:
        for conn in (a, b):
            await conn.execute("SET pgsplit.route = 'primary'", timeout=10)
        pid = await a.fetchval("SELECT pg_backend_pid()", timeout=10)
        await a.execute(statement, timeout=10)
        waiting = asyncio.ensure_future(b.fetchrow(f"SELECT ({probe}) AS v, pg_backend_pid() AS pid", timeout=20))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # the connection is a's until a ends
        assert await a.fetchval(probe, timeout=10) == a_sees
        assert await a.fetchval("SELECT pg_backend_pid()", timeout=10) == pid
        await a.close(timeout=10)
        row = await asyncio.wait_for(waiting, 20)
        assert row["v"] == b_sees and row["pid"] != pid  # a's connection was not lent again
    finally:
        for conn in (a, b):
            if not conn.is_closed():
                await conn.close(timeout=10)


def test_a_failed_settings_replay_leaves_no_state_for_the_next_client(make_proxy, cluster, state_role) -> None:
    # b's SET ROLE cannot be replayed once its role is gone; the replay fails as a whole
    # (its RESETs too), so the connection still carries a's role: c must not get it.
    cluster.sql(cluster.primary, "DROP ROLE IF EXISTS pl_gone_role")
    cluster.sql(cluster.primary, "CREATE ROLE pl_gone_role")
    cluster.sql(cluster.primary, "GRANT pl_gone_role TO app")
    proxy = make_proxy(pool={"size": 1})
    try:
        with connect(proxy) as a, connect(proxy) as b, connect(proxy) as c:
            a.execute(f"SET ROLE {ROLE}")
            b.execute("SET ROLE pl_gone_role")
            assert one(a, "SELECT current_user") == ROLE  # the connection now carries a's role
            cluster.sql(cluster.primary, "DROP ROLE pl_gone_role")
            b.execute("SELECT 1")  # (its settings could not be restored: a warning)
            assert one(c, "SELECT current_user") == "app"
            assert one(a, "SELECT current_user") == ROLE
    finally:
        cluster.sql(cluster.primary, "DROP ROLE IF EXISTS pl_gone_role")


def test_startup_settings_that_fail_leave_no_state_for_the_next_client(make_proxy, cluster, state_role) -> None:
    proxy = make_proxy(pool={"size": 1})
    with connect(proxy) as a:
        a.execute(f"SET ROLE {ROLE}")
        assert one(a, "SELECT current_user") == ROLE  # the connection carries a's role
        with pytest.raises(psycopg.OperationalError, match="DateStyle"):
            psycopg.connect(proxy.dsn(options="-c%20DateStyle%3Dnonsense"), connect_timeout=10)
        with connect(proxy) as c:
            assert one(c, "SELECT current_user") == "app"
        assert one(a, "SELECT current_user") == ROLE
