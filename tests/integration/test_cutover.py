"""Cutover through pgsplit on real sandbox clusters (ops/cutover/, the admin API, the CLI).

Every test builds its own throwaway cluster (a cutover fences its primary, so the shared
session cluster is never used): the source is the sandbox primary (with a replica where
reads matter), the target a streaming standby of it (``hop1``), with a cascading standby of
the target as the target cluster's replica (``hop1r``). A chain of cutovers uses further
cascading standbys (``hop2`` streams from ``hop1``, ...), each a cluster of its own in the
config: after ``hop1``'s promotion, ``hop2`` follows its new timeline.

Clients are asyncpg connections opened once and never reopened; every acknowledged write is
recorded with the port of the server that took it (``inet_server_port()``), so the tests
can tell which primary accepted which write and prove that none reached a fenced one.

Knobs for measuring (the defaults keep the file short): PGSPLIT_CUTOVER_CLIENTS (20),
PGSPLIT_CUTOVER_CHAIN (cutovers in a row under the same load, 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from helpers import async_wait_until
from loadtest.harness import NodeSet, ProxyProcess, ProxyThread, config_text
from loadtest.sandbox import Cluster
from workload import Workload

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = int(os.environ.get("PGSPLIT_CUTOVER_CLIENTS", "20"))
CHAIN = int(os.environ.get("PGSPLIT_CUTOVER_CHAIN", "2"))
THINK_S = 0.002  # between a client's statements: hundreds of units per second in all

SCHEMA = """
CREATE TABLE acks (id bigserial PRIMARY KEY, client int NOT NULL, seq int NOT NULL, UNIQUE (client, seq));
CREATE TABLE counters (client int PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO counters SELECT g FROM generate_series(0, 499) g;
"""


def make_cluster(name: str, replicas: int = 0, hops: int = 1, hop_replica: bool = True) -> Cluster:
    """A started cluster with `hops` standbys chained from its primary (hop1 from the
    primary, hop2 from hop1, ...) and, if asked, hop1r, a cascading standby of hop1."""
    c = Cluster(replicas, name=name).start()
    try:
        with_app(c, SCHEMA)
        upstream = None
        for i in range(1, hops + 1):
            c.add_standby(f"hop{i}", upstream=upstream)
            upstream = f"hop{i}"
            if i == 1 and hop_replica:
                c.add_standby("hop1r", upstream="hop1")
        c.wait_caught_up()
    except BaseException:
        c.stop()
        raise
    return c


def with_app(c: Cluster, script: str, node: str = "primary") -> None:
    for statement in filter(None, (s.strip() for s in script.split(";"))):
        c.sql(node, statement, user="app", dbname="app")


def hop_clusters(c: Cluster, hops: int, main_replicas: list[str]) -> dict[str, NodeSet]:
    sets = {"main": NodeSet.of(c, "primary", main_replicas)}
    for i in range(1, hops + 1):
        sets[f"hop{i}"] = NodeSet.of(c, f"hop{i}", ["hop1r"] if i == 1 and "hop1r" in {n.name for n in c.nodes} else [])
    return sets


@pytest.fixture
def clusters() -> Iterator[list[Cluster]]:
    """Clusters a test makes are stopped after it, however it ends."""
    made: list[Cluster] = []
    yield made
    for c in made:
        c.stop()


def fenced(c: Cluster, node: str) -> bool:
    return c.sql(node, "SHOW default_transaction_read_only")[0][0] == "on"


def rows(c: Cluster, node: str) -> set[tuple[int, int]]:
    return {(a, b) for a, b in c.sql(node, "SELECT client, seq FROM acks", dbname="app")}


async def post_cutover(admin_url: str, body: dict, events: list[tuple[float, dict]] | None = None) -> dict:
    """POST /v1/cutover and read its event stream; returns the summary event. Each event is
    recorded with the loop time it arrived (the stream must arrive step by step)."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with http.post(admin_url + "/v1/cutover", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            summary = None
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                if events is not None:
                    events.append((loop.time(), event))
                if event["event"] == "summary":
                    summary = event
    assert summary is not None, "the stream ended without a summary"
    return summary


async def post(admin_url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(admin_url + path, json=body or {}) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text.strip().startswith("{") else {"raw": text})


# --- the workload ------------------------------------------------------------------------------


# --- the tests ---------------------------------------------------------------------------------


async def test_cutover_under_load(clusters: list[Cluster]) -> None:
    c = make_cluster("coload", replicas=1, hops=CHAIN)
    clusters.append(c)
    text = config_text(hop_clusters(c, CHAIN, ["replica1"]),
                       sections={"pool": {"size": max(40, CLIENTS + 10)}, "cutover": {"catchup_timeout_s": 10}})
    proc = ProxyProcess(text).start()
    admin = f"http://127.0.0.1:{proc.admin_port}"
    dsn = f"postgresql://app:app-secret@127.0.0.1:{proc.port}/app?sslmode=disable"
    work = Workload(dsn, CLIENTS, THINK_S)
    loop = asyncio.get_running_loop()
    try:
        await work.start(warm_ops=5)
        conns = [cl.conn for cl in work.clients]
        primaries = [c.primary] + [c.node(f"hop{i}") for i in range(1, CHAIN + 1)]
        figures = []
        for i in range(1, CHAIN + 1):
            await asyncio.sleep(1.0)  # load on the current primary before each cutover
            events: list[tuple[float, dict]] = []
            t0 = loop.time()
            summary = await post_cutover(admin, {"target": f"hop{i}"}, events)
            assert summary["result"] == "success", summary
            steps = [e["step"] for _, e in events if e["event"] == "step" and e["phase"] == "end"]
            assert steps == ["preflight", "warm-up", "pause", "fence", "catch-up", "promote", "swap", "resume"]
            # streamed: the preflight's end arrived well before the summary
            assert events[-1][0] - next(t for t, e in events if e.get("step") == "preflight"
                                        and e["phase"] == "end") > 0.02
            # clients keep writing on the new primary
            new_port = primaries[i].port
            await async_wait_until(lambda: work.count(new_port) >= CLIENTS,
                                   timeout=10, message=f"writes on the new primary hop{i}")
            paused = next(t for t, e in events if e.get("step") == "pause" and e["phase"] == "start")
            resumed = next(t for t, e in events if e.get("step") == "resume" and e["phase"] == "end")
            after = work.finished_after(resumed)
            before = (work.longest_wait(t0 - 1.0, t0 - 0.01),  # steady state, for comparison
                      work.longest_wait(t0, paused - 0.05))  # preflight and warm-up, under load
            figures.append((summary["pause_seconds"], work.longest_wait(paused, resumed), summary["units_held"],
                            summary["bytes_caught_up"], work.ops_per_second(t0 - 1.0, t0),
                            {s["step"]: s["seconds"] for s in summary["steps"]}, after,
                            next(s["detail"] for s in summary["steps"] if s["step"] == "fence"), before))
        await asyncio.sleep(0.5)
        await work.finish()
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(admin + "/metrics", timeout=5).read().decode())
        assert f'pgsplit_cutovers_total{{result="success"}} {float(CHAIN)}' in metrics

        assert work.errors == [], "\n".join(work.errors[:20])
        assert work.stale == [], "\n".join(work.stale[:20])
        assert all(not cl.conn.is_closed() and cl.conn is conns[n] for n, cl in enumerate(work.clients))
        for cl in work.clients:  # the same connection still works, and writes go to the last primary
            assert await cl.conn.fetchval("/* pgsplit:primary */ SELECT inet_server_port()") == primaries[-1].port
        await work.close()
    finally:
        await work.close()
        proc.stop()

    for n, (pause, seen, held, caught, rate, steps, after, fence, before) in enumerate(figures, 1):
        print(f"\ncutover {n} with {CLIENTS} clients at {rate:.0f} statements/s: proxy pause {pause * 1000:.0f} ms, "
              f"longest client wait {seen * 1000:.0f} ms (steady state {before[0] * 1000:.0f} ms, "
              f"preflight and warm-up {before[1] * 1000:.0f} ms), "
              f"{held} units held, {caught} bytes caught up; "
              + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in steps.items())
              + f"; held statements ended {after * 1000:.0f} ms after the resume event at the latest; fence {fence}")
    # Every acknowledged write is on the last primary, and nothing else is.
    assert rows(c, primaries[-1].name) == work.acked()
    # Each fenced primary has exactly the writes acknowledged by it and its predecessors:
    # none was accepted after its fence (they went to the next primary), and it is read-only.
    ports: set[int] = set()
    for node in primaries[:-1]:
        ports.add(node.port)
        assert rows(c, node.name) == work.acked(ports), f"{node.name} differs from what was acknowledged"
        assert fenced(c, node.name)
    assert not fenced(c, primaries[-1].name)
    assert all(seen < 5.0 for _, seen, *_ in figures), figures


