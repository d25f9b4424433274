"""The benchmark report from a results CSV: the runs are written as the benchmark writes
them (Recorder), read back (load_results) and rendered (render_report), with the proxy CPU
per transaction section checked figure by figure."""

from __future__ import annotations

import csv
from pathlib import Path

from loadtest.bench.pgbench import Run
from loadtest.bench.phases import Recorder
from loadtest.bench.report import render_report
from loadtest.bench.results import load_results

# (user, system) µs per transaction by target and round; pgsplit's totals 60, 90, 120
# against PgBouncer's 30, 60, 40: per-round ratios 2, 1.5, 3, median 2.00 (the ratio of
# the medians would be 90 / 40 = 2.25)
CPU = {
    "pgbouncer": {1: (20.0, 10.0), 2: (40.0, 20.0), 3: (25.0, 15.0)},
    "pgsplit": {1: (45.0, 15.0), 2: (70.0, 20.0), 3: (95.0, 25.0)},
    "relay": {1: (20.0, 12.0), 2: (22.0, 14.0), 3: (24.0, 16.0)},
}


def make_runs(cpu: bool = True) -> list[Run]:
    runs, seq = [], 0
    for rnd in (1, 2, 3):
        for mode in ("simple", "extended"):
            for clients in (1, 8):
                for target in ("direct", "pgbouncer", "pgsplit", "relay"):
                    seq += 1
                    r = Run("throughput", rnd, seq, target, "select", mode, clients, 5.0,
                            pgbench_T=5, tps=10000.0 - 100 * seq, latency_avg_ms=0.8,
                            p50_ms=0.5, p99_ms=2.0, transactions=50000, failed=0,
                            connect_ms=40.0, idle_cpu=0.05)
                    if cpu and target in CPU:
                        u, s = CPU[target][rnd]
                        if clients == 1:
                            u, s = u * 3, s * 3
                        if mode == "extended":
                            u, s = u + 1, s + 1
                        r.cpu_user_us_per_tx, r.cpu_sys_us_per_tx = u, s
                    runs.append(r)
    # an aborted run with a wild figure: left out like in every other table
    runs.append(Run("throughput", 4, seq + 1, "pgsplit", "select", "simple", 8, 5.0,
                    pgbench_T=5, tps=10.0, transactions=10, aborted=3, error="aborted",
                    cpu_user_us_per_tx=9999.0, cpu_sys_us_per_tx=9999.0))
    return runs


def render(tmp_path: Path, runs: list[Run]) -> str:
    rec = Recorder(tmp_path / "x-runs.csv", len(runs))
    for r in runs:
        rec.add(r)
    rec.close()
    loaded, memory, meta = load_results(tmp_path / "x-runs.csv")
    meta = {"plan": {"rounds": 3, "duration": 5, "warmup": 2, "replicas": 2, "scale": 10,
                     "pool_size": 20}, "machine": {}, "command": "python -m loadtest.bench"}
    docs = tmp_path / "docs" / "benchmarks.md"
    render_report(loaded, memory, meta, docs, tmp_path / "img")
    return docs.read_text()


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def table_after(text: str, heading: str) -> dict[str, list[str]]:
    rows = []
    for ln in text[text.index(heading):].splitlines()[2:]:  # the heading, a blank line
        if not ln.startswith("|"):
            break
        rows.append(ln)
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]
    assert cells[0] == ["target", "user µs", "system µs", "total µs", "total / PgBouncer"]
    return {c[0]: c[1:] for c in cells[2:]}


def test_the_csv_keeps_the_cpu_figures(tmp_path):
    runs = make_runs()
    rec = Recorder(tmp_path / "y-runs.csv", len(runs))
    for r in runs:
        rec.add(r)
    rec.close()
    with open(tmp_path / "y-runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["target"] == "pgbouncer" and rows[1]["cpu_user_us_per_tx"] == "60.0"
    assert rows[0]["target"] == "direct" and rows[0]["cpu_sys_us_per_tx"] == ""
    loaded, _, _ = load_results(tmp_path / "y-runs.csv")
    assert [(r.cpu_user_us_per_tx, r.cpu_sys_us_per_tx) for r in loaded] == \
        [(r.cpu_user_us_per_tx, r.cpu_sys_us_per_tx) for r in runs]


def test_cpu_section_medians_over_rounds_and_paired_ratio_to_pgbouncer(tmp_path):
    text = render(tmp_path, make_runs())
    cpu = section(text, "## Proxy CPU per transaction")
    assert "/proc/PID/stat" in cpu
    simple = table_after(cpu, "### select-only (-S), -M simple, 8 clients")
    assert list(simple) == ["PgBouncer", "pgsplit (primary only)", "framing relay"]
    assert simple["PgBouncer"] == ["25.0", "15.0", "40.0", "1.00"]
    assert simple["pgsplit (primary only)"] == ["70.0", "20.0", "90.0", "2.00"]
    assert simple["framing relay"] == ["22.0", "14.0", "36.0", "1.00"]  # 32/30, 36/60, 40/40
    ext = table_after(cpu, "### select-only (-S), -M extended, 8 clients")
    assert ext["pgsplit (primary only)"][:3] == ["71.0", "21.0", "92.0"]
    assert "1 clients" not in cpu and "PostgreSQL (direct)" not in cpu


def test_the_other_sections_still_render(tmp_path):
    text = render(tmp_path, make_runs())
    for title in ("## Setup", "## Summary", "## Throughput", "## Connection set-up",
                  "## Latency at 1 client", "## Errors seen", "## Reproduce"):
        assert title in text
    assert text.index("## Throughput") < text.index("## Proxy CPU per transaction") < \
        text.index("## Connection set-up")
    assert "| framing relay | `python -m loadtest.framing_relay`" in section(text, "## Setup")
    assert "`pgsplit-uncompiled`, `pgsplit-2w`, `relay`" in section(text, "## Reproduce")
    assert (tmp_path / "img" / "bench-tps-select.png").exists()


def test_no_cpu_section_for_results_without_cpu_figures(tmp_path):
    text = render(tmp_path, make_runs(cpu=False))
    assert "## Proxy CPU per transaction" not in text
    assert "## Throughput" in text


def test_without_8_clients_the_largest_count_is_shown(tmp_path):
    runs = [r for r in make_runs() if r.clients == 8]
    for r in runs:
        r.clients = 32
    text = render(tmp_path, runs)
    assert "### select-only (-S), -M simple, 32 clients" in text
