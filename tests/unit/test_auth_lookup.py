"""proxy.process.lookup against servers that do not answer: real sockets, no PostgreSQL.
A host that takes the TCP connection and says nothing, and a port nobody listens on, each
fail the lookup within its deadline with an error naming the server and the setting."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import asyncpg
import pytest

from proxy.process.lookup import LookupFailed, LookupSettings, UserLookup
from proxy.scram import Verifier
from router import pg
from router.topology import BackendState, Role

SETTINGS = LookupSettings("SELECT 1", "pgsplit_auth", "lookup-secret", "postgres",
                          timeout_s=0.5, cache_ttl_s=5.0, cache_size=10)


def backend(port: int) -> BackendState:
    return BackendState(name="main_primary", host="127.0.0.1", port=port, role=Role.PRIMARY)


def test_a_silent_server_fails_the_lookup_within_its_deadline(caplog) -> None:
    async def run() -> None:
        held: list[asyncio.StreamWriter] = []

        async def silent(_reader, writer) -> None:
            held.append(writer)  # accepted, never answered

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lookup = UserLookup(SETTINGS)
        try:
            t0 = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="pgsplit.auth_query"):
                with pytest.raises(LookupFailed) as info:
                    await lookup.verifier("someone", backend(port))
                assert time.monotonic() - t0 < 1.5
                await asyncio.sleep(0.7)  # (the lookup itself ends at its own deadline, and says why)
            # The client learns nothing of the server; the log says which and why.
            assert info.value.sqlstate == "08006" and info.value.fatal
            assert info.value.message == "authentication lookup failed; see the pgsplit log"
            assert (f'could not look up user "someone": the auth_query server main_primary (127.0.0.1:{port}) '
                    "did not answer within 0.5s (auth_query.timeout_s)") in caplog.text
            assert "lookup-secret" not in caplog.text and "lookup-secret" not in repr(SETTINGS)
            # a failure is not cached: the next login asks again (and fails again, in time)
            with pytest.raises(LookupFailed):
                await lookup.verifier("someone", backend(port))
        finally:
            lookup.close()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_a_refused_connection_fails_the_lookup_at_once(caplog) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (closed again: nobody listens there)

    async def run() -> LookupFailed:
        lookup = UserLookup(SETTINGS)
        try:
            with pytest.raises(LookupFailed) as info:
                await lookup.verifier("someone", backend(port))
            return info.value
        finally:
            lookup.close()

    with caplog.at_level(logging.WARNING, logger="pgsplit.auth_query"):
        error = asyncio.run(run())
    assert error.message == "authentication lookup failed; see the pgsplit log"
    assert (f'could not look up user "someone" on the auth_query server main_primary (127.0.0.1:{port}): '
            in caplog.text)


# --- against a fake server: what the lookup does with its connections ---------------------

VERIFIER_TEXT = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=:" + "B" * 43 + "=")


class FakeServer:
    """pg.connect's stand-in: counts the connections it opens; the query sleeps `delay[user]`
    (0.01 s by default) and answers `rows[user]` (no row by default)."""

    def __init__(self) -> None:
        self.opened: list[FakeConn] = []
        self.queries: list[str] = []
        self.delay: dict[str, float] = {}
        self.rows: dict[str, list] = {}

    async def connect(self, ep, application_name: str) -> FakeConn:
        await asyncio.sleep(0.01)
        conn = FakeConn(self)
        self.opened.append(conn)
        return conn

    def open_connections(self) -> int:
        return sum(not c.closed for c in self.opened)


class FakeConn:
    def __init__(self, server: FakeServer) -> None:
        self.server, self.closed = server, False

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True

    async def fetch(self, query: str, user: str) -> list:
        self.server.queries.append(user)
        await asyncio.sleep(self.server.delay.get(user, 0.01))
        if self.closed:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return self.server.rows.get(user, [])


@pytest.fixture
def fake(monkeypatch) -> FakeServer:
    server = FakeServer()
    monkeypatch.setattr(pg, "connect", server.connect)
    return server


FAST = LookupSettings("q", "pgsplit_auth", None, "postgres", timeout_s=0.5, cache_ttl_s=5.0, cache_size=8)


def test_a_slow_lookup_for_one_name_does_not_fail_another_names(fake: FakeServer) -> None:
    fake.delay["slow"] = 5.0
    fake.rows["alice"] = [("alice", VERIFIER_TEXT)]

    async def run() -> None:
        lookup = UserLookup(FAST)
        try:
            slow = asyncio.ensure_future(lookup.verifier("slow", backend(1)))
            await asyncio.sleep(0.05)  # its query is running
            t0 = time.monotonic()
            assert (await lookup.verifier("alice", backend(1))).iterations == 4096
            assert await lookup.verifier("bob", backend(1)) is None
            assert time.monotonic() - t0 < 0.3
            with pytest.raises(LookupFailed):
                await slow
        finally:
            lookup.close()

    asyncio.run(run())


def test_clients_of_one_name_share_its_lookup_and_one_that_leaves_does_not_cut_it_off(fake: FakeServer) -> None:
    fake.delay["alice"] = 0.1
    fake.rows["alice"] = [("alice", VERIFIER_TEXT)]

    async def run() -> None:
        lookup = UserLookup(FAST)
        try:
            waiters = [asyncio.ensure_future(lookup.verifier("alice", backend(1))) for _ in range(5)]
            await asyncio.sleep(0.05)  # connected, the query in flight
            waiters[0].cancel()  # a client disconnects
            results = await asyncio.gather(*waiters, return_exceptions=True)
            assert isinstance(results[0], asyncio.CancelledError)
            assert all(isinstance(r, Verifier) for r in results[1:])
            assert fake.queries == ["alice"]  # one query for the five
            # Clients that leave mid-lookup, name after name: the connection stays.
            for i in range(10):
                waiter = asyncio.ensure_future(lookup.verifier(f"gone{i}", backend(1)))
                await asyncio.sleep(0.005)
                waiter.cancel()
                await asyncio.gather(waiter, return_exceptions=True)
            await asyncio.sleep(0.05)
            assert len(fake.opened) <= 3 and fake.open_connections() == len(fake.opened)
            assert sorted(fake.queries[1:]) == sorted(f"gone{i}" for i in range(10))
        finally:
            lookup.close()

    asyncio.run(run())


def test_lookups_run_a_few_at_once_on_as_many_connections(fake: FakeServer) -> None:
    fake.delay.update({f"n{i}": 0.03 for i in range(30)})

    async def run() -> None:
        lookup = UserLookup(FAST, connections=3)
        try:
            t0 = time.monotonic()
            assert await asyncio.gather(*(lookup.verifier(f"n{i}", backend(1)) for i in range(30))) == [None] * 30
            assert time.monotonic() - t0 < 0.45  # 10 rounds of 3 (0.3 s), not 30 in a row (0.9 s)
            assert len(fake.opened) == 3
        finally:
            lookup.close()

    asyncio.run(run())


def test_names_the_server_does_not_have_do_not_evict_the_users_it_has(fake: FakeServer) -> None:
    fake.rows["alice"] = [("alice", VERIFIER_TEXT)]

    async def run() -> None:
        lookup = UserLookup(FAST)  # cache_size 8: 2 "no such user" answers kept
        try:
            await lookup.verifier("alice", backend(1))
            for i in range(50):
                assert await lookup.verifier(f"random{i}", backend(1)) is None
            assert await lookup.verifier("random49", backend(1)) is None
            queries = len(fake.queries)
            assert (await lookup.verifier("alice", backend(1))) is not None
            assert len(fake.queries) == queries  # answered from the cache
        finally:
            lookup.close()

    asyncio.run(run())


def test_close_fails_the_lookups_in_flight_and_leaves_no_connection(fake: FakeServer) -> None:
    fake.delay.update({f"u{i}": 0.2 for i in range(4)})

    async def run() -> None:
        lookup = UserLookup(FAST)
        # three queries in flight, the fourth waiting for a connection
        waiters = [asyncio.ensure_future(lookup.verifier(f"u{i}", backend(1))) for i in range(4)]
        await asyncio.sleep(0.05)
        lookup.close()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert [type(r) for r in results] == [LookupFailed] * 4
        await asyncio.sleep(0.05)
        assert fake.open_connections() == 0
        opened = len(fake.opened)
        with pytest.raises(LookupFailed):
            await lookup.verifier("u9", backend(1))
        await asyncio.sleep(0.05)
        assert len(fake.opened) == opened and fake.open_connections() == 0  # no reconnect

    asyncio.run(run())


def test_a_query_with_more_than_one_row_fails_the_lookup(fake: FakeServer, caplog) -> None:
    fake.rows["alice"] = [("alice", VERIFIER_TEXT), ("alice", VERIFIER_TEXT)]

    async def run() -> None:
        lookup = UserLookup(FAST)
        try:
            with pytest.raises(LookupFailed) as info:
                await lookup.verifier("alice", backend(1))
            assert info.value.message == "authentication lookup failed; see the pgsplit log"
        finally:
            lookup.close()

    with caplog.at_level(logging.WARNING, logger="pgsplit.auth_query"):
        asyncio.run(run())
    assert 'the query returned 2 rows for user "alice" (at most one is allowed)' in caplog.text
