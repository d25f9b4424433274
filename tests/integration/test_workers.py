"""`pgsplit run --workers 2` against the real sandbox: two worker processes on one port,
seen from the outside as one proxy. Clients land on either worker (the kernel chooses:
SO_REUSEPORT); a session's worker is the low byte of its cancel key's process id.

Each test looks at both workers: a statement, a cancel, a pause, a reload, a cutover
reaches the worker that holds the session, whichever worker the request arrived on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pytest

from helpers import wait_until
from loadtest.harness import NodeSet, ProxyProcess, config_text
from loadtest.sandbox.cluster import Cluster

APP_PASSWORD = "app-secret"
WORKERS = 2


def dsn(proxy: ProxyProcess) -> str:
    return f"host=127.0.0.1 port={proxy.port} user=app password={APP_PASSWORD} dbname=app sslmode=disable"


def admin(proxy: ProxyProcess, path: str, body: dict | None = None, timeout: float = 60):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{proxy.admin_port}{path}", data=data,
                                     method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return text if path == "/metrics" else json.loads(text.splitlines()[-1])


def metric_sum(proxy: ProxyProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in admin(proxy, "/metrics").splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def worker_of(conn: psycopg.Connection) -> int:
    return conn.info.backend_pid & 0xFF


def sessions_on_each_worker(proxy: ProxyProcess, per_worker: int = 1, **kwargs) -> dict[int, list[psycopg.Connection]]:
    """Connections until each worker holds `per_worker` of them (the kernel spreads them;
    the spares are closed)."""
    out: dict[int, list[psycopg.Connection]] = {i: [] for i in range(WORKERS)}
    for _ in range(60):
        if all(len(v) >= per_worker for v in out.values()):
            return out
        conn = psycopg.connect(dsn(proxy), autocommit=True, connect_timeout=10, **kwargs)
        got = out[worker_of(conn)]
        if len(got) < per_worker:
            got.append(conn)
        else:
            conn.close()
    raise AssertionError(f"60 connections did not reach every worker: {[len(v) for v in out.values()]}")


def close_all(sessions: dict[int, list[psycopg.Connection]]) -> None:
    for conns in sessions.values():
        for conn in conns:
            conn.close()


@pytest.fixture
def workers_proxy(cluster):
    proxy = ProxyProcess(config_text({"main": cluster}, sections={"cutover": {"pause_timeout_s": 5},
                                                                  "routing": {"consistency": "session"}}),
                         workers=WORKERS).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_clients_spread_over_the_workers_and_are_counted_as_one_proxy(workers_proxy):
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy, per_worker=2)
    try:
        status = admin(proxy, "/v1/status")
        assert [w["up"] for w in status["workers"]["workers"]] == [True, True]
        assert status["clients"]["idle"] == 2 * WORKERS
        before = metric_sum(proxy, "pgsplit_units_total")
        for conns in sessions.values():
            for conn in conns:
                for i in range(10):
                    assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        # every worker's units, added up at the scrape
        assert metric_sum(proxy, "pgsplit_units_total") - before == 10 * 2 * WORKERS
        assert metric_sum(proxy, "pgsplit_client_connections", state="idle") == 2 * WORKERS
        # the monitor's gauges once (one monitor), not once per worker
        assert metric_sum(proxy, "pgsplit_backend_up") == len(cluster_backends(status))
        pids = {w["pid"] for w in status["workers"]["workers"]}
        assert len(pids) == WORKERS and proxy.proc.pid not in pids
        shown = subprocess.run([sys.executable, "-m", "proxy.cli", "status", "--admin",
                                f"http://127.0.0.1:{proxy.admin_port}"], capture_output=True, text=True, timeout=30)
        assert f"workers: {WORKERS} of {WORKERS} up, 0 restarts" in shown.stdout, shown
    finally:
        close_all(sessions)


def cluster_backends(status: dict) -> list[str]:
    return [b["name"] for b in status["backends"]]


def test_a_cancel_reaches_the_session_on_whichever_worker_holds_it(workers_proxy):
    """psycopg's cancel opens a new connection, which the kernel gives to either worker:
    about half of them arrive on the other worker and are passed on."""
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy)
    try:
        for attempt in range(12):
            for index, (conn,) in sessions.items():
                outcome: list[BaseException | None] = []

                def sleeper(conn=conn, outcome=outcome):
                    try:
                        conn.execute("SELECT pg_sleep(20)")
                        outcome.append(None)
                    except psycopg.Error as exc:
                        outcome.append(exc)

                thread = threading.Thread(target=sleeper)
                started = time.monotonic()
                thread.start()
                time.sleep(0.2)
                conn.cancel()
                thread.join(10)
                assert outcome and isinstance(outcome[0], psycopg.errors.QueryCanceled), (index, outcome)
                assert time.monotonic() - started < 8
                assert conn.execute("SELECT 1").fetchone() == (1,)
            passed_on = proxy.log().count("cancel request for a session of worker")
            if passed_on >= 2 and attempt >= 2:
                break
        assert proxy.log().count("cancel request for a session of worker") >= 2
        # a key of no session (with a worker's number in it) cancels nothing
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            raw.sendall(struct.pack("!iiii", 16, 80877102, (12345 << 8) | 1, 42))
            assert raw.recv(1) == b""
        assert all(conns[0].execute("SELECT 2").fetchone() == (2,) for conns in sessions.values())
    finally:
        close_all(sessions)


def test_a_worker_that_dies_is_restarted_without_touching_the_other_workers_clients(workers_proxy):
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy)
    try:
        (victim_conn,), (keep,) = sessions[1], sessions[0]
        for i in range(10):
            victim_conn.execute("SELECT 1")
        units_before = metric_sum(proxy, "pgsplit_units_total")  # (the scrape collects worker 1's too)
        status = admin(proxy, "/v1/status")["workers"]["workers"]
        victim = status[1]["pid"]
        keep_pid = keep.info.backend_pid
        os.kill(victim, signal.SIGKILL)
        # the other worker's client keeps going while worker 1 restarts
        deadline = time.monotonic() + 20
        ran = 0  # units since units_before
        while True:
            assert keep.execute("SELECT 3").fetchone() == (3,)
            ran += 1
            workers = admin(proxy, "/v1/status")["workers"]["workers"]
            if workers[1]["up"] and workers[1]["pid"] != victim:
                break
            assert time.monotonic() < deadline, workers
            time.sleep(0.05)
        assert workers[1]["restarts"] == 1 and workers[0]["pid"] == status[0]["pid"]
        assert keep.info.backend_pid == keep_pid and keep.execute("SELECT 4").fetchone() == (4,)
        ran += 1
        with pytest.raises(psycopg.OperationalError):
            victim_conn.execute("SELECT 1")
        # new clients reach the new worker 1, and no counter went backwards
        again = sessions_on_each_worker(proxy)
        try:
            assert all(conns[0].execute("SELECT 5").fetchone() == (5,) for conns in again.values())
        finally:
            close_all(again)
        ran += 2
        # (without the dead worker's counters kept, the sum would lose its 10 units and more)
        assert metric_sum(proxy, "pgsplit_units_total") == units_before + ran
    finally:
        close_all(sessions)


def test_pause_holds_every_worker_also_one_restarted_meanwhile(workers_proxy):
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy)
    try:
        assert admin(proxy, "/v1/pause", {})["paused"] is True
        done: dict[int, float] = {}

        def run(index: int, conn: psycopg.Connection) -> None:
            try:
                conn.execute("SELECT 1")
                done[index] = time.monotonic()
            except psycopg.OperationalError:  # (worker 1's session: its worker is killed below)
                done[index] = -1.0

        threads = [threading.Thread(target=run, args=(i, conns[0])) for i, conns in sessions.items()]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert done == {}, "a worker let a unit through while paused"
        # a worker that restarts during the pause starts held
        victim = admin(proxy, "/v1/status")["workers"]["workers"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(0.5)
        wait_until(lambda: (w := admin(proxy, "/v1/status")["workers"]["workers"][1])["up"] and w["pid"] != victim,
                   timeout=20)
        late: dict[int, float] = {}
        fresh = sessions_on_each_worker(proxy)
        late_thread = threading.Thread(target=lambda: (fresh[1][0].execute("SELECT 1"), late.setdefault(1, 1.0)))
        late_thread.start()
        time.sleep(1.0)
        assert late == {}, "a restarted worker let a unit through while paused"
        resumed = time.monotonic()
        assert admin(proxy, "/v1/resume", {})["resumed"] is True
        late_thread.join(10)
        threads[0].join(10)
        threads[1].join(10)
        assert done[0] >= resumed and done[1] == -1.0 and late == {1: 1.0}
        close_all(fresh)
    finally:
        close_all(sessions)


def test_the_admin_console_on_either_worker_pauses_and_resumes_them_all(cluster):
    """The console runs in the worker its client reached; PAUSE and RESUME there hold and
    release every worker, and SHOW CUTOVER on another worker says so."""
    proxy = ProxyProcess(config_text({"main": cluster}, sections={"admin": {"console_users": ["app"]}}),
                         workers=WORKERS).start()
    consoles: dict[int, list[psycopg.Connection]] = {}
    sessions = {}
    try:
        sessions = sessions_on_each_worker(proxy)
        consoles = {i: [] for i in range(WORKERS)}
        for _ in range(60):
            if all(consoles.values()):
                break
            conn = psycopg.connect(dsn(proxy).replace("dbname=app", "dbname=pgsplit"), autocommit=True,
                                   prepare_threshold=None, connect_timeout=10)
            if consoles[worker_of(conn)]:
                conn.close()  # (a spare)
            else:
                consoles[worker_of(conn)].append(conn)
        assert all(consoles.values()), "no console session on each worker"
        consoles[1][0].execute("PAUSE")
        done: dict[int, bool] = {}
        threads = [threading.Thread(target=lambda i=i, c=c: (c[0].execute("SELECT 1"), done.setdefault(i, True)))
                   for i, c in sessions.items()]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert done == {}, "a worker let a unit through while paused"

        def in_progress() -> str:
            cur = consoles[0][0].execute("SHOW CUTOVER")
            return dict(zip([d.name for d in cur.description], cur.fetchone()))["in_progress"]

        wait_until(lambda: in_progress() == "pause", timeout=5)
        consoles[0][0].execute("RESUME")
        for t in threads:
            t.join(10)
        assert done == {0: True, 1: True}
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not paused"):
            consoles[1][0].execute("RESUME")
    finally:
        close_all(sessions)
        close_all(consoles)
        proxy.stop()


def test_reload_reaches_every_worker(workers_proxy):
    """SIGHUP to the supervisor: a new session on either worker starts with the reloaded
    default consistency."""
    proxy = workers_proxy
    before = sessions_on_each_worker(proxy)
    try:
        shown = {i: conns[0].execute("SHOW pgsplit.consistency").fetchone()[0] for i, conns in before.items()}
        assert set(shown.values()) == {"session"}, shown
        text = proxy.config_path.read_text()
        assert 'consistency = "session"' in text
        proxy.config_path.write_text(text.replace('consistency = "session"', 'consistency = "eventual"'))
        proxy.proc.send_signal(signal.SIGHUP)

        def everywhere_eventual() -> bool:
            after = sessions_on_each_worker(proxy)
            try:
                return {c[0].execute("SHOW pgsplit.consistency").fetchone()[0] for c in after.values()} == {"eventual"}
            finally:
                close_all(after)

        wait_until(everywhere_eventual, timeout=15)
    finally:
        close_all(before)


def test_a_cutover_holds_every_worker_and_moves_them_all_without_losing_a_write():
    """Writers on both workers while the proxy cuts over to a physical standby: every
    write acknowledged is on the new primary, and afterwards both workers' sessions, old
    and new, write there."""
    c = Cluster(0, name="workers-co", users={"app": APP_PASSWORD}).start()
    proxy = None
    try:
        hop = c.add_standby("hop1")
        c.sql(c.primary, "CREATE TABLE acked (id bigint PRIMARY KEY, worker int); ALTER TABLE acked OWNER TO app",
              dbname="app")
        c.wait_caught_up()
        proxy = ProxyProcess(config_text({"main": NodeSet.of(c, "primary"), "hop1": NodeSet.of(c, "hop1")},
                                         sections={"cutover": {"pause_timeout_s": 5}}), workers=WORKERS).start()
        sessions = sessions_on_each_worker(proxy)
        acked: dict[int, list[int]] = {i: [] for i in sessions}
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(index: int, conn: psycopg.Connection) -> None:
            n = index * 1_000_000
            while not stop.is_set():
                n += 1
                try:
                    conn.execute("INSERT INTO acked VALUES (%s, %s)", (n, index))
                    acked[index].append(n)
                except psycopg.Error as exc:  # (a write refused during the swap is not acknowledged)
                    errors.append(exc)
                    time.sleep(0.05)

        threads = [threading.Thread(target=writer, args=(i, conns[0])) for i, conns in sessions.items()]
        for t in threads:
            t.start()
        time.sleep(0.5)
        summary = admin(proxy, "/v1/cutover", {"target": "hop1"}, timeout=120)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(10)
        assert summary["result"] == "success", summary
        # (a worker not held would send writes to the fenced primary: refused as read-only)
        assert errors == [], errors[:3]
        assert all(len(v) > 5 for v in acked.values()), {i: len(v) for i, v in acked.items()}
        on_new = {row[0] for row in c.sql(hop, "SELECT id FROM acked", dbname="app")}
        lost = [n for v in acked.values() for n in v if n not in on_new]
        assert lost == [], f"{len(lost)} acknowledged writes are not on the new primary"
        fresh = sessions_on_each_worker(proxy)
        try:
            for conns in (*sessions.values(), *fresh.values()):
                with conns[0].transaction():
                    conns[0].execute("INSERT INTO acked VALUES (%s, 9)", (time.monotonic_ns(),))
                    assert conns[0].execute("SELECT inet_server_port()").fetchone() == (hop.port,)
        finally:
            close_all(fresh)
        close_all(sessions)
    finally:
        if proxy is not None:
            proxy.stop()
        c.stop()


def test_a_stuck_worker_is_killed_and_started_again(workers_proxy):
    """A worker whose loop stops (SIGSTOP stands for a loop stuck in a call) keeps its
    socket, so the kernel goes on giving it new clients: the supervisor, missing its
    reports, kills it and starts another."""
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy)
    try:
        stuck = admin(proxy, "/v1/status")["workers"]["workers"][1]["pid"]
        os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        wait_until(lambda: (w := admin(proxy, "/v1/status")["workers"]["workers"][1])["up"] and w["pid"] != stuck,
                   timeout=30)
        assert time.monotonic() - started < 25
        assert "killing worker 1" in proxy.log()
        assert sessions[0][0].execute("SELECT 1").fetchone() == (1,)
        again = sessions_on_each_worker(proxy)
        try:
            assert all(conns[0].execute("SELECT 2").fetchone() == (2,) for conns in again.values())
        finally:
            close_all(again)
    finally:
        close_all(sessions)


def test_a_worker_that_stalls_for_a_few_seconds_under_scrapes_is_not_killed(workers_proxy):
    """Stuck is measured in time, not in unanswered requests: scrapes in flight during a
    3-second stall (a page-in, a long GC) must not add up to a kill."""
    proxy = workers_proxy
    sessions = sessions_on_each_worker(proxy)
    try:
        paused = admin(proxy, "/v1/status")["workers"]["workers"][1]["pid"]
        os.kill(paused, signal.SIGSTOP)
        try:
            scrapes = [threading.Thread(target=lambda: admin(proxy, "/metrics")) for _ in range(4)]
            for t in scrapes:
                t.start()
            time.sleep(3.0)
        finally:
            os.kill(paused, signal.SIGCONT)
        for t in scrapes:
            t.join(10)
        assert sessions[1][0].execute("SELECT 1").fetchone() == (1,)
        worker = admin(proxy, "/v1/status")["workers"]["workers"][1]
        assert (worker["pid"], worker["restarts"]) == (paused, 0) and "killing worker" not in proxy.log()
    finally:
        close_all(sessions)


def test_a_port_in_use_is_refused_as_by_one_process(workers_proxy, cluster):
    """With SO_REUSEPORT a second proxy could bind the same port and take half the clients
    (a pause or a cutover of one would not hold the other): it is refused instead."""
    second = ProxyProcess(config_text({"main": cluster}), port=workers_proxy.port, workers=WORKERS)
    try:
        with pytest.raises(RuntimeError, match="exited"):
            second.start(timeout=20)
        assert "Address already in use" in second.log()
    finally:
        second.stop()
    with psycopg.connect(dsn(workers_proxy), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_default_is_a_worker_per_core(cluster):
    proxy = ProxyProcess(config_text({"main": cluster}), workers=None).start()
    try:
        cores = len(os.sched_getaffinity(0))
        status = admin(proxy, "/v1/status")
        assert status.get("workers", {"count": 1})["count"] == cores
        with psycopg.connect(dsn(proxy), autocommit=True, connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        proxy.stop()
