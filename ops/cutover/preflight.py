"""The cutover's preflight: what it saw of both servers and their replication, and the
report built from that.

Owns: the facts (`ServerState` per server, `ReplicationFacts`, `PreflightFacts`;
`record_schemas`, their schema part), the pure `build_report` that turns them into
blockers (the cutover would fail or lose writes: nothing may change) and warnings, and
`report_lines`, the report for a terminal. A migration's plan (ops.migrate.plan) runs
`build_report` too, on the facts the cutover will find, so that it names every blocker
the cutover will.
Must not know: how the facts are gathered (physical.py, logical.py), the state machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ops.schema import Fingerprint, diff_databases
from router.lsn import format_lsn
from router.pg import major_version

__all__ = [
    "PreflightFacts",
    "PreflightReport",
    "ReplicationFacts",
    "ServerState",
    "build_report",
    "record_schemas",
    "report_lines",
]


@dataclass
class ServerState:
    """One server as the preflight saw it: reachable or not, its version, role, timeline
    and WAL position, and what its configuration says about writes."""

    name: str
    address: str
    reachable: bool = False
    error: str | None = None
    version: str | None = None  # server_version, e.g. "15.4 (Debian 15.4-1)"
    version_num: int | None = None  # server_version_num, e.g. 150004
    in_recovery: bool | None = None
    system_identifier: str | None = None
    timeline: int | None = None  # a primary's current timeline; a standby's received one
    wal_lsn: int | None = None  # pg_current_wal_lsn() on a primary, replay LSN on a standby
    read_only: bool | None = None  # default_transaction_read_only as configured
    superuser: bool | None = None
    sender: str | None = None  # a standby's upstream (pg_stat_wal_receiver), "host:port"

    @property
    def major(self) -> int | None:
        return None if self.version_num is None else major_version(self.version_num)


@dataclass
class ReplicationFacts:
    kind: str | None = None  # "physical" | "logical" | None (not found)
    via: str | None = None  # "direct" | "cascading through host:port" | subscription name
    status: str | None = None  # walreceiver status / subscription worker state
    lag_bytes: int | None = None
    replay_lag_s: float | None = None  # pg_stat_replication.replay_lag (direct physical)
    detail: str | None = None
    subscription: str | None = None  # logical: the subscription's name (one per database)
    databases: list[str] = field(default_factory=list)  # logical: databases it carries
    tables_not_ready: list[str] = field(default_factory=list)  # logical: still in their initial copy


@dataclass
class PreflightFacts:
    source: ServerState
    target: ServerState
    replication: ReplicationFacts = field(default_factory=ReplicationFacts)
    schema_differences: list[str] | None = None  # None: not compared
    schema_digests: dict[str, dict[str, str]] = field(default_factory=dict)  # side -> db -> digest
    schema_errors: list[str] = field(default_factory=list)
    target_replicas: list[ServerState] = field(default_factory=list)
    source_table_databases: list[str] | None = None  # databases with tables on the source


def record_schemas(facts: PreflightFacts, prints: Mapping[str, Mapping[str, Fingerprint]]) -> None:
    """The schema part of ``facts`` from every database's fingerprint on both sides
    (``{"source": {database: print}, "target": {...}}``): the differences, which databases
    have tables on the source, the digests. The preflight calls it with what it read; a
    migration's plan with the target as the migration will leave it (ops.migrate.plan)."""
    facts.source_table_databases = sorted(db for db, fp in prints["source"].items() if fp.count("table"))
    facts.schema_differences = diff_databases(prints["source"], prints["target"])
    facts.schema_digests = {side: {db: fp.digest for db, fp in p.items()} for side, p in prints.items()}


@dataclass
class PreflightReport:
    facts: PreflightFacts
    versions: str
    blockers: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.blockers

    def to_dict(self) -> dict[str, Any]:
        f = self.facts

        def server(s: ServerState) -> dict[str, Any]:
            d = asdict(s)
            d["wal_lsn"] = None if s.wal_lsn is None else format_lsn(s.wal_lsn)
            return d

        return {
            "ok": self.ok,
            "source": server(f.source),
            "target": server(f.target),
            "versions": self.versions,
            "replication": asdict(f.replication),
            "schema": {"differences": f.schema_differences, "digests": f.schema_digests,
                       "errors": f.schema_errors},
            "target_replicas": [server(r) for r in f.target_replicas],
            "blockers": self.blockers,
            "warnings": self.warnings,
        }


