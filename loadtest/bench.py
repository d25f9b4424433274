"""Benchmarks: pgsplit against PostgreSQL direct, PgBouncer and Pgpool-II, with pgbench.

Owns: the benchmark plan (which pgbench runs, in which order), running it against a
sandbox cluster (a primary and streaming replicas from `loadtest.sandbox`), the results
(CSV under loadtest/results/) and the report (docs/benchmarks.md and PNG plots under
docs/img/). It drives pgsplit as an operator would, as a `pgsplit run` child process
(`loadtest.harness.ProxyProcess`), and the competitors through `loadtest.competitors`;
it imports nothing from proxy/ or router/.

The machine is small and shared by pgbench, PostgreSQL and the proxy under test, so a
single figure means little. Every comparison is interleaved: round after round, each
(workload, mode, clients) combination runs on every target back to back, in an order
rotated (and reversed every other time) from one combination and round to the next; the report quotes medians over
rounds and ratios computed per round between runs that ran side by side.

Phases:

- throughput: pgbench select-only (-S) and tpcb-like, -M simple/extended/prepared, at
  several client counts, on every target; p50/p99 come from pgbench's per-transaction
  log (-l), so the 1-client runs give the latency added by each proxy.
- memory: RSS of a fresh pgsplit and a fresh PgBouncer holding N idle client
  connections that completed a real SCRAM login; bytes per connection.
- ryw: a custom script (1 UPDATE, 10 SELECTs of random accounts) through three pgsplit
  processes that differ only in `[routing]` (session; session with consistency_wait_ms = 0;
  eventual), with the share of reads served by replicas from pgsplit's metrics.

Run ``python -m loadtest.bench --help``; ``--quick`` for a ~3-minute development run,
``--plan`` to print what would run and an estimate of the time it takes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime as dt
import glob
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.competitors import (
    PGBOUNCER,
    PGPOOL,
    Backend,
    CompetitorError,
    PgBouncer,
    Pgpool,
    tool_version,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "loadtest" / "results"
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
IMG_DIR = ROOT / "docs" / "img"
PGBENCH = shutil.which("pgbench") or "/usr/bin/pgbench"

USER, PASSWORD, DBNAME = "app", "app-secret", "app"

WORKLOADS = {"select": ["-S"], "tpcb": ["-b", "tpcb-like"]}
WORKLOAD_LABELS = {"select": "select-only (-S)", "tpcb": "tpcb-like", "ryw": "1 write + 10 reads"}
MODES = ("simple", "extended", "prepared")

# Order matters: it is the first round's order and the column order of the report.
TARGETS = {
    "direct": "PostgreSQL (direct)",
    "pgbouncer": "PgBouncer",
    "pgpool": "Pgpool-II (primary only)",
    "pgpool-replicas": "Pgpool-II (with replicas)",
    "pgsplit": "pgsplit (primary only)",
    "pgsplit-replicas": "pgsplit (with replicas)",
}
RYW_TARGETS = {
    "direct": "PostgreSQL (direct)",
    "pgsplit-session": "pgsplit, consistency = session",
    "pgsplit-session-nowait": "pgsplit, consistency = session, consistency_wait_ms = 0",
    "pgsplit-eventual": "pgsplit, consistency = eventual",
}
RYW_ROUTING = {  # the [routing] of each pgsplit target of the read-your-writes phase
    "pgsplit-session": {"consistency": "session"},
    "pgsplit-session-nowait": {"consistency": "session", "consistency_wait_ms": 0},
    "pgsplit-eventual": {"consistency": "eventual"},
}
# (numerator, denominator) pairs quoted in the report
RATIOS = [
    ("pgsplit", "direct"),
    ("pgsplit", "pgbouncer"),
    ("pgsplit", "pgpool"),
    ("pgsplit-replicas", "direct"),
    ("pgsplit-replicas", "pgpool-replicas"),
]

# Sandbox settings for the benchmark cluster: room for every target's server
# connections at once (direct 128 + two Pgpool-II with one connection per child and
# backend + the pools), the whole pgbench data set in shared_buffers, no checkpoint
# storm in the middle of a run.
CLUSTER_SETTINGS = {
    "max_connections": "800",
    "shared_buffers": "256MB",
    "checkpoint_timeout": "30min",
    "max_wal_size": "4GB",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
}

CSV_FIELDS = [
    "round", "target", "workload", "mode", "clients", "tps", "latency_avg_ms", "p50_ms",
    "p99_ms", "failed", "aborted", "transactions", "replica_read_share",
    "waits_immediate", "waits_waited", "waits_fallback", "wait_seconds", "connect_ms", "phase", "seq",
    "duration_s", "pgbench_T", "wall_s", "started_at", "loadavg", "idle_cpu",
    "error",
]
MEMORY_FIELDS = ["target", "connections", "rss_bytes", "rss0_bytes", "bytes_per_connection",
                 "login_seconds", "error"]


class BenchError(RuntimeError):
    """The benchmark cannot go on (a target did not start, pgbench is missing...)."""


# --------------------------------------------------------------------------- options


@dataclasses.dataclass
class Plan:
    rounds: int
    duration: int
    warmup: int
    workloads: list[str]
    modes: list[str]
    clients: list[int]
    targets: list[str]
    phases: list[str]
    scale: int
    replicas: int
    pool_size: int
    memory_conns: list[int]
    ryw_clients: int
    ryw_modes: list[str]
    ryw_duration: int
    # (workload, mode, clients) of the throughput phase, in run order within a round
    combos: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    def throughput_runs(self) -> int:
        per_round = sum(1 for _w, m, _c in self.combos for t in self.targets if supports(t, m))
        return per_round * self.rounds

    def estimate_seconds(self) -> float:
        """Rough wall time: run durations plus ~0.6 s of connecting and teardown each."""
        total = 30.0  # cluster, pgbench -i, targets
        if "throughput" in self.phases:
            # connecting is part of -T: ~15 ms per client through a proxy on 2 CPUs
            for _w, m, c in self.combos:
                n = sum(1 for t in self.targets if supports(t, m))
                total += self.rounds * n * (self.duration + 0.3 + 0.02 * c)
            total += len(self.targets) * (self.warmup + 2 + 0.1 * max(self.clients))
        if "ryw" in self.phases:
            total += self.rounds * len(RYW_TARGETS) * len(self.ryw_modes) * (self.ryw_duration + 0.6)
        if "memory" in self.phases and self.memory_conns:
            total += 2 * (5 + max(self.memory_conns) * 0.006)
        return total


def supports(target: str, mode: str) -> bool:
    """PgBouncer before 1.21 cannot carry protocol-level prepared statements in
    transaction pooling: a client's statement lives on one server connection and the
    next transaction may get another ("prepared statement P_0 does not exist")."""
    return not (target == "pgbouncer" and mode == "prepared")


def _csv_list(kind: Callable[[str], Any], allowed: Iterable[Any] | None = None):
    def parse(text: str) -> list[Any]:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown {', '.join(map(str, bad))}; choose from {', '.join(map(str, allowed))}")
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


DEFAULTS = dict(rounds=3, duration=2, warmup=3, workloads=list(WORKLOADS),
                modes=list(MODES), clients=[1, 8, 32, 128], memory_conns=[1000, 5000],
                ryw_duration=4)
QUICK = dict(rounds=3, duration=1, warmup=1, workloads=["select", "tpcb"],
             modes=["simple", "prepared"], clients=[1, 8], memory_conns=[1000],
             ryw_duration=2)
# --quick without --workloads/--modes/--clients: not the full cross product, which
# would take twice as long; tpcb-like runs at 8 clients only.
QUICK_COMBOS = [("select", "simple", 1), ("select", "prepared", 1),
                ("select", "simple", 8), ("select", "prepared", 8),
                ("tpcb", "simple", 8), ("tpcb", "prepared", 8)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="Benchmark pgsplit against PostgreSQL direct, PgBouncer and Pgpool-II "
                    "on a local sandbox cluster (interleaved rounds, medians, ratios). "
                    "Writes loadtest/results/*.csv and regenerates docs/benchmarks.md.",
    )
    p.add_argument("--quick", action="store_true",
                   help="development run of about 3 minutes: 3 rounds of 1 s runs of "
                        "select-only at 1 and 8 clients and tpcb-like at 8, -M simple and "
                        "prepared; memory at 1000 clients; read-your-writes 2 s runs "
                        "(explicit options still win)")
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})")
    p.add_argument("--duration", type=int,
                   help=f"pgbench -T seconds per run (default {DEFAULTS['duration']:g})")
    p.add_argument("--warmup", type=int,
                   help=f"seconds of warm-up per target before round 1 (default {DEFAULTS['warmup']:g})")
    p.add_argument("--workloads", type=_csv_list(str, WORKLOADS),
                   help="comma list of: " + ", ".join(WORKLOADS) + " (default all)")
    p.add_argument("--modes", type=_csv_list(str, MODES),
                   help="pgbench -M modes: " + ", ".join(MODES) + " (default all)")
    p.add_argument("--clients", type=_csv_list(int),
                   help="comma list of client counts (default 1,8,32,128)")
    p.add_argument("--targets", type=_csv_list(str, TARGETS), default=list(TARGETS),
                   help="comma list of: " + ", ".join(TARGETS) + " (default all)")
    p.add_argument("--phases", type=_csv_list(str, ["throughput", "memory", "ryw"]),
                   default=["throughput", "memory", "ryw"],
                   help="comma list of phases: throughput, memory, ryw (default all)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s scale (default 10)")
    p.add_argument("--replicas", type=int, default=2, help="streaming replicas in the sandbox (default 2)")
    p.add_argument("--pool-size", type=int, default=20,
                   help="server connections per pool: pgsplit pool.size, PgBouncer "
                        "default_pool_size (default 20)")
    p.add_argument("--memory-conns", type=_csv_list(int),
                   help="idle client connection counts for the memory phase (default 1000,5000)")
    p.add_argument("--ryw-clients", type=int, default=8, help="clients of the read-your-writes phase (default 8)")
    p.add_argument("--ryw-modes", type=_csv_list(str, MODES), default=["simple"],
                   help="pgbench -M modes of the read-your-writes phase (default simple)")
    p.add_argument("--ryw-duration", type=int,
                   help=f"-T seconds per read-your-writes run (default {DEFAULTS['ryw_duration']:g})")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the CSV files go (default loadtest/results)")
    p.add_argument("--docs", type=Path, default=DOCS_PATH, help="report to regenerate (default docs/benchmarks.md)")
    p.add_argument("--img-dir", type=Path, default=IMG_DIR, help="where the PNG plots go (default docs/img)")
    p.add_argument("--no-docs", action="store_true", help="write the CSV only")
    p.add_argument("--from-csv", type=Path, metavar="RUNS_CSV",
                   help="run nothing: regenerate the report from a results/*-runs.csv "
                        "(and its -memory.csv and -meta.json)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan and an estimate of its duration, run nothing")
    p.add_argument("--note", metavar="TEXT",
                   help="a remark printed in the report's Setup section (e.g. what else ran "
                        "on the machine); with --from-csv it replaces the stored one")
    p.add_argument("--keep", action="store_true",
                   help="keep temporary directories (proxy and competitor logs, pgbench logs)")
    return p


def make_plan(args: argparse.Namespace) -> Plan:
    base = dict(DEFAULTS)
    if args.quick:
        base.update(QUICK)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    plan = Plan(
        rounds=pick("rounds"), duration=pick("duration"), warmup=pick("warmup"),
        workloads=pick("workloads"), modes=pick("modes"), clients=sorted(pick("clients")),
        targets=[t for t in TARGETS if t in args.targets], phases=args.phases,
        scale=args.scale, replicas=args.replicas, pool_size=args.pool_size,
        memory_conns=sorted(pick("memory_conns")), ryw_clients=args.ryw_clients,
        ryw_modes=args.ryw_modes, ryw_duration=pick("ryw_duration"),
    )
    if args.quick and args.workloads is None and args.modes is None and args.clients is None:
        plan.combos = [c for c in QUICK_COMBOS]
    else:
        plan.combos = [(w, m, c) for w in plan.workloads for m in plan.modes for c in plan.clients]
    if plan.rounds < 1 or plan.duration <= 0:
        raise SystemExit("--rounds must be >= 1 and --duration > 0")
    if plan.rounds < 3:
        print("warning: fewer than 3 rounds: medians of 1-2 runs are not robust",
              file=sys.stderr)
    if plan.replicas < 1 and any(t.endswith("-replicas") for t in plan.targets):
        raise SystemExit("targets with replicas need --replicas >= 1")
    return plan


# --------------------------------------------------------------------------- pgbench


@dataclasses.dataclass
class Run:
    """One pgbench run; one CSV row."""

    phase: str
    round: int
    seq: int
    target: str
    workload: str
    mode: str
    clients: int
    duration_s: float  # traffic wanted: -T minus pgbench's initial connection time
    pgbench_T: int = 0  # the -T given (0: duration_s)
    tps: float | None = None
    latency_avg_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    transactions: int | None = None
    failed: int | None = None
    aborted: int = 0
    replica_read_share: float | None = None
    # pgsplit_consistency_waits_total by outcome, delta over the run
    waits_immediate: float | None = None
    waits_waited: float | None = None
    waits_fallback: float | None = None
    wait_seconds: float | None = None  # pgsplit_consistency_wait_seconds_sum delta
    connect_ms: float | None = None  # pgbench's "initial connection time"
    loadavg: float | None = None  # 1-minute load average when the run started
    idle_cpu: float | None = None  # CPU busy share just before the run, the benchmark idle
    wall_s: float | None = None
    started_at: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.tps is not None and not self.aborted and not self.error

    def row(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: ("" if d[k] is None else d[k]) for k in CSV_FIELDS}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "Run":
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = row.get(f.name, "")
            if f.name in ("round", "seq", "clients", "aborted", "pgbench_T"):
                kw[f.name] = int(v or 0)
            elif f.name in ("transactions", "failed"):
                kw[f.name] = int(v) if v != "" else None
            elif f.name in ("phase", "target", "workload", "mode", "started_at", "error"):
                kw[f.name] = v
            else:
                kw[f.name] = float(v) if v != "" else None
        return cls(**kw)


def _pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # sslmode=disable for every target alike: no SSLRequest round trip to anyone
    env.update(PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGCONNECT_TIMEOUT="30")
    return env


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(p / 100.0 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


def read_transaction_log(prefix: str) -> list[float]:
    """Latencies in ms from pgbench's per-transaction logs (one file per thread).

    Line format (pgbench docs, "Per-Transaction Logging"): client_id transaction_no time
    script_no time_epoch time_us [schedule_lag retries]; `time` is the latency in
    microseconds, or "failed"/"skipped"."""
    values: list[float] = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]) / 1000.0)
    values.sort()
    return values


_RE = {
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
    "latency": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "processed": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
    "connect": re.compile(r"^initial connection time = ([\d.]+) ms", re.M),
}


def _pgbench_error(stderr: str, rc: int, run: Run) -> str:
    """The distinct server/proxy errors pgbench reported (without client numbers)."""
    seen: dict[str, None] = {}
    for line in stderr.splitlines():
        m = re.search(r"(ERROR|FATAL):\s+(.*)$", line)
        if m:
            seen.setdefault(f"{m.group(1)}: {m.group(2).strip()}", None)
    if not seen:
        lines = [ln.strip() for ln in stderr.splitlines() if "error" in ln.lower()]
        if lines:
            seen[lines[0]] = None
    if not seen and rc == 0:
        seen[f"no result: pgbench printed no tps (still connecting when -T {run.pgbench_T}s ran out?)"] = None
    msg = " / ".join(list(seen)[:3]) or f"pgbench exited with {rc}"
    if run.aborted:
        msg = f"{run.aborted} clients aborted: {msg}"
    return msg[:400]


def busy_share(seconds: float = 0.1) -> float | None:
    """The machine's CPU busy share over a short window (from /proc/stat). Taken between
    runs, while every target is idle, it shows other work on the machine; the load
    average cannot, since the benchmark's own 128-client runs keep it high for minutes."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return 1 - (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def run_pgbench(run: Run, port: int, script_args: Sequence[str], logdir: Path,
                keep_logs: bool = False) -> Run:
    """Run pgbench once and fill in `run` (tps, latency, percentiles, failures)."""
    prefix = str(logdir / f"tx{run.seq}")
    run.pgbench_T = run.pgbench_T or math.ceil(run.duration_s)
    cmd = [PGBENCH, "-n", *script_args, "-M", run.mode, "-c", str(run.clients),
           "-j", str(min(2, run.clients)), "-T", str(run.pgbench_T),
           "-l", "--log-prefix", prefix,
           "-h", "127.0.0.1", "-p", str(port), "-U", USER, DBNAME]
    run.started_at = dt.datetime.now().isoformat(timespec="seconds")
    run.loadavg = os.getloadavg()[0]
    run.idle_cpu = busy_share()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_pg_env(),
                              timeout=run.pgbench_T + 120)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = "pgbench did not finish within -T + 120 s (killed)"
        rc = -1
    run.wall_s = round(time.monotonic() - t0, 3)
    if (m := _RE["tps"].search(out)):
        run.tps = float(m.group(1))
    if (m := _RE["latency"].search(out)):
        run.latency_avg_ms = float(m.group(1))
    if (m := _RE["processed"].search(out)):
        run.transactions = int(m.group(1))
    if (m := _RE["failed"].search(out)):
        run.failed = int(m.group(1))
    if (m := _RE["connect"].search(out)):
        run.connect_ms = float(m.group(1))
    run.aborted = len(re.findall(r"client \d+ .*aborted", err))
    if rc != 0 or run.tps is None:
        run.error = _pgbench_error(err, rc, run)
    lat = read_transaction_log(prefix)
    run.p50_ms = percentile(lat, 50)
    run.p99_ms = percentile(lat, 99)
    if not keep_logs:
        for path in glob.glob(glob.escape(prefix) + ".*"):
            os.unlink(path)
    return run


