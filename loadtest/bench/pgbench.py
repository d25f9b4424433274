"""One pgbench run: its command line, its transaction log, its figures (one CSV row)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import glob
import math
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.plan import CSV_FIELDS, DBNAME, PASSWORD, PGBENCH, USER

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
    # CPU of the target's processes over the run per transaction (none for direct)
    cpu_user_us_per_tx: float | None = None
    cpu_sys_us_per_tx: float | None = None
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