def _human_major(major: int) -> str:
    return f"{major // 100}.{major % 100}" if major >= 100 else str(major)


def build_report(facts: PreflightFacts, *, max_lag_bytes: int) -> PreflightReport:
    """Blockers (the cutover would fail or lose writes: nothing may change) and warnings
    (worth reading) from what the preflight saw. Pure: unit-tested without a server."""
    s, t = facts.source, facts.target
    blockers: list[str] = []
    warnings: list[str] = []
    for side, f in (("source", s), ("target", t)):
        if not f.reachable:
            blockers.append(f"the {side} {f.name} ({f.address}) cannot be reached: {f.error}")
        elif f.superuser is False:
            blockers.append(f"the control account is not a superuser on the {side} {f.name}: "
                            "ALTER SYSTEM, pg_terminate_backend and pg_promote need one")
    versions = _compare_versions(facts, blockers)
    _check_writability(facts, blockers, warnings)
    if s.reachable and t.reachable:
        _check_replication(facts, max_lag_bytes, blockers, warnings)
    _check_schemas(facts, blockers, warnings)
    _check_replicas(facts, warnings)
    return PreflightReport(facts, versions, blockers, warnings)


def _compare_versions(facts: PreflightFacts, blockers: list[str]) -> str:
    """The versions line of the report; a blocker when the majors differ and nothing but
    logical replication could cross them."""
    s, t, rep = facts.source, facts.target, facts.replication
    if s.major is not None and t.major is not None and s.major != t.major:
        versions = (f"major versions differ: source {s.name} runs {_human_major(s.major)} ({s.version}), "
                    f"target {t.name} runs {_human_major(t.major)} ({t.version})")
        if rep.kind != "logical":
            blockers.append(versions + "; only logical replication crosses major versions")
    elif s.version is not None and t.version is not None:
        versions = f"same major version {_human_major(s.major)}: source {s.version}, target {t.version}"
    else:
        versions = "not compared (a server could not be reached)"
    return versions


def _check_writability(facts: PreflightFacts, blockers: list[str], warnings: list[str]) -> None:
    """The source must be the writable primary it is configured as; the target must take
    writes after the swap."""
    s, t, rep = facts.source, facts.target, facts.replication
    if s.reachable and s.in_recovery:
        blockers.append(f"the source {s.name} is in recovery: it is not the primary it is configured as")
    if s.read_only:
        warnings.append(f"the source {s.name} already has default_transaction_read_only = on "
                        "(a fence left over?); a rollback resets it to the server default")
    if t.reachable and t.read_only:
        if rep.kind == "logical":
            # e.g. the old cluster on the way back, fenced by the cutover that left it
            warnings.append(f"the target {t.name} has default_transaction_read_only = on (the fence of an "
                            "earlier cutover?): it is reset after the catch-up, before the swap")
        else:
            blockers.append(f"the target {t.name} has default_transaction_read_only = on in its configuration: "
                            "it would refuse writes after the swap (ALTER SYSTEM RESET it there first)")


def _check_replication(facts: PreflightFacts, max_lag_bytes: int, blockers: list[str],
                       warnings: list[str]) -> None:
    """Something must carry the source's last writes to the target, and not too far
    behind: a physical standby of the same cluster and timeline, or a logical subscriber
    whose tables are copied, in every database that has tables."""
    s, t, rep = facts.source, facts.target, facts.replication
    if rep.kind is None:
        blockers.append(f"the target {t.name} does not replicate from the source {s.name}"
                        + (f": {rep.detail}" if rep.detail else "")
                        + "; nothing would carry the last writes over")
    elif rep.kind == "logical":
        sub = rep.subscription or "?"
        if rep.status == "disabled":
            blockers.append(f"the subscription {sub} on the target {t.name} is disabled: nothing would be "
                            f"applied (ALTER SUBSCRIPTION {sub} ENABLE)")
        elif rep.status != "streaming":
            warnings.append(f"the subscription {sub} on the target {t.name} has no apply worker running "
                            "(restarting after an error? see the target's log): the catch-up waits for it")
        if rep.tables_not_ready:
            listed = ", ".join(rep.tables_not_ready[:10]) + (
                f" ... ({len(rep.tables_not_ready) - 10} more)" if len(rep.tables_not_ready) > 10 else "")
            blockers.append(f"tables still in their initial copy on the target {t.name}: {listed} "
                            "(pgsplit migrate status shows the progress)")
        for db in facts.source_table_databases or []:
            if db not in rep.databases:
                blockers.append(f"database {db} has tables on the source but the target {t.name} has no "
                                f"subscription {sub} there: its rows would not be carried over")
    if rep.kind == "physical":
        if s.system_identifier != t.system_identifier:
            blockers.append(f"the target {t.name} is a standby of another cluster (system identifier "
                            f"{t.system_identifier}, source {s.system_identifier})")
        elif s.timeline is not None and t.timeline is not None and s.timeline != t.timeline:
            blockers.append(f"the target {t.name} follows timeline {t.timeline} but the source {s.name} "
                            f"is on timeline {s.timeline}")
    if rep.lag_bytes is not None and rep.lag_bytes > max_lag_bytes:
        blockers.append(f"the target {t.name} is {rep.lag_bytes} bytes behind the source "
                        f"(limit {max_lag_bytes}): the catch-up would hold clients too long")