async def test_rollback_when_the_target_cannot_catch_up(clusters: list[Cluster]) -> None:
    c = make_cluster("corollback", hop_replica=False)
    clusters.append(c)
    text = config_text(hop_clusters(c, 1, []), sections={"cutover": {"catchup_timeout_s": 1.5, "pause_timeout_s": 0.5}})
    proxy = ProxyThread(text).start()
    work = Workload(proxy.dsn(), 8, THINK_S)
    try:
        await work.start()
        admin = proxy.admin_url
        source_port = c.primary.port

        # An idle transaction: the pause gives it pause_timeout_s, then the cutover aborts
        # before anything else happened.
        idle = await asyncpg.connect(proxy.dsn())
        tx = idle.transaction()
        await tx.start()
        await idle.execute("INSERT INTO acks (client, seq) VALUES (1000, 1)")
        summary = await post_cutover(admin, {"target": "hop1"})
        assert summary["result"] == "rolled_back", summary
        assert [s["step"] for s in summary["steps"]] == ["preflight", "warm-up", "pause", "rollback"]
        assert "idle in a transaction" in summary["error"]
        await tx.commit()  # the transaction was never touched
        await idle.close()

        # Replay paused on the target: the catch-up times out, the source is unfenced and
        # the held units run on it.
        c.pause_replay("hop1")
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(post_cutover(admin, {"target": "hop1"}))
        await async_wait_until(lambda: proxy.call(lambda: proxy.proxy.dataplane.holding), timeout=10,
                               message="the cutover to pause traffic")
        # one cutover at a time; no pause or resume under a cutover
        assert (await post(admin, "/v1/cutover", {"target": "hop1"}))[0] == 409
        assert (await post(admin, "/v1/pause"))[0] == 409
        assert (await post(admin, "/v1/resume"))[0] == 409
        t0 = loop.time()
        summary = await task
        t1 = loop.time()
        assert summary["result"] == "rolled_back", summary
        assert [s["step"] for s in summary["steps"]] == ["preflight", "warm-up", "pause", "fence", "catch-up",
                                                         "rollback"]
        assert "replay is paused" in summary["error"]
        assert summary["steps"][-1]["detail"]["unfenced"] is True
        assert summary["units_held"] > 0  # clients were held, then ran on the source
        await asyncio.sleep(0.5)
        assert work.errors == [], work.errors
        assert work.stale == []
        assert not fenced(c, "primary")
        assert proxy.call(lambda: proxy.proxy.topology.current.cluster) == "main"
        assert all(p == source_port for cl in work.clients for _, _, p in cl.acked)
        held_ran = [end for cl in work.clients for start, end, kind in cl.ops if start < t1 and end > t1 - 0.05]
        assert held_ran, "no statement was held and then ran on the source"
        conn = await asyncpg.connect(proxy.dsn())
        assert await conn.fetchval("INSERT INTO acks (client, seq) VALUES (1001, 1) RETURNING inet_server_port()") \
            == source_port
        await conn.close()
        print(f"\nrollback: units held for {summary['pause_seconds'] * 1000:.0f} ms "
              f"(catch-up timeout 1.5 s), longest client wait {work.longest_wait(t0, t1) * 1000:.0f} ms")

        # After the rollback the same target works: the fence's terminated pool connections
        # are replaced, and nothing is left over.
        c.resume_replay("hop1")
        summary = await post_cutover(admin, {"target": "hop1"})
        assert summary["result"] == "success", summary
        await asyncio.sleep(0.3)
        await work.finish()
        assert work.errors == [], work.errors
        assert rows(c, "hop1") >= work.acked()
        assert rows(c, "primary") == work.acked({source_port}) | {(1000, 1), (1001, 1)}
        metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(admin + "/metrics", timeout=5).read().decode())
        assert 'pgsplit_cutovers_total{result="rolled_back"} 2.0' in metrics
        assert 'pgsplit_cutovers_total{result="success"} 1.0' in metrics
        assert "pgsplit_cutover_pause_seconds_count 3.0" in metrics
    finally:
        await work.close()
        proxy.stop()