# --------------------------------------------------------------------------- targets


def scrape(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text from pgsplit's /metrics as {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return out


WAIT_OUTCOMES = ("immediate", "waited", "fallback")


@dataclasses.dataclass
class Counters:
    """Cumulative counters of a target: reads by where they ran, and pgsplit's
    read-your-writes outcomes (immediate: a replica had already replayed the session's
    commit; waited: the read waited for one; fallback: it went to the primary)."""

    replica_reads: float = 0.0
    all_reads: float = 0.0
    waits: dict[str, float] = dataclasses.field(default_factory=dict)
    wait_seconds: float = 0.0

    def __sub__(self, other: "Counters") -> "Counters":
        keys = set(self.waits) | set(other.waits)
        return Counters(self.replica_reads - other.replica_reads,
                        self.all_reads - other.all_reads,
                        {k: self.waits.get(k, 0.0) - other.waits.get(k, 0.0) for k in keys},
                        self.wait_seconds - other.wait_seconds)

    @property
    def share(self) -> float | None:
        return round(self.replica_reads / self.all_reads, 4) if self.all_reads > 0 else None


class Target:
    """Something pgbench can connect to."""

    def __init__(self, key: str, label: str, port: int, *, stop: Callable[[], None] = lambda: None,
                 counters: Callable[[], Counters | None] = lambda: None,
                 log: Callable[[], str] = lambda: "",
                 errors: Callable[[], list[str]] = lambda: []):
        self.key, self.label, self.port = key, label, port
        self.stop, self.counters, self.log, self.errors = stop, counters, log, errors


_PROXY_ERROR = re.compile(r"\b(ERROR|CRITICAL|Traceback|Exception)\b")


def _proxy_errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if _PROXY_ERROR.search(ln)]


