"""Benchmark results: the memory figures, runs grouped for the report (medians, paired
ratios), and a finished run's CSV and metadata read back for a report without running."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from loadtest.bench.pgbench import Run
from loadtest.bench.plan import MEMORY_FIELDS

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

    def ratio(self, phase: str, w: str, m: str, c: int, num: str, den: str,
              value: Callable[[Run], float | None] = lambda r: r.tps) -> float | None:
        """Median over rounds of value(num)/value(den) within the same round (paired runs);
        the value is tps unless told."""
        a = {r.round: value(r) for r in self.ok(phase, w, m, c, num)}
        b = {r.round: value(r) for r in self.ok(phase, w, m, c, den)}
        return _median(a[k] / b[k] for k in a if k in b and a[k] is not None and b[k])

    def difference(self, phase: str, w: str, m: str, c: int, a: str, b: str,
                   field: str) -> float | None:
        """Median over rounds of field(a) - field(b) within the same round (paired runs)."""
        x = {r.round: getattr(r, field) for r in self.ok(phase, w, m, c, a)}
        y = {r.round: getattr(r, field) for r in self.ok(phase, w, m, c, b)}
        return _median(x[k] - y[k] for k in x if k in y and x[k] is not None and y[k] is not None)

    def values(self, field: str) -> list[Any]:
        return sorted({getattr(r, field) for r in self.runs})


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