async def test_preflight_reports_schema_differences_and_a_dry_run_changes_nothing(clusters: list[Cluster]) -> None:
    c = make_cluster("copre", hop_replica=False)
    clusters.append(c)
    other = Cluster(0, name="coother").start()
    clusters.append(other)
    # an independent "target" with a deliberately different schema
    with_app(other, """
        CREATE TABLE acks (id bigserial PRIMARY KEY, client int NOT NULL, seq int NOT NULL, note text);
        CREATE TABLE counters (client int PRIMARY KEY, n bigint NOT NULL DEFAULT 0)""")
    text = config_text({"main": NodeSet.of(c, "primary"), "hop1": NodeSet.of(c, "hop1"),
                        "other": NodeSet.of(other, "primary")})
    proxy = ProxyThread(text).start()
    try:
        before = c.sql(c.primary, "SELECT pg_current_wal_lsn()")[0][0]
        summary = await post_cutover(proxy.admin_url, {"target": "other", "dry_run": True})
        assert summary["result"] == "refused" and summary["error"].startswith("preflight: ")
        report = summary["report"]
        assert not report["ok"]
        diffs = report["schema"]["differences"]
        assert "database app: column public.acks.note: only on the target (text)" in diffs
        assert ("database app: index public.acks_client_seq_key: only on the source (CREATE UNIQUE INDEX "
                "acks_client_seq_key ON public.acks USING btree (client, seq))") in diffs
        assert "database app: constraint public.acks.acks_client_seq_key: only on the source (UNIQUE (client, seq))" in diffs
        assert "database app: column public.counters.n: integer not null default 0 on the source, " \
               "bigint not null default 0 on the target" in diffs
        assert any("schemas differ" in b for b in report["blockers"])
        assert any("does not replicate from the source" in b for b in report["blockers"])
        assert report["versions"].startswith("same major version")

        # A real cutover to it is refused at the preflight: nothing changes.
        summary = await post_cutover(proxy.admin_url, {"target": "other"})
        assert summary["result"] == "refused" and [s["step"] for s in summary["steps"]] == ["preflight"]

        # A dry run against a good target: a clean report, and still nothing changes.
        summary = await post_cutover(proxy.admin_url, {"target": "hop1", "dry_run": True})
        assert summary["result"] == "dry_run" and summary["report"]["ok"], summary["report"]
        rep = summary["report"]
        assert rep["schema"]["differences"] == []
        assert rep["schema"]["digests"]["source"] == rep["schema"]["digests"]["target"]
        assert rep["replication"]["kind"] == "physical" and rep["replication"]["via"] == "direct"
        assert not fenced(c, "primary")
        assert c.sql("hop1", "SELECT pg_is_in_recovery()")[0][0] is True
        assert proxy.call(lambda: (proxy.proxy.topology.current.cluster, proxy.proxy.dataplane.holding)) == ("main", False)
        assert c.sql(c.primary, "SELECT pg_current_wal_lsn() - %s::pg_lsn", before)[0][0] < 1024  # no writes of ours
        conn = await asyncpg.connect(proxy.dsn())
        assert await conn.fetchval("INSERT INTO acks (client, seq) VALUES (1, 1) RETURNING inet_server_port()") \
            == c.primary.port
        await conn.close()
        # bad requests
        assert (await post(proxy.admin_url, "/v1/cutover", {"target": "nope"}))[0] == 400
        assert (await post(proxy.admin_url, "/v1/cutover", {"target": "main"}))[0] == 400
        assert (await post(proxy.admin_url, "/v1/cutover", {"target": "hop1", "bogus": 1}))[0] == 400
    finally:
        proxy.stop()