def _check_schemas(facts: PreflightFacts, blockers: list[str], warnings: list[str]) -> None:
    rep = facts.replication
    diffs = facts.schema_differences
    if diffs:
        listed = "; ".join(diffs[:20]) + (f"; ... ({len(diffs) - 20} more)" if len(diffs) > 20 else "")
        if rep.kind == "physical":
            # A standby's catalog is the source's, a little behind: replay closes the gap.
            warnings.append(f"schemas differ (recent DDL not replayed yet?): {listed}")
        else:
            blockers.append(f"schemas differ: {listed}")
    warnings += facts.schema_errors


def _check_replicas(facts: PreflightFacts, warnings: list[str]) -> None:
    """The target's standbys should follow it through the promotion."""
    t = facts.target
    for r in facts.target_replicas:
        if not r.reachable:
            warnings.append(f"replica {r.name} of the target cannot be reached ({r.error}); "
                            "it stays out of rotation until it answers")
        elif not r.in_recovery:
            warnings.append(f"replica {r.name} of the target is not in recovery: the monitor will "
                            "report a split brain after the swap")
        elif t.system_identifier is not None and r.system_identifier != t.system_identifier:
            warnings.append(f"replica {r.name} is a standby of another cluster (system identifier "
                            f"{r.system_identifier})")
        elif r.sender is not None and r.sender != t.address:
            warnings.append(f"replica {r.name} streams from {r.sender}, not from the target {t.name} "
                            f"({t.address}): unless that is the target under another name, it will not "
                            "follow the promotion (point its primary_conninfo at the target)")


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """The preflight report (as `PreflightReport.to_dict` gives it) for a terminal."""
    lines = []
    for side in ("source", "target"):
        f = report[side]
        state = ("unreachable: " + str(f["error"]) if not f["reachable"]
                 else ("standby" if f["in_recovery"] else "primary")
                 + f", timeline {f['timeline']}, WAL {f['wal_lsn']}")
        lines.append(f"{side:<8} {f['name']} ({f['address']}) {f.get('version') or ''}: {state}")
    lines.append(f"versions {report['versions']}")
    rep = report["replication"]
    if rep["kind"] is None:
        lines.append("replication not found" + (f" ({rep['detail']})" if rep.get("detail") else ""))
    else:
        lag = "-" if rep["lag_bytes"] is None else f"{rep['lag_bytes']} bytes"
        extra = "" if rep.get("replay_lag_s") is None else f", replay lag {rep['replay_lag_s'] * 1000:.0f} ms"
        lines.append(f"replication {rep['kind']} ({rep['via']}, {rep['status']}), lag {lag}{extra}")
    schema = report["schema"]
    if schema["differences"] is None:
        lines.append("schema not compared")
    elif not schema["differences"]:
        dbs = ", ".join(f"{db} {d}" for db, d in sorted(schema["digests"].get("source", {}).items()))
        lines.append(f"schema identical ({dbs})")
    else:
        lines.append(f"schema {len(schema['differences'])} difference(s):")
        lines += [f"  - {d}" for d in schema["differences"]]
    for r in report["target_replicas"]:
        state = ("unreachable" if not r["reachable"] else "standby" if r["in_recovery"] else "NOT in recovery")
        lines.append(f"replica  {r['name']} ({r['address']}): {state}"
                     + (f", upstream {r['sender']}" if r.get("sender") else ""))
    lines += [f"warning  {w}" for w in report["warnings"]]
    lines += [f"BLOCKER  {b}" for b in report["blockers"]]
    return lines
