"""router.monitor and router.lsn against the real sandbox cluster.

Lag is made on purpose (paused replay), nodes are killed and restarted; every test puts
the shared cluster back as it found it (replay resumed, nodes running and streaming).
Blocking sandbox calls run in a thread so the monitor keeps polling on the loop meanwhile.
Timings are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from helpers import async_wait_until
from loadtest.sandbox import Cluster
from metrics import Metrics
from router.lsn import REPLAY_WAIT_SQL, CommitLsnFetcher, format_lsn, parse_lsn
from router.monitor.lag import initial_topology
from router.monitor.monitor import Monitor
from router.monitor.probe import MonitorSettings
from router.topology import BackendSpec, Role, Topology, TopologyHolder

INTERVAL = 0.1
# uvloop's loop.time() counts whole milliseconds: an interval read from it is off by up to one
CLOCK_TICK = 0.001
SMALL_LAG = 64 * 1024


def specs_of(cluster: Cluster, **limits: dict) -> list[BackendSpec]:
    out = []
    for node in cluster.nodes:
        role = Role.PRIMARY if node is cluster.primary else Role.REPLICA
        out.append(BackendSpec(node.name, node.host, node.port, role, **limits.get(node.name, {})))
    return out


def settings_of(cluster: Cluster, **kw) -> MonitorSettings:
    kw = {"interval_s": INTERVAL, "timeout_s": 1.0, **kw}
    return MonitorSettings(user="postgres", password=cluster.superuser_password, dbname="postgres", **kw)


MakeMonitor = Callable[..., Awaitable[Monitor]]


@pytest.fixture
async def make_monitor(cluster: Cluster) -> AsyncIterator[MakeMonitor]:
    monitors: list[Monitor] = []

    async def make(limits: dict | None = None, start: bool = True, **kw) -> Monitor:
        specs = specs_of(cluster, **(limits or {}))
        holder = TopologyHolder(initial_topology("it", specs))
        m = Monitor(holder, specs, settings_of(cluster, **kw), Metrics())
        monitors.append(m)
        if start:
            await m.start()
        return m

    yield make
    for m in monitors:
        await m.stop()


@pytest.fixture
async def primary_conn(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(**cluster.primary.conninfo_kwargs())
    await conn.execute("CREATE TABLE IF NOT EXISTS monitor_fill (id bigserial PRIMARY KEY, pad text)")
    yield conn
    await conn.close()


async def write_wal(conn: asyncpg.Connection, kbytes: int) -> None:
    """Commit about `kbytes` kB of new rows (a little more WAL than that)."""
    await conn.execute("INSERT INTO monitor_fill (pad) SELECT repeat(md5(g::text), 32) "
                       "FROM generate_series(1, $1) AS g", kbytes)


async def until(holder: TopologyHolder, predicate: Callable[[Topology], bool], timeout: float) -> float:
    """Seconds until an installed snapshot satisfies `predicate` (checked at each install)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate(holder.current):
        remaining = start + timeout - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"no snapshot satisfied the condition within {timeout} s; last: {holder.current}")
        await holder.wait_changed(remaining)
    return loop.time() - start


def replica(topo: Topology, name: str):
    b = topo.backend(name)
    assert b is not None
    return b


async def restore(cluster: Cluster) -> None:
    """Every node running, replay resumed, replicas streaming and caught up."""
    for node in cluster.nodes:
        if not node.is_running():
            await asyncio.to_thread(cluster.start_node, node)
    for node in cluster.replicas:
        state = (await asyncio.to_thread(cluster.sql, node, "SELECT pg_get_wal_replay_pause_state()"))[0][0]
        if state != "not paused":
            await asyncio.to_thread(cluster.resume_replay, node)
        await asyncio.to_thread(cluster.wait_streaming, node)
    await asyncio.to_thread(cluster.wait_caught_up)


# --- first picture ------------------------------------------------------------------------------


