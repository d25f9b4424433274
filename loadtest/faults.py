"""The fault suite: pgsplit under a mixed client load while faults are injected one at a time,
with recovery in between, checking what clients and the proxy make of each.

The load (one client each, every operation under a timeout of `OP_TIMEOUT_S`):

- asyncpg: autocommit inserts, transactions (two inserts and an update), reads, inserts and
  reads through an explicitly prepared statement; with `asyncpg_copy` also
  copy_records_to_table;
- psycopg 3: autocommit inserts (server-side prepared), transactions, reads, COPY FROM STDIN.

Every write inserts a unique id into a ledger table; an id is *acknowledged* once its
commit (or autocommit statement, or COPY) returned OK to the client. At the end every
acknowledged id must be on the primary.

The faults, each followed by recovery (the node back, every backend up and in rotation
again as /v1/status sees it) and `--seconds` of plain load:

- replica_stop: SIGSTOP a replica (postmaster and backends) for a few seconds, then SIGCONT;
- primary_stop: the same for the primary, briefly;
- replica_kill: SIGKILL a replica's postmaster and children, restart it;
- terminate_server: pg_terminate_backend of every pooled connection, on every server;
- pool_exhaust: pool.size + 2 clients hold write transactions; the pool's acquire timeout
  is short;
- client_disconnect: clients close their socket with a query in flight, in and out of a
  transaction;
- copy_disconnect: clients close their sockets during COPY FROM STDIN (psycopg after some
  data; asyncpg while it streams rows, as text and through copy_records_to_table).

Per fault it reports the longest wait of any statement (checked against the configured
bounds: the longest of pool.acquire_timeout_s, pool.connect_timeout_s and
routing.monitor_timeout_ms, plus `SLACK_S`, plus the stop itself for primary_stop), the
distinct (SQLSTATE, message) pairs clients got (each must have both), operations that hit
`OP_TIMEOUT_S` (named by client), and the proxy's RSS, open files and server connections
(the proxy runs as `pgsplit run`, a child process, so /proc/<pid> is the proxy's alone).

Faults that hit a defect not fixed yet are listed in `AWAITING_FIX` and run only with
`--include-awaiting-fix [NAME,...]` (all of them, or those named; for the test,
PGSPLIT_FAULTS_INCLUDE_AWAITING_FIX=1 or =NAME,...); remove a name from it once its fix is
in.

Command line::

    python -m loadtest.faults [--short] [--seconds N] [--only NAME,...] [--include-awaiting-fix [NAME,...]]

Exit status 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg

from loadtest.harness import ProxyProcess, config_text
from loadtest.sandbox import Cluster

# Faults (and load parts) that hit a defect not fixed on this code: name -> the defect.
AWAITING_FIX: dict[str, str] = {}  # name -> the defect it hits; empty: every fault runs

PROXY_SECTIONS: dict[str, dict[str, Any]] = {
    "pool": {"size": 8, "acquire_timeout_s": 1.0, "connect_timeout_s": 2.0},
    "routing": {"monitor_interval_ms": 100, "monitor_timeout_ms": 500},
}
SLACK_S = 1.5  # a loaded 2-core machine: scheduling, retries, the client's own work
OP_TIMEOUT_S = 15.0  # the suite's own guard: an operation this long is a failure of its own
STEP_TIMEOUT_S = 30.0  # any one step of the suite (a node restart, a recovery)
LEDGER = "fault_ledger"
COUNTERS = "fault_counters"
MESSAGE_PREFIX = 100
DOWN_LINE = re.compile(r"(?:primary|replica) main_(\w+) \([^)]*\) is down")


def configured_bound(sections: dict[str, dict[str, Any]] = PROXY_SECTIONS) -> float:
    """The longest a statement may wait on its own account: the proxy's configured bounds."""
    pool, routing = sections["pool"], sections["routing"]
    return max(pool["acquire_timeout_s"], pool["connect_timeout_s"], routing["monitor_timeout_ms"] / 1000) + SLACK_S


# --- what clients saw --------------------------------------------------------------------------


def error_pair(exc: BaseException) -> tuple[str | None, str]:
    """(SQLSTATE, the first words of the message) of a driver's exception, or of the error it
    wraps (asyncpg's transaction block raises its own error when the server's ended it)."""
    cause: BaseException | None = exc
    while cause is not None and not getattr(cause, "sqlstate", None):
        cause = cause.__cause__ or cause.__context__
    exc = cause or exc
    if isinstance(exc, asyncpg.InterfaceError) and "underlying connection is closed" in str(exc):
        # The server's FATAL (terminated, 57P01) arrived while the client sat between two
        # statements of a transaction: asyncpg closed the connection then and raises this at
        # the next call instead of ConnectionDoesNotExistError (08003), as it does against
        # PostgreSQL itself. The client was told; the harness counts it as 08003.
        return "08003", "connection closed: " + " ".join(str(exc).split())[:MESSAGE_PREFIX]
    sqlstate = getattr(exc, "sqlstate", None)
    diag = getattr(exc, "diag", None)
    message = (diag.message_primary if diag is not None else None) or \
        (getattr(exc, "message", None) if isinstance(exc, asyncpg.PostgresError) else None) or str(exc)
    message = " ".join(message.split())
    return sqlstate, (message[:MESSAGE_PREFIX] + "..." if len(message) > MESSAGE_PREFIX else message)