def start_pgsplit(key: str, label: str, cluster: Any, *, replicas: bool, pool_size: int,
                  routing: dict[str, Any] | None = None) -> Target:
    from loadtest.harness import NodeSet, ProxyProcess, config_text

    view = cluster if replicas else NodeSet.of(cluster, cluster.primary)
    sections: dict[str, dict[str, Any]] = {"pool": {"size": pool_size}}
    if routing:
        sections["routing"] = dict(routing)
    proc = ProxyProcess(config_text({"main": view}, sections=sections)).start()

    def counters() -> Counters:
        c = Counters()
        for (name, labels), value in scrape(proc.admin_port).items():
            lab = dict(labels)
            if name == "pgsplit_units_total" and lab.get("kind") == "read":
                c.all_reads += value
                if lab.get("role") == "replica":
                    c.replica_reads += value
            elif name == "pgsplit_consistency_waits_total":
                outcome = lab.get("outcome", "")
                c.waits[outcome] = c.waits.get(outcome, 0.0) + value
            elif name == "pgsplit_consistency_wait_seconds_sum":
                c.wait_seconds += value
        return c

    def stop() -> None:
        proc.stop()

    target = Target(key, label, proc.port, stop=stop, counters=counters, log=proc.log,
                    errors=lambda: _proxy_errors(proc.log()))
    target.process = proc  # type: ignore[attr-defined]
    return target


