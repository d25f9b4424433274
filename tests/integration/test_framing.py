"""Replies that reach the proxy in pieces cut anywhere, from a real server: a relay with a
bandwidth cap delivers the server's bytes about 1 KB at a time, so messages larger than
that arrive cut mid-body. Every unit must still end at its ReadyForQuery, so that the
server connection goes back to the pool while the client sits idle."""

from __future__ import annotations

from types import SimpleNamespace

import asyncpg

from loadtest.harness import NodeSet, ProxyThread, config_text
from loadtest.relay import LinkProfile, RelayThread


async def test_units_whose_replies_arrive_in_pieces_give_their_connection_back(cluster):
    # 1.6 Mbit/s = 200 kB/s: the relay reads 1,024 bytes at a time (loadtest.relay)
    with RelayThread(cluster.primary.port, LinkProfile(bandwidth_mbit=1.6)) as relay:
        primary = SimpleNamespace(name="primary", host="127.0.0.1", port=relay.port)
        nodes = NodeSet(primary, [], dict(cluster.users), {}, cluster.superuser_password)
        # one server connection for both clients: b gets it only if a's units end
        proxy = ProxyThread(config_text({"main": nodes}, sections={"pool": {"size": 1}})).start()
        a = b = None
        try:
            a = await asyncpg.connect(proxy.dsn(), timeout=10)
            b = await asyncpg.connect(proxy.dsn(), timeout=10)
            for i in range(5):
                size = 3000 + 700 * i  # DataRows of 3-6 kB, cut at different places
                assert len(await a.fetchval("SELECT repeat('x', $1::int)", size, timeout=10)) == size
                assert await b.fetchval("SELECT $1::int + 1", i, timeout=5) == i + 1
                async with a.transaction():
                    assert len(await a.fetchval("SELECT repeat('y', $1::int)", size, timeout=10)) == size
                    assert await a.fetchval("SELECT $1::int * 2", i, timeout=10) == 2 * i
                assert await b.fetchval("SELECT $1::int + 2", i, timeout=5) == i + 2
        finally:
            for conn in (a, b):
                if conn is not None:
                    conn.terminate()
            proxy.stop()
