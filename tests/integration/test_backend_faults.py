"""A backend that stops answering, or one server connection that is lost, through pgsplit.

A node is stopped with SIGSTOP (postmaster and every backend: the kernel still accepts and
acknowledges, nothing answers, as in a network partition) and always continued in a
`finally`; single server connections are ended with pg_terminate_backend. Each test says
what a client sees and how long it may wait, and checks the rotation afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest

from helpers import async_wait_until
from loadtest.sandbox import Cluster
from loadtest.sandbox.processes import _children

OUTAGE_S = 8.0
# The monitor's default verdict (routing.monitor_timeout_ms = 1000, three timed-out polls
# for a primary) plus pool.down_backend_wait_s (1 s), the check's period and a margin for
# a loaded machine: far below the outage.
BOUND_S = 4.5


def asyncpg_dsn(proxy) -> str:
    return f"postgresql://app:app-secret@127.0.0.1:{proxy.port}/app"


@contextmanager
def stopped(cluster: Cluster, name: str) -> Iterator[None]:
    """SIGSTOP a node's postmaster and all its processes; SIGCONT them on the way out."""
    postmaster = cluster.node(name).pid
    assert postmaster is not None, f"{name} is not running"
    pids = [postmaster, *_children(postmaster)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def rotation(proxy) -> list[str]:
    return sorted(r.name for r in proxy.proxy.topology.current.rotation)


async def back_in_rotation(proxy, n: int = 2) -> None:
    await async_wait_until(lambda: len(rotation(proxy)) == n and proxy.proxy.topology.current.primary_writable,
                           timeout=30, message="every backend back in rotation")


async def run_for(seconds: float, conns: list[asyncpg.Connection], sql: str, *args) -> list[list[tuple]]:
    """Each connection runs `sql` in a loop for `seconds`; per statement (start offset,
    duration, error or None). A statement that outlives its bound is cut off by the test."""
    loop = asyncio.get_running_loop()
    t_end = loop.time() + seconds

    async def one(conn: asyncpg.Connection) -> list[tuple]:
        out = []
        while loop.time() < t_end:
            t0 = loop.time()
            try:
                await asyncio.wait_for(conn.fetchval(sql, *args), OUTAGE_S + 10)
                err = None
            except asyncpg.PostgresError as exc:
                err = exc
            except TimeoutError as exc:
                err = exc
            out.append((t0, loop.time() - t0, err))
            if err is not None:
                await asyncio.sleep(0.05)
        return out

    return await asyncio.gather(*(one(c) for c in conns))


async def stop_all(work: asyncio.Task | None, conns: list[asyncpg.Connection]) -> None:
    if work is not None and not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
    for c in conns:
        c.terminate()


# --- a backend that stops answering -----------------------------------------------------------


async def test_reads_in_flight_on_a_stopped_replica_are_sent_elsewhere(cluster, make_proxy):
    proxy = make_proxy(routing={"consistency": "eventual"})
    await back_in_rotation(proxy)
    conns = [await asyncpg.connect(asyncpg_dsn(proxy), timeout=10) for _ in range(12)]
    work = None
    try:
        work = asyncio.create_task(run_for(OUTAGE_S + 1.5, conns, "SELECT 1 FROM pg_sleep(0.05)"))
        await asyncio.sleep(0.5)
        with stopped(cluster, "replica1"):
            t_stop = asyncio.get_running_loop().time()
            await asyncio.sleep(OUTAGE_S)
        results = await asyncio.wait_for(work, 30)
    finally:
        await stop_all(work, conns)
    spanning = [(t0 - t_stop, d) for rs in results for t0, d, err in rs if t0 < t_stop and t0 + d > t_stop]
    slowest = max(d for rs in results for _, d, _ in rs)
    errors = [err for rs in results for _, _, err in rs if err is not None]
    print(f"\n{len(spanning)} reads in flight when replica1 stopped; slowest read {slowest:.2f} s "
          f"(outage {OUTAGE_S:g} s); errors: {errors[:3]}")
    assert errors == []
    assert slowest < BOUND_S, f"a read waited {slowest:.1f} s on the stopped replica (outage {OUTAGE_S:g} s)"
    await back_in_rotation(proxy)


async def test_writes_in_flight_on_a_stopped_primary_fail_with_outcome_unknown(cluster, make_proxy):
    table = f"bf_w_{uuid.uuid4().hex[:8]}"
    cluster.sql(cluster.primary, f"CREATE TABLE {table} (v int)", dbname="app")
    cluster.sql(cluster.primary, f"GRANT ALL ON {table} TO app", dbname="app")
    proxy = make_proxy()
    await back_in_rotation(proxy)
    conns = [await asyncpg.connect(asyncpg_dsn(proxy), timeout=10) for _ in range(8)]
    in_tx = await asyncpg.connect(asyncpg_dsn(proxy), timeout=10)
    work = None
    try:
        await in_tx.execute(f"BEGIN; INSERT INTO {table} VALUES (2)")
        work = asyncio.create_task(run_for(OUTAGE_S + 1.5, conns, f"INSERT INTO {table} VALUES (1)"))
        await asyncio.sleep(0.5)
        with stopped(cluster, "primary"):
            loop = asyncio.get_running_loop()
            t_stop = loop.time()
            try:
                await asyncio.wait_for(in_tx.execute("COMMIT"), OUTAGE_S + 10)
                commit = None
            except asyncpg.PostgresError as exc:
                commit = exc
            commit_waited = loop.time() - t_stop
            await asyncio.sleep(max(0.0, OUTAGE_S - commit_waited))
        results = await asyncio.wait_for(work, 30)
    finally:
        await stop_all(work, [*conns, in_tx])
        cluster.sql(cluster.primary, f"DROP TABLE {table}", dbname="app")
    slowest = max(d for rs in results for _, d, _ in rs)
    firsts = [next((err for _, _, err in rs if err is not None), None) for rs in results]
    print(f"\nslowest write {slowest:.2f} s (outage {OUTAGE_S:g} s); first errors: "
          f"{sorted({(getattr(e, 'sqlstate', None), str(e)) for e in firsts})}")
    assert slowest < BOUND_S, f"a write waited {slowest:.1f} s on the stopped primary (outage {OUTAGE_S:g} s)"
    print(f"COMMIT in flight: {commit_waited:.2f} s, {commit!r}")
    # The transaction's end is unknown: FATAL (asyncpg: the connection ended after it).
    assert commit_waited < BOUND_S
    assert "while the transaction was committing; its outcome is unknown" in str(commit), commit
    for err in firsts:  # every writer had an INSERT in flight when the primary stopped
        assert isinstance(err, asyncpg.PostgresError) and err.sqlstate == "08006", err
        assert "outcome is unknown" in str(err), err
    await back_in_rotation(proxy)


async def test_server_sockets_have_keepalive_and_a_user_timeout(cluster, make_proxy):
    """A partitioned backend acknowledges nothing: TCP must give up on it (keepalive probes
    on an idle connection, TCP_USER_TIMEOUT on unacknowledged data), as configured."""
    proxy = make_proxy(pool={"keepalive_idle_s": 7, "keepalive_interval_s": 2, "keepalive_count": 4,
                             "tcp_user_timeout_s": 2.5})
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=10)
    try:
        await conn.fetchval("SELECT 1")
        await conn.execute("CREATE TEMP TABLE t (x int)")  # pins a primary connection too
        socks = [c.transport.get_extra_info("socket") for pool in proxy.proxy.pools
                 for c in (*pool.idle, *pool.busy)]
        assert len(socks) >= 2
        for sock in socks:
            got = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                   sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
            assert got == (1, 7, 2, 4, 2500), got
    finally:
        await conn.close(timeout=5)


