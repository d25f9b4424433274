"""What a benchmark runs: the targets, workloads, modes and client counts, the plan built
from the command line, and how long it will take."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
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
    "pgsplit-uncompiled": "pgsplit uncompiled (primary only)",
    "pgsplit-2w": "pgsplit, 2 workers (primary only)",
    "relay": "framing relay",
}
# Not run unless named in --targets: they explain pgsplit's CPU rather than compare it.
OPT_IN_TARGETS = ("pgsplit-uncompiled", "pgsplit-2w", "relay")
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
    ("pgsplit-2w", "pgsplit"),  # two workers against one (when pgsplit-2w is named)
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
    "waits_immediate", "waits_waited", "waits_fallback", "wait_seconds",
    "cpu_user_us_per_tx", "cpu_sys_us_per_tx", "connect_ms", "phase", "seq",
    "duration_s", "pgbench_T", "wall_s", "started_at", "loadavg", "idle_cpu",
    "error",
]
MEMORY_FIELDS = ["target", "connections", "rss_bytes", "rss0_bytes", "bytes_per_connection",
                 "login_seconds", "error"]


class BenchError(RuntimeError):
    """The benchmark cannot go on (a target did not start, pgbench is missing...)."""


@dataclasses.dataclass
class RunOptions:
    """Settings of this invocation that are not part of the plan (not kept with the results)."""
    keep: bool = False  # --keep: leave the temporary directories and pgbench logs behind


OPTIONS = RunOptions()


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
    p.add_argument("--targets", type=_csv_list(str, TARGETS),
                   default=[t for t in TARGETS if t not in OPT_IN_TARGETS],
                   help="comma list of: " + ", ".join(TARGETS) + " (default all but "
                        + ", ".join(OPT_IN_TARGETS) + ": pgsplit with PGSPLIT_UNCOMPILED=1, "
                        "and loadtest.framing_relay, the floor of a Python proxy)")
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
