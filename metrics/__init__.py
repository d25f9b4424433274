"""Prometheus metrics of pgsplit: definitions, hot-path counters, text exposition.

Owns: every metric name and label set (names are a contract, see docs/operations.md), one
registry passed in by the caller (tests make their own). This is the only package that
imports prometheus_client.

The per-unit counters are plain Python ints and lists bumped on the hot path and turned
into metric families only when /metrics is scraped: a labelled prometheus_client child
costs microseconds per increment, a dict bump a few tens of nanoseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import hotpath as _hotpath

_hotpath.choose()  # (metrics.units is compiled with the hot path: the choice comes first)

from metrics.units import UnitStats  # noqa: E402

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PAUSE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ScrapeCollector(Collector):
    """Builds the hot-path families and the connection gauges at scrape time."""

    def __init__(self, stats: UnitStats, sources: "Metrics"):
        self._stats = stats
        self._sources = sources

    def collect(self) -> Iterable:
        units = CounterMetricFamily(
            "pgsplit_units_total", "Units of work routed, by backend, role and kind (read/write)",
            labels=["backend", "role", "kind"],
        )
        for (backend, role, kind), n in sorted(self._stats.units.items()):
            units.add_metric([backend, role, kind], n)
        yield units
        hist = HistogramMetricFamily(
            "pgsplit_unit_duration_seconds", "Time from a unit's first byte to its ReadyForQuery",
            labels=["role"],
        )
        for role, h in sorted(self._stats.durations.items()):
            hist.add_metric([role], h.buckets(), h.total)
        yield hist
        waits = CounterMetricFamily(
            "pgsplit_consistency_waits",
            "Reads that needed a replica at the session's LSN, by outcome (immediate, waited, fallback)",
            labels=["outcome"],
        )
        for outcome, n in self._stats.consistency.items():
            waits.add_metric([outcome], n)
        yield waits
        clients = GaugeMetricFamily(
            "pgsplit_client_connections", "Client connections by state", labels=["state"]
        )
        for state, n in sorted(self._sources.client_counts().items()):
            clients.add_metric([state], n)
        yield clients
        servers = GaugeMetricFamily(
            "pgsplit_server_connections", "Server connections by backend and state",
            labels=["backend", "state"],
        )
        for (backend, state), n in sorted(self._sources.server_counts().items()):
            servers.add_metric([backend, state], n)
        yield servers
        prepared = GaugeMetricFamily(
            "pgsplit_server_prepared_statements",
            "Protocol-level statements prepared on the open server connections, by backend", labels=["backend"],
        )
        for backend, n in sorted(self._sources.prepared_counts().items()):
            prepared.add_metric([backend], n)
        yield prepared
        yield CounterMetricFamily(
            "pgsplit_prepared_statement_evictions",
            "Statements closed on a server connection to stay within pool.max_prepared_statements",
            value=self._sources.prepared_evictions(),
        )
        waiting = GaugeMetricFamily(
            "pgsplit_pool_waiting", "Units queued for a server connection of their pool (at pool.size, or opening for earlier ones), by backend",
            labels=["backend"],
        )
        for backend, n in sorted(self._sources.pool_waiting().items()):
            waiting.add_metric([backend], n)
        yield waiting
        timeouts = CounterMetricFamily(
            "pgsplit_pool_timeouts",
            "Units that failed with 53300: no server connection became free within pool.acquire_timeout_s",
            labels=["backend"],
        )
        for backend, n in sorted(self._sources.pool_timeouts().items()):
            timeouts.add_metric([backend], n)
        yield timeouts


def _empty() -> dict:
    return {}


def _zero() -> int:
    return 0


class Metrics:
    """All metrics of one proxy process, registered in the registry it is given."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.units = UnitStats()
        self.client_counts: Callable[[], Mapping[str, int]] = _empty
        self.server_counts: Callable[[], Mapping[tuple[str, str], int]] = _empty
        self.prepared_counts: Callable[[], Mapping[str, int]] = _empty
        self.prepared_evictions: Callable[[], int] = _zero
        self.pool_waiting: Callable[[], Mapping[str, int]] = _empty
        self.pool_timeouts: Callable[[], Mapping[str, int]] = _empty
        r.register(_ScrapeCollector(self.units, self))

        self.backend_up = Gauge("pgsplit_backend_up", "1 if the backend answers the monitor", ["backend", "role"], registry=r)
        self.replica_lag_bytes = Gauge("pgsplit_replica_lag_bytes", "Primary WAL position minus replica replay position", ["backend"], registry=r)
        self.replica_lag_seconds = Gauge("pgsplit_replica_lag_seconds", "Replica replay delay in seconds (0 when caught up)", ["backend"], registry=r)
        self.replica_in_rotation = Gauge("pgsplit_replica_in_rotation", "1 if the replica receives reads", ["backend"], registry=r)
        self.topology_generation = Gauge("pgsplit_topology_generation", "Generation of the installed backend set", registry=r)
        self.split_brain = Gauge("pgsplit_split_brain", "1 while two backends of the active set claim to be primary", registry=r)
        self.consistency_wait_seconds = Histogram(
            "pgsplit_consistency_wait_seconds", "Time reads waited for a replica to reach the session's LSN",
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.retries = Counter("pgsplit_retries", "Units retried on another backend, by reason", ["reason"], registry=r)
        self.cutovers = Counter("pgsplit_cutovers", "Cutovers by result", ["result"], registry=r)
        self.cutover_pause_seconds = Histogram(
            "pgsplit_cutover_pause_seconds", "How long units were held during a cutover", buckets=PAUSE_BUCKETS, registry=r,
        )
        self.server_connects = Counter(
            "pgsplit_server_connects", "Server connection attempts by backend and result", ["backend", "result"], registry=r,
        )
        self.migration_lag_bytes = Gauge(
            "pgsplit_migration_lag_bytes",
            "Source WAL not yet applied by a watched online migration's subscription (the largest, if several)",
            registry=r,
        )
        self.migration_tables = Gauge(
            "pgsplit_migration_tables", "Tables of watched online migrations by initial-copy state", ["state"],
            registry=r,
        )
        self.schema_drift = Gauge(
            "pgsplit_schema_drift", "1 while the schemas of a watched migration's two sides differ", registry=r,
        )

    def set_migration(self, lag_bytes: int, tables_by_state: Mapping[str, int], drift: bool) -> None:
        """The migration gauges from the watched migrations (none: all zero, no states)."""
        self.migration_lag_bytes.set(lag_bytes)
        self.migration_tables.clear()
        for state, n in tables_by_state.items():
            self.migration_tables.labels(state=state.replace(" ", "_")).set(n)
        self.schema_drift.set(1 if drift else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> Snapshot:
        """Every family of this registry as plain data (a worker's, sent to its supervisor)."""
        return [(m.name, m.type, m.documentation, m.unit, [(s.name, dict(s.labels), s.value) for s in m.samples])
                for m in self.registry.collect()]


# --- many processes as one (pgsplit run --workers N) ---------------------------------------------

# (family name, type, help, unit, [(sample name, labels, value)])
Snapshot = list[tuple[str, str, str, str, list[tuple[str, dict, float]]]]

# Gauges of what each worker holds (its clients, its server connections): added up. Every
# other gauge describes the one backend set (lag, rotation, generation, migration) and is
# the supervisor's alone: the first snapshot given to merge_snapshots.
PER_WORKER_GAUGES = frozenset({"pgsplit_client_connections", "pgsplit_server_connections",
                               "pgsplit_server_prepared_statements", "pgsplit_pool_waiting"})


def merge_snapshots(base: Snapshot, others: Iterable[Snapshot]) -> Snapshot:
    """`base` plus `others`: counters and histograms added sample by sample (a `_created`
    sample keeps the earliest), per-worker gauges added, other gauges as in `base`."""
    families: dict[str, tuple[str, str, str, dict]] = {}
    for name, kind, doc, unit, samples in base:
        families[name] = (kind, doc, unit, {(s, _key(labels)): v for s, labels, v in samples})
    for snapshot in others:
        for name, kind, doc, unit, samples in snapshot:
            if kind == "gauge" and name not in PER_WORKER_GAUGES and name in families:
                continue
            merged = families.setdefault(name, (kind, doc, unit, {}))[3]
            for sample, labels, value in samples:
                key = (sample, _key(labels))
                old = merged.get(key)
                if old is None:
                    merged[key] = value
                elif sample.endswith("_created"):
                    merged[key] = min(old, value)
                else:
                    merged[key] = old + value
    return [(name, kind, doc, unit, [(s, dict(labels), v) for (s, labels), v in samples.items()])
            for name, (kind, doc, unit, samples) in families.items()]


def counters_only(snapshot: Snapshot) -> Snapshot:
    """What of a worker that ended stays in the sums: its counters and histograms."""
    return [f for f in snapshot if f[1] != "gauge"]


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot):
        self._snapshot = snapshot

    def collect(self) -> Iterable:
        for name, kind, doc, unit, samples in self._snapshot:
            family = Metric(name, doc, kind, unit)
            for sample, labels, value in samples:
                family.add_sample(sample, labels, value)
            yield family