async def test_prepared_statements_and_settings_survive(clusters: list[Cluster]) -> None:
    c = make_cluster("coprep")
    clusters.append(c)
    with_app(c, """
        CREATE SCHEMA s2;
        CREATE TABLE s2.items (id serial PRIMARY KEY, v int NOT NULL)""")
    c.wait_caught_up()
    proxy = ProxyThread(config_text(hop_clusters(c, 1, []))).start()
    try:
        conn = await asyncpg.connect(proxy.dsn())
        await conn.execute("SET search_path TO s2, public")
        await conn.execute("SET application_name TO 'prep-client'")
        insert = await conn.prepare("INSERT INTO items (v) VALUES ($1) RETURNING inet_server_port()")
        count = await conn.prepare("SELECT count(*) FROM items WHERE v >= $1")
        await conn.execute("PREPARE by_sql (int) AS SELECT count(*) FROM items WHERE v = $1")
        assert await insert.fetchval(1) == c.primary.port
        assert await count.fetchval(0) == 1

        result = await post_cutover(proxy.admin_url, {"target": "hop1"})
        assert result["result"] == "success", result

        assert not conn.is_closed()
        assert await insert.fetchval(2) == c.node("hop1").port
        assert await count.fetchval(0) == 2
        # SQL EXECUTE by the simple protocol: by the extended one (conn.fetchval) it fails with
        # 26000 on any server connection that did not run the PREPARE, cutover or not (a
        # proxy bug: session._prepare_sql runs for Query messages only, not for Parse).
        assert await conn.execute("EXECUTE by_sql (2)") == "SELECT 1"
        assert await conn.fetchval("SHOW search_path") == "s2, public"
        assert await conn.fetchval("/* pgsplit:primary */ SELECT current_setting('application_name')") == "prep-client"
        assert await conn.fetchval("SELECT count(*) FROM items") == 2  # a replica read (hop1r) sees it all
        await conn.close()
    finally:
        proxy.stop()


