"""A whole benchmark: check the tools, start the sandbox, run the phases, write the CSV and
metadata, render the report; and the command line (python -m loadtest.bench)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.pgbench import _pg_env
from loadtest.bench.phases import Recorder, memory_phase, ryw_phase, throughput_phase
from loadtest.bench.plan import (
    CLUSTER_SETTINGS,
    DBNAME,
    MEMORY_FIELDS,
    OPTIONS,
    PASSWORD,
    PGBENCH,
    ROOT,
    RYW_TARGETS,
    USER,
    BenchError,
    Plan,
    build_parser,
    make_plan,
)
from loadtest.bench.report import render_report
from loadtest.bench.results import MemoryResult, load_results
from loadtest.competitors import PGBOUNCER, PGPOOL, CompetitorError, tool_version
from loadtest.sandbox import Cluster

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
    for dist in ("uvloop", "asyncpg", "pglast"):  # read from the installed metadata, not imported
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "?"
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


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _repo_rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def run_benchmark(plan: Plan, args: argparse.Namespace) -> int:
    _check_tools(plan)
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
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cluster = Cluster(plan.replicas, name="bench", users={USER: PASSWORD},
                      settings=CLUSTER_SETTINGS)
    interrupted = False
    try:
        memory = _run_phases(cluster, plan, rec, meta, log_errors, logdir)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything; partial results are in the CSV",
              file=sys.stderr, flush=True)
    finally:
        rec.close()
        cluster.stop()
        if not OPTIONS.keep:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            print(f"kept pgbench logs in {logdir}")
    meta["wall_seconds"] = round(time.monotonic() - t_start, 1)
    meta["log_errors"] = log_errors
    meta["interrupted"] = interrupted
    _write_results(memory, memory_csv, meta, meta_path)
    print(f"done in {meta['wall_seconds'] / 60:.1f} min; {runs_csv}", flush=True)
    bad = [r for r in rec.runs if not r.ok or r.failed]
    if bad:
        print(f"{len(bad)} runs with errors, failed transactions or aborted clients", flush=True)
    if not args.no_docs and not interrupted:
        render_report(rec.runs, memory, meta, args.docs, args.img_dir)
    return 130 if interrupted else 0


def _check_tools(plan: Plan) -> None:
    if not Path(PGBENCH).exists():
        raise BenchError("pgbench not found (install postgresql-contrib)")
    for key, prog in (("pgbouncer", PGBOUNCER), ("pgpool", PGPOOL)):
        if any(t.startswith(key) for t in plan.targets) and not Path(prog).exists():
            raise BenchError(f"{prog} not found: run scripts/install.sh bench, or leave "
                             f"{key} out with --targets")


def _run_phases(cluster: Cluster, plan: Plan, rec: Recorder, meta: dict[str, Any],
                log_errors: dict[str, list[str]], logdir: Path) -> list[MemoryResult]:
    """Start the sandbox and run the planned phases; the memory phase's results are returned,
    pgbench runs go to `rec`, timings and code versions to `meta`, log errors to `log_errors`."""
    seq = iter(range(1, 10**9))
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
    memory: list[MemoryResult] = []
    if "memory" in plan.phases and plan.memory_conns:
        t0 = time.monotonic()
        meta.setdefault("code", {})["memory"] = git_describe()
        memory = memory_phase(cluster, plan)
        meta["memory_seconds"] = round(time.monotonic() - t0, 1)
    return memory


def _write_results(memory: list[MemoryResult], memory_csv: Path, meta: dict[str, Any],
                   meta_path: Path) -> None:
    with open(memory_csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=MEMORY_FIELDS)
        wr.writeheader()
        for m in memory:
            wr.writerow(m.row())
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    OPTIONS.keep = args.keep
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
