"""The sandbox cluster manager (loadtest.sandbox) against real PostgreSQL servers.

Everything the proxy's integration tests rely on is checked here: replicas really stream,
lag can be made on purpose (paused replay, apply delay), nodes can be killed, frozen, restarted,
promoted and added (cascading), and every kind of user can log in over TCP.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import psycopg
import pytest

from helpers import async_wait_until, wait_until
from loadtest.sandbox import Cluster, Node, SandboxError, find_bindir, free_port


def _table(cluster: Cluster) -> str:
    """A fresh table on the primary (replicated), name unique per call."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    cluster.sql(cluster.primary, f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    return name


def _has_row(cluster: Cluster, node: Node, table: str, row_id: int) -> bool:
    return bool(cluster.sql(node, f"SELECT 1 FROM {table} WHERE id = %s", row_id))


def _streaming_names(cluster: Cluster, upstream: Node) -> set[str]:
    rows = cluster.sql(upstream, "SELECT application_name FROM pg_stat_replication "
                                 "WHERE state = 'streaming'")
    return {r[0] for r in rows}


def test_binaries_and_ports() -> None:
    bindir = find_bindir()
    for prog in ("initdb", "pg_ctl", "postgres", "pg_basebackup"):
        assert (bindir / prog).is_file()
    from loadtest.sandbox import server_major_version

    major = server_major_version(bindir)
    assert find_bindir(major) == bindir
    with pytest.raises(SandboxError, match="no PostgreSQL 7 server binaries"):
        find_bindir(7)
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20 and all(1024 < p < 65536 for p in ports)


