"""proxy.process.lookup against servers that do not answer: real sockets, no PostgreSQL.
A host that takes the TCP connection and says nothing, and a port nobody listens on, each
fail the lookup within its deadline with an error naming the server and the setting."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from proxy.process.lookup import LookupFailed, LookupSettings, UserLookup
from router.topology import BackendState, Role

SETTINGS = LookupSettings("SELECT 1", "pgsplit_auth", "lookup-secret", "postgres",
                          timeout_s=0.5, cache_ttl_s=5.0, cache_size=10)


def backend(port: int) -> BackendState:
    return BackendState(name="main_primary", host="127.0.0.1", port=port, role=Role.PRIMARY)


def test_a_silent_server_fails_the_lookup_within_its_deadline() -> None:
    async def run() -> None:
        held: list[asyncio.StreamWriter] = []

        async def silent(_reader, writer) -> None:
            held.append(writer)  # accepted, never answered

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lookup = UserLookup(SETTINGS)
        try:
            t0 = time.monotonic()
            with pytest.raises(LookupFailed) as info:
                await lookup.verifier("someone", backend(port))
            assert time.monotonic() - t0 < 1.5
            assert info.value.sqlstate == "08006" and info.value.fatal
            assert info.value.message == (f'could not look up user "someone": the auth_query server main_primary '
                                          f"(127.0.0.1:{port}) did not answer within 0.5s (auth_query.timeout_s)")
            assert "lookup-secret" not in info.value.message and "lookup-secret" not in repr(SETTINGS)
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


def test_a_refused_connection_fails_the_lookup_at_once() -> None:
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

    error = asyncio.run(run())
    assert error.message.startswith(f'could not look up user "someone" on the auth_query server main_primary '
                                    f"(127.0.0.1:{port}): ")