# --- one lost server connection -----------------------------------------------------------------


class RotationWatch:
    """Samples the proxy's rotation every few ms while running: its smallest size."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.smallest = 99
        self.down_events: set[str] = set()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            topo = self.proxy.proxy.topology.current
            self.smallest = min(self.smallest, len(topo.rotation))
            self.down_events |= {b.name for b in topo.backends if not b.up}
            await asyncio.sleep(0.003)

    async def __aenter__(self) -> RotationWatch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


KILL_ME = "bf_kill_me"
ENDED = "connection was closed in the middle of operation"  # asyncpg, after a FATAL and the end


@pytest.fixture(scope="module")
def kill_me(cluster):
    """A STABLE function (so a read, routed to a replica) that ends its own backend."""
    cluster.sql(cluster.primary, f"CREATE OR REPLACE FUNCTION {KILL_ME}() RETURNS boolean STABLE "
                                 "LANGUAGE sql AS 'SELECT pg_terminate_backend(pg_backend_pid())'", dbname="app")
    cluster.wait_caught_up()
    yield f"SELECT {KILL_ME}()"
    cluster.sql(cluster.primary, f"DROP FUNCTION {KILL_ME}()", dbname="app")


def retries(proxy) -> float:
    return sum(v for (reason,), v in _retry_counts(proxy).items())


def _retry_counts(proxy) -> dict:
    return {tuple(s.labels.values()): s.value for m in proxy.proxy.metrics.retries.collect()
            for s in m.samples if s.name.endswith("_total")}


async def test_terminating_pooled_replica_connections_leaves_rotation_intact(cluster, make_proxy):
    proxy = make_proxy(routing={"consistency": "eventual"})
    await back_in_rotation(proxy)
    marker = f"bf_term_{uuid.uuid4().hex[:8]}"
    conns = [await asyncpg.connect(asyncpg_dsn(proxy), timeout=10) for _ in range(6)]
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def reader(i: int) -> int:
        conn, n = conns[i], 0
        while not stop.is_set():
            if conn.is_closed():  # (it ended after the server's FATAL, as PostgreSQL's would)
                conn = conns[i] = await asyncpg.connect(asyncpg_dsn(proxy), timeout=10)
            try:
                await asyncio.wait_for(conn.fetchval(f"SELECT 1 FROM pg_sleep(0.02) /* {marker} */"), 10)
                n += 1
            except asyncpg.PostgresError as exc:
                errors.append(exc)
        return n

    def terminate() -> int:
        killed = 0
        for node in cluster.replicas:
            killed += len(cluster.sql(node, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                            "WHERE usename = 'app' AND pid <> pg_backend_pid()"))
        return killed

    try:
        async with RotationWatch(proxy) as watch:
            readers = [asyncio.create_task(reader(i)) for i in range(len(conns))]
            killed = 0
            for _ in range(20):
                await asyncio.sleep(0.1)
                killed += await asyncio.to_thread(terminate)
            stop.set()
            done = await asyncio.wait_for(asyncio.gather(*readers), 20)
    finally:
        stop.set()
        for c in conns:
            c.terminate()
    kinds = sorted({f"{e.sqlstate} {e}" for e in errors})
    print(f"\n{killed} replica connections terminated, {sum(done)} reads, {len(errors)} errors; "
          f"smallest rotation {watch.smallest}, down: {sorted(watch.down_events)}; errors seen: {kinds}")
    assert killed > 20
    assert watch.smallest == 2 and not watch.down_events
    # A read whose server was terminated under it gets PostgreSQL's own FATAL, and its
    # connection ends (asyncpg reports that as 08003 with the server's message); one that
    # found its connection already gone gets 08006 and its session lives on.
    assert set(kinds) <= {
        f"08003 {ENDED}: terminating connection due to administrator command",
        *(f"08006 server connection to backend main_replica{i} was lost during the query" for i in (1, 2)),
    }, kinds


@pytest.mark.parametrize("times", [10])
async def test_a_read_that_ends_its_own_server_is_not_retried_and_ends_the_session(
        cluster, make_proxy, kill_me, times):
    proxy = make_proxy(routing={"consistency": "eventual"})
    await back_in_rotation(proxy)
    r0 = retries(proxy)
    async with RotationWatch(proxy) as watch:
        for _ in range(times):
            conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=10)
            try:
                with pytest.raises(asyncpg.ConnectionDoesNotExistError,
                                   match=f"{ENDED}: terminating connection due to administrator command"):
                    await asyncio.wait_for(conn.fetchval(kill_me), 10)
                await async_wait_until(conn.is_closed, timeout=5, message="the client connection to end")
            finally:
                conn.terminate()
    print(f"\n{times} self-terminating reads: retries {retries(proxy) - r0:g}, smallest rotation {watch.smallest}, "
          f"down: {sorted(watch.down_events)}")
    assert retries(proxy) == r0
    assert watch.smallest == 2 and not watch.down_events


# --- pg_terminate_backend of the client's own backend -------------------------------------------


@pytest.mark.parametrize("where", ["primary", "replica"])
def test_psycopg_sees_its_connection_end_after_a_server_fatal(cluster, make_proxy, kill_me, where):
    """psycopg's test_broken and test_right_exception_on_server_disconnect, through pgsplit."""
    import psycopg
    from psycopg import errors as e

    proxy = make_proxy()
    sql = "SELECT pg_terminate_backend(pg_backend_pid())" if where == "primary" else kill_me
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        with pytest.raises(e.AdminShutdown):
            conn.execute(sql)
        assert conn.closed
        assert conn.broken
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


