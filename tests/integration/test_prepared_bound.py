"""The bound on protocol-level statements per server connection (pool.max_prepared_statements),
on the real sandbox cluster.

Clients that prepare many distinct statements through a pool of one server connection:
the server session never holds more than the bound (the least recently used are closed),
and every statement still runs and returns its own result, the closed ones prepared again
transparently, also when one pipelined unit uses more statements than the bound.
"""

from __future__ import annotations

import re
import struct
import urllib.request

import asyncpg
import psycopg
import pytest
from rawclient import RawClient, message

COUNT_SQL = "SELECT count(*)::int FROM pg_prepared_statements"


def server_statements(proxy) -> int:
    """Statements prepared in the pool's one primary server session (asked by a client that
    prepares none itself: psycopg's unnamed statements)."""
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=None, connect_timeout=10) as conn:
        conn.execute("SET pgsplit.route = 'primary'")
        return conn.execute(COUNT_SQL).fetchone()[0]


def evictions(proxy) -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r"^pgsplit_prepared_statement_evictions_total (\S+)$", text, re.M)
    assert match is not None, text
    return float(match.group(1))


async def test_many_asyncpg_statements_stay_within_the_bound(make_proxy, cluster) -> None:
    proxy = make_proxy(pool={"size": 1})  # the default bound, 100
    conn = await asyncpg.connect(f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app", timeout=10,
                                 statement_cache_size=2000)
    try:
        await conn.execute("SET pgsplit.route = 'primary'", timeout=10)
        for i in range(300):
            assert await conn.fetchval(f"SELECT {i}::int + $1", 1, timeout=10) == i + 1
        for i in range(0, 300, 7):  # long closed on the server: prepared again
            assert await conn.fetchval(f"SELECT {i}::int + $1", 2, timeout=10) == i + 2
        assert await conn.fetchval(COUNT_SQL, timeout=10) <= 100
    finally:
        await conn.close(timeout=10)
    assert server_statements(proxy) <= 100
    assert evictions(proxy) >= 200


def test_a_pipeline_with_more_statements_than_the_bound(make_proxy, cluster) -> None:
    # One unit (a psycopg pipeline: no Sync until its end) prepares 60 statements on a
    # connection that keeps 20, and uses the first ones again at its end.
    proxy = make_proxy(pool={"size": 1, "max_prepared_statements": 20})
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("SET pgsplit.route = 'primary'")
        order = [*range(60), *range(10)]
        with conn.pipeline():
            cursors = [conn.execute(f"SELECT {i}::int * %s", (10,), prepare=True) for i in order]
        assert [cur.fetchone()[0] for cur in cursors] == [i * 10 for i in order]
        for i in range(0, 60, 5):
            assert conn.execute(f"SELECT {i}::int * %s", (3,), prepare=True).fetchone()[0] == i * 3
    assert server_statements(proxy) <= 20
    assert evictions(proxy) >= 40


def test_a_close_the_server_skipped_after_an_error_is_remembered(make_proxy, cluster) -> None:
    # The connection is full; in one pipeline a statement fails, and the Parse of a new one
    # after it (with the Close of the oldest ahead of it) is skipped by the server: that
    # oldest statement is still prepared there, and using it again must not prepare it twice.
    proxy = make_proxy(pool={"size": 1, "max_prepared_statements": 20})
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute("SET pgsplit.route = 'primary'")
        for i in range(19):  # 19, and the failing one makes 20
            assert conn.execute(f"SELECT {i}::int * %s", (2,), prepare=True).fetchone()[0] == i * 2
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("SELECT 1 / %s", (0,), prepare=True)
                conn.execute("SELECT 100::int * %s", (2,), prepare=True)
        for i in range(19):
            assert conn.execute(f"SELECT {i}::int * %s", (3,), prepare=True).fetchone()[0] == i * 3
    assert server_statements(proxy) <= 20


def _parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + b"\0\0")


def _bind_execute(name: str, value: str) -> bytes:
    bind = b"\0" + name.encode() + b"\0" + struct.pack("!hhi", 0, 1, len(value)) + value.encode() + b"\0\0"
    return message(b"B", bind) + message(b"E", b"\0" + b"\0\0\0\0")


def _until(client: RawClient, last: str) -> list[str]:
    types = []
    while not types or types[-1] != last:
        types.append(client.read_message()[0])
    return types


def test_statements_named_after_an_error_has_come_back_are_skipped_too(make_proxy, cluster) -> None:
    # The same as above, made deterministic: the error has reached the client (so the proxy
    # has seen it) before the rest of the group is sent. The server skips that rest up to
    # the Sync: the Close of the oldest statement ahead of the new Parse closes nothing.
    proxy = make_proxy(pool={"size": 1, "max_prepared_statements": 20})
    with RawClient("127.0.0.1", proxy.port, timeout=20) as client:
        client.login("app", "app-secret", "app")
        client.query("SET pgsplit.route = 'primary'")
        for i in range(19):  # 19, and the failing one makes 20
            client.send(_parse(f"s{i}", f"SELECT {i}::int * $1") + _bind_execute(f"s{i}", "2") + message(b"S"))
            assert _until(client, "Z") == ["1", "2", "D", "C", "Z"]
        client.send(_parse("fails", "SELECT 1 / $1") + _bind_execute("fails", "0") + message(b"H"))
        assert _until(client, "E") == ["1", "E"]  # (1 / $1 fails at its Bind: planning folds it)
        client.send(_parse("new", "SELECT 100::int * $1") + _bind_execute("new", "2") + message(b"S"))
        assert _until(client, "Z") == ["Z"]  # skipped by the server, as PostgreSQL does
        for i in range(19):  # s0 is still prepared on the server: used again, not prepared twice
            client.send(_bind_execute(f"s{i}", "3") + message(b"S"))
            types = _until(client, "Z")
            assert types == ["2", "D", "C", "Z"], (i, types)
    assert server_statements(proxy) <= 20