def _pgpool_counters(port: int) -> Counters | None:
    """Load-balanced SELECTs per node from Pgpool-II's SHOW pool_nodes (select_cnt)."""
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                             dbname=DBNAME, sslmode="disable", connect_timeout=10,
                             autocommit=True) as conn:
            cur = conn.execute("SHOW pool_nodes")
            cols = [d.name for d in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    except psycopg.Error:
        return None
    c = Counters()
    for r in rows:
        n = float(r.get("select_cnt") or 0)
        c.all_reads += n
        if str(r.get("role", "")).lower() == "standby":
            c.replica_reads += n
    return c


def start_targets(keys: Sequence[str], cluster: Any, plan: Plan, stack: contextlib.ExitStack,
                  labels: dict[str, str]) -> list[Target]:
    targets: list[Target] = []
    primary = Backend.of(cluster.primary)
    users = dict(cluster.users)
    max_clients = max(plan.clients + [plan.ryw_clients])
    for key in keys:
        label = labels[key]
        if key == "direct":
            t = Target(key, label, cluster.primary.port)
        elif key == "pgbouncer":
            d = PgBouncer(primary, users, pool_size=plan.pool_size)
            stack.callback(d.cleanup if not KEEP else d.stop)
            d.start()
            t = Target(key, label, d.port, stop=d.stop, log=d.log_text, errors=d.errors)
        elif key in ("pgpool", "pgpool-replicas"):
            reps = [Backend.of(r) for r in cluster.replicas] if key == "pgpool-replicas" else []
            d = Pgpool(primary, reps, users, check_user="postgres",
                       check_password=cluster.superuser_password,
                       num_init_children=max_clients + 4)
            stack.callback(d.cleanup if not KEEP else d.stop)
            d.start()
            port = d.port
            t = Target(key, label, port, stop=d.stop, log=d.log_text, errors=d.errors,
                       counters=(lambda p=port: _pgpool_counters(p)) if reps else (lambda: None))
        elif key in ("pgsplit", "pgsplit-replicas"):
            t = start_pgsplit(key, label, cluster, replicas=key == "pgsplit-replicas",
                              pool_size=plan.pool_size)
            stack.callback(_stopper(t))
        elif key in RYW_ROUTING:
            t = start_pgsplit(key, label, cluster, replicas=True, pool_size=plan.pool_size,
                              routing=RYW_ROUTING[key])
            stack.callback(_stopper(t))
        else:
            raise BenchError(f"unknown target {key}")
        targets.append(t)
    return targets


def _stopper(t: Target) -> Callable[[], None]:
    def stop() -> None:
        t.stop()
        proc = getattr(t, "process", None)
        if proc is not None and not KEEP:
            shutil.rmtree(proc.dir, ignore_errors=True)
    return stop


KEEP = False


# --------------------------------------------------------------------------- phases


class ConnectBudget:
    """pgbench's -T also runs while its clients connect (and SCRAM logins through a proxy
    at 128 clients take seconds), so a fixed -T would measure less traffic, or none, for
    slow-connecting targets. Each run gets -T = duration + an allowance from that
    target's connection time at that client count: measured by the warm-up at the
    largest count (scaled down linearly), then by the previous round."""

    def __init__(self, duration: float, max_clients: int) -> None:
        self.duration = duration
        self.max_clients = max_clients
        self.known: dict[tuple[str, int], float] = {}

    def note(self, run: "Run") -> None:
        if run.connect_ms is not None:
            self.known[(run.target, run.clients)] = run.connect_ms / 1000.0
        elif run.tps is None and not run.aborted:
            # no output at all: the clients were still connecting when -T ran out
            self.known[(run.target, run.clients)] = float(run.pgbench_T)

    def pgbench_T(self, target: str, clients: int) -> int:
        est = self.known.get((target, clients))
        if est is None:
            seed = self.known.get((target, self.max_clients))
            est = seed * clients / self.max_clients if seed is not None else 0.0
        extra = 0 if est < max(0.1 * self.duration, 0.25) else math.ceil(est * 1.1 + 0.2)
        return math.ceil(self.duration) + extra




def rotated(items: Sequence[Any], k: int) -> list[Any]:
    """The k-th order of `items`: rotated by k, and reversed for odd k, so that no target
    always runs first, or always right after the same other one (whose writes leave
    autovacuum and checkpoints behind)."""
    n = max(1, len(items))
    order = list(items[k % n:]) + list(items[:k % n])
    return order[::-1] if k % 2 else order


class Recorder:
    """Appends every run to the CSV as soon as it is done (an interrupted benchmark
    keeps what it measured) and prints a progress line."""

    def __init__(self, path: Path, total: int) -> None:
        self.path = path
        self.runs: list[Run] = []
        self.total = total
        self.t0 = time.monotonic()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        self._writer.writeheader()
        self._file.flush()

    def add(self, run: Run) -> None:
        self.runs.append(run)
        self._writer.writerow(run.row())
        self._file.flush()
        done = len(self.runs)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / done * (self.total - done) if done else 0
        status = (f"tps={run.tps:>9,.0f} p50={_ms(run.p50_ms)} p99={_ms(run.p99_ms)}"
                  if run.tps is not None else "tps=        -")
        status += f" T={run.pgbench_T}s conn={run.connect_ms or 0:,.0f}ms"
        if run.replica_read_share is not None:
            status += f" replica reads={run.replica_read_share:.0%}"
        if run.waits_immediate or run.waits_waited or run.waits_fallback:
            status += (f" ryw immediate/waited/fallback={run.waits_immediate:.0f}/"
                       f"{run.waits_waited:.0f}/{run.waits_fallback:.0f} "
                       f"waited {run.wait_seconds or 0:.2f}s")
        if run.failed:
            status += f" FAILED={run.failed}"
        if run.error:
            status += f" ERROR: {run.error}"
        print(f"[{done:>4}/{self.total} eta {eta / 60:4.1f} min] r{run.round} {run.phase:<10} "
              f"{run.workload:<6} {run.mode:<8} c={run.clients:<3} {run.target:<17} {status}",
              flush=True)

    def close(self) -> None:
        self._file.close()


def _ms(v: float | None) -> str:
    return f"{v:6.2f}ms" if v is not None else "     -  "


def measure(run: Run, target: Target, script_args: Sequence[str], logdir: Path) -> Run:
    before = _safe(target.counters)
    run_pgbench(run, target.port, script_args, logdir, keep_logs=KEEP)
    after = _safe(target.counters)
    if before is not None and after is not None:
        delta = after - before
        run.replica_read_share = delta.share
        if target.key.startswith("pgsplit"):
            run.waits_immediate = delta.waits.get("immediate", 0.0)
            run.waits_waited = delta.waits.get("waited", 0.0)
            run.waits_fallback = delta.waits.get("fallback", 0.0)
            run.wait_seconds = round(delta.wait_seconds, 4)
    return run


def measure_with_budget(make_run: Callable[[], Run], target: Target, script_args: Sequence[str],
                        logdir: Path, budget: ConnectBudget) -> Run:
    """One run; if pgbench printed no result because its clients were still connecting
    when -T ran out, once more with the larger allowance that this teaches the budget."""
    run = measure(make_run(), target, script_args, logdir)
    budget.note(run)
    if run.tps is None and not run.aborted and run.connect_ms is None:
        print(f"  no result from {target.key} at c={run.clients} within -T {run.pgbench_T}s "
              "(still connecting?): once more with a longer -T", flush=True)
        run = measure(make_run(), target, script_args, logdir)
        budget.note(run)
    return run


def _safe(fn: Callable[[], Counters | None]) -> Counters | None:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed scrape must not stop the benchmark
        print(f"warning: could not read counters: {exc}", file=sys.stderr)
        return None


def warm_up(targets: Sequence[Target], plan: Plan, logdir: Path, budget: ConnectBudget) -> None:
    """Every target once, before round 1: fills caches, opens pooled server connections
    (Pgpool-II opens one per child, so at the largest client count), and measures the
    connection time at that count. The -T is generous: connecting is part of it."""
    clients = budget.max_clients
    for t in targets:
        run = Run("warmup", 0, 0, t.key, "select", "simple", clients, max(1, plan.warmup))
        # first logins are the slowest (Pgpool-II children open their backend connections)
        run.pgbench_T = max(1, plan.warmup) + math.ceil(clients * 0.1)
        run_pgbench(run, t.port, WORKLOADS["select"], logdir)
        budget.note(run)
        print(f"warm-up {t.key:<17} c={clients:<3} tps={run.tps or 0:,.0f} "
              f"connect={run.connect_ms or 0:,.0f}ms"
              + (f"  ERROR: {run.error}" if run.error else ""), flush=True)


def throughput_phase(cluster: Any, plan: Plan, rec: Recorder, stack: contextlib.ExitStack,
                     logdir: Path, seq: Iterator[int]) -> list[Target]:
    targets = start_targets(plan.targets, cluster, plan, stack, TARGETS)
    budget = ConnectBudget(plan.duration, max(c for _w, _m, c in plan.combos))
    warm_up(targets, plan, logdir, budget)
    for rnd in range(1, plan.rounds + 1):
        for k, (w, m, c) in enumerate(plan.combos):
            for t in rotated(targets, rnd - 1 + k):
                if not supports(t.key, m):
                    continue
                run = measure_with_budget(
                    lambda: Run("throughput", rnd, next(seq), t.key, w, m, c, plan.duration,
                                pgbench_T=budget.pgbench_T(t.key, c)),
                    t, WORKLOADS[w], logdir, budget)
                rec.add(run)
    return targets


def ryw_script(path: Path, scale: int) -> Path:
    """1 UPDATE of a random account, then 10 SELECTs of random accounts (autocommit)."""
    n = 100000 * scale
    lines = [f"\\set aid random(1, {n})", "\\set delta random(-5000, 5000)",
             "UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;"]
    for i in range(1, 11):
        lines += [f"\\set r{i} random(1, {n})",
                  f"SELECT abalance FROM pgbench_accounts WHERE aid = :r{i};"]
    path.write_text("\n".join(lines) + "\n")
    return path


def ryw_phase(cluster: Any, plan: Plan, rec: Recorder, stack: contextlib.ExitStack,
              logdir: Path, seq: Iterator[int]) -> list[Target]:
    targets = start_targets(list(RYW_TARGETS), cluster, plan, stack, RYW_TARGETS)
    script = ["-f", str(ryw_script(logdir / "ryw.sql", plan.scale))]
    for t in targets:  # open the pools
        run_pgbench(Run("warmup", 0, 0, t.key, "ryw", "simple", plan.ryw_clients, 1.0,
                        pgbench_T=2), t.port, script, logdir)
    budget = ConnectBudget(plan.ryw_duration, plan.ryw_clients)
    for rnd in range(1, plan.rounds + 1):
        for k, m in enumerate(plan.ryw_modes):
            for t in rotated(targets, rnd - 1 + k):
                run = measure_with_budget(
                    lambda: Run("ryw", rnd, next(seq), t.key, "ryw", m, plan.ryw_clients,
                                plan.ryw_duration,
                                pgbench_T=budget.pgbench_T(t.key, plan.ryw_clients)),
                    t, script, logdir, budget)
                rec.add(run)
    return targets


@dataclasses.dataclass
class MemoryResult:
    target: str
    connections: int
    rss_bytes: int | None = None
    rss0_bytes: int | None = None
    bytes_per_connection: float | None = None
    login_seconds: float | None = None
    error: str = ""

    def row(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: ("" if d[k] is None else d[k]) for k in MEMORY_FIELDS}


async def _open_idle(port: int, n: int, conns: list[Any], concurrency: int = 64) -> None:
    """Open connections until `conns` holds n; each completes a SCRAM login."""
    import asyncpg

    sem = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with sem:
            return await asyncpg.connect(host="127.0.0.1", port=port, user=USER,
                                         password=PASSWORD, database=DBNAME, ssl=False,
                                         timeout=60)

    results = await asyncio.gather(*(one() for _ in range(n - len(conns))),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    conns.extend(r for r in results if not isinstance(r, BaseException))
    if errors:
        raise BenchError(f"{len(errors)} of {len(results)} logins failed; first: {errors[0]!r}")


async def _memory_of(key: str, port: int, rss: Callable[[], int],
                     counts: Sequence[int]) -> list[MemoryResult]:
    import asyncpg

    # warm: one login and a query, so lazily built state is in RSS_0
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                 database=DBNAME, ssl=False, timeout=60)
    await conn.fetchval("SELECT 1")
    await conn.close()
    await asyncio.sleep(1.0)
    rss0 = rss()
    out: list[MemoryResult] = []
    conns: list[Any] = []
    try:
        for n in counts:
            res = MemoryResult(key, n, rss0_bytes=rss0)
            t0 = time.monotonic()
            try:
                await _open_idle(port, n, conns)
            except (BenchError, OSError) as exc:
                res.error = str(exc)[:300]
            res.login_seconds = round(time.monotonic() - t0, 2)
            await asyncio.sleep(1.0)
            res.rss_bytes = rss()
            res.bytes_per_connection = round((res.rss_bytes - rss0) / max(1, len(conns)))
            if len(conns) != n and not res.error:
                res.error = f"only {len(conns)} connections open"
            out.append(res)
            print(f"memory {key:<10} {len(conns):>5} idle clients: RSS {res.rss_bytes / 2**20:7.1f} MiB "
                  f"(idle RSS {rss0 / 2**20:.1f} MiB), {res.bytes_per_connection:,.0f} B/conn, "
                  f"logins {res.login_seconds:.1f}s" + (f"  ERROR: {res.error}" if res.error else ""),
                  flush=True)
    finally:
        await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)
    return out