@pytest.mark.parametrize("where", ["primary", "replica"])
async def test_asyncpg_sees_its_connection_end_after_a_server_fatal(cluster, make_proxy, kill_me, where):
    proxy = make_proxy()
    sql = "SELECT pg_terminate_backend(pg_backend_pid())" if where == "primary" else kill_me
    conn = await asyncpg.connect(asyncpg_dsn(proxy), timeout=10)
    try:
        # (asyncpg's words for PostgreSQL's FATAL followed by the end of the connection)
        with pytest.raises(asyncpg.ConnectionDoesNotExistError,
                           match=f"{ENDED}: terminating connection due to administrator command"):
            await asyncio.wait_for(conn.execute(sql), 10)
        await async_wait_until(conn.is_closed, timeout=5, message="the client connection to end")
    finally:
        conn.terminate()


# --- logins right after a primary crash ---------------------------------------------------------


@pytest.fixture
def crash_cluster():
    """A cluster of its own for a test that crashes its primary (a primary that went
    through crash recovery reports a replay position: the shared one must not)."""
    from conftest import SESSION_USERS
    from loadtest.sandbox import Cluster

    c = Cluster(1, name="crash", users=SESSION_USERS)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_logins_right_after_a_primary_crash_are_served_by_a_replica(crash_cluster, make_proxy):
    """The monitor has not polled since the primary died (a long interval here): a new
    client's login, which first borrows a primary connection, is refused by the dead
    primary; it is served by a replica (the login learns its parameters there) instead of
    failing with 08006."""
    import psycopg

    cluster = crash_cluster
    proxy = make_proxy(clusters={"main": cluster}, routing={"monitor_interval_ms": 5000})
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    failures, times = [], []
    try:
        cluster.kill_node("primary")
        for _ in range(5):
            t0 = time.monotonic()
            try:
                with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
                    assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            except psycopg.OperationalError as exc:
                failures.append(str(exc).strip())
            times.append(time.monotonic() - t0)
    finally:
        cluster.start_node("primary")
        for r in cluster.replicas:
            cluster.wait_streaming(r)
    print(f"\nlogins after the primary crash: {len(failures)} failed, times {[round(t, 3) for t in times]}: "
          f"{failures[:2]}")
    assert failures == []
    assert max(times) < 3  # (one check of the primary: a refused connection fails at once)


@pytest.mark.parametrize("pinned_by", ["CREATE TEMP TABLE bf_pin (x int)", "LISTEN bf_channel"])
def test_a_pinned_session_whose_idle_backend_is_terminated_ends(cluster, make_proxy, pinned_by):
    """A session pinned to its server connection (a temporary table, LISTEN) whose server
    is terminated between units: its server-side state is gone, and PostgreSQL would have
    ended the connection, so the proxy ends the client's too (before: the next statement
    ran on a new server connection without the temporary table, after a stray FATAL)."""
    import psycopg

    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(pinned_by)
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert cluster.sql(cluster.primary, "SELECT pg_terminate_backend(%s)", pid) == [(True,)]
        with pytest.raises(psycopg.OperationalError) as info:
            for _ in range(50):  # until the proxy has seen the connection end
                conn.execute("SELECT 1")
                time.sleep(0.05)
        assert "terminating connection due to administrator command" in str(info.value) or (
            "server-side state" in str(info.value)), info.value
        assert conn.closed