def understandable(pair: tuple[str | None, str]) -> bool:
    sqlstate, message = pair
    return bool(sqlstate) and len(sqlstate) == 5 and len(message) >= 8


@dataclass
class Op:
    client: str
    fault: str
    kind: str
    start: float
    end: float


class Recorder:
    """Operations, errors, timeouts and the ledger of acknowledged ids, by fault."""

    def __init__(self) -> None:
        self.fault = "baseline"
        self.ops: list[Op] = []
        self.errors: dict[str, Counter] = defaultdict(Counter)
        self.timeouts: list[str] = []
        self.acked: dict[int, str] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def ack(self, ids: Iterable[int], fault: str) -> None:
        for i in ids:
            self.acked[i] = fault

    async def timed(self, client: str, kind: str, coro: Awaitable[Any]) -> str:
        """Run one operation under OP_TIMEOUT_S: "ok", "error" or "timeout"."""
        fault, loop = self.fault, asyncio.get_running_loop()
        t0 = loop.time()
        outcome = "ok"
        guard = asyncio.timeout(OP_TIMEOUT_S)
        try:
            async with guard:
                await coro
        except TimeoutError as exc:
            outcome = "timeout"
            if guard.expired():
                self.timeouts.append(f"{client} {kind} during {fault}: no answer in {OP_TIMEOUT_S:g} s")
            else:  # the driver's own (login) timeout: the proxy did not answer either
                self.errors[fault][(None, f"{type(exc).__name__} in the driver: {exc}")] += 1
        except Exception as exc:  # noqa: BLE001  every error a client gets is recorded and judged
            outcome = "error"
            self.errors[fault][error_pair(exc)] += 1
        self.ops.append(Op(client, fault, kind, t0, loop.time()))
        return outcome


# --- the load ------------------------------------------------------------------------------------


class LoadClient:
    """One application connection that reconnects when it loses it. Subclasses define
    `connect`, `close`, `closed` and `step`."""

    kinds: tuple[str, ...] = ()

    def __init__(self, name: str, dsn: str, rec: Recorder, think_s: float = 0.02):
        self.name, self.dsn, self.rec, self.think_s = name, dsn, rec, think_s
        self.conn: Any = None
        self.n = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.conn is None or self.closed():
                await self.close()
                if await self.rec.timed(self.name, "connect", self.connect()) != "ok":
                    await asyncio.sleep(0.2)
                    continue
            kind = self.kinds[self.n % len(self.kinds)]
            self.n += 1
            if await self.rec.timed(self.name, kind, self.step(kind)) == "timeout":
                await self.close()  # a timed-out connection is in an unknown state
            await asyncio.sleep(self.think_s)
        await self.close()

    def ids(self, n: int) -> list[int]:
        return [self.rec.next_id() for _ in range(n)]


class AsyncpgClient(LoadClient):
    def __init__(self, *args: Any, kinds: tuple[str, ...], **kw: Any):
        super().__init__(*args, **kw)
        self.kinds = kinds
        self.insert_stmt = self.read_stmt = None

    async def connect(self) -> None:
        self.conn = await asyncpg.connect(self.dsn, timeout=5, ssl=False)
        if "prepared" in self.kinds:
            self.insert_stmt = await self.conn.prepare(f"INSERT INTO {LEDGER} (id, client) VALUES ($1, $2)")
            self.read_stmt = await self.conn.prepare(f"SELECT count(*) FROM {LEDGER} WHERE client = $1")

    def closed(self) -> bool:
        return self.conn.is_closed()

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None

    async def step(self, kind: str) -> None:
        fault, c = self.rec.fault, self.conn
        if kind == "write":
            ids = self.ids(1)
            await c.execute(f"INSERT INTO {LEDGER} (id, client) VALUES ($1, $2)", ids[0], self.name)
        elif kind == "tx":
            ids = self.ids(2)
            async with c.transaction():
                await c.executemany(f"INSERT INTO {LEDGER} (id, client) VALUES ($1, $2)",
                                    [(i, self.name) for i in ids])
                await c.execute(f"UPDATE {COUNTERS} SET n = n + 1 WHERE client = $1", self.name)
        elif kind == "prepared":
            ids = self.ids(1)
            await self.insert_stmt.fetch(ids[0], self.name)
            await self.read_stmt.fetchval(self.name)
        elif kind == "copy":
            ids = self.ids(20)
            await c.copy_records_to_table(LEDGER, records=[(i, self.name) for i in ids], columns=["id", "client"])
        else:
            await c.fetchval(f"SELECT count(*) FROM {LEDGER} WHERE client = $1", self.name)
            return
        self.rec.ack(ids, fault)