async def test_manual_pause_and_resume(clusters: list[Cluster]) -> None:
    c = Cluster(0, name="copause").start()
    clusters.append(c)
    with_app(c, SCHEMA)
    proxy = ProxyThread(config_text({"main": NodeSet.of(c, "primary")})).start()
    try:
        conn = await asyncpg.connect(proxy.dsn())
        other = await asyncpg.connect(proxy.dsn())
        status, body = await post(proxy.admin_url, "/v1/pause")
        assert status == 200 and body["paused"] is True, body
        held = asyncio.create_task(conn.fetchval("INSERT INTO acks (client, seq) VALUES (1, 1) RETURNING 1"))
        await asyncio.sleep(0.3)
        assert not held.done()  # waits inside the proxy, no error
        assert (await post(proxy.admin_url, "/v1/pause"))[0] == 409
        assert (await post(proxy.admin_url, "/v1/cutover", {"target": "main"}))[0] == 400
        status, body = await post(proxy.admin_url, "/v1/resume")
        assert status == 200 and body["units_held"] == 1 and body["pause_seconds"] >= 0.3, body
        assert await asyncio.wait_for(held, 5) == 1
        assert (await post(proxy.admin_url, "/v1/resume"))[0] == 409  # not paused

        # an open transaction that does not end: the pause gives up and undoes itself
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO acks (client, seq) VALUES (2, 1)")
        status, body = await post(proxy.admin_url, "/v1/pause", {"timeout_s": 0.3})
        assert status == 409 and "idle in a transaction" in body["error"], body
        assert await conn.fetchval("SELECT count(*) FROM acks") == 1  # not paused
        await tx.commit()
        await conn.close()
        await other.close()
    finally:
        proxy.stop()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


async def test_cli_cutover(clusters: list[Cluster]) -> None:
    c = make_cluster("cocli")
    clusters.append(c)
    proc = ProxyProcess(config_text(hop_clusters(c, 1, []), sections={"admin": {"token": "s3cret"}})).start()
    try:
        admin = f"http://127.0.0.1:{proc.admin_port}"
        out = await asyncio.to_thread(run_cli, "cutover", "hop1", "--dry-run", "-c", str(proc.config_path))
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "cutover main -> hop1 (dry run)"
        assert any(line.startswith("  preflight  ok") for line in lines)
        assert any("replication physical (direct, streaming), lag" in line for line in lines)
        assert any("schema identical" in line for line in lines)
        assert "result       dry_run" in lines
        assert not fenced(c, "primary") and c.sql("hop1", "SELECT pg_is_in_recovery()")[0][0]

        # without the token the admin API refuses
        out = await asyncio.to_thread(run_cli, "cutover", "hop1", "--admin", admin)
        assert out.returncode != 0 and "HTTP 401" in out.stderr

        out = await asyncio.to_thread(run_cli, "cutover", "hop1", "-c", str(proc.config_path), "--timeout", "30s")
        assert out.returncode == 0, out.stdout + out.stderr
        ends = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ") and " ok " in line]
        assert ends == ["preflight", "warm-up", "pause", "fence", "catch-up", "promote", "swap", "resume"], out.stdout
        assert "result       success" in out.stdout
        assert any(line.startswith("pause        ") and "units held" in line for line in out.stdout.splitlines())
        assert any(line.startswith("caught up    ") for line in out.stdout.splitlines())
        assert fenced(c, "primary") and not c.sql("hop1", "SELECT pg_is_in_recovery()")[0][0]
        status = json.loads(urllib.request.urlopen(admin + "/v1/status", timeout=5).read())
        assert status["cluster"] == "hop1" and status["primary_writable"]

        out = await asyncio.to_thread(run_cli, "cutover", "hop1", "-c", str(proc.config_path))
        assert out.returncode != 0 and "HTTP 400" in out.stderr and "already the active one" in out.stderr
        out = await asyncio.to_thread(run_cli, "status", "--admin", admin)
        assert "cluster hop1  generation 2" in out.stdout
    except BaseException:
        print(proc.log()[-4000:])
        raise
    finally:
        proc.stop()
