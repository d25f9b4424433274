"""The phases of a benchmark: throughput (interleaved rounds over every target),
read-your-writes (three pgsplit routings side by side) and memory per idle connection."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.pgbench import Run, run_pgbench
from loadtest.bench.plan import (
    CSV_FIELDS,
    DBNAME,
    OPTIONS,
    PASSWORD,
    RYW_TARGETS,
    TARGETS,
    USER,
    WORKLOADS,
    BenchError,
    Plan,
    supports,
)
from loadtest.bench.results import MemoryResult
from loadtest.bench.targets import Target, _stopper, start_pgsplit, start_targets
from loadtest.competitors import Backend, PgBouncer

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
        if run.cpu_user_us_per_tx is not None:
            status += f" cpu={run.cpu_user_us_per_tx + (run.cpu_sys_us_per_tx or 0):.0f}us/tx"
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
    cpu0 = _safe(target.cpu_seconds)  # after the scrape: its CPU is not the run's
    run_pgbench(run, target.port, script_args, logdir, keep_logs=OPTIONS.keep)
    cpu1 = _safe(target.cpu_seconds)
    after = _safe(target.counters)
    if cpu0 is not None and cpu1 is not None and run.transactions:
        run.cpu_user_us_per_tx = round((cpu1[0] - cpu0[0]) * 1e6 / run.transactions, 2)
        run.cpu_sys_us_per_tx = round((cpu1[1] - cpu0[1]) * 1e6 / run.transactions, 2)
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


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed scrape must not stop the benchmark
        print(f"warning: could not read counters or CPU times: {exc}", file=sys.stderr)
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
    for key, workers in (("pgsplit", 1), ("pgsplit-2w", 2)):
        if key not in plan.targets and (key != "pgsplit" or "pgsplit-replicas" not in plan.targets):
            continue
        t = start_pgsplit(key, key, cluster, replicas=plan.replicas > 0, pool_size=plan.pool_size,
                          workers=workers)
        try:
            proc = t.process  # type: ignore[attr-defined]  (RSS: with workers, every process's)
            results += asyncio.run(_memory_of(key, t.port, proc.rss_bytes, plan.memory_conns))
            errs = t.errors()
            if errs:
                print(f"{key} log errors during the memory phase: {len(errs)}; first: {errs[0]}")
        finally:
            _stopper(t)()
    if "pgbouncer" in plan.targets:
        d = PgBouncer(Backend.of(cluster.primary), dict(cluster.users), pool_size=plan.pool_size,
                      max_client_conn=max(plan.memory_conns) + 100)
        try:
            d.start()
            results += asyncio.run(_memory_of("pgbouncer", d.port, d.rss_bytes, plan.memory_conns))
        finally:
            d.stop() if OPTIONS.keep else d.cleanup()
    return results