class PsycopgClient(LoadClient):
    def __init__(self, *args: Any, kinds: tuple[str, ...], **kw: Any):
        super().__init__(*args, **kw)
        self.kinds = kinds

    async def connect(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)

    def closed(self) -> bool:
        return self.conn.closed or self.conn.broken

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                async with asyncio.timeout(5):
                    await conn.close()
            except (TimeoutError, psycopg.Error, OSError):
                pass

    async def step(self, kind: str) -> None:
        fault, c = self.rec.fault, self.conn
        if kind == "write":
            ids = self.ids(1)
            await c.execute(f"INSERT INTO {LEDGER} (id, client) VALUES (%s, %s)", (ids[0], self.name), prepare=True)
        elif kind == "tx":
            ids = self.ids(2)
            async with c.transaction():
                for i in ids:
                    await c.execute(f"INSERT INTO {LEDGER} (id, client) VALUES (%s, %s)", (i, self.name))
                await c.execute(f"UPDATE {COUNTERS} SET n = n + 1 WHERE client = %s", (self.name,))
        elif kind == "copy":
            ids = self.ids(20)
            async with c.cursor() as cur, cur.copy(f"COPY {LEDGER} (id, client) FROM STDIN") as copy:
                for i in ids:
                    await copy.write_row((i, self.name))
        else:
            await c.execute(f"SELECT count(*) FROM {LEDGER} WHERE client = %s", (self.name,), prepare=True)
            return
        self.rec.ack(ids, fault)


def load_clients(dsn: str, rec: Recorder, asyncpg_copy: bool) -> list[LoadClient]:
    clients: list[LoadClient] = [
        AsyncpgClient("asyncpg-write", dsn, rec, kinds=("write",)),
        AsyncpgClient("asyncpg-tx", dsn, rec, kinds=("tx",)),
        AsyncpgClient("asyncpg-read", dsn, rec, kinds=("read",)),
        AsyncpgClient("asyncpg-prepared", dsn, rec, kinds=("prepared",)),
        PsycopgClient("psycopg-write", dsn, rec, kinds=("write",)),
        PsycopgClient("psycopg-tx", dsn, rec, kinds=("tx",)),
        PsycopgClient("psycopg-read", dsn, rec, kinds=("read", "read", "write")),
        PsycopgClient("psycopg-copy", dsn, rec, kinds=("copy",), think_s=0.1),
    ]
    if asyncpg_copy:
        clients.append(AsyncpgClient("asyncpg-copy", dsn, rec, kinds=("copy",), think_s=0.1))
    return clients


# --- the suite -----------------------------------------------------------------------------------


@dataclass
class FaultRow:
    """What one fault did, as the table prints it."""

    name: str
    ops: int = 0
    acked: int = 0
    lost: int = 0
    errors: int = 0
    longest_wait_s: float = 0.0
    bound_s: float = 0.0
    timeouts: int = 0
    recovery_s: float = 0.0
    rss_mb: float = 0.0
    fds: int = 0
    server_conns: int = 0
    server_sessions: int = 0
    down_seen: list[str] = field(default_factory=list)
    pairs: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