def test_topology(cluster: Cluster) -> None:
    p, r1, r2 = cluster.primary, cluster.node("replica1"), cluster.node("replica2")
    assert [n.name for n in cluster.nodes] == ["primary", "replica1", "replica2"]
    assert cluster.replicas == [r1, r2]
    assert p.role == "primary" and p.upstream is None
    assert r1.role == r2.role == "replica" and r1.upstream is p and r2.upstream is p
    assert len({n.port for n in cluster.nodes}) == 3
    for n in cluster.nodes:
        assert n.is_running() and n.pid and n.pid > 1
        assert cluster.sql(n, "SHOW port")[0][0] == str(n.port)
        assert cluster.sql(n, "SHOW unix_socket_directories")[0][0] == str(n.dir)
        assert cluster.sql(n, "SHOW listen_addresses")[0][0] == "127.0.0.1"
        assert cluster.sql(n, "SHOW wal_level")[0][0] == "logical"
        assert cluster.sql(n, "SHOW fsync")[0][0] == "off"
        assert (n.dir / f".s.PGSQL.{n.port}").exists()
        # (the whole log: the tests before this one may have written far more than a tail)
        assert "ready to accept" in n.logfile.read_text(errors="replace")
    assert cluster.sql(p, "SELECT pg_is_in_recovery()") == [(False,)]
    assert cluster.sql(r1, "SELECT pg_is_in_recovery()") == [(True,)]
    assert cluster.sql(r2, "SELECT pg_is_in_recovery()") == [(True,)]
    assert _streaming_names(cluster, p) == {"replica1", "replica2"}
    slots = cluster.sql(p, "SELECT slot_name, slot_type, active FROM pg_replication_slots "
                           "ORDER BY slot_name")
    assert slots == [("replica1", "physical", True), ("replica2", "physical", True)]
    for r in (r1, r2):
        assert cluster.sql(r, "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)]
        assert cluster.sql(r, "SHOW hot_standby_feedback") == [("on",)]


def test_write_visible_on_replicas_after_catch_up(cluster: Cluster) -> None:
    table = _table(cluster)
    cluster.sql(cluster.primary, f"INSERT INTO {table} VALUES (1, 'hello')")
    lsn = cluster.wait_caught_up(timeout=10)
    assert "/" in lsn
    for r in cluster.replicas:
        assert cluster.sql(r, f"SELECT note FROM {table} WHERE id = 1") == [("hello",)]
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            cluster.sql(r, f"INSERT INTO {table} VALUES (2, 'no')")


def test_pause_replay_makes_a_replica_stale(cluster: Cluster) -> None:
    r1, r2 = cluster.node("replica1"), cluster.node("replica2")
    table = _table(cluster)
    cluster.wait_caught_up(timeout=10)
    cluster.pause_replay(r1)
    try:
        assert cluster.sql(r1, "SELECT pg_get_wal_replay_pause_state()") == [("paused",)]
        cluster.sql(cluster.primary, f"INSERT INTO {table} VALUES (1, 'while paused')")
        cluster.wait_caught_up(r2, timeout=10)
        assert _has_row(cluster, r2, table, 1)
        assert not _has_row(cluster, r1, table, 1)
        with pytest.raises(TimeoutError, match="replica1.*replay"):
            cluster.wait_caught_up(r1, timeout=0.5)
        with pytest.raises(TimeoutError, match="replica1"):
            cluster.wait_caught_up(timeout=0.3)  # all replicas: r1 holds it up
        assert not _has_row(cluster, r1, table, 1)  # still stale after waiting
    finally:
        cluster.resume_replay(r1)
    assert cluster.sql(r1, "SELECT pg_get_wal_replay_pause_state()") == [("not paused",)]
    cluster.wait_caught_up(r1, timeout=10)
    assert _has_row(cluster, r1, table, 1)


def test_apply_delay_delays_visibility(cluster: Cluster) -> None:
    r2 = cluster.node("replica2")
    table = _table(cluster)
    cluster.wait_caught_up(timeout=10)
    delay_ms = 1200
    cluster.set_apply_delay(r2, delay_ms)
    try:
        assert cluster.sql(r2, "SELECT setting FROM pg_settings "
                               "WHERE name = 'recovery_min_apply_delay'") == [(str(delay_ms),)]
        t0 = time.monotonic()
        cluster.sql(cluster.primary, f"INSERT INTO {table} VALUES (1, 'delayed')")
        cluster.wait_caught_up(cluster.node("replica1"), timeout=10)
        assert not _has_row(cluster, r2, table, 1)
        wait_until(lambda: _has_row(cluster, r2, table, 1), timeout=10, interval=0.02,
                   message="the delayed row on replica2")
        elapsed = time.monotonic() - t0
        assert elapsed >= delay_ms / 1000 - 0.15, elapsed
    finally:
        cluster.set_apply_delay(r2, 0)
    assert cluster.sql(r2, "SELECT setting FROM pg_settings "
                           "WHERE name = 'recovery_min_apply_delay'") == [("0",)]
    t0 = time.monotonic()
    cluster.sql(cluster.primary, f"INSERT INTO {table} VALUES (2, 'prompt')")
    cluster.wait_caught_up(r2, timeout=5)
    assert _has_row(cluster, r2, table, 2)
    assert time.monotonic() - t0 < 1.0


def test_kill_and_restart_a_replica(cluster: Cluster) -> None:
    r1 = cluster.node("replica1")
    pid = r1.pid
    assert pid is not None
    cluster.kill_node(r1)
    assert not r1.is_running() and r1.pid is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(r1.dsn(), connect_timeout=2)
    wait_until(lambda: "replica1" not in _streaming_names(cluster, cluster.primary),
               timeout=10, message="replica1 to disappear from pg_stat_replication")
    table = _table(cluster)
    cluster.sql(cluster.primary, f"INSERT INTO {table} VALUES (1, 'while down')")
    cluster.start_node(r1)
    assert r1.is_running() and r1.pid != pid
    cluster.wait_streaming(r1)
    cluster.wait_caught_up(r1, timeout=10)
    assert _has_row(cluster, r1, table, 1)
    assert cluster.sql(r1, "SELECT pg_is_in_recovery()") == [(True,)]


def test_freeze_and_thaw_a_replica(cluster: Cluster) -> None:
    """A frozen node keeps its sockets but answers nothing, neither on an open session nor
    to a login; thawed, the open session goes on."""
    r1 = cluster.node("replica1")

    async def scenario() -> None:
        conn = await asyncpg.connect(**r1.conninfo_kwargs(), timeout=10)
        try:
            cluster.freeze_node(r1)
            try:
                query = asyncio.create_task(conn.fetchval("SELECT 1"))
                done, _ = await asyncio.wait([query], timeout=1.0)
                assert not done, "a frozen server answered"
                with pytest.raises(TimeoutError):
                    await asyncpg.connect(**r1.conninfo_kwargs(), timeout=1.0)
            finally:
                cluster.thaw_node(r1)
            assert await asyncio.wait_for(query, 10) == 1
            assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 10) == 2
        finally:
            conn.terminate()

    asyncio.run(scenario())
    cluster.thaw_node(r1)  # nothing left to thaw: no-op
    assert cluster.sql(r1, "SELECT pg_is_in_recovery()") == [(True,)]


def test_logins_over_tcp(cluster: Cluster) -> None:
    p, r1 = cluster.primary, cluster.node("replica1")
    stored = dict(cluster.sql(p, """
        SELECT rolname, CASE WHEN rolpassword LIKE 'SCRAM-SHA-256$%%' THEN 'scram'
                             WHEN rolpassword LIKE 'md5%%' THEN 'md5' END
        FROM pg_authid WHERE rolname IN ('postgres', 'app', 'app_md5', 'app_trust')"""))
    assert stored == {"postgres": "scram", "app": "scram", "app_md5": "md5", "app_trust": None}
    for node in (p, r1):
        for user, db in (("postgres", "postgres"), ("app", "app"), ("app_md5", "postgres"),
                         ("app_trust", "app")):
            with psycopg.connect(node.dsn(user, dbname=db), connect_timeout=5) as conn:
                row = conn.execute("SELECT current_user, current_database(), "
                                   "inet_server_addr()::text").fetchone()
                assert row == (user, db, "127.0.0.1/32")
    # the password matters for scram and md5 users, not for trust users
    for user in ("app", "app_md5", "postgres"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn(user, password="wrong"), connect_timeout=5)
    with psycopg.connect(p.dsn("app_trust", password="anything"), connect_timeout=5):
        pass
    hba = {r[0]: r[1] for r in cluster.sql(
        p, "SELECT user_name[1], auth_method FROM pg_hba_file_rules WHERE type = 'host' "
           "AND database = '{all}'")}
    assert hba == {"app_md5": "md5", "app_trust": "trust", "all": "scram-sha-256"}
    # app users may create tables in postgres.public and app.public
    for user, db in (("app", "postgres"), ("app_md5", "app"), ("app_trust", "postgres")):
        with psycopg.connect(p.dsn(user, dbname=db), autocommit=True) as conn:
            name = f"own_{uuid.uuid4().hex[:8]}"
            conn.execute(f"CREATE TABLE {name} (x int)")
            conn.execute(f"DROP TABLE {name}")
    assert cluster.sql(p, "SELECT pg_get_userbyid(datdba) FROM pg_database "
                          "WHERE datname = 'app'") == [("app",)]


