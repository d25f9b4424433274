"""The systems under test: pgsplit as `pgsplit run` child processes, PgBouncer, Pgpool-II
and PostgreSQL direct, started for a phase and scraped for their counters."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from loadtest.bench.cpu import tree_cpu_seconds
from loadtest.bench.plan import DBNAME, OPTIONS, PASSWORD, RYW_ROUTING, USER, BenchError, Plan
from loadtest.competitors import Backend, PgBouncer, Pgpool

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
                 errors: Callable[[], list[str]] = lambda: [],
                 pid: Callable[[], int | None] = lambda: None):
        self.key, self.label, self.port = key, label, port
        self.stop, self.counters, self.log, self.errors = stop, counters, log, errors
        self.pid = pid  # the target's own process (None: not a process of its own)

    def cpu_seconds(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds so far of the target's process and its descendants."""
        pid = self.pid()
        return None if pid is None else tree_cpu_seconds(pid)


_PROXY_ERROR = re.compile(r"\b(ERROR|CRITICAL|Traceback|Exception)\b")


def _proxy_errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if _PROXY_ERROR.search(ln)]


UNCOMPILED_ENV = "PGSPLIT_UNCOMPILED"  # set: pgsplit runs its compiled hot path as plain Python


def start_pgsplit(key: str, label: str, cluster: Any, *, replicas: bool, pool_size: int,
                  routing: dict[str, Any] | None = None, uncompiled: bool = False, workers: int = 1) -> Target:
    from loadtest.harness import NodeSet, ProxyProcess, config_text

    view = cluster if replicas else NodeSet.of(cluster, cluster.primary)
    sections: dict[str, dict[str, Any]] = {"pool": {"size": pool_size}}
    if routing:
        sections["routing"] = dict(routing)
    proc = ProxyProcess(config_text({"main": view}, sections=sections),
                        env={UNCOMPILED_ENV: "1"} if uncompiled else None, workers=workers)
    if not uncompiled:  # not inherited from the benchmark's own environment either
        proc.env.pop(UNCOMPILED_ENV, None)
    proc.start()

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
                    errors=lambda: _proxy_errors(proc.log()), pid=lambda: proc.proc.pid)
    target.process = proc  # type: ignore[attr-defined]
    return target


def start_relay(key: str, label: str, cluster: Any) -> Target:
    """loadtest.framing_relay in front of the primary, a child process like pgsplit."""
    from loadtest.framing_relay import RelayProcess

    relay = RelayProcess("127.0.0.1", cluster.primary.port).start()
    target = Target(key, label, relay.port, stop=relay.stop, log=relay.log,
                    errors=lambda: _proxy_errors(relay.log()), pid=lambda: relay.proc.pid)
    target.process = relay  # type: ignore[attr-defined]
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
            stack.callback(d.cleanup if not OPTIONS.keep else d.stop)
            d.start()
            t = Target(key, label, d.port, stop=d.stop, log=d.log_text, errors=d.errors,
                       pid=d.daemon_pid)
        elif key in ("pgpool", "pgpool-replicas"):
            reps = [Backend.of(r) for r in cluster.replicas] if key == "pgpool-replicas" else []
            d = Pgpool(primary, reps, users, check_user="postgres",
                       check_password=cluster.superuser_password,
                       num_init_children=max_clients + 4)
            stack.callback(d.cleanup if not OPTIONS.keep else d.stop)
            d.start()
            port = d.port
            # its children serve the clients: its CPU is the whole process tree's
            t = Target(key, label, port, stop=d.stop, log=d.log_text, errors=d.errors,
                       counters=(lambda p=port: _pgpool_counters(p)) if reps else (lambda: None),
                       pid=d.daemon_pid)
        elif key in ("pgsplit", "pgsplit-replicas", "pgsplit-uncompiled", "pgsplit-2w"):
            t = start_pgsplit(key, label, cluster, replicas=key == "pgsplit-replicas",
                              pool_size=plan.pool_size, uncompiled=key == "pgsplit-uncompiled",
                              workers=2 if key == "pgsplit-2w" else 1)
            stack.callback(_stopper(t))
        elif key == "relay":
            t = start_relay(key, label, cluster)
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
        if proc is not None and not OPTIONS.keep:
            shutil.rmtree(proc.dir, ignore_errors=True)
    return stop