@dataclass
class SuiteResult:
    rows: list[FaultRow]
    failures: list[str]
    seconds: float

    def table(self) -> str:
        head = ["fault", "ops", "acked", "lost", "errors", "longest wait", "bound", "timeouts",
                "recovery", "RSS MB", "fds", "server conns", "pg sessions", "backends down seen"]
        lines = [[r.name, str(r.ops), str(r.acked), str(r.lost), str(r.errors), f"{r.longest_wait_s:.2f} s",
                  f"{r.bound_s:.1f} s" if r.bound_s else "-", str(r.timeouts),
                  f"{r.recovery_s:.1f} s" if r.recovery_s else "-", f"{r.rss_mb:.1f}", str(r.fds),
                  str(r.server_conns), str(r.server_sessions), ", ".join(r.down_seen) or "-"] for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
        out += ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
        return "\n".join(out)

    def report(self) -> str:
        out = [self.table(), ""]
        for r in self.rows:
            if r.pairs or r.notes:
                out.append(f"{r.name}:")
                out += [f"  {n} x {sqlstate or '(no SQLSTATE)'} {message}" for (sqlstate, message), n
                        in sorted(r.pairs.items(), key=lambda kv: -kv[1])]
                out += [f"  note: {n}" for n in r.notes]
        out.append(f"\n{len(self.failures)} failure(s) in {self.seconds:.0f} s")
        out += [f"FAIL {f}" for f in self.failures]
        return "\n".join(out)


class Suite:
    def __init__(self, cluster: Cluster, *, short: bool, settle_s: float, faults: list[str],
                 asyncpg_copy: bool, log: Callable[[str], None] = print):
        self.cluster, self.short, self.settle_s, self.fault_names = cluster, short, settle_s, faults
        self.asyncpg_copy, self.log = asyncpg_copy, log
        self.rec = Recorder()
        self.proxy: ProxyProcess | None = None
        self.failures: list[str] = []
        self.rows: list[FaultRow] = []
        self.log_offset = 0
        self.password = cluster.users["app"]

    # -- the proxy, seen from outside

    @property
    def dsn(self) -> str:
        return f"postgresql://app:{self.password}@127.0.0.1:{self.proxy.port}/app?sslmode=disable"

    async def status(self) -> dict:
        url = f"http://127.0.0.1:{self.proxy.admin_port}/v1/status"

        def get() -> dict:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return json.loads(resp.read())

        return await asyncio.to_thread(get)

    def proxy_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proxy.proc.pid}/fd"))

    async def server_sessions(self) -> int:
        """Sessions of the application's user on all servers: the proxy's pooled connections."""
        total = 0
        for node in self.cluster.nodes:
            rows = await asyncio.to_thread(self.cluster.sql, node,
                                           "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
            total += rows[0][0]
        return total

    def read_proxy_log(self, row: FaultRow | None = None) -> None:
        """The proxy's log since the last call: into `row`, the backends it logged as down
        (a replica out of service for a few milliseconds is missed by any poll of
        /v1/status) and any traceback (a failure)."""
        with open(self.proxy.log_path, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        self.log_offset += len(data)
        if row is None:
            return
        text = data.decode(errors="replace")
        row.down_seen = sorted({m.group(1) for m in DOWN_LINE.finditer(text)})
        self.failures += [f"{row.name}: the proxy logged {line.strip()[:200]!r}" for line in text.splitlines()
                          if line.startswith("Traceback") or " ERROR " in line or " CRITICAL " in line]

    async def recovered(self) -> float:
        """Seconds until every backend is up, in rotation and the primary writable."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            try:
                s = await self.status()
                if s["primary_writable"] and all(b["up"] and b["in_rotation"] is not False for b in s["backends"]):
                    return loop.time() - t0
            except OSError:
                pass
            if loop.time() - t0 > STEP_TIMEOUT_S:
                self.failures.append(f"{self.rec.fault}: the backends were not all up within {STEP_TIMEOUT_S:g} s")
                return loop.time() - t0
            await asyncio.sleep(0.1)

    # -- set-up and the run

    async def setup(self) -> None:
        sql = lambda q: asyncio.to_thread(self.cluster.sql, self.cluster.primary, q, dbname="app")  # noqa: E731
        await sql(f"DROP TABLE IF EXISTS {LEDGER}, {COUNTERS}")
        await sql(f"CREATE TABLE {LEDGER} (id bigint PRIMARY KEY, client text NOT NULL)")
        await sql(f"CREATE TABLE {COUNTERS} (client text PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        await sql(f"INSERT INTO {COUNTERS} (client) SELECT 'asyncpg-tx' UNION ALL SELECT 'psycopg-tx'")
        await sql(f"ALTER TABLE {LEDGER} OWNER TO app")
        await sql(f"ALTER TABLE {COUNTERS} OWNER TO app")
        await asyncio.to_thread(self.cluster.wait_caught_up, None, STEP_TIMEOUT_S)
        self.proxy = ProxyProcess(config_text({"main": self.cluster}, sections=PROXY_SECTIONS))
        await asyncio.to_thread(self.proxy.start)

    async def run(self) -> SuiteResult:
        t_start = time.monotonic()
        asyncio.get_running_loop().set_exception_handler(_quiet_on_closed_connections)
        stop = asyncio.Event()
        tasks: list[asyncio.Task] = []
        try:
            await self.setup()
            clients = load_clients(self.dsn, self.rec, self.asyncpg_copy)
            tasks = [asyncio.create_task(c.run(stop)) for c in clients]
            await asyncio.sleep(self.settle_s)
            await self.measure(FaultRow("baseline", bound_s=configured_bound()))
            for name in self.fault_names:
                await self.run_fault(name)
        finally:
            stop.set()
            done, late = await asyncio.wait(tasks, timeout=OP_TIMEOUT_S + 10) if tasks else (set(), set())
            for t in late:
                t.cancel()
                self.failures.append("a load client did not stop in time")
            self.failures += [f"a load client failed: {t.exception()!r}" for t in done if t.exception()]
            if self.proxy is not None:
                await asyncio.to_thread(self.proxy.stop)
        self.judge()
        await self.check_ledger()
        self.check_resources()
        await asyncio.to_thread(self.cluster.sql, self.cluster.primary, f"DROP TABLE {LEDGER}, {COUNTERS}",
                                dbname="app")
        if self.failures:
            self.failures.append(f"(the proxy's log: {self.proxy.log_path})")
        else:
            shutil.rmtree(self.proxy.dir, ignore_errors=True)
        return SuiteResult(self.rows, self.failures, time.monotonic() - t_start)

    async def run_fault(self, name: str) -> None:
        fault = FAULTS[name]
        runs = sum(1 for r in self.rows if r.name.split("#")[0] == name)
        name = f"{name}#{runs + 1}" if runs else name
        self.read_proxy_log()  # what came before is not this fault's
        self.rec.fault = name
        self.log(f"fault {name}: {fault.what}")
        row = FaultRow(name, bound_s=fault.bound(self))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        guard = asyncio.timeout(STEP_TIMEOUT_S * 2)
        try:
            async with guard:
                await fault.inject(self, row)
        except Exception as exc:  # noqa: BLE001  reported; the suite goes on to recover and measure
            self.failures.append(f"{name}: injecting and undoing the fault took over {STEP_TIMEOUT_S * 2:g} s"
                                 if guard.expired() else f"{name}: the fault's own steps failed: {exc!r}")
        finally:
            for node in self.cluster.nodes:  # whatever happened, no node stays stopped
                self.cluster.thaw_node(node)
        undone = loop.time() - t0
        row.recovery_s = await self.recovered()
        await asyncio.sleep(self.settle_s)
        row.notes.append(f"injected and undone in {undone:.1f} s")
        await self.measure(row)
        if fault.check is not None:
            fault.check(self, row)

    def count(self, row: FaultRow) -> list[Op]:
        """The row's figures from the recorder (operations are counted under the fault in
        which they started); its operations."""
        ops = [o for o in self.rec.ops if o.fault == row.name]
        row.ops = len(ops)
        row.longest_wait_s = max((o.end - o.start for o in ops), default=0.0)
        row.pairs = self.rec.errors.get(row.name, Counter())
        row.errors = sum(row.pairs.values())
        row.timeouts = sum(1 for t in self.rec.timeouts if f" during {row.name}:" in t)
        row.acked = sum(1 for f in self.rec.acked.values() if f == row.name)
        return ops

    def judge(self) -> None:
        """Once the load has stopped (every operation ended or timed out): waits over the
        bound, timeouts and errors without SQLSTATE, per fault."""
        for row in self.rows:
            ops = self.count(row)
            if row.bound_s and row.longest_wait_s > row.bound_s:
                slow = max(ops, key=lambda o: o.end - o.start)
                self.failures.append(f"{row.name}: {slow.client} waited {row.longest_wait_s:.2f} s on a {slow.kind} "
                                     f"(bound {row.bound_s:.1f} s)")
            self.failures += [t for t in self.rec.timeouts if f" during {row.name}:" in t]
            self.failures += [f"{row.name}: an error without SQLSTATE or message: {p!r}" for p in row.pairs
                              if not understandable(p)]

    async def measure(self, row: FaultRow) -> None:
        """The proxy's figures as the fault's window closes (and the recorder's so far)."""
        self.count(row)
        row.rss_mb = self.proxy.rss_bytes() / 2**20
        row.fds = self.proxy_fds()
        status = await self.status()
        row.server_conns = sum(sum(b["server_connections"].values()) for b in status["backends"])
        row.server_sessions = await self.server_sessions()
        self.read_proxy_log(row)
        self.rows.append(row)
        self.log(f"  {row.name}: {row.ops} ops, {row.errors} errors, longest wait {row.longest_wait_s:.2f} s, "
                 f"RSS {row.rss_mb:.1f} MB, {row.fds} fds, {row.server_conns} server connections")

    async def check_ledger(self) -> None:
        rows = await asyncio.to_thread(self.cluster.sql, self.cluster.primary, f"SELECT id FROM {LEDGER}",
                                       dbname="app")
        present = {r[0] for r in rows}
        lost = Counter(f for i, f in self.rec.acked.items() if i not in present)
        for row in self.rows:
            row.lost = lost.get(row.name, 0)
        if lost:
            self.failures.append(f"acknowledged writes lost: {dict(lost)}")

    def check_resources(self) -> None:
        """After the faults, the proxy's files and memory are near where the load left them
        before the first fault; its server connections match the servers' sessions."""
        if len(self.rows) < 2:
            return
        base, last = self.rows[0], self.rows[-1]
        # Sockets to servers come and go with the pools (up to pool.size each); the rest
        # (clients, listeners, logs) must not grow.
        other_base, other_last = base.fds - base.server_conns, last.fds - last.server_conns
        if other_last > other_base + 4:
            self.failures.append(f"open files other than server connections grew from {other_base} to {other_last}")
        cap = PROXY_SECTIONS["pool"]["size"] * len(self.cluster.nodes)
        if last.server_conns > cap:
            self.failures.append(f"{last.server_conns} server connections, more than the pools allow ({cap})")
        for row in self.rows:
            if abs(row.server_conns - row.server_sessions) > 2:
                self.failures.append(f"{row.name}: the proxy counts {row.server_conns} server connections, "
                                     f"the servers {row.server_sessions} sessions")
        if last.rss_mb > base.rss_mb * 1.5 + 20:
            self.failures.append(f"RSS grew from {base.rss_mb:.1f} to {last.rss_mb:.1f} MB")


def _quiet_on_closed_connections(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncpg leaves a future with "connection was closed" unretrieved when a connection
    is closed under a COPY: what the faults do on purpose."""
    if not isinstance(context.get("exception"), asyncpg.ConnectionDoesNotExistError):
        loop.default_exception_handler(context)


# --- the faults ----------------------------------------------------------------------------------


@dataclass
class Fault:
    what: str
    inject: Callable[[Suite, FaultRow], Awaitable[None]]
    bound: Callable[[Suite], float] = lambda suite: configured_bound()
    check: Callable[[Suite, FaultRow], None] | None = None  # after the row's figures are in


def stop_seconds(suite: Suite, node: str) -> float:
    return (5.0 if suite.short else 8.0) if node != "primary" else 1.5


async def freeze(suite: Suite, row: FaultRow, node: str) -> None:
    await asyncio.to_thread(suite.cluster.freeze_node, node)
    try:
        await asyncio.sleep(stop_seconds(suite, node))
    finally:
        suite.cluster.thaw_node(node)


async def replica_kill(suite: Suite, row: FaultRow) -> None:
    await asyncio.to_thread(suite.cluster.kill_node, "replica2")
    await asyncio.sleep(1.0)
    await asyncio.to_thread(suite.cluster.start_node, "replica2")
    await asyncio.to_thread(suite.cluster.wait_streaming, "replica2", STEP_TIMEOUT_S)


async def terminate_server(suite: Suite, row: FaultRow) -> None:
    """Terminate every pooled connection on every server, while the load runs and while
    some slow reads are sure to be in flight (a read whose server connection is lost before
    it sent a row is retried elsewhere)."""
    marker = f"slowread_{uuid.uuid4().hex[:8]}"
    conns = await asyncio.gather(*(asyncpg.connect(suite.dsn, timeout=5, ssl=False) for _ in range(3)))
    try:
        reads = [asyncio.create_task(suite.rec.timed(f"slow-read-{k}", "read", c.fetchval(
            f"SELECT pg_sleep(1) /* {marker} */"))) for k, c in enumerate(conns)]
        await wait_sessions(suite, marker, present=True)
        killed = 0
        for node in suite.cluster.nodes:
            rows = await asyncio.to_thread(
                suite.cluster.sql, node, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                         "WHERE usename = 'app' AND pid <> pg_backend_pid()")
            killed += rows[0][0]
        row.notes.append(f"{killed} server connections terminated")
        await asyncio.gather(*reads)
    finally:
        for c in conns:
            c.terminate()
    await asyncio.sleep(1.0 if suite.short else 2.0)


def no_backend_down(suite: Suite, row: FaultRow) -> None:
    """Servers that end some sessions are still up: no backend leaves service for it."""
    if row.down_seen:
        suite.failures.append(f"{row.name}: backends marked down: {', '.join(row.down_seen)}")


async def pool_exhaust(suite: Suite, row: FaultRow) -> None:
    size = PROXY_SECTIONS["pool"]["size"]
    hold_s = PROXY_SECTIONS["pool"]["acquire_timeout_s"] * 2.5
    rec = suite.rec

    async def holder(k: int) -> None:
        """BEGIN and an insert (which takes a server connection), hold it, COMMIT: the
        statements are timed, not the hold."""
        name, i = f"holder-{k}", rec.next_id()
        conn = None
        try:
            conn = await asyncpg.connect(suite.dsn, timeout=5, ssl=False)
            insert = conn.execute(f"BEGIN; INSERT INTO {LEDGER} (id, client) VALUES ({i}, '{name}')")
            if await rec.timed(name, "begin+insert", insert) == "ok":
                await asyncio.sleep(hold_s)
                if await rec.timed(name, "commit", conn.execute("COMMIT")) == "ok":
                    rec.ack([i], row.name)
        except Exception as exc:  # noqa: BLE001  a login that fails is an error this client got
            rec.errors[row.name][error_pair(exc)] += 1
        finally:
            if conn is not None:
                conn.terminate()

    await asyncio.gather(*(holder(k) for k in range(size + 2)))
    if not any(sqlstate == "53300" for sqlstate, _ in rec.errors[row.name]):
        suite.failures.append("pool_exhaust: no client got 53300: the pool was not exhausted")


async def wait_sessions(suite: Suite, marker: str, present: bool) -> list[str]:
    """Wait (up to 5 s) until a server session whose query has `marker` runs on some node
    (present) or on none; the nodes where it runs at the end."""
    q = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + 5
    while True:
        running = [n.name for n in suite.cluster.nodes
                   if (await asyncio.to_thread(suite.cluster.sql, n, q, f"%{marker}%", dbname="app"))[0][0]]
        if bool(running) == present or time.monotonic() > deadline:
            return running
        await asyncio.sleep(0.05)


async def client_disconnect(suite: Suite, row: FaultRow) -> None:
    """Two clients close their sockets with a statement in flight: one in autocommit (a read,
    on a replica or the primary), one in a transaction after an insert (on the primary)."""
    for in_tx in (False, True):
        marker = f"gone_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(suite.dsn, timeout=5, ssl=False)
        uncommitted = suite.rec.next_id()
        query = None
        try:
            async with asyncio.timeout(10):
                if in_tx:
                    await conn.execute("BEGIN")
                    await conn.execute(f"INSERT INTO {LEDGER} (id, client) VALUES ($1, 'gone')", uncommitted)
                query = asyncio.create_task(conn.execute(f"SELECT pg_sleep(30) /* {marker} */"))
                started = await wait_sessions(suite, marker, present=True)
        finally:
            conn.terminate()
            if query is not None:
                await asyncio.wait([query], timeout=5)
                if query.done() and not query.cancelled():
                    query.exception()  # the client's own error: it closed the socket
        what = "in a transaction" if in_tx else "in autocommit"
        if not started:
            suite.failures.append(f"client_disconnect: the statement {what} never showed on a server")
            continue
        if still := await wait_sessions(suite, marker, present=False):
            suite.failures.append(f"client_disconnect: the server session of the client gone {what} "
                                  f"still runs its statement 5 s later (on {', '.join(still)})")
        if in_tx:
            rows = await asyncio.to_thread(suite.cluster.sql, "primary", f"SELECT 1 FROM {LEDGER} WHERE id = %s",
                                           uncommitted, dbname="app")
            if rows:
                suite.failures.append("client_disconnect: the insert of a transaction never committed is on the primary")


async def copy_disconnect(suite: Suite, row: FaultRow) -> None:
    """Clients close their sockets in the middle of COPY FROM STDIN: psycopg after some
    data, asyncpg while it streams rows."""
    await psycopg_copy_gone(suite)
    await asyncpg_copy_gone(suite, binary=False)
    await asyncpg_copy_gone(suite, binary=True)


async def copy_left_nothing(suite: Suite, who: str, marker: str, ids: list[int]) -> None:
    if still := await wait_sessions(suite, marker, present=False):
        suite.failures.append(f"copy_disconnect: the server session of {who} gone mid-COPY still runs the COPY "
                              f"5 s later (on {', '.join(still)})")
    rows = await asyncio.to_thread(suite.cluster.sql, "primary", f"SELECT count(*) FROM {LEDGER} WHERE id = ANY(%s)",
                                   ids, dbname="app")
    if rows[0][0]:
        suite.failures.append(f"copy_disconnect: {rows[0][0]} rows of {who}'s abandoned COPY are on the primary")


async def asyncpg_copy_gone(suite: Suite, binary: bool) -> None:
    """asyncpg streams rows from an endless source (CSV text with copy_to_table, or
    records with copy_records_to_table, which pipelines the COPY) until it is cut off."""
    marker = f"copygone_{uuid.uuid4().hex[:8]}"
    ids: list[int] = []

    async def endless_text() -> Any:
        while True:
            chunk = [suite.rec.next_id() for _ in range(100)]
            ids.extend(chunk)
            yield "".join(f"{i},copy-gone\n" for i in chunk).encode()
            await asyncio.sleep(0.005)

    async def endless_records() -> Any:
        while True:
            ids.append(suite.rec.next_id())
            yield (ids[-1], "copy-gone")
            if len(ids) % 100 == 0:
                await asyncio.sleep(0.005)

    conn = await asyncpg.connect(suite.dsn, timeout=5, ssl=False)
    where = f"true /* {marker} */"
    if binary:
        work = conn.copy_records_to_table(LEDGER, records=endless_records(), columns=["id", "client"], where=where)
    else:
        work = conn.copy_to_table(LEDGER, source=endless_text(), columns=["id", "client"], format="csv", where=where)
    copy = asyncio.create_task(work)
    try:
        if not await wait_sessions(suite, marker, present=True):
            suite.failures.append("copy_disconnect: asyncpg's COPY never showed on the primary")
    finally:
        conn.terminate()
        await asyncio.wait([copy], timeout=5)
        if copy.done() and not copy.cancelled():
            copy.exception()  # the client's own error: it closed the socket
        else:
            copy.cancel()
    await copy_left_nothing(suite, "asyncpg (binary)" if binary else "asyncpg", marker, ids)


async def psycopg_copy_gone(suite: Suite) -> None:
    marker = f"copygone_{uuid.uuid4().hex[:8]}"
    conn = await psycopg.AsyncConnection.connect(suite.dsn, autocommit=True, connect_timeout=5)
    ids = [suite.rec.next_id() for _ in range(2000)]
    try:
        async with asyncio.timeout(10):
            cur = conn.cursor()
            async with cur.copy(f"COPY {LEDGER} (id, client) FROM STDIN /* {marker} */") as copy:
                for i in ids:
                    await copy.write_row((i, "copy-gone " + "x" * 40))  # > 100 kB: some of it is sent
                if not await wait_sessions(suite, marker, present=True):
                    suite.failures.append("copy_disconnect: the COPY never showed on the primary")
                sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                raise ConnectionAbortedError  # leave the COPY without finishing it
    except (ConnectionAbortedError, psycopg.Error, OSError):
        pass
    finally:
        try:
            async with asyncio.timeout(5):
                await conn.close()
        except (TimeoutError, psycopg.Error, OSError):
            pass
    await copy_left_nothing(suite, "psycopg", marker, ids)


FAULTS: dict[str, Fault] = {
    "replica_stop": Fault("SIGSTOP replica1 (postmaster and backends), then SIGCONT",
                          lambda s, r: freeze(s, r, "replica1")),
    "primary_stop": Fault("SIGSTOP the primary for 1.5 s, then SIGCONT", lambda s, r: freeze(s, r, "primary"),
                          bound=lambda s: configured_bound() + stop_seconds(s, "primary")),
    "replica_kill": Fault("SIGKILL replica2's postmaster and children, restart it", replica_kill),
    "terminate_server": Fault("pg_terminate_backend of every pooled connection, on every server", terminate_server,
                              check=no_backend_down),
    "pool_exhaust": Fault("pool.size + 2 clients hold write transactions (acquire timeout 1 s)", pool_exhaust),
    "client_disconnect": Fault("clients close their sockets with a query in flight (autocommit, in a transaction)",
                               client_disconnect),
    "copy_disconnect": Fault("clients close their sockets during COPY FROM STDIN (psycopg; asyncpg, text and "
                             "binary)", copy_disconnect),
}


def awaiting_included(spec: str | None) -> set[str]:
    """The names of AWAITING_FIX to run anyway: "" or None none, "1" or "all" every one,
    else a comma-separated list."""
    if not spec or spec == "0":
        return set()
    names = set(AWAITING_FIX) if spec in ("1", "all") else set(spec.split(","))
    if unknown := names - set(AWAITING_FIX):
        raise ValueError(f"not awaiting a fix: {', '.join(sorted(unknown))}; AWAITING_FIX: {', '.join(AWAITING_FIX)}")
    return names


def selected(included: set[str], only: Iterable[str] | None = None) -> list[str]:
    names = list(only) if only else list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    return [n for n in names if n in included or n not in AWAITING_FIX]


async def run_suite(cluster: Cluster, *, short: bool = False, seconds: float | None = None,
                    include_awaiting_fix: str | None = None, only: Iterable[str] | None = None,
                    log: Callable[[str], None] = print) -> SuiteResult:
    """`include_awaiting_fix`: what of AWAITING_FIX to run anyway (see awaiting_included)."""
    included = awaiting_included(include_awaiting_fix)
    suite = Suite(cluster, short=short, settle_s=seconds if seconds is not None else (2.0 if short else 8.0),
                  faults=selected(included, only),
                  asyncpg_copy="asyncpg_copy" in included or "asyncpg_copy" not in AWAITING_FIX, log=log)
    return await suite.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="shorter stops and pauses (the CI form)")
    parser.add_argument("--seconds", type=float, help="seconds of plain load after each recovery (default 8, short 2)")
    parser.add_argument("--only", help="comma-separated fault names: " + ", ".join(FAULTS))
    parser.add_argument("--include-awaiting-fix", nargs="?", const="all", metavar="NAME,...",
                        help="also run what AWAITING_FIX lists (all, or these): " + ", ".join(AWAITING_FIX))
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else None
    with Cluster(2, name="faults", users={"app": "app-secret"}) as cluster:
        result = asyncio.run(run_suite(cluster, short=args.short, seconds=args.seconds,
                                       include_awaiting_fix=args.include_awaiting_fix, only=only))
    print(result.report())
    return 1 if result.failures else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