async def test_first_round_gives_roles_and_lsns(cluster: Cluster, make_monitor: MakeMonitor) -> None:
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor()
    t = m.holder.current
    assert t.primary.name == "primary" and t.primary.up and t.primary.in_recovery is False
    assert t.primary_lsn is not None and t.primary_lsn > 0 and t.primary_writable
    for r in t.replicas:
        assert r.up and r.in_recovery is True and r.replay_lsn is not None and r.receive_lsn is not None
        assert r.lag_bytes is not None and r.lag_bytes < 1024 * 1024
    assert [r.name for r in t.rotation] == ["replica1", "replica2"]
    text = m.metrics.exposition().decode()
    assert 'pgsplit_backend_up{backend="primary",role="primary"} 1.0' in text
    assert 'pgsplit_replica_in_rotation{backend="replica1"} 1.0' in text
    assert "pgsplit_split_brain 0.0" in text


# --- lag filtering ------------------------------------------------------------------------------


async def test_paused_replica_leaves_rotation_and_returns(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pgsplit.monitor")
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor(limits={"replica1": {"max_lag_bytes": SMALL_LAG}})
    holder = m.holder
    try:
        await asyncio.to_thread(cluster.pause_replay, "replica1")
        assert replica(holder.current, "replica1").in_rotation
        loop = asyncio.get_running_loop()
        await write_wal(primary_conn, 256)  # ~300 kB of WAL: well past 64 kB
        committed = loop.time()
        waited = await until(holder, lambda t: not replica(t, "replica1").in_rotation, 5.0)
        left_after = loop.time() - committed
        r1 = replica(holder.current, "replica1")
        print(f"\npaused replica left rotation {left_after * 1000:.1f} ms after the commit "
              f"(lag {r1.lag_bytes} bytes)")
        assert r1.up and r1.lag_bytes is not None and r1.lag_bytes > SMALL_LAG
        assert left_after <= 2 * INTERVAL + 0.05, left_after
        assert waited <= left_after + 0.001
        assert replica(holder.current, "replica2").in_rotation  # the other one still serves
        assert 'pgsplit_replica_in_rotation{backend="replica1"} 0.0' in m.metrics.exposition().decode()

        await asyncio.to_thread(cluster.resume_replay, "replica1")
        back = await until(holder, lambda t: replica(t, "replica1").in_rotation, 10.0)
        print(f"resumed replica back in rotation after {back * 1000:.1f} ms")
        r1 = replica(holder.current, "replica1")
        assert r1.lag_bytes is not None and r1.lag_bytes < SMALL_LAG // 2
    finally:
        await restore(cluster)
    messages = [r.getMessage() for r in caplog.records if r.name == "pgsplit.monitor"]
    assert any("replica1" in msg and "left rotation" in msg and "max_lag_bytes 65536" in msg for msg in messages)
    assert any("replica1" in msg and "joined rotation" in msg for msg in messages)
    assert len(messages) < 10, messages  # state changes only, not every poll


async def test_idle_primary_does_not_make_replicas_lag_in_seconds(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection,
) -> None:
    # With a 0.5 s time limit, "now - last replayed commit" alone would throw both replicas
    # out after half a second of quiet.
    limits = {name: {"max_lag_seconds": 0.5} for name in ("replica1", "replica2")}
    await write_wal(primary_conn, 1)
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor(limits=limits)
    await asyncio.sleep(1.0)
    seen: list[Topology] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.5
    while loop.time() < end:
        if await m.holder.wait_changed(end - loop.time()):
            seen.append(m.holder.current)
    assert len(seen) >= 10
    for t in seen:
        for r in t.replicas:
            assert r.in_rotation and r.lag_seconds == 0.0 and r.lag_bytes == 0, r
    age = (await asyncio.to_thread(
        cluster.sql, "replica1",
        "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"))[0][0]
    print(f"\nidle: {len(seen)} rounds, replicas at lag 0 s; last replayed commit {age:.1f} s old")


async def test_killed_replica_is_down_in_the_next_round_and_comes_back(
    cluster: Cluster, make_monitor: MakeMonitor,
) -> None:
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor()
    holder = m.holder
    loop = asyncio.get_running_loop()
    try:
        kill = loop.time()
        await asyncio.to_thread(cluster.kill_node, "replica2")  # SIGKILL, then waits for the port to close
        killed = loop.time()
        await until(holder, lambda t: not replica(t, "replica2").up, 5.0)
        down_after = loop.time() - killed
        r2 = replica(holder.current, "replica2")
        print(f"\nkilled replica marked down {(loop.time() - kill) * 1000:.1f} ms after kill_node began "
              f"(which took {(killed - kill) * 1000:.1f} ms): {r2.error}")
        assert down_after <= 2 * INTERVAL + 0.05
        assert not r2.in_rotation and r2.error
        assert [r.name for r in holder.current.rotation] == ["replica1"]
        assert holder.current.primary.up
        assert 'pgsplit_backend_up{backend="replica2",role="replica"} 0.0' in m.metrics.exposition().decode()

        restart = loop.time()
        await asyncio.to_thread(cluster.start_node, "replica2")  # returns once it accepts connections
        accepting = loop.time()
        await until(holder, lambda t: replica(t, "replica2").up and replica(t, "replica2").in_rotation, 15.0)
        print(f"restarted replica back in rotation {(loop.time() - restart) * 1000:.1f} ms after "
              f"pg_ctl start began ({(accepting - restart) * 1000:.1f} ms until it accepted connections)")
    finally:
        await restore(cluster)


# 300 ms: the poll times out on the tick of a round; 375 ms: after a round's wait (half an
# interval), before the next round.
# Either way the next round's poll, on a new connection, answers at once: the failure must
# still be installed by a round.
@pytest.mark.parametrize("timeout_s", [0.3, 0.375])
async def test_a_hung_replica_does_not_hold_back_the_others(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection, timeout_s: float,
) -> None:
    # SIGSTOP the server process behind the monitor's poll connection to replica2: its
    # polls hang (the server itself still accepts new connections).
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor(timeout_s=timeout_s)
    holder = m.holder
    loop = asyncio.get_running_loop()
    rows = await asyncio.to_thread(
        cluster.sql, "replica2",
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgsplit-monitor (poll)' "
        "ORDER BY backend_start DESC LIMIT 1")
    pid = rows[0][0]
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = loop.time()
        before = holder.current.primary_lsn
        await write_wal(primary_conn, 4)
        # Rounds keep their pace and the others' figures move while replica2's poll hangs.
        installs = []
        while loop.time() - stopped < 0.25:
            if await holder.wait_changed(0.25):
                installs.append(holder.current)
        assert replica(installs[-1], "replica2").up  # not yet past its timeout
        assert len(installs) >= 2, [t.polled_at for t in installs]
        assert installs[-1].primary_lsn is not None and before is not None and installs[-1].primary_lsn > before
        assert replica(installs[-1], "replica1").replay_lsn >= installs[-1].primary_lsn - 65536
        await until(holder, lambda t: not replica(t, "replica2").up, 1.0)
        down_after = loop.time() - stopped
        r2 = replica(holder.current, "replica2")
        print(f"\nhung replica marked down after {down_after * 1000:.0f} ms (timeout {timeout_s * 1000:.0f} ms): "
              f"{r2.error}; {len(installs)} rounds installed meanwhile")
        assert f"no answer within {timeout_s * 1000:.0f} ms" in (r2.error or "")
        assert timeout_s <= down_after <= timeout_s + 2 * INTERVAL + 0.05
        assert [r.name for r in holder.current.rotation] == ["replica1"]
        # A new connection to the (still running) server answers: it comes back.
        await until(holder, lambda t: replica(t, "replica2").in_rotation, 3.0)
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_mark_down_takes_a_replica_out_at_once_until_a_later_poll(
    cluster: Cluster, make_monitor: MakeMonitor,
) -> None:
    m = await make_monitor()
    m.mark_down("replica1", "a server connection failed")
    r1 = replica(m.holder.current, "replica1")
    assert not r1.up and not r1.in_rotation and r1.error == "a server connection failed"
    assert [r.name for r in m.holder.current.rotation] == ["replica2"]
    # The replica is fine: the next poll sent after mark_down brings it back.
    await until(m.holder, lambda t: replica(t, "replica1").in_rotation, 2.0)


async def test_mark_down_of_the_primary_is_confirmed_by_a_poll_not_believed(
    cluster: Cluster, make_monitor: MakeMonitor,
) -> None:
    m = await make_monitor()
    rounds = m.rounds
    m.mark_down("primary", "a server connection failed")
    assert m.holder.current.primary.up and m.holder.current.primary_writable
    await async_wait_until(lambda: m.rounds > rounds, timeout=0.05, interval=0.002,
                           message="an immediate confirmation round")
    assert m.holder.current.primary.up


# --- read-your-writes ---------------------------------------------------------------------------


async def test_wait_for_lsn_returns_quickly_after_a_write(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection,
) -> None:
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor()
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(20):
        await write_wal(primary_conn, 1)
        # The flush position, as a synchronous commit's token: the insert position can be
        # ahead of flushed WAL (anything else writing), which no replica has until the
        # WAL writer flushes it, up to wal_writer_delay (200 ms) later.
        lsn = parse_lsn(await primary_conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
        start = loop.time()
        assert await m.wait_for_lsn(lsn, 2.0)
        times.append(loop.time() - start)
        assert any(r.replay_lsn is not None and r.replay_lsn >= lsn for r in m.holder.current.rotation)
        await asyncio.sleep(0.013)  # land at different points of the regular interval
    times.sort()
    print(f"\nwait_for_lsn after a write: median {times[10] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms")
    assert times[10] < 0.015 and times[-1] < INTERVAL


async def test_a_wanted_lsn_is_learnt_between_rounds(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection,
) -> None:
    """want_lsn (every commit of a session that reads its writes) has the replicas report
    the replay themselves: known long before the next round, with nobody waiting."""
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor(interval_s=5.0)  # no round in between
    await asyncio.sleep(0.2)
    rounds = m.rounds
    loop = asyncio.get_running_loop()
    for _ in range(10):
        await write_wal(primary_conn, 1)
        lsn = parse_lsn(await primary_conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
        start = loop.time()
        m.want_lsn(lsn)
        await async_wait_until(lambda: all(r.replay_lsn is not None and r.replay_lsn >= lsn
                                           for r in m.holder.current.rotation), timeout=1.0,
                               message="both replicas reported the replay")
        assert loop.time() - start < 0.1 + CLOCK_TICK
    assert m.rounds == rounds
    assert 10 <= m.replay_waits <= 40, m.replay_waits  # about one query per replica and commit


async def test_the_replay_wait_query_ends_at_the_replay_or_its_timeout(
    cluster: Cluster, primary_conn: asyncpg.Connection,
) -> None:
    await asyncio.to_thread(cluster.wait_caught_up)
    replica = await asyncpg.connect(cluster.node("replica2").dsn(user="postgres", password=cluster.superuser_password))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(cluster.pause_replay, "replica2")
        await write_wal(primary_conn, 1)
        lsn = parse_lsn(await primary_conn.fetchval("SELECT pg_current_wal_flush_lsn()::text"))
        start = loop.time()
        reached = parse_lsn(await replica.fetchval(REPLAY_WAIT_SQL, format_lsn(lsn), 300))
        assert reached < lsn and 0.3 <= loop.time() - start < 0.45
        waiter = asyncio.create_task(replica.fetchval(REPLAY_WAIT_SQL, format_lsn(lsn), 5000))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await asyncio.to_thread(cluster.resume_replay, "replica2")
        assert parse_lsn(await waiter) >= lsn
        # A server not in recovery cannot say: NULL, at once.
        start = loop.time()
        assert await primary_conn.fetchval(REPLAY_WAIT_SQL, format_lsn(lsn), 5000) is None
        assert loop.time() - start < 0.1
    finally:
        await replica.close()
        await restore(cluster)


async def test_wait_for_lsn_times_out_while_replay_is_paused(
    cluster: Cluster, make_monitor: MakeMonitor, primary_conn: asyncpg.Connection,
) -> None:
    await asyncio.to_thread(cluster.wait_caught_up)
    m = await make_monitor()
    loop = asyncio.get_running_loop()
    try:
        for node in ("replica1", "replica2"):
            await asyncio.to_thread(cluster.pause_replay, node)
        await write_wal(primary_conn, 1)
        lsn = parse_lsn(await primary_conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
        rounds = m.rounds
        start = loop.time()
        assert not await m.wait_for_lsn(lsn, 0.3)
        elapsed = loop.time() - start
        assert 0.3 - CLOCK_TICK <= elapsed < 0.45
        assert len(m.holder.current.rotation) == 2  # lagging a little, still in rotation
        assert 1 <= m.replay_waits <= 2 * 4, m.replay_waits  # a wait query per replica and round
        assert m.rounds - rounds <= 4  # the regular rounds kept their pace
        # Resumed: a waiter is released as soon as a replica replays the write.
        waiter = asyncio.create_task(m.wait_for_lsn(lsn, 5.0))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        resumed = loop.time()
        await asyncio.to_thread(cluster.resume_replay, "replica2")
        assert await waiter
        print(f"\nwaiter released {(loop.time() - resumed) * 1000:.1f} ms after pg_wal_replay_resume() was sent")
    finally:
        await restore(cluster)


async def test_commit_lsn_fetcher_covers_commits(cluster: Cluster, make_monitor: MakeMonitor) -> None:
    """Every session's fetched LSN is at or past the end of its own commit record, read
    exactly from the WAL with pg_walinspect; concurrent sessions share queries."""
    m = await make_monitor(start=False)
    async def flush_lsn() -> int:  # synchronous commits: the flush position covers them
        return (await m.primary_commit_lsns()).covering(False)

    fetcher = CommitLsnFetcher(flush_lsn)
    admin = await asyncpg.connect(**cluster.primary.conninfo_kwargs())
    await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
    sessions = [await asyncpg.connect(**cluster.primary.conninfo_kwargs()) for _ in range(20)]
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS monitor_commits (id serial PRIMARY KEY, who int)")
        start_lsn = await admin.fetchval("SELECT pg_current_wal_insert_lsn()::text")

        async def commit_then_fetch(i: int, conn: asyncpg.Connection) -> tuple[int, int]:
            async with conn.transaction():
                await conn.execute("INSERT INTO monitor_commits (who) VALUES ($1)", i)
                xid = int(await conn.fetchval("SELECT pg_current_xact_id()::text"))
            ticket = fetcher.ticket()  # the commit's ReadyForQuery has arrived
            return xid, await fetcher.fetch_after(ticket)

        results = await asyncio.gather(*(commit_then_fetch(i, c) for i, c in enumerate(sessions)))
        end_lsn = await admin.fetchval("SELECT pg_current_wal_flush_lsn()::text")
        rows = await admin.fetch(
            "SELECT xid::text::bigint AS xid, end_lsn::text FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn) "
            "WHERE resource_manager = 'Transaction' AND record_type = 'COMMIT'", start_lsn, end_lsn)
        commit_end = {r["xid"]: parse_lsn(r["end_lsn"]) for r in rows}
        for xid, fetched in results:
            assert xid in commit_end
            assert fetched >= commit_end[xid], (xid, fetched, commit_end[xid])
        assert fetcher.queries_sent < len(sessions)
        print(f"\n{len(sessions)} concurrent commits: {fetcher.queries_sent} primary LSN queries")

        # One session: the LSN of a query sent after the ticket, not an older one.
        conn = sessions[0]
        before = fetcher.queries_sent
        await conn.execute("INSERT INTO monitor_commits (who) VALUES (-1)")
        ticket = fetcher.ticket()
        after_commit = parse_lsn(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
        fetched = await fetcher.fetch_after(ticket)
        assert fetcher.queries_sent == before + 1
        assert fetched >= after_commit  # the commit was flushed before pg_current_wal_lsn() ran
        assert await fetcher.fetch_current() >= fetched
    finally:
        for c in sessions:
            await c.close()
        await admin.execute("DROP EXTENSION IF EXISTS pg_walinspect")
        await admin.close()
        await m.stop()


async def test_primary_commit_lsns_error_is_clear(cluster: Cluster) -> None:
    specs = [BackendSpec("nowhere", "127.0.0.1", 1, Role.PRIMARY)]
    m = Monitor(TopologyHolder(initial_topology("x", specs)), specs, settings_of(cluster))
    try:
        with pytest.raises(Exception, match=r"WAL position of primary nowhere \(127.0.0.1:1\), connect"):
            await m.primary_commit_lsns()
    finally:
        await m.stop()


# --- catalog and cutover ------------------------------------------------------------------------


async def test_volatile_function_catalog_is_read_from_the_primary(cluster: Cluster, make_monitor: MakeMonitor) -> None:
    await asyncio.to_thread(cluster.sql, "primary",
                            "CREATE OR REPLACE FUNCTION public.monitor_bump() RETURNS int "
                            "LANGUAGE sql VOLATILE AS 'SELECT 1'")
    got: list[frozenset[str]] = []
    specs = specs_of(cluster)
    m = Monitor(TopologyHolder(initial_topology("it", specs)), specs, settings_of(cluster), None,
                on_volatile_functions=got.append)
    try:
        await m.start()
        await async_wait_until(lambda: got, timeout=5, message="the first catalog refresh")
        assert "monitor_bump" in got[0] and "public.monitor_bump" in got[0]
    finally:
        await m.stop()
        await asyncio.to_thread(cluster.sql, "primary", "DROP FUNCTION IF EXISTS public.monitor_bump()")


async def test_retarget_installs_the_new_set_with_the_next_generation(
    cluster: Cluster, make_monitor: MakeMonitor,
) -> None:
    m = await make_monitor()
    gen = m.holder.current.generation
    # The "next" set: the same servers under other names, replica2 left out.
    specs = [BackendSpec("p", cluster.primary.host, cluster.primary.port, Role.PRIMARY),
             BackendSpec("r1", cluster.node("replica1").host, cluster.node("replica1").port, Role.REPLICA)]
    t = await m.retarget("next", specs)
    assert m.holder.current is t
    assert t.cluster == "next" and t.generation == gen + 1
    assert [b.name for b in t.backends] == ["p", "r1"] and all(b.up for b in t.backends)
    assert t.primary_lsn is not None and [r.name for r in t.rotation] == ["r1"]
    await until(m.holder, lambda t2: t2.polled_at > t.polled_at, 2.0)
    assert m.holder.current.cluster == "next" and m.holder.current.generation == gen + 1
    text = m.metrics.exposition().decode()
    assert 'backend="replica2"' not in text and 'pgsplit_topology_generation 2.0' in text


async def poll_sessions(cluster: Cluster, node: str) -> set[int]:
    rows = await asyncio.to_thread(cluster.sql, node, "SELECT pid FROM pg_stat_activity "
                                   "WHERE application_name LIKE 'pgsplit-monitor (poll)%'")
    return {pid for (pid,) in rows}


async def test_a_staged_set_is_switched_to_without_logging_in_again(
    cluster: Cluster, make_monitor: MakeMonitor,
) -> None:
    """A cutover's warm-up stages the target set: the switch (made while clients are held)
    then polls over connections opened before it instead of logging in (several round
    trips to a distant target). A staged set that is not switched to is logged out."""
    m = await make_monitor()
    specs = [BackendSpec("p", cluster.primary.host, cluster.primary.port, Role.PRIMARY),
             BackendSpec("r1", cluster.node("replica1").host, cluster.node("replica1").port, Role.REPLICA)]
    before = await poll_sessions(cluster, "replica1")  # the running set's own poller
    assert await m.stage("next", specs) == 2
    staged = await poll_sessions(cluster, "replica1") - before
    assert len(staged) == 1
    await m.unstage()
    for _ in range(50):
        if not staged & await poll_sessions(cluster, "replica1"):
            break
        await asyncio.sleep(0.05)
    assert not staged & await poll_sessions(cluster, "replica1"), "an unstaged login stayed open"

    assert await m.stage("next", specs) == 2
    staged = await poll_sessions(cluster, "replica1") - before
    t = await m.retarget("next", specs)
    assert t.cluster == "next" and all(b.up for b in t.backends)
    await until(m.holder, lambda t2: t2.polled_at > t.polled_at, 2.0)
    now = await poll_sessions(cluster, "replica1")
    assert staged <= now <= staged | before, (staged, before, now)  # no other login


async def test_flush_position_misses_an_asynchronous_commit_that_the_insert_position_covers(
        cluster: Cluster, make_monitor: MakeMonitor) -> None:
    """Why read-your-writes fetches both positions: a commit with synchronous_commit = off
    returns before its WAL is flushed, so only the insert position is sure to cover it.
    The flush position can be behind the commit here (the WAL writer flushes it later)."""
    m = await make_monitor(start=False)
    conn = await asyncpg.connect(**cluster.primary.conninfo_kwargs())
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS monitor_async (id serial PRIMARY KEY)")
        await conn.execute("SET synchronous_commit = off")
        behind = 0
        for _ in range(20):
            await conn.execute("INSERT INTO monitor_async DEFAULT VALUES")
            committed = parse_lsn(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
            lsns = await m.primary_commit_lsns()
            assert lsns.covering(True) >= committed  # the insert position always covers it
            behind += lsns.covering(False) < committed
        print(f"\nflush position behind an asynchronous commit in {behind} of 20 cases")
    finally:
        await conn.execute("DROP TABLE IF EXISTS monitor_async")
        await conn.close()
        await m.stop()
