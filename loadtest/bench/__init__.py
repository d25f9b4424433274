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
  log (-l), so the 1-client runs give the latency added by each proxy; around every run
  the CPU time of each proxy's process tree (/proc), per transaction. Two targets only
  run when named: pgsplit with PGSPLIT_UNCOMPILED=1, and `loadtest.framing_relay` (cuts
  messages at their headers and forwards them, nothing else: the floor of a Python proxy).
- memory: RSS of a fresh pgsplit and a fresh PgBouncer holding N idle client
  connections that completed a real SCRAM login; bytes per connection.
- ryw: a custom script (1 UPDATE, 10 SELECTs of random accounts) through three pgsplit
  processes that differ only in `[routing]` (session; session with consistency_wait_ms = 0;
  eventual), with the share of reads served by replicas from pgsplit's metrics.

Modules: `plan` (the options and what runs), `pgbench` (one run and its figures), `targets`
(pgsplit and the competitors, started and scraped), `cpu` (a process tree's CPU time), `phases` (throughput, read-your-writes,
memory), `results` (runs grouped for the report, CSV and metadata read back), `report` and
`plots` (docs/benchmarks.md, one function per section), `run` (the whole benchmark, the
command line).

Run ``python -m loadtest.bench --help``; ``--quick`` for a ~3-minute development run,
``--plan`` to print what would run and an estimate of the time it takes.
"""
