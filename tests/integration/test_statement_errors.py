"""Errors about a client's named prepared statements, through pgsplit.

pgsplit prepares a client's named statement on a server under a name of its own
(`pgsplit_` + a hash of the text), so that pooled connections share it. What the server
says about that statement must still make sense to the client: an error names the
client's statement, as PostgreSQL would, and a statement whose cached plan a schema change
invalidated ("cached plan must not change result type") is prepared afresh when the
driver prepares it again, as asyncpg does on its own, on whichever connection it runs.
"""

from __future__ import annotations

import struct

import asyncpg
import pytest

from rawclient import RawClient, message

APP_PASSWORD = "app-secret"
MODES = ["transaction", "session"]


async def connect(proxy) -> asyncpg.Connection:
    conn = await asyncpg.connect(proxy.dsn(), timeout=10, command_timeout=10)
    await conn.execute("SET pgsplit.route = 'primary'")  # the DDL below is seen at once
    return conn


@pytest.mark.parametrize("mode", MODES)
async def test_statement_gone_from_the_server_is_named_as_the_client_named_it(make_proxy, mode):
    """A DEALLOCATE of the server-side name (as pg_prepared_statements lists it; sent with
    another statement, so that the server runs it): asyncpg's next execution fails with
    the name asyncpg gave the statement, not the proxy's."""
    proxy = make_proxy(pool={"mode": mode})
    conn = await connect(proxy)
    try:
        stmt = await conn.prepare("SELECT $1::int + 1 AS n")
        assert await stmt.fetchval(41) == 42
        server_name = await conn.fetchval(
            "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT $1::int + 1 AS n'")
        assert server_name.startswith("pgsplit_"), server_name
        await conn.execute(f'SELECT 1; DEALLOCATE "{server_name}"')
        with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
            await stmt.fetchval(1)
        assert info.value.sqlstate == "26000"
        assert info.value.message == f'prepared statement "{stmt.get_name()}" does not exist'
        assert await conn.fetchval("SELECT 7") == 7  # the session goes on
    finally:
        await conn.close(timeout=5)


def bind_without_parameters(client: RawClient, name: bytes) -> dict[str, str]:
    """Parse `name` with one int4 parameter, then Bind it with none: the server's 08P01."""
    client.send(message(b"P", name + b"\0SELECT $1::int\0" + struct.pack("!hi", 1, 23)) + message(b"S"))
    assert client.read_message()[0] == "1"
    assert client.read_message() == ("Z", b"I")
    client.send(message(b"B", b"\0" + name + b"\0" + struct.pack("!hhh", 0, 0, 0))
                + message(b"E", b"\0" + struct.pack("!i", 0)) + message(b"S"))
    result = client.read_result()
    assert len(result.errors) == 1 and result.status == "I", result
    return result.errors[0]


def test_bind_error_names_the_clients_statement_as_postgresql_does(proxy, cluster):
    """The same bytes, sent to PostgreSQL directly and through pgsplit, get the same error."""
    with RawClient(cluster.primary.host, cluster.primary.port, timeout=10) as direct:
        direct.login("app", APP_PASSWORD, "app")
        expected = bind_without_parameters(direct, b"my_stmt")
    with RawClient("127.0.0.1", proxy.port, timeout=10) as client:
        client.login("app", APP_PASSWORD, "app")
        got = bind_without_parameters(client, b"my_stmt")
        assert client.scalar("SELECT 'still here'") == "still here"
    assert expected["M"] == 'bind message supplies 0 parameters, but prepared statement "my_stmt" requires 1'
    assert (got["C"], got["M"]) == (expected["C"], expected["M"])


@pytest.mark.parametrize("mode", MODES)
async def test_asyncpg_recovers_from_a_changed_result_type(make_proxy, mode):
    """asyncpg's own recovery (its test_cache_invalidation): a cached statement whose
    table's column changed type fails with 0A000 on the server; asyncpg prepares it again
    and runs it once more, which must work through pgsplit as it does on PostgreSQL. The
    stale server statement is closed, so no other client inherits it."""
    # transaction mode: one server connection, so every try meets the stale statement
    proxy = make_proxy(pool={"mode": mode, "size": 1 if mode == "transaction" else 5})
    conn, other = await connect(proxy), await connect(proxy)
    table = f"stale_plan_{mode}"
    query = f"SELECT * FROM {table}"

    async def rows(c) -> list[tuple]:
        return [tuple(r) for r in await c.fetch(query)]

    try:
        await other.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int, b int);"
                            f" INSERT INTO {table} VALUES (1, 2)")
        assert await rows(conn) == [(1, 2)]
        await other.execute(f"ALTER TABLE {table} ALTER COLUMN b TYPE text")
        assert await rows(conn) == [(1, "2")]  # failed once inside, re-prepared by asyncpg
        assert await rows(conn) == [(1, "2")]

        # An explicitly prepared statement is not re-prepared by asyncpg (nor on
        # PostgreSQL); after its failure a new client, and a new prepare, work.
        stmt = await conn.prepare(query)
        assert [tuple(r) for r in await stmt.fetch()] == [(1, "2")]  # (ends the prepare's transaction)
        await other.execute(f"ALTER TABLE {table} ALTER COLUMN a TYPE bigint")
        with pytest.raises(asyncpg.InvalidCachedStatementError):
            await stmt.fetch()
        fresh = await connect(proxy)
        try:
            assert await rows(fresh) == [(1, "2")]
        finally:
            await fresh.close(timeout=5)
        assert [tuple(r) for r in await (await conn.prepare(query)).fetch()] == [(1, "2")]

        # A prepare (Parse, Describe, Flush) after the change, on a connection that has
        # the statement from before it: the client's Parse makes it afresh there (a Close
        # goes first), as PostgreSQL would, so its Describe and execution work.
        await other.execute(f"ALTER TABLE {table} ALTER COLUMN a TYPE int")
        assert [tuple(r) for r in await (await conn.prepare(query)).fetch()] == [(1, "2")]
        assert await rows(conn) == [(1, "2")]
        await other.execute(f"DROP TABLE {table}")
    finally:
        await conn.close(timeout=5)
        await other.close(timeout=5)


@pytest.mark.parametrize("how", ["DEALLOCATE ALL", "DEALLOCATE {name}"])
async def test_deallocate_drops_protocol_level_statements_as_postgresql_does(make_proxy, cluster, how):
    """SQL and protocol-level prepared statements share one namespace on the server:
    DEALLOCATE (by name, or ALL) drops one prepared with a Parse, and its next use fails
    with 26000, directly and through pgsplit alike."""
    proxy = make_proxy()

    async def outcome(dsn: str) -> tuple:
        conn = await asyncpg.connect(dsn, timeout=10, command_timeout=10)
        try:
            stmt = await conn.prepare("SELECT 41 + 1")
            first = await stmt.fetchval()
            await conn.execute(how.format(name=f'"{stmt.get_name()}"'))
            with pytest.raises(asyncpg.InvalidSQLStatementNameError) as info:
                await stmt.fetchval()
            return first, info.value.sqlstate, await conn.fetchval("SELECT 7")
        finally:
            await conn.close(timeout=5)

    direct = await outcome(cluster.primary.dsn(user="app", password=APP_PASSWORD, dbname="app"))
    assert direct == (42, "26000", 7)
    assert await outcome(proxy.dsn()) == direct
