"""The per-unit counters the hot path bumps: plain ints, lists and dicts, no locks.

Owns: UnitStats (units by backend, role and kind; durations by role; read-your-writes
outcomes; per database the admin console's SHOW STATS counters) and FastHistogram.
metrics turns them into metric families only when /metrics is scraped. Compiled with the
hot path (units.pxd): `UnitStats.record` runs once per unit.
"""

from __future__ import annotations

from bisect import bisect_left

UNIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FastHistogram:
    """A histogram without labels or locks, exported by UnitStats' collector."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class UnitStats:
    """Units of work by (backend, role, kind), their durations by role, reads that carried
    a read-your-writes token by outcome, and per database the counters of the admin
    console's SHOW STATS."""

    def __init__(self) -> None:
        self.units: dict[tuple[str, str, str], int] = {}
        self.durations: dict[str, FastHistogram] = {}
        # pgsplit_consistency_waits_total: bumped once per such read, so a plain dict
        self.consistency: dict[str, int] = {"immediate": 0, "waited": 0, "fallback": 0}
        # database (as clients name it) -> [transactions, units, unit time in seconds (a float:
        # the hot path adds what it measured; SHOW STATS turns it into microseconds)]
        self.databases: dict[str, list] = {}

    def database_counters(self, database: str) -> list:
        """The counters a session of `database` bumps in place (looked up once per session)."""
        counters = self.databases.get(database)
        if counters is None:
            counters = self.databases[database] = [0, 0, 0.0]
        return counters

    def record(self, backend: str, role: str, kind: str, seconds: float) -> None:
        key = (backend, role, kind)
        units = self.units
        units[key] = units.get(key, 0) + 1
        hist = self.durations.get(role)
        if hist is None:
            hist = self.durations[role] = FastHistogram(UNIT_BUCKETS)
        hist.counts[bisect_left(hist.bounds, seconds)] += 1
        hist.total += seconds
        hist.count += 1