async def test_asyncpg_login(cluster: Cluster) -> None:
    conn = await asyncpg.connect(**cluster.primary.conninfo_kwargs("app", dbname="app"),
                                 timeout=5)
    try:
        assert await conn.fetchval("SELECT current_user") == "app"
        await conn.execute("CREATE TABLE IF NOT EXISTS asyncpg_probe (x int)")
        await conn.execute("INSERT INTO asyncpg_probe VALUES (1)")
    finally:
        await conn.close()
    replica = cluster.node("replica2")
    cluster.wait_caught_up(replica, timeout=10)

    async def visible() -> bool:
        c = await asyncpg.connect(**replica.conninfo_kwargs("app", dbname="app"))
        try:
            return await c.fetchval("SELECT count(*) FROM asyncpg_probe") >= 1
        finally:
            await c.close()

    assert await async_wait_until(visible, timeout=5, message="asyncpg_probe on replica2")


def test_add_standby_and_cascade(cluster: Cluster) -> None:
    p = cluster.primary
    added: list[Node] = []
    try:
        a = cluster.add_standby("target1")
        added.append(a)
        b = cluster.add_standby("target2", upstream=a)
        added.append(b)
        assert a.upstream is p and b.upstream is a and a.role == b.role == "replica"
        assert "target1" in _streaming_names(cluster, p)
        assert _streaming_names(cluster, a) == {"target2"}
        assert cluster.sql(a, "SELECT slot_name, active FROM pg_replication_slots") == [
            ("target2", True)]
        for n in (a, b):
            assert cluster.sql(n, "SELECT pg_is_in_recovery()") == [(True,)]
            assert cluster.sql(n, "SELECT status FROM pg_stat_wal_receiver") == [
                ("streaming",)]
        sysid = "SELECT system_identifier FROM pg_control_system()"
        assert cluster.sql(a, sysid) == cluster.sql(b, sysid) == cluster.sql(p, sysid)
        table = _table(cluster)
        cluster.sql(p, f"INSERT INTO {table} VALUES (1, 'cascaded')")
        cluster.wait_caught_up(b, timeout=10)
        assert _has_row(cluster, b, table, 1)
        with pytest.raises(ValueError, match="already has a node"):
            cluster.add_standby("target1")
    finally:
        for n in reversed(added):
            cluster.remove_node(n)
    assert [n.name for n in cluster.nodes] == ["primary", "replica1", "replica2"]
    assert {r[0] for r in cluster.sql(p, "SELECT slot_name FROM pg_replication_slots")} == {
        "replica1", "replica2"}
    assert all(not n.dir.exists() for n in added)


def test_throwaway_cluster_kill_primary_promote_and_cleanup() -> None:
    with Cluster(1, name="promo", users={"owner": "owner-pw"}) as c:
        p, r = c.primary, c.node("replica1")
        base = c.base_dir
        table = _table(c)
        c.sql(p, f"INSERT INTO {table} VALUES (1, 'before crash')")
        c.wait_caught_up(timeout=10)
        # crash the primary: the replica loses its upstream, comes back after the restart
        c.kill_node(p)
        assert not p.is_running()
        c.start_node(p)
        assert "database system was interrupted" in c.log_tail(p, 100)
        c.wait_streaming(r)
        c.sql(p, f"INSERT INTO {table} VALUES (2, 'after crash')")
        c.wait_caught_up(r, timeout=10)
        assert _has_row(c, r, table, 2)
        # promote the replica
        c.promote(r)
        assert r.role == "primary" and r.upstream is None and c.replicas == []
        assert c.sql(r, "SELECT pg_is_in_recovery()") == [(False,)]
        c.sql(r, f"INSERT INTO {table} VALUES (3, 'on the new primary')")
        assert c.sql(r, f"SELECT count(*) FROM {table}") == [(3,)]
        assert c.sql(r, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0] >= 1
        assert c.sql(p, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
        with pytest.raises(SandboxError, match="not a replica"):
            c.pause_replay(r)
        pids = [n.pid for n in c.nodes]
    assert not base.exists()
    assert all(not n.is_running() for n in c.nodes)
    for pid in pids:
        assert pid is not None
        stat = Path(f"/proc/{pid}/stat")
        # gone, or a zombie nobody reaps (the postmaster was daemonized by pg_ctl)
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    c.stop()  # idempotent
    assert not c.started
