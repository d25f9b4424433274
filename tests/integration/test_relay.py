"""Region to region in the sandbox: replication through loadtest.relay (a userspace WAN
link, 40 ms one way) stays healthy.

- a streaming replica whose primary_conninfo points at the relay keeps streaming under a
  light write load, with a write lag of about one round trip and a bounded replay lag;
- a logical subscriber (PostgreSQL 18, ops.migrate) reaching its PostgreSQL 15 source
  through the relay copies the data and catches up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

from helpers import wait_until
from loadtest.relay import LinkProfile, RelayThread
from loadtest.sandbox import Cluster, find_bindir
from ops.migrate.copy import start
from ops.migrate.finish import finish
from ops.migrate.handover import logical_catch_up
from ops.migrate.status import status
from ops.migrate.verify import verify
from router.pg import Endpoint

pytestmark = pytest.mark.timeout(180)

DELAY_MS = 40


@dataclass
class Region:
    near: Cluster  # PostgreSQL 15: a primary and one replica
    far: Cluster  # PostgreSQL 18: a primary only, the logical subscriber


@pytest.fixture(scope="module")
def region() -> Iterator[Region]:
    near = Cluster(1, name="relay-near15")
    far = Cluster(0, name="relay-far18", bindir=find_bindir(18))
    try:
        near.start()
        far.start()
        yield Region(near, far)
    finally:
        far.stop()
        near.stop()


def _point_replica_at(cluster: Cluster, port: int) -> None:
    replica = cluster.replicas[0]
    conninfo = (f"host=127.0.0.1 port={port} user=postgres "
                f"application_name={replica.name}")
    cluster.sql(replica, psycopg.sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
        psycopg.sql.Literal(conninfo)))
    cluster.sql(replica, "SELECT pg_reload_conf()")  # the WAL receiver restarts with it
    wait_until(lambda: cluster.sql(replica, "SELECT status, sender_port FROM "
                                            "pg_stat_wal_receiver") == [("streaming", port)],
               30, message=f"{replica.name} to stream through port {port}")


def test_streaming_replica_behind_a_40ms_relay(region: Region) -> None:
    c = region.near
    replica = c.replicas[0]
    c.sql(c.primary, "CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT now(), "
                     "pad text)", dbname="app")
    with RelayThread(c.primary.port, LinkProfile(delay_ms=DELAY_MS, jitter_ms=2)) as relay:
        _point_replica_at(c, relay.port)
        samples = []  # (state, write_lag s, replay_lag s, bytes behind)
        with psycopg.connect(c.primary.local_conninfo(dbname="app"), autocommit=True) as conn:
            t_end = time.monotonic() + 6
            i = 0
            while time.monotonic() < t_end:  # ~50 small transactions a second
                conn.execute("INSERT INTO ticks (pad) VALUES (repeat('x', 200))")
                i += 1
                if i % 10 == 0:
                    samples.append(conn.execute(
                        "SELECT state, extract(epoch FROM write_lag)::float8, "
                        "extract(epoch FROM replay_lag)::float8, "
                        "pg_current_wal_lsn() - replay_lsn FROM pg_stat_replication "
                        "WHERE application_name = %s", (replica.name,)).fetchone())
                time.sleep(0.02)
        lsn = c.wait_caught_up(replica, timeout=30)
        down = relay.stats.bytes_down
    assert all(s is not None and s[0] == "streaming" for s in samples), samples
    write_lags = [s[1] for s in samples if s[1] is not None]
    replay_lags = [s[2] for s in samples if s[2] is not None]
    behind = [int(s[3]) for s in samples]
    print(f"\nreplica behind a {DELAY_MS} ms relay, {i} commits in 6 s: write_lag "
          f"{min(write_lags) * 1000:.0f}-{max(write_lags) * 1000:.0f} ms, replay_lag max "
          f"{max(replay_lags) * 1000:.0f} ms, bytes behind max {max(behind)}; caught up "
          f"at {lsn}")
    # the WAL went through the relay, and the standby's reports took a round trip
    assert down > i * 200
    assert min(write_lags) >= 2 * DELAY_MS / 1000 * 0.9
    assert max(replay_lags) < 1.0
    assert max(behind) < 1024 * 1024
    assert c.sql(replica, "SELECT count(*) FROM ticks", dbname="app") == [(i,)]
    # back to the direct connection, for whatever runs next
    _point_replica_at(c, c.primary.port)


async def test_logical_subscriber_behind_the_relay_catches_up(region: Region) -> None:
    near, far = region.near, region.far
    src = Endpoint("127.0.0.1", near.primary.port, password=near.superuser_password,
                   database="app")
    dst = Endpoint("127.0.0.1", far.primary.port, password=far.superuser_password,
                   database="app")
    near.sql(near.primary, "CREATE TABLE events (id bigint PRIMARY KEY, body text)",
             dbname="app")
    near.sql(near.primary, "INSERT INTO events SELECT g, repeat(md5(g::text), 4) "
                           "FROM generate_series(1, 50000) g", dbname="app")
    profile = LinkProfile(delay_ms=DELAY_MS, jitter_ms=2, bandwidth_mbit=200)
    with RelayThread(near.primary.port, profile) as relay:
        through_relay = (f"host=127.0.0.1 port={relay.port} user=postgres "
                         f"password={near.superuser_password} dbname={{database}}")
        await start(src, dst, source_conninfo=through_relay)
        conn = await asyncpg.connect(host=src.host, port=src.port, user=src.user,
                                     password=src.password, database="app")
        try:
            t0 = time.monotonic()
            for i in range(50_001, 50_501):  # writes during the copy and after it
                await conn.execute("INSERT INTO events VALUES ($1, 'late')", i)
                if i % 7 == 0:
                    await conn.execute("UPDATE events SET body = 'changed' WHERE id = $1",
                                       i - 50_000)
            final = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            st = None
            while not (st := await status(src, dst, previous=st)).ready:
                assert time.monotonic() - t0 < 60, st.render()
            waited = await logical_catch_up(src, dst, final, 60)
            elapsed = time.monotonic() - t0
        finally:
            await conn.close()
        report = await verify(src, dst)
        down = relay.stats.bytes_down
        await finish(src, dst)
    print(f"\nsubscriber behind a {DELAY_MS} ms / 200 Mbit relay: copy and catch-up "
          f"{elapsed:.2f}s (catch-up wait {waited * 1000:.0f} ms), {down / 1e6:.1f} MB "
          f"through the relay")
    assert report.equal, report.render()
    assert report.table("public.events").source_rows == 50_500
    assert down > 50_000 * 128  # the copy and the stream came through the relay
    assert near.sql(near.primary, "SELECT count(*) FROM pg_replication_slots "
                                  "WHERE slot_type = 'logical'") == [(0,)]