def memory_phase(cluster: Any, plan: Plan) -> list[MemoryResult]:
    """Fresh processes (not the ones that ran the load), the same idle clients for each."""
    results: list[MemoryResult] = []
    if "pgsplit-replicas" in plan.targets or "pgsplit" in plan.targets:
        t = start_pgsplit("pgsplit", "pgsplit", cluster, replicas=plan.replicas > 0,
                          pool_size=plan.pool_size)
        try:
            proc = t.process  # type: ignore[attr-defined]
            results += asyncio.run(_memory_of("pgsplit", t.port, proc.rss_bytes, plan.memory_conns))
            errs = t.errors()
            if errs:
                print(f"pgsplit log errors during the memory phase: {len(errs)}; first: {errs[0]}")
        finally:
            _stopper(t)()
    if "pgbouncer" in plan.targets:
        d = PgBouncer(Backend.of(cluster.primary), dict(cluster.users), pool_size=plan.pool_size,
                      max_client_conn=max(plan.memory_conns) + 100)
        try:
            d.start()
            results += asyncio.run(_memory_of("pgbouncer", d.port, d.rss_bytes, plan.memory_conns))
        finally:
            d.stop() if KEEP else d.cleanup()
    return results


# --------------------------------------------------------------------------- environment


def machine_info(cluster: Any | None) -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "kernel": platform.release()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["ram_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        info["ram_gib"] = None
    info["pgbench"] = tool_version(PGBENCH)
    info["pgbouncer"] = tool_version(PGBOUNCER)
    info["pgpool"] = tool_version(PGPOOL)
    if cluster is not None:
        info["postgresql"] = cluster.sql(cluster.primary, "SELECT version()")[0][0].split(",")[0]
    for mod in ("uvloop", "asyncpg", "pglast"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = "?"
    info["git"] = git_describe()
    return info


def git_describe() -> str:
    """The pgsplit code a proxy started now runs (a "-dirty" suffix: uncommitted changes)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, needed)
    if hard != resource.RLIM_INFINITY and want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError):
            want = hard
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def init_pgbench(cluster: Any, scale: int) -> float:
    t0 = time.monotonic()
    subprocess.run([PGBENCH, "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
                    str(cluster.primary.port), "-U", USER, DBNAME],
                   env=_pg_env(), check=True, capture_output=True, text=True)
    cluster.sql(cluster.primary, "CHECKPOINT")
    cluster.wait_caught_up(timeout=120)
    return time.monotonic() - t0


# --------------------------------------------------------------------------- report


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


class Results:
    """Runs grouped for the report."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        self.by_key: dict[tuple[str, str, str, int, str], list[Run]] = defaultdict(list)
        for r in self.runs:
            self.by_key[(r.phase, r.workload, r.mode, r.clients, r.target)].append(r)

    def ok(self, phase: str, w: str, m: str, c: int, t: str) -> list[Run]:
        return [r for r in self.by_key.get((phase, w, m, c, t), []) if r.ok]

    def median(self, phase: str, w: str, m: str, c: int, t: str, field: str = "tps") -> float | None:
        return _median(getattr(r, field) for r in self.ok(phase, w, m, c, t))

    def ratio(self, phase: str, w: str, m: str, c: int, num: str, den: str) -> float | None:
        """Median over rounds of tps(num)/tps(den) within the same round (paired runs)."""
        a = {r.round: r.tps for r in self.ok(phase, w, m, c, num)}
        b = {r.round: r.tps for r in self.ok(phase, w, m, c, den)}
        return _median(a[k] / b[k] for k in a if k in b and b[k])

    def difference(self, phase: str, w: str, m: str, c: int, a: str, b: str,
                   field: str) -> float | None:
        """Median over rounds of field(a) - field(b) within the same round (paired runs)."""
        x = {r.round: getattr(r, field) for r in self.ok(phase, w, m, c, a)}
        y = {r.round: getattr(r, field) for r in self.ok(phase, w, m, c, b)}
        return _median(x[k] - y[k] for k in x if k in y and x[k] is not None and y[k] is not None)

    def values(self, field: str) -> list[Any]:
        return sorted({getattr(r, field) for r in self.runs})


def _fmt(v: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


COLORS = {"direct": "#444444", "pgbouncer": "#1f77b4", "pgpool": "#ff7f0e",
          "pgpool-replicas": "#ffbb78", "pgsplit": "#2ca02c", "pgsplit-replicas": "#98df8a"}


def plot_throughput(res: Results, targets: Sequence[str], img_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    runs = [r for r in res.runs if r.phase == "throughput"]
    workloads = [w for w in WORKLOADS if any(r.workload == w for r in runs)]
    modes = [m for m in MODES if any(r.mode == m for r in runs)]
    clients = sorted({r.clients for r in runs})
    for w in workloads:
        fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 4.3), sharey=True,
                                 squeeze=False)
        for ax, m in zip(axes[0], modes):
            for t in targets:
                xs, ys, lo, hi = [], [], [], []
                for c in clients:
                    tps = [r.tps for r in res.ok("throughput", w, m, c, t)]
                    if tps:
                        xs.append(c)
                        ys.append(statistics.median(tps))
                        lo.append(min(tps))
                        hi.append(max(tps))
                if xs:
                    ax.plot(xs, ys, marker="o", label=TARGETS.get(t, t), color=COLORS.get(t))
                    ax.fill_between(xs, lo, hi, color=COLORS.get(t), alpha=0.15, linewidth=0)
                failed = [c for c in clients if res.by_key.get(("throughput", w, m, c, t))
                          and not res.ok("throughput", w, m, c, t)]
                if failed:  # every round failed: an x on the axis (see "Errors seen")
                    ax.plot(failed, [0] * len(failed), linestyle="none", marker="X",
                            markersize=9, color=COLORS.get(t), clip_on=False)
            ax.set_xscale("log", base=2)
            ax.set_xticks(clients)
            ax.set_xticklabels([str(c) for c in clients])
            ax.set_title(f"-M {m}")
            ax.set_xlabel("clients")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("tps (median; band = min–max of rounds;\nX on the axis = every run failed)")
        axes[0][0].set_ylim(bottom=0)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if labels:
            fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8,
                       frameon=False)
        fig.suptitle(f"pgbench {WORKLOAD_LABELS[w]}: throughput by client count")
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = img_dir / f"bench-tps-{w}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append((f"Throughput, {WORKLOAD_LABELS[w]}", path))
    return out


def plot_latency(res: Results, targets: Sequence[str], img_dir: Path) -> tuple[str, Path] | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(w, m) for w in WORKLOADS for m in MODES
              if any(res.ok("throughput", w, m, 1, t) for t in targets)]
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 2), 4))
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        p50 = [res.median("throughput", w, m, 1, t, "p50_ms") or 0 for w, m in groups]
        p99 = [res.median("throughput", w, m, 1, t, "p99_ms") or 0 for w, m in groups]
        xs = [g + (i - (len(targets) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, p99, width, color=COLORS.get(t), alpha=0.35)
        ax.bar(xs, p50, width, color=COLORS.get(t), label=TARGETS.get(t, t))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w}\n-M {m}" for w, m in groups], fontsize=8)
    ax.set_ylabel("ms per transaction (solid p50, light p99)")
    ax.set_title("Latency at 1 client (medians over rounds)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = img_dir / "bench-latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ("Latency at 1 client", path)


def render_report(runs: Sequence[Run], memory: Sequence[MemoryResult], meta: dict[str, Any],
                  docs_path: Path, img_dir: Path) -> None:
    res = Results(runs)
    img_dir.mkdir(parents=True, exist_ok=True)
    tput = [r for r in runs if r.phase == "throughput"]
    targets = [t for t in TARGETS if any(r.target == t for r in tput)]
    workloads = [w for w in WORKLOADS if any(r.workload == w for r in tput)]
    modes = [m for m in MODES if any(r.mode == m for r in tput)]
    clients = sorted({r.clients for r in tput})
    rel = lambda p: os.path.relpath(p, docs_path.parent)  # noqa: E731
    m = meta.get("machine", {})
    plan = meta.get("plan", {})
    out: list[str] = []
    w_ = out.append
    w_("# Benchmarks\n")
    w_("<!-- generated by `python -m loadtest.bench`; edit loadtest/bench.py, not this file -->\n")
    w_("pgsplit against PostgreSQL direct, PgBouncer and Pgpool-II on one small machine, "
       "measured with pgbench. Everything (pgbench, three PostgreSQL servers, the proxy under "
       "test) shares the same CPUs, so absolute figures are low and noisy; read the ratios, "
       "which compare runs made back to back.\n")
    w_("## Setup\n")
    w_(f"- Machine: {m.get('nproc')} CPUs ({m.get('cpu')}), {m.get('ram_gib')} GiB RAM, "
       f"Linux {m.get('kernel')}.")
    w_(f"- {m.get('postgresql', 'PostgreSQL')}: a primary and {plan.get('replicas')} streaming "
       "replicas from `loadtest.sandbox` on loopback (fsync off, "
       f"shared_buffers {CLUSTER_SETTINGS['shared_buffers']}); pgbench data `-i -s {plan.get('scale')}` "
       f"(~{15 * int(plan.get('scale') or 0)} MB, fits in RAM). {m.get('pgbench')}.")
    code = meta.get("code") or {}
    if len(set(code.values())) > 1:  # the proxy code changed while the benchmark ran
        where = "; ".join(f"{ph}: {c}" for ph, c in code.items())
        w_(f"- {m.get('pgbouncer')}; {m.get('pgpool')}; pgsplit on Python {m.get('python')} "
           f"with uvloop {m.get('uvloop')}, started per phase from the code of that moment "
           f"(git describe) — {where}.")
    else:
        w_(f"- {m.get('pgbouncer')}; {m.get('pgpool')}; pgsplit {m.get('git')} on Python "
           f"{m.get('python')} with uvloop {m.get('uvloop')}.")
    w_(f"- Command: `{meta.get('command')}` — started {meta.get('started')}, took "
       f"{_fmt((meta.get('wall_seconds') or 0) / 60, '.1f')} min.")
    w_(f"- {plan.get('rounds')} interleaved rounds; pgbench `-T {plan.get('duration'):g}` per run, "
       f"`-j 2` (`-j 1` at 1 client), `-n`, per-transaction log (`-l`) for p50/p99; one warm-up "
       f"of {plan.get('warmup'):g} s per target at the largest client count before round 1. "
       "pgbench's `-T` includes the time its clients take to connect (seconds at 128 clients, "
       "see [Connection set-up](#connection-set-up)), so each run's `-T` is the duration plus "
       "an allowance from that target's connection time at that client count; every run "
       f"measures about {plan.get('duration'):g} s of traffic.")
    shares = [r.idle_cpu for r in runs if r.idle_cpu is not None]
    if shares:
        busy = statistics.median(shares) > 0.25
        w_(f"- CPU busy in the 0.1 s before each run, while the benchmark and its targets were idle: "
           f"median {100 * statistics.median(shares):.0f} %, max {100 * max(shares):.0f} %"
           + (" — **other work was running on the machine**: absolute figures are depressed, "
              "ratios of back-to-back runs less so." if busy else " (a quiet machine)."))
    if meta.get("note"):
        w_(f"- Note: {meta['note']}")
    w_("")
    w_("Targets (all logins are SCRAM-SHA-256 for user `app`, all over TCP on 127.0.0.1, "
       "`sslmode=disable`):\n")
    w_("| target | what |\n| --- | --- |")
    w_("| PostgreSQL (direct) | pgbench straight to the primary |")
    w_(f"| PgBouncer | `pool_mode = transaction`, `default_pool_size = {plan.get('pool_size')}`, "
       "SCRAM both ways from a plaintext userlist.txt |")
    w_("| Pgpool-II (primary only) | streaming-replication mode with only the primary as backend0, "
       "`connection_cache = on`, `num_init_children` = largest client count + 4, SCRAM with "
       "`TEXT` pool_passwd entries and pool_hba |")
    w_("| Pgpool-II (with replicas) | the same plus the replicas as backend1.., "
       "`load_balance_mode = on`, `statement_level_load_balance = on`, `backend_weight0 = 0` "
       "(reads to the replicas only, like pgsplit) |")
    w_(f"| pgsplit (primary only) | `pgsplit run`, a cluster with only the primary, "
       f"`pool.size = {plan.get('pool_size')}`, transaction pooling |")
    w_("| pgsplit (with replicas) | the same with the replicas: autocommit reads go to replicas, "
       "`routing.consistency = session` (the default) |\n")
    w_("Order: within a round, each (workload, mode, clients) combination runs on every target "
       "back to back; the target order is rotated by one from one combination to the next "
       "and from one round to the next, and reversed every other time, so no target always "
       "runs first, last, or right after the same other target. Tables show "
       "medians over rounds; a ratio is the median over rounds of the per-round ratio of two "
       "runs that ran side by side. Runs that aborted are left out (and listed below).\n")
    if "pgbouncer" in targets and "prepared" in modes:
        w_("PgBouncer 1.18 has no `-M prepared` figures: in transaction pooling a protocol-level "
           "prepared statement lives on one server connection and the next transaction may get "
           "another (`prepared statement \"P_0\" does not exist`); PgBouncer supports them from "
           "1.21 (`max_prepared_statements`).\n")

    # --- headline
    if tput:
        w_("## Summary\n")
        head_c = 8 if 8 in clients else clients[-1]
        rows = []
        for wl in workloads:
            for md in modes:
                if not any(res.ok("throughput", wl, md, head_c, t) for t in targets):
                    continue
                cells = [f"{wl} -M {md}"]
                for num, den in RATIOS:
                    if num in targets and den in targets:
                        cells.append(_fmt(res.ratio("throughput", wl, md, head_c, num, den), ".2f"))
                rows.append(cells)
        hdr = ["workload"] + [f"{num} / {den}" for num, den in RATIOS if num in targets and den in targets]
        w_(f"Throughput ratios at {head_c} clients (median of per-round ratios; > 1 means pgsplit "
           "is faster):\n")
        w_(_table(hdr, rows) + "\n")

    # --- throughput
    if tput:
        w_("## Throughput\n")
        for title, path in plot_throughput(res, targets, img_dir):
            w_(f"![{title}]({rel(path)})\n")
        for wl in workloads:
            for md in modes:
                cl = [c for c in clients if any(res.ok("throughput", wl, md, c, t) for t in targets)]
                if not cl:
                    continue
                w_(f"### {WORKLOAD_LABELS[wl]}, -M {md}\n")
                rows = []
                for c in cl:
                    rows.append([str(c)] + [_fmt(res.median("throughput", wl, md, c, t))
                                            for t in targets])
                w_("Median tps:\n")
                w_(_table(["clients"] + [TARGETS[t] for t in targets], rows) + "\n")
                pairs = [(a, b) for a, b in RATIOS if a in targets and b in targets]
                if pairs:
                    rows = [[str(c)] + [_fmt(res.ratio("throughput", wl, md, c, a, b), ".2f")
                                        for a, b in pairs] for c in cl]
                    w_("Ratios:\n")
                    w_(_table(["clients"] + [f"{a} / {b}" for a, b in pairs], rows) + "\n")
        shares = []
        for t in ("pgsplit-replicas", "pgpool-replicas"):
            if t in targets:
                for wl in workloads:
                    vals = [r.replica_read_share for r in tput
                            if r.target == t and r.workload == wl and r.replica_read_share is not None]
                    if vals:
                        shares.append([TARGETS[t], wl, f"{statistics.median(vals):.0%}",
                                       f"{min(vals):.0%}–{max(vals):.0%}"])
        if shares:
            w_("Share of reads served by replicas during the runs (pgsplit: "
               "`pgsplit_units_total{kind=\"read\"}` by role; Pgpool-II: `select_cnt` of "
               "`SHOW pool_nodes`), per run:\n")
            w_(_table(["target", "workload", "median", "range"], shares, "llrr") + "\n")

    # --- connection set-up
    if tput:
        w_("## Connection set-up\n")
        w_("pgbench's *initial connection time* (all clients of a run connecting, each a SCRAM "
           "login; `-j 2` connects two at a time), median over the runs of all workloads and "
           "modes, in ms. A pooler answers the login itself; Pgpool-II children also open their "
           "backend connections on a child's first use (then cache them).\n")
        rows = []
        for c in clients:
            cells = [str(c)]
            for t in targets:
                cells.append(_fmt(_median(r.connect_ms for r in tput
                                          if r.target == t and r.clients == c and r.tps is not None), ",.0f"))
            rows.append(cells)
        w_(_table(["clients"] + [TARGETS[t] for t in targets], rows) + "\n")
        short = [r for r in tput if r.tps is not None and r.connect_ms is not None
                 and r.pgbench_T - r.connect_ms / 1000 < 0.8 * r.duration_s]
        if short:
            w_(f"{len(short)} runs measured less than 80% of the intended {short[0].duration_s:g} s "
               "because connecting took longer than its allowance (their tps is still per "
               "second of traffic): " + ", ".join(
                   sorted({f"{r.target} c={r.clients}" for r in short})) + ".\n")

    # --- latency
    if 1 in clients and tput:
        w_("## Latency at 1 client\n")
        lat_plot = plot_latency(res, targets, img_dir)
        if lat_plot:
            w_(f"![{lat_plot[0]}]({rel(lat_plot[1])})\n")
        w_("Per transaction, from pgbench's per-transaction log; medians over rounds of each "
           "run's p50 and p99, in ms. *Added* = median over rounds of the target's value minus "
           "direct's in the same round, in µs. With short runs on 2 shared CPUs the p99 is "
           "dominated by scheduling hiccups (a negative added p99 shows it): compare p50s, and "
           "read p99 as an order of magnitude.\n")
        rows = []
        for wl in workloads:
            for md in modes:
                for t in targets:
                    p50 = res.median("throughput", wl, md, 1, t, "p50_ms")
                    p99 = res.median("throughput", wl, md, 1, t, "p99_ms")
                    if p50 is None:
                        continue
                    add50 = add99 = None
                    if t != "direct":
                        add50 = res.difference("throughput", wl, md, 1, t, "direct", "p50_ms")
                        add99 = res.difference("throughput", wl, md, 1, t, "direct", "p99_ms")
                    add50 = add50 * 1000 if add50 is not None else None
                    add99 = add99 * 1000 if add99 is not None else None
                    rows.append([f"{wl} -M {md}", TARGETS[t], _fmt(p50, ".3f"), _fmt(p99, ".3f"),
                                 _fmt(add50, "+,.0f"), _fmt(add99, "+,.0f")])
        w_(_table(["workload", "target", "p50 ms", "p99 ms", "added p50 µs", "added p99 µs"],
                  rows, "llrrrr") + "\n")

    # --- memory
    if memory:
        w_("## Memory per idle client connection\n")
        w_("A fresh process of each, one warm-up login, then N idle clients (asyncpg, each a "
           "completed SCRAM login, no query). Per connection = (RSS with N − RSS with none) / N. "
           "Pgpool-II is left out: it serves one client per pre-forked process "
           "(`num_init_children`), so thousands of idle clients need thousands of processes.\n")
        rows = [[r.target, f"{r.connections:,}", _fmt(r.rss0_bytes / 2**20 if r.rss0_bytes else None, ".1f"),
                 _fmt(r.rss_bytes / 2**20 if r.rss_bytes else None, ".1f"),
                 _fmt(r.bytes_per_connection, ",.0f"), _fmt(r.login_seconds, ".1f"),
                 r.error or ""] for r in memory]
        w_(_table(["target", "idle clients", "RSS idle MiB", "RSS MiB", "bytes / connection",
                   "logins took s", "error"], rows, "lrrrrrl") + "\n")
        by = {(r.target, r.connections): r for r in memory}
        for n in sorted({r.connections for r in memory}):
            a, b = by.get(("pgsplit", n)), by.get(("pgbouncer", n))
            if a and b and a.bytes_per_connection and b.bytes_per_connection:
                w_(f"- {n:,} clients: pgsplit uses {a.bytes_per_connection / b.bytes_per_connection:.1f}× "
                   "PgBouncer's memory per connection.")
        w_("")

    # --- read your writes
    ryw = [r for r in runs if r.phase == "ryw"]
    if ryw:
        w_("## Cost of read-your-writes\n")
        w_(f"A custom pgbench script: one `UPDATE pgbench_accounts` of a random account, then "
           f"10 `SELECT`s of random accounts, all autocommit, {plan.get('ryw_clients')} clients, "
           f"`-T {plan.get('ryw_duration'):g}`. Three pgsplit processes with replicas that differ "
           "only in `[routing]`: `session` (each read after the session's write may "
           "use a replica only once it has replayed that commit, waiting up to "
           "`consistency_wait_ms` = 50, else the primary), the same with "
           "`consistency_wait_ms = 0` (such a read goes to the primary at once), and "
           "`eventual` (lag filtering only). "
           "Direct to the primary for reference. tps counts whole scripts (11 statements). "
           "Replica share = replica reads / all reads from the `pgsplit_units_total` delta of "
           "each run. The last three columns are the `pgsplit_consistency_waits_total` delta "
           "by outcome, per run: *immediate* (a replica had already replayed the session's "
           "last commit), *waited* (the read waited for a replica to get there), *fallback* "
           "(it went to the primary); *time waiting* is the `pgsplit_consistency_wait_seconds` "
           "sum delta, added up over all clients (a run lasts clients × duration client-seconds).\n")
        rows = []
        rmodes = [md for md in MODES if any(r.mode == md for r in ryw)]
        for md in rmodes:
            for t in RYW_TARGETS:
                ok = res.ok("ryw", "ryw", md, plan.get("ryw_clients") or ryw[0].clients, t)
                if not ok:
                    continue
                share = _median(r.replica_read_share for r in ok)
                rows.append([md, RYW_TARGETS[t], _fmt(_median(r.tps for r in ok)),
                             _fmt(_median(r.p50_ms for r in ok), ".2f"),
                             _fmt(_median(r.p99_ms for r in ok), ".2f"),
                             "–" if share is None else f"{share:.1%}"]
                            + [_fmt(_median(getattr(r, f"waits_{o}") for r in ok), ",.0f")
                               for o in WAIT_OUTCOMES]
                            + [_fmt(_median(r.wait_seconds for r in ok), ".2f")])
        w_(_table(["mode", "target", "tps", "p50 ms", "p99 ms", "reads on replicas",
                   "immediate", "waited", "fallback", "time waiting s"], rows, "llrrrrrrrr") + "\n")
        for md in rmodes:
            c = ryw[0].clients
            ratio = res.ratio("ryw", "ryw", md, c, "pgsplit-session", "pgsplit-eventual")
            if ratio is not None:
                nowait = res.ratio("ryw", "ryw", md, c, "pgsplit-session-nowait", "pgsplit-eventual")
                w_(f"- `-M {md}`: tps session / eventual = **{ratio:.2f}** "
                   f"(with `consistency_wait_ms = 0`: {_fmt(nowait, '.2f')}; "
                   f"pgsplit session / direct = {_fmt(res.ratio('ryw', 'ryw', md, c, 'pgsplit-session', 'direct'), '.2f')}).")
        w_("")

    # --- errors
    w_("## Errors seen\n")
    bad = [r for r in runs if r.phase != "warmup" and (r.error or r.failed or r.aborted)]
    if bad:
        groups: dict[tuple[str, str, str, int, str], list[Run]] = defaultdict(list)
        for r in bad:
            groups[(r.target, r.workload, r.mode, r.clients, r.error)].append(r)
        rows = [[t, wl, md, str(c), ", ".join(str(r.round) for r in rs),
                 str(sum(r.failed or 0 for r in rs)), str(sum(r.aborted for r in rs)),
                 "`" + (err or "(failed transactions)").replace("|", "\\|").replace("`", "'")[:200] + "`"]
                for (t, wl, md, c, err), rs in groups.items()]
        w_(f"{len(bad)} runs had errors, failed transactions or aborted clients (left out of "
           "every median and ratio above), grouped:\n")
        w_(_table(["target", "workload", "mode", "clients", "rounds", "failed", "aborted",
                   "first error"], rows, "lllrlrrl") + "\n")
    else:
        w_("No pgbench run had failed transactions or aborted clients.\n")
    logs = meta.get("log_errors") or {}
    for key, lines in logs.items():
        if lines:
            w_(f"- {key} log: {len(lines)} error lines; first: `{lines[0][:200]}`")
    if not any(logs.values()):
        w_("No ERROR lines in the pgsplit, PgBouncer or Pgpool-II logs.")
    w_("")
    w_("## Reproduce\n")
    w_("```sh\nscripts/install.sh bench          # pgbouncer, pgpool2, matplotlib\n"
       "python -m loadtest.bench          # 25-30 min; --quick: 3-5 min; --help: subsets\n"
       "python -m loadtest.bench --from-csv loadtest/results/<stamp>-runs.csv   # report only\n```\n")
    w_(f"Raw results: `{meta.get('runs_csv', '')}` (one row per pgbench run) and "
       f"`{meta.get('memory_csv', '')}`.\n")
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text("\n".join(out))
    print(f"wrote {docs_path}")


def load_results(runs_csv: Path) -> tuple[list[Run], list[MemoryResult], dict[str, Any]]:
    with open(runs_csv, newline="") as f:
        runs = [Run.from_row(r) for r in csv.DictReader(f)]
    stem = runs_csv.name.removesuffix("-runs.csv")
    memory: list[MemoryResult] = []
    mem_path = runs_csv.with_name(f"{stem}-memory.csv")
    if mem_path.exists():
        with open(mem_path, newline="") as f:
            for r in csv.DictReader(f):
                memory.append(MemoryResult(
                    r["target"], int(r["connections"]),
                    int(r["rss_bytes"]) if r["rss_bytes"] else None,
                    int(r["rss0_bytes"]) if r["rss0_bytes"] else None,
                    float(r["bytes_per_connection"]) if r["bytes_per_connection"] else None,
                    float(r["login_seconds"]) if r["login_seconds"] else None, r["error"]))
    meta_path = runs_csv.with_name(f"{stem}-meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return runs, memory, meta


# --------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _repo_rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def run_benchmark(plan: Plan, args: argparse.Namespace) -> int:
    from loadtest.sandbox import Cluster

    if not Path(PGBENCH).exists():
        raise BenchError("pgbench not found (install postgresql-contrib)")
    for key, prog in (("pgbouncer", PGBOUNCER), ("pgpool", PGPOOL)):
        if any(t.startswith(key) for t in plan.targets) and not Path(prog).exists():
            raise BenchError(f"{prog} not found: run scripts/install.sh bench, or leave "
                             f"{key} out with --targets")
    raise_fd_limit(max(plan.memory_conns + [0]) + 1024)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    runs_csv = args.results_dir / f"{stamp}-runs.csv"
    memory_csv = args.results_dir / f"{stamp}-memory.csv"
    meta_path = args.results_dir / f"{stamp}-meta.json"
    command = "python -m loadtest.bench" + ("" if len(sys.argv) <= 1 else " " + shlex.join(sys.argv[1:]))
    meta: dict[str, Any] = {"command": command, "plan": dataclasses.asdict(plan), "note": args.note,
                            "started": dt.datetime.now().isoformat(timespec="seconds"),
                            "runs_csv": _repo_rel(runs_csv), "memory_csv": _repo_rel(memory_csv)}
    t_start = time.monotonic()
    total = (plan.throughput_runs() if "throughput" in plan.phases else 0) + (
        plan.rounds * len(RYW_TARGETS) * len(plan.ryw_modes) if "ryw" in plan.phases else 0)
    print(f"plan: {total} pgbench runs, estimated {plan.estimate_seconds() / 60:.0f} min; "
          f"results -> {runs_csv}", flush=True)
    rec = Recorder(runs_csv, total)
    memory: list[MemoryResult] = []
    log_errors: dict[str, list[str]] = {}
    logdir = Path(tempfile.mkdtemp(prefix="pgsplit-bench-pgbench-"))
    seq = iter(range(1, 10**9))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(plan.replicas, name="bench", users={USER: PASSWORD},
                      settings=CLUSTER_SETTINGS)
    interrupted = False
    try:
        print(f"starting the sandbox (primary + {plan.replicas} replicas) ...", flush=True)
        cluster.start()
        print(f"pgbench -i -s {plan.scale}: {init_pgbench(cluster, plan.scale):.1f}s", flush=True)
        meta["machine"] = machine_info(cluster)
        for phase, fn in (("throughput", throughput_phase), ("ryw", ryw_phase)):
            if phase not in plan.phases:
                continue
            t0 = time.monotonic()
            meta.setdefault("code", {})[phase] = git_describe()
            with contextlib.ExitStack() as stack:
                targets = fn(cluster, plan, rec, stack, logdir, seq)
                for t in targets:
                    errs = t.errors()
                    if errs:
                        log_errors[f"{phase}: {t.label}"] = errs[:20]
                        print(f"{t.key}: {len(errs)} error lines in its log; first: {errs[0]}",
                              flush=True)
            meta[f"{phase}_seconds"] = round(time.monotonic() - t0, 1)
            print(f"{phase} phase: {meta[f'{phase}_seconds'] / 60:.1f} min", flush=True)
        if "memory" in plan.phases and plan.memory_conns:
            t0 = time.monotonic()
            meta.setdefault("code", {})["memory"] = git_describe()
            memory = memory_phase(cluster, plan)
            meta["memory_seconds"] = round(time.monotonic() - t0, 1)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything; partial results are in the CSV",
              file=sys.stderr, flush=True)
    finally:
        rec.close()
        cluster.stop()
        if not KEEP:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"kept pgbench logs in {logdir}")
    meta["wall_seconds"] = round(time.monotonic() - t_start, 1)
    meta["log_errors"] = log_errors
    meta["interrupted"] = interrupted
    with open(memory_csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=MEMORY_FIELDS)
        wr.writeheader()
        for m in memory:
            wr.writerow(m.row())
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"done in {meta['wall_seconds'] / 60:.1f} min; {runs_csv}", flush=True)
    bad = [r for r in rec.runs if not r.ok or r.failed]
    if bad:
        print(f"{len(bad)} runs with errors, failed transactions or aborted clients", flush=True)
    if not args.no_docs and not interrupted:
        render_report(rec.runs, memory, meta, args.docs, args.img_dir)
    return 130 if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    global KEEP
    args = build_parser().parse_args(argv)
    KEEP = args.keep
    if args.from_csv:
        runs, memory, meta = load_results(args.from_csv)
        if args.note is not None:  # kept with the results, so a later --from-csv has it
            meta["note"] = args.note
            meta_path = args.from_csv.with_name(args.from_csv.name.removesuffix("-runs.csv") + "-meta.json")
            meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        render_report(runs, memory, meta, args.docs, args.img_dir)
        return 0
    plan = make_plan(args)
    if args.plan:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
        print(f"{plan.throughput_runs()} throughput runs; estimated "
              f"{plan.estimate_seconds() / 60:.0f} min")
        return 0
    try:
        return run_benchmark(plan, args)
    except (BenchError, CompetitorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
