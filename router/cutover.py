"""The cutover: move the proxy's traffic from the active backend set to another one, with no
client error and no lost acknowledged write (design.md, "Cutover").

Owns: the state machine (`Cutover`), its steps' order, timing, events and rollback
decisions; the preflight report (`build_report`, a pure function of `PreflightFacts`); and
the database side (`PgControl`: the control connections that fence the source, read its
final LSN, wait for the target and promote it).
Must not know: sessions, pools, the config file. The data plane is driven through the
`DataPlane` protocol below (proxy/ hands in its own), backends arrive as plain
`BackendSpec`s and settings as `CutoverSettings`; router/ never imports proxy/.

Order of operations (each step is logged and timed; an event goes out at its start and end):

1. preflight: both primaries reachable, versions compared, schema fingerprints compared
   (router.schema), the target's replication from the source found and its lag measured.
   Anything that would make the cutover fail or lose data is a blocker: nothing changes.
   A dry run stops here.
   warm-up (if the data plane offers one): server connections to the target are opened
   now, while clients still run, so the held units do not all log in at once after the
   swap (a hot standby's sessions survive its promotion and then take writes). A target
   that refuses the application's logins is refused here, before anything changed.
2. pause: the data plane holds new units; units in flight finish; sessions idle in a
   transaction get `pause_timeout_s` (then the cutover rolls back, or they are cancelled).
3. fence: the source refuses writes from everyone (default_transaction_read_only on,
   reloaded) and every other client backend that could write is terminated and gone, so
   no other proxy or direct client writes to it any more.
4. catch-up: the source's WAL position after the fence is final; the target (and its own
   standbys) must have replayed it (physical) within `catchup_timeout_s`. A logical
   subscriber (router.migrate) must have applied it; then its sequences are moved past
   the source's, its subscription disabled, the reverse replication created if asked,
   and a target fenced by an earlier cutover unfenced (`PgControl.catch_up_logical`).
5. promote: a physical standby is promoted and confirmed out of recovery (a logical
   target is a primary already: skipped).
6. swap: the data plane installs the target's backend set (one assignment, generation + 1):
   connections to the old set retired, LSN tokens reset, session state replayed later.
7. resume: held units run on the new primary.
8. finish (logical targets), clients running meanwhile: the disabled forward
   subscription, its slot and publication dropped, the reverse subscription created on
   the old primary (on the slot the catch-up made); a failure is reported, not rolled back.

Any failure before the swap rolls back: undo what a logical catch-up changed (enable the
subscription, drop the reverse, fence the target again), unfence the source (if the fence
had begun) and release the held units, which run on the source again. The fence comes before the
promotion and the swap after it, so at no moment are there two writable primaries behind
the proxy: while the target is promoted and the source fenced, every unit is held.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import asyncpg

from router import migrate
from router.lsn import format_lsn, parse_lsn
from router.schema import Fingerprint, diff_databases, fingerprint
from router.topology import BackendSpec

__all__ = [
    "ControlAccount",
    "Cutover",
    "CutoverBusy",
    "CutoverError",
    "CutoverResult",
    "CutoverSettings",
    "DataPlane",
    "PgControl",
    "PreflightFacts",
    "PreflightReport",
    "ReplicationFacts",
    "Result",
    "ServerFacts",
    "Step",
    "build_report",
    "report_lines",
]

log = logging.getLogger("pgsplit.cutover")

APPLICATION_NAME = "pgsplit-cutover"
# The proxy's own pollers (router.monitor) only read; they are not terminated by the fence,
# so the monitor keeps an accurate view of the source while the cutover may still roll back.
MONITOR_APPLICATION_PREFIX = "pgsplit-monitor"
POLL_S = 0.002  # catch-up, promotion and fence polls: each step is a few milliseconds of work
XLOG_BLCKSZ = 8192
XLOG_LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD: the most a page header moves the insert position


class Step(enum.Enum):
    PREFLIGHT = "preflight"
    WARM_UP = "warm-up"
    PAUSE = "pause"
    FENCE = "fence"
    CATCH_UP = "catch-up"
    PROMOTE = "promote"
    SWAP = "swap"
    RESUME = "resume"
    FINISH = "finish"  # logical targets: drop the old subscription, after the resume
    ROLLBACK = "rollback"


class Result(enum.Enum):
    SUCCESS = "success"  # traffic runs on the target
    DRY_RUN = "dry_run"  # preflight only; nothing changed
    REFUSED = "refused"  # preflight found blockers; nothing changed
    ROLLED_BACK = "rolled_back"  # a step before the swap failed; traffic runs on the source again
    FAILED = "failed"  # the swap or the rollback itself failed: an operator must look


class CutoverError(Exception):
    """A step could not be done; the message is for the operator."""


class CutoverBusy(ValueError):
    """Another cutover (or a manual pause) is in progress."""


class DataPlane(Protocol):
    """What the cutover needs from the proxy's data plane (proxy.dataplane.DataPlane)."""

    held_units: int

    def hold(self) -> None: ...

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> Any: ...

    async def install(self, cluster_name: str) -> Any: ...

    def release(self) -> float: ...

    def census(self) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class ControlAccount:
    """The control connections' login ([monitor]); a superuser for ALTER SYSTEM and pg_promote."""

    user: str
    password: str | None
    dbname: str = "postgres"
    connect_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class LogicalOptions:
    """What a cutover to a logical subscriber does besides catching up (router.migrate)."""

    reverse: bool = False  # leave a reverse publication/subscription (new -> old) to come back by
    reverse_name: str = "pgsplit_reverse"  # its name (publication, subscription; slot per database)
    reverse_conninfo: str | None = None  # how the old primary reaches the new one ({database} replaced)
    sequence_headroom: int = 0  # increments past the source's last value


@dataclass(frozen=True, slots=True)
class CutoverSettings:
    pause_timeout_s: float = 10.0
    catchup_timeout_s: float = 30.0
    cancel_idle_in_transaction: bool = False  # cutover.idle_in_transaction = "cancel"
    promote_timeout_s: float = 60.0
    fence_timeout_s: float = 10.0  # for terminated backends to exit
    max_lag_bytes: int = 16 * 1024 * 1024  # preflight: a target further behind is a blocker
    timeout_s: float | None = None  # cap on pause .. promote together (the units' wait)
    dry_run: bool = False


# --- preflight: facts and the report built from them ------------------------------------------


@dataclass
class ServerFacts:
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
    source: ServerFacts
    target: ServerFacts
    replication: ReplicationFacts = field(default_factory=ReplicationFacts)
    schema_differences: list[str] | None = None  # None: not compared
    schema_digests: dict[str, dict[str, str]] = field(default_factory=dict)  # side -> db -> digest
    schema_errors: list[str] = field(default_factory=list)
    target_replicas: list[ServerFacts] = field(default_factory=list)
    source_table_databases: list[str] | None = None  # databases with tables on the source


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

        def server(s: ServerFacts) -> dict[str, Any]:
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


def major_version(version_num: int) -> int:
    """server_version_num -> major version: 150004 -> 15, 90624 -> 9.6 as 906."""
    return version_num // 10000 if version_num >= 100000 else version_num // 100


def _human_major(major: int) -> str:
    return f"{major // 100}.{major % 100}" if major >= 100 else str(major)


def build_report(facts: PreflightFacts, *, max_lag_bytes: int) -> PreflightReport:
    """Blockers (the cutover would fail or lose writes: nothing may change) and warnings
    (worth reading) from what the preflight saw. Pure: unit-tested without a server."""
    s, t, rep = facts.source, facts.target, facts.replication
    blockers: list[str] = []
    warnings: list[str] = []
    for side, f in (("source", s), ("target", t)):
        if not f.reachable:
            blockers.append(f"the {side} {f.name} ({f.address}) cannot be reached: {f.error}")
        elif f.superuser is False:
            blockers.append(f"the control account is not a superuser on the {side} {f.name}: "
                            "ALTER SYSTEM, pg_terminate_backend and pg_promote need one")

    if s.major is not None and t.major is not None and s.major != t.major:
        versions = (f"major versions differ: source {s.name} runs {_human_major(s.major)} ({s.version}), "
                    f"target {t.name} runs {_human_major(t.major)} ({t.version})")
        if rep.kind != "logical":
            blockers.append(versions + "; only logical replication crosses major versions")
    elif s.version is not None and t.version is not None:
        versions = f"same major version {_human_major(s.major)}: source {s.version}, target {t.version}"
    else:
        versions = "not compared (a server could not be reached)"

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

    if s.reachable and t.reachable:
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

    diffs = facts.schema_differences
    if diffs:
        listed = "; ".join(diffs[:20]) + (f"; ... ({len(diffs) - 20} more)" if len(diffs) > 20 else "")
        if rep.kind == "physical":
            # A standby's catalog is the source's, a little behind: replay closes the gap.
            warnings.append(f"schemas differ (recent DDL not replayed yet?): {listed}")
        else:
            blockers.append(f"schemas differ: {listed}")
    warnings += facts.schema_errors

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
    return PreflightReport(facts, versions, blockers, warnings)


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


# --- the database side -----------------------------------------------------------------------


class Control(Protocol):
    """The database operations the state machine runs (PgControl; fakes in unit tests)."""

    async def preflight(self) -> PreflightFacts: ...

    async def fence(self, timeout: float) -> dict[str, Any]: ...

    async def unfence(self) -> dict[str, Any]: ...

    async def final_lsn(self, timeout: float) -> int: ...

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict[str, Any]: ...

    async def promote(self, timeout: float) -> dict[str, Any]: ...

    async def target_in_recovery(self) -> bool | None: ...

    async def close(self) -> None: ...


# What anyone may ask; the rest (pg_control_system() and friends) only if a superuser.
_SERVER_SQL = """\
SELECT current_setting('server_version'), current_setting('server_version_num')::int, pg_is_in_recovery(),
       current_setting('default_transaction_read_only') = 'on',
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"""
_SERVER_SUPERUSER_SQL = """\
SELECT (SELECT system_identifier FROM pg_control_system())::text,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text ELSE pg_current_wal_lsn()::text END,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END"""
_WAL_RECEIVER_SQL = """\
SELECT status, sender_host, sender_port, slot_name, received_tli FROM pg_stat_wal_receiver"""
_REPLICATION_BY_SLOT_SQL = """\
SELECT r.application_name, r.state, extract(epoch FROM r.replay_lag)::float8
  FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
 WHERE s.slot_name = $1"""
_SUBSCRIPTIONS_SQL = """\
SELECT s.subname, s.subslotname, s.subenabled,
       EXISTS (SELECT 1 FROM pg_stat_subscription st
                WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL),
       d.datname
  FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid ORDER BY s.subname, d.datname"""
_NOT_READY_SQL = """\
SELECT r.srrelid::regclass::text FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid
 WHERE s.subname = $1 AND r.srsubstate <> 'r' ORDER BY 1"""
_CONFIRMED_SQL = """\
SELECT min(confirmed_flush_lsn)::text FROM pg_replication_slots WHERE slot_name = ANY($1::text[])"""
_LOGICAL_SLOTS_SQL = """\
SELECT slot_name, confirmed_flush_lsn::text, active FROM pg_replication_slots
 WHERE slot_type = 'logical' AND slot_name = ANY($1::text[])"""
_DATABASES_SQL = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
_SHOW_READ_ONLY = "SHOW default_transaction_read_only"
_LEFT_SQL = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
_INSERT_LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
_WRITE_LSN_SQL = "SELECT pg_current_wal_lsn()::text"
_REPLAY_LSN_SQL = "SELECT pg_last_wal_replay_lsn()::text"
_IN_RECOVERY_SQL = "SELECT pg_is_in_recovery()"
# Listed and signalled in one statement (MATERIALIZED: the filter runs before any signal).
_TERMINATE_WRITERS_SQL = f"""\
WITH writers AS MATERIALIZED (
  SELECT pid FROM pg_stat_activity
   WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
     AND NOT (usename = current_user AND (application_name LIKE '{MONITOR_APPLICATION_PREFIX}%'
                                          OR application_name = '{APPLICATION_NAME}')))
SELECT pid FROM writers WHERE pg_terminate_backend(pid)"""


def _error(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return f"{exc.sqlstate} {exc}"
    return str(exc) or type(exc).__name__


class PgControl:
    """The control connections of one cutover: one to the source primary, one to the
    target primary (opened by the preflight, kept until `close`), short-lived ones for
    the schema fingerprints and the target's replicas."""

    def __init__(self, source: BackendSpec, target: BackendSpec, target_replicas: Sequence[BackendSpec],
                 account: ControlAccount, logical: LogicalOptions | None = None):
        self.source = source
        self.target = target
        self.target_replicas = list(target_replicas)
        self.account = account
        self.logical = logical or LogicalOptions()
        self.src: asyncpg.Connection | None = None
        self.tgt: asyncpg.Connection | None = None
        self.replicas: dict[str, asyncpg.Connection] = {}  # the target's standbys that answered
        self.kind: str | None = None
        self.target_read_only = False  # default_transaction_read_only = on in the target's configuration
        self.terminate_writers: Any = None  # asyncpg PreparedStatement of _TERMINATE_WRITERS_SQL on src
        # a logical target: its subscription, and what the catch-up changed (for a rollback)
        self.subscription: str | None = None
        self.databases: list[str] = []
        self.mig: migrate.Connections | None = None
        self.mig_sequences: migrate.Connections | None = None
        self.disabled = False  # the subscription was disabled
        self.reversed = False  # the reverse replication was (being) created
        self.target_unfenced = False  # the target's default_transaction_read_only was reset

    async def _connect(self, spec: BackendSpec, database: str | None = None) -> asyncpg.Connection:
        a = self.account
        return await asyncpg.connect(host=spec.host, port=spec.port, user=a.user, password=a.password,
                                     database=database or a.dbname, timeout=a.connect_timeout_s,
                                     server_settings={"application_name": APPLICATION_NAME})

    async def close(self) -> None:
        for conns in (self.mig, self.mig_sequences):
            if conns is not None:
                await conns.close()
        self.mig = self.mig_sequences = None
        for conn in (self.src, self.tgt, *self.replicas.values()):
            if conn is not None and not conn.is_closed():
                try:
                    await conn.close(timeout=1)
                except Exception:  # noqa: BLE001  a broken connection: just drop it
                    conn.terminate()
        self.src = self.tgt = None
        self.replicas = {}

    # --- preflight ------------------------------------------------------------------------

    async def _server(self, spec: BackendSpec) -> tuple[ServerFacts, asyncpg.Connection | None]:
        facts = ServerFacts(spec.name, f"{spec.host}:{spec.port}")
        try:
            conn = await self._connect(spec)
        except Exception as exc:  # noqa: BLE001  reported, a blocker
            facts.error = _error(exc)
            return facts, None
        try:
            facts.version, facts.version_num, facts.in_recovery, facts.read_only, facts.superuser = \
                await conn.fetchrow(_SERVER_SQL)
            facts.reachable = True
            if not facts.superuser:
                await conn.close()
                return facts, None
            facts.system_identifier, lsn, facts.timeline = await conn.fetchrow(_SERVER_SUPERUSER_SQL)
            facts.wal_lsn = None if lsn is None else parse_lsn(lsn)
            if facts.in_recovery:
                wr = await conn.fetchrow(_WAL_RECEIVER_SQL)
                if wr is not None:
                    facts.sender = f"{wr['sender_host']}:{wr['sender_port']}"
                    facts.timeline = wr["received_tli"]
        except Exception as exc:  # noqa: BLE001
            facts.reachable = False
            facts.error = _error(exc)
            conn.terminate()
            return facts, None
        return facts, conn

    async def preflight(self) -> PreflightFacts:
        (source, self.src), (target, self.tgt) = await asyncio.gather(self._server(self.source),
                                                                     self._server(self.target))
        facts = PreflightFacts(source, target)
        self.target_read_only = bool(target.read_only)
        for spec in self.target_replicas:
            r, conn = await self._server(spec)
            if conn is not None and r.in_recovery and r.system_identifier == target.system_identifier:
                self.replicas[spec.name] = conn
            elif conn is not None:
                await conn.close()
            facts.target_replicas.append(r)
        if self.src is None or self.tgt is None:
            return facts
        facts.replication = await self._replication(facts)
        self.kind = facts.replication.kind
        await self._schema(facts)
        # Run the statements the paused steps run once now: asyncpg prepares a statement
        # the first time it runs and keeps it by its text (Connection.prepare() does not
        # fill that cache), so none of them costs an extra round trip while clients wait,
        # a whole round trip to a far target. The one that is not harmless is prepared.
        for sql in (_SHOW_READ_ONLY, _INSERT_LSN_SQL, _WRITE_LSN_SQL):
            await self.src.fetchval(sql)
        await self.src.fetchval(_LEFT_SQL, [])
        self.terminate_writers = await self.src.prepare(_TERMINATE_WRITERS_SQL)
        for conn in (self.tgt, *self.replicas.values()):
            for sql in (_REPLAY_LSN_SQL, _IN_RECOVERY_SQL):
                await conn.fetchval(sql)
        if not target.in_recovery:  # a logical target, a primary: its WAL position and the unfence
            for sql in (_SHOW_READ_ONLY, _WRITE_LSN_SQL):
                await self.tgt.fetchval(sql)
        return facts

    async def _replication(self, facts: PreflightFacts) -> ReplicationFacts:
        s, t = facts.source, facts.target
        if t.in_recovery:
            wr = await self.tgt.fetchrow(_WAL_RECEIVER_SQL)
            if wr is None:
                return ReplicationFacts(detail=f"{t.name} is in recovery but has no WAL receiver (archive only?)")
            rep = ReplicationFacts("physical", status=wr["status"])
            rep.lag_bytes = max(0, s.wal_lsn - t.wal_lsn) if s.wal_lsn is not None and t.wal_lsn is not None else None
            row = await self.src.fetchrow(_REPLICATION_BY_SLOT_SQL, wr["slot_name"]) if wr["slot_name"] else None
            direct = row is not None or (wr["sender_host"], wr["sender_port"]) == (self.source.host, self.source.port)
            rep.via = "direct" if direct else f"cascading through {wr['sender_host']}:{wr['sender_port']}"
            if row is not None:
                rep.replay_lag_s = row[2]
                rep.detail = f"pg_stat_replication on the source: {row[0]} {row[1]}, slot {wr['slot_name']}"
            if wr["status"] != "streaming":
                return ReplicationFacts(detail=f"its WAL receiver is {wr['status']!r}, not streaming")
            return rep
        subs = await self.tgt.fetch(_SUBSCRIPTIONS_SQL)
        slots = {r[0]: r for r in await self.src.fetch(_LOGICAL_SLOTS_SQL, [r[1] for r in subs if r[1]])} if subs else {}
        # a subscription of the source's: one per database, the same name in each (router.migrate)
        found: dict[str, list[Any]] = {}
        for row in subs:
            if row[1] in slots:
                found.setdefault(row[0], []).append(row)
        if not found:
            return ReplicationFacts(detail=f"{t.name} is a primary (not in recovery) with no subscription "
                                           f"to a slot of {s.name}")
        name, rows = next(iter(found.items()))
        lags = []
        for row in rows:
            confirmed = parse_lsn(slots[row[1]][1]) if slots[row[1]][1] else None
            lags.append(max(0, s.wal_lsn - confirmed) if confirmed is not None and s.wal_lsn is not None else None)
        status = ("disabled" if not all(r[2] for r in rows) else "streaming" if all(r[3] for r in rows)
                  else "enabled")
        via = f"subscription {name}, slot{'s' if len(rows) > 1 else ''} {', '.join(r[1] for r in rows)}"
        rep = ReplicationFacts("logical", via=via, status=status,
                               lag_bytes=None if None in lags else max(lags),
                               subscription=name, databases=[r[4] for r in rows])
        self.subscription, self.databases = name, list(rep.databases)
        await self._open_migration_connections()
        for db in rep.databases:
            conn = await self.mig.get(self._endpoint(self.target), "target", db)
            rep.tables_not_ready += [f"{db}.{r[0]}" for r in await conn.fetch(_NOT_READY_SQL, name)]
        for conns in (self.mig, self.mig_sequences):
            await migrate.prepare_cutover(self._endpoint(self.source), self._endpoint(self.target), conns,
                                          name=name, databases=self.databases)
        await self.src.fetchval(_CONFIRMED_SQL, [])
        return rep

    # --- logical targets (router.migrate) ------------------------------------------------------

    def _endpoint(self, spec: BackendSpec) -> "migrate.Endpoint":
        a = self.account
        return migrate.Endpoint(spec.host, spec.port, a.user, a.password, a.dbname, a.connect_timeout_s)

    async def _open_migration_connections(self) -> None:
        """router.migrate's connections for the catch-up, opened now, before the pause: the
        source's survive the fence (they carry this module's application_name), and a
        far target's logins do not add round trips while clients wait."""
        self.mig = migrate.Connections(APPLICATION_NAME)
        self.mig_sequences = migrate.Connections(APPLICATION_NAME)  # the sequence sync runs next to the catch-up
        dbs: list[str | None] = [None, *self.databases]
        await asyncio.gather(self.mig.open(self._endpoint(self.source), "source", dbs),
                             self.mig.open(self._endpoint(self.target), "target", dbs),
                             self.mig_sequences.open(self._endpoint(self.source), "source", self.databases),
                             self.mig_sequences.open(self._endpoint(self.target), "target", self.databases))

    async def _schema(self, facts: PreflightFacts) -> None:
        prints: dict[str, dict[str, Fingerprint]] = {"source": {}, "target": {}}
        # Across major versions, what only the version changes is left out (PostgreSQL 18
        # lists every NOT NULL as a constraint too): the migration's own comparison.
        majors = facts.source.major, facts.target.major
        take = migrate.schema_fingerprint if None not in majors and majors[0] != majors[1] else fingerprint
        for side, spec, conn in (("source", self.source, self.src), ("target", self.target, self.tgt)):
            for (db,) in await conn.fetch(_DATABASES_SQL):
                try:
                    if db == self.account.dbname:
                        prints[side][db] = await take(conn)
                    else:
                        other = await self._connect(spec, db)
                        try:
                            prints[side][db] = await take(other)
                        finally:
                            await other.close()
                except Exception as exc:  # noqa: BLE001  reported; the rest is still compared
                    facts.schema_errors.append(f"schema of database {db} on the {side} not read: {_error(exc)}")
        facts.source_table_databases = sorted(db for db, fp in prints["source"].items() if fp.count("table"))
        facts.schema_differences = diff_databases(prints["source"], prints["target"])
        facts.schema_digests = {side: {db: fp.digest for db, fp in p.items()} for side, p in prints.items()}

    # --- fence --------------------------------------------------------------------------

    async def _wait_setting(self, conn: asyncpg.Connection, value: str, timeout: float) -> None:
        """pg_reload_conf() only signals: wait until our own backend has re-read the file.
        The postmaster reloads before it signals its children, so by then every new
        backend starts with the value too."""
        deadline = time.monotonic() + timeout
        while await conn.fetchval(_SHOW_READ_ONLY) != value:
            if time.monotonic() > deadline:
                raise CutoverError(f"default_transaction_read_only did not become {value} within {timeout:g}s "
                                   "of pg_reload_conf()")
            await asyncio.sleep(POLL_S)

    async def fence(self, timeout: float) -> dict[str, Any]:
        src = self.src
        t0 = time.monotonic()
        await src.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        await src.execute("SELECT pg_reload_conf()")
        await self._wait_setting(src, "on", timeout)
        t1 = time.monotonic()
        # Sessions opened before the reload keep writing until their next statement reads
        # the new default, and a session may have SET it off: end them all. Waiting until
        # they are gone matters: a commit in progress finishes (and writes WAL) before its
        # backend exits, and the final LSN must come after it.
        terminate = self.terminate_writers
        pids = [r[0] for r in await (terminate.fetch() if terminate is not None else src.fetch(_TERMINATE_WRITERS_SQL))]
        deadline = time.monotonic() + timeout
        while pids:
            left = await src.fetchval(_LEFT_SQL, pids)
            if not left:
                break
            if time.monotonic() > deadline:
                raise CutoverError(f"{left} terminated backend(s) of the source still running after {timeout:g}s")
            await asyncio.sleep(POLL_S)
        return {"read_only": True, "terminated_backends": len(pids), "reload_seconds": round(t1 - t0, 4),
                "terminate_seconds": round(time.monotonic() - t1, 4)}

    async def unfence(self) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.disabled or self.reversed or self.target_unfenced:
            # The migration as it was before the catch-up (its subscription enabled, no
            # reverse): a later cutover can try again. A failure here is named, and the
            # source is unfenced all the same (clients must not stay held).
            try:
                detail["logical"] = await self._undo_logical()
            except Exception as exc:  # noqa: BLE001
                detail["logical_error"] = _error(exc)
                log.warning("cutover rollback: undoing the logical catch-up failed: %s "
                            "(check the subscription %s on %s)", _error(exc), self.subscription, self.target.name)
        src = self.src
        if src is None or src.is_closed():
            src = self.src = await self._connect(self.source)
        await src.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await src.execute("SELECT pg_reload_conf()")
        await self._wait_setting(src, "off", 10.0)
        return {"read_only": False, **detail}

    # --- catch-up and promotion ------------------------------------------------------------

    async def final_lsn(self, timeout: float) -> int:
        """The source's WAL write position once everything inserted before it is written.
        pg_current_wal_lsn() is the write position; an asynchronous commit (acknowledged,
        synchronous_commit = off) may still sit in WAL buffers, which the WAL writer
        writes within wal_writer_delay, so wait until the write position passes the insert
        position read now (a page header is all a boundary can leave between them)."""
        src = self.src
        insert = parse_lsn(await src.fetchval(_INSERT_LSN_SQL))
        deadline = time.monotonic() + timeout
        while True:
            write = parse_lsn(await src.fetchval(_WRITE_LSN_SQL))
            if write >= insert or (write % XLOG_BLCKSZ == 0 and insert - write <= XLOG_LONG_PAGE_HEADER):
                return write
            if time.monotonic() > deadline:
                raise CutoverError(f"the source's WAL write position stayed at {format_lsn(write)}, "
                                   f"short of {format_lsn(insert)}, for {timeout:g}s")
            await asyncio.sleep(POLL_S)

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict[str, Any]:
        if kind == "logical":
            return await self.catch_up_logical(lsn, timeout)
        deadline = time.monotonic() + timeout
        first = await self._replayed(self.target.name, self.tgt, lsn, deadline)
        # The target's own standbys too: the swap resets every session's LSN token, so a
        # session's first read after it may go to any replica in rotation, which must
        # therefore have every write made before the fence. (They stream from the target,
        # a few milliseconds behind it.)
        for name, conn in self.replicas.items():
            await self._replayed(name, conn, lsn, deadline)
        return {"final_lsn": format_lsn(lsn), "bytes": max(0, lsn - first),
                "replicas": sorted(self.replicas)}

    async def _replayed(self, name: str, conn: asyncpg.Connection, lsn: int, deadline: float) -> int:
        """Wait until `conn`'s server has replayed `lsn`; its replay LSN when first asked."""
        first = None
        while True:
            replayed = parse_lsn(await conn.fetchval(_REPLAY_LSN_SQL))
            if first is None:
                first = replayed
            if replayed >= lsn:
                return first
            if time.monotonic() > deadline:
                state = await conn.fetchval("SELECT pg_get_wal_replay_pause_state()")
                raise CutoverError(
                    f"{name} replayed up to {format_lsn(replayed)} of the source's final {format_lsn(lsn)} "
                    f"({lsn - replayed} bytes short) in the catch-up time"
                    + ("" if state == "not paused" else f"; its WAL replay is {state}"))
            await asyncio.sleep(POLL_S)

    async def catch_up_logical(self, lsn: int, timeout: float) -> dict[str, Any]:
        """A logical subscriber of the source (router.migrate), source fenced, clients held:

        1. wait until the subscription has applied `lsn` in every database it carries
           (`migrate.logical_catch_up`);
        2. meanwhile, move every sequence of the target past the source's
           (`migrate.sync_sequences`): logical replication does not carry them;
        3. disable the subscription (`migrate.finish(drop=False)`): nothing more comes
           from the old side; dropping it (and its slot and publication) waits until after
           the swap (`finish_logical`), so a rollback until then finds the migration as it
           was (`unfence` enables it again);
        4. with `LogicalOptions.reverse`, the target's half of the way back
           (`migrate.reverse(subscribe=False)`): a publication and a slot on the target,
           the slot starting at the target's WAL position now, before any client writes
           there (the subscription on the source, which logs in to the target, comes
           after the resume, in `finish_logical`);
        5. a target with default_transaction_read_only on (fenced by an earlier cutover)
           is unfenced;
        6. the target's own standbys replay the target's WAL position after all that.

        Each uses router.migrate's connections opened (and its statements prepared) by
        the preflight: to a target in another region every round trip is what clients
        wait for."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        name, dbs, conns = self.subscription, self.databases, self.mig
        if name is None or conns is None:
            raise CutoverError("the preflight found no subscription of the source on the target")
        slots = [migrate.slot_name_for(name, db) for db in dbs]
        before = await self.src.fetchval(_CONFIRMED_SQL, slots)
        t0 = time.monotonic()
        timings: dict[str, float] = {}

        async def timed(what: str, coro: Any) -> Any:
            try:
                return await coro
            finally:
                timings[what] = round(time.monotonic() - t0, 4)

        # The source is fenced: its sequences are final already, so they are moved while
        # the subscription applies the last changes (on connections of their own).
        try:
            waited, synced = await asyncio.gather(
                timed("apply", migrate.logical_catch_up(src_ep, tgt_ep, lsn, left(), name=name, databases=dbs,
                                                        poll_interval=POLL_S, connections=conns)),
                timed("sequences", migrate.sync_sequences(src_ep, tgt_ep, databases=dbs,
                                                          headroom=self.logical.sequence_headroom,
                                                          connections=self.mig_sequences)))
        except migrate.MigrateError as exc:
            raise CutoverError(str(exc)) from exc
        t2 = time.monotonic()
        detail: dict[str, Any] = {
            "final_lsn": format_lsn(lsn), "subscription": name, "databases": dbs,
            "bytes": max(0, lsn - parse_lsn(before)) if before else None,
            "apply_wait_seconds": round(waited, 4), "sequences_moved": sum(1 for q in synced if q.changed)}
        self.disabled = True
        await migrate.finish(src_ep, tgt_ep, name=name, databases=dbs, drop=False, wait=False,
                             connections=conns)
        t3 = time.monotonic()
        if self.logical.reverse:
            # the target's half (publication, slot) now; the subscription after the resume
            self.reversed = True
            detail["reverse"] = await migrate.reverse(
                src_ep, tgt_ep, name=self.logical.reverse_name, databases=dbs, forward_name=name,
                target_conninfo=self.logical.reverse_conninfo, timeout=left(), connections=conns,
                subscribe=False)
        t4 = time.monotonic()
        if self.target_read_only:
            self.target_unfenced = True
            await self._set_read_only(self.tgt, False, left())
            detail["target_unfenced"] = True
        # The swap resets every session's token: a first read may go to any replica of
        # the target, which must have what the target has now.
        if self.replicas:
            target_lsn = parse_lsn(await self.tgt.fetchval(_WRITE_LSN_SQL))
            for rname, conn in self.replicas.items():
                await self._replayed(rname, conn, target_lsn, deadline)
            detail["replicas"] = sorted(self.replicas)
        detail["seconds"] = {**timings, "disable": round(t3 - t2, 4), "reverse": round(t4 - t3, 4),
                             "unfence_target_and_replicas": round(time.monotonic() - t4, 4)}
        return detail

    async def _set_read_only(self, conn: asyncpg.Connection, on: bool, timeout: float) -> None:
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on
                           else "ALTER SYSTEM RESET default_transaction_read_only")
        await conn.execute("SELECT pg_reload_conf()")
        await self._wait_setting(conn, "on" if on else "off", timeout)

    async def finish_logical(self) -> dict[str, Any]:
        """After the swap, clients running on the target: the disabled forward subscription
        dropped (its slot on the old primary with it) and the publication there
        (`migrate.finish`); then, with the reverse, its subscription on the old primary, on
        the slot the catch-up created (`migrate.reverse`). A failure is named; the
        cutover stands."""
        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        # Dropped first: DROP SUBSCRIPTION waits for its workers to be gone, so nothing the
        # reverse brings to the old primary can come round again.
        detail: dict[str, Any] = {"notes": await migrate.finish(
            src_ep, tgt_ep, name=self.subscription, databases=self.databases, connections=self.mig)}
        if self.logical.reverse:
            detail["reverse"] = await migrate.reverse(
                src_ep, tgt_ep, name=self.logical.reverse_name, databases=self.databases,
                forward_name=self.subscription, target_conninfo=self.logical.reverse_conninfo,
                connections=self.mig)
        return detail

    async def _undo_logical(self) -> list[str]:
        """A rollback after the logical catch-up began: what it changed, undone."""
        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        notes: list[str] = []
        if self.reversed:
            notes += await migrate.finish(tgt_ep, src_ep, name=self.logical.reverse_name,
                                          databases=self.databases, connections=self.mig)
            notes += await migrate.drop_slots(
                tgt_ep, "target", [migrate.slot_name_for(self.logical.reverse_name, db) for db in self.databases],
                connections=self.mig)
            self.reversed = False
        if self.target_unfenced:
            await self._set_read_only(self.tgt, True, 10.0)
            notes.append(f"target {self.target.name}: default_transaction_read_only = on again")
            self.target_unfenced = False
        if self.disabled:
            notes += await migrate.enable(src_ep, tgt_ep, name=self.subscription, databases=self.databases,
                                          connections=self.mig)
            self.disabled = False
        return notes

    async def promote(self, timeout: float) -> dict[str, Any]:
        tgt = self.tgt
        # pg_promote(wait => true) looks for the end of recovery every 100 ms; polling
        # ourselves takes a few milliseconds off every cutover's pause.
        if not await tgt.fetchval("SELECT pg_promote(wait => false)"):
            raise CutoverError(f"pg_promote() on {self.target.name} could not signal the postmaster")
        t0 = time.monotonic()
        while await tgt.fetchval(_IN_RECOVERY_SQL):
            if time.monotonic() - t0 > timeout:
                raise CutoverError(f"the target {self.target.name} was still in recovery {timeout:g}s "
                                   "after pg_promote()")
            await asyncio.sleep(POLL_S)
        return {"promoted": self.target.name, "in_recovery": False}

    async def target_in_recovery(self) -> bool | None:
        try:
            if self.tgt is None or self.tgt.is_closed():
                self.tgt = await self._connect(self.target)
            return await self.tgt.fetchval(_IN_RECOVERY_SQL)
        except Exception:  # noqa: BLE001  unknown
            return None


# --- the state machine --------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: str
    outcome: str  # "ok" | "failed" | "skipped"
    seconds: float
    detail: dict[str, Any]


@dataclass
class CutoverResult:
    result: Result
    source: str
    target: str
    steps: list[StepRecord] = field(default_factory=list)
    report: dict[str, Any] | None = None
    error: str | None = None
    pause_seconds: float | None = None  # None: no unit was ever held
    units_held: int = 0
    bytes_caught_up: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"event": "summary", "result": self.result.value, "source": self.source, "target": self.target,
                "seconds": round(self.seconds, 4),
                "pause_seconds": None if self.pause_seconds is None else round(self.pause_seconds, 4),
                "units_held": self.units_held, "bytes_caught_up": self.bytes_caught_up, "error": self.error,
                "steps": [{**asdict(s), "detail": _short(s)} for s in self.steps], "report": self.report}


def _short(record: StepRecord) -> dict[str, Any]:
    """A step's detail for logs and the summary: the preflight's is the whole report (sent
    once, in its own event and as the summary's `report`), so only its verdict here."""
    d = record.detail
    if record.step == Step.PREFLIGHT.value and "blockers" in d:
        return {"ok": d["ok"], "blockers": len(d["blockers"]), "warnings": len(d["warnings"])}
    return d


class _StepFailed(Exception):
    def __init__(self, step: Step, cause: BaseException):
        super().__init__(f"{step.value}: {_error(cause)}")
        self.step = step
        self.cause = cause


class Cutover:
    """One run of the state machine (see the module docstring for the order). `run()`
    never raises for a failed step: the outcome is in the result, and every step's
    start and end went to `on_event` as a dict."""

    def __init__(self, source_cluster: str, target_cluster: str, dataplane: DataPlane, control: Control,
                 settings: CutoverSettings, on_event: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 warm_up: Callable[[], Awaitable[dict[str, Any]]] | None = None):
        self.source = source_cluster
        self.target = target_cluster
        self.dataplane = dataplane
        self.control = control
        self.settings = settings
        self.on_event = on_event
        self.clock = clock
        self.warm_up = warm_up
        self.result = CutoverResult(Result.FAILED, source_cluster, target_cluster)
        self.holding = False  # units are held: release them whatever happens
        self.fence_begun = False  # the source may be read-only: unfence on rollback
        self.swapped = False
        self._deadline: float | None = None

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001  a broken listener must not break a cutover
                log.exception("cutover event listener failed")

    def _budget(self, step: Step, timeout: float) -> float:
        if self._deadline is None:
            return timeout
        left = self._deadline - self.clock()
        if left <= 0:
            raise CutoverError(f"the cutover's timeout ({self.settings.timeout_s:g}s) ran out before {step.value}")
        return min(timeout, left)

    async def _step(self, step: Step, action: Callable[[], Any]) -> dict[str, Any]:
        self._emit({"event": "step", "step": step.value, "phase": "start"})
        t0 = self.clock()
        try:
            detail = await action()
        except (Exception, asyncio.CancelledError) as exc:
            seconds = self.clock() - t0
            detail = {"error": _error(exc)}
            self._record(step, "failed", seconds, detail)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _StepFailed(step, exc) from exc
        detail = detail or {}
        outcome = detail.pop("outcome", "ok")
        self._record(step, outcome, self.clock() - t0, detail)
        return detail

    def _record(self, step: Step, outcome: str, seconds: float, detail: dict[str, Any]) -> None:
        record = StepRecord(step.value, outcome, round(seconds, 4), detail)
        self.result.steps.append(record)
        self._emit({"event": "step", "step": step.value, "phase": "end", "outcome": outcome,
                    "seconds": round(seconds, 4), "detail": detail})
        level = logging.INFO if outcome != "failed" else logging.WARNING
        log.log(level, "cutover %s -> %s: %s %s in %.1f ms: %s", self.source, self.target, step.value, outcome,
                seconds * 1000, ", ".join(f"{k}={v}" for k, v in _short(record).items()))
        if step is Step.PREFLIGHT and "blockers" in detail:
            for line in detail["blockers"]:
                log.warning("cutover %s -> %s: preflight blocker: %s", self.source, self.target, line)
            for line in detail["warnings"]:
                log.info("cutover %s -> %s: preflight warning: %s", self.source, self.target, line)

    async def run(self) -> CutoverResult:
        t0 = self.clock()
        self._emit({"event": "begin", "source": self.source, "target": self.target,
                    "dry_run": self.settings.dry_run})
        try:
            await self._run()
        except _StepFailed as exc:
            self.result.error = str(exc)
            if self.swapped:
                self.result.result = Result.FAILED
            elif self.holding or self.fence_begun:
                await self._rollback()
            else:
                self.result.result = Result.REFUSED
        except asyncio.CancelledError:
            if not self.swapped and (self.holding or self.fence_begun):
                self.result.error = "the cutover was cancelled"
                await asyncio.shield(self._rollback())
            raise
        finally:
            if self.holding:  # never leave clients waiting, whatever went wrong
                self._release()
            self.result.seconds = self.clock() - t0
            r = self.result
            log.log(logging.INFO if r.result in (Result.SUCCESS, Result.DRY_RUN) else logging.WARNING,
                    "cutover %s -> %s: %s in %.3f s%s%s", self.source, self.target, r.result.value, r.seconds,
                    "" if r.pause_seconds is None else f", units held {r.pause_seconds * 1000:.0f} ms "
                                                       f"({r.units_held} units)",
                    f": {r.error}" if r.error else "")
            try:
                await self.control.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the cutover's control connections failed")
            self._emit(self.result.to_dict())
        return self.result

    async def _run(self) -> None:
        s = self.settings
        report = await self._step(Step.PREFLIGHT, self._preflight)
        self.result.report = report
        if s.dry_run:
            self.result.result = Result.DRY_RUN
            return
        if not report["ok"]:
            self.result.result = Result.REFUSED
            self.result.error = "preflight: " + "; ".join(report["blockers"])
            return
        kind = report["replication"]["kind"]
        if self.warm_up is not None:
            await self._step(Step.WARM_UP, self.warm_up)
        if s.timeout_s is not None:
            self._deadline = self.clock() + s.timeout_s
        await self._step(Step.PAUSE, self._pause)
        await self._step(Step.FENCE, self._fence)
        caught = await self._step(Step.CATCH_UP, lambda: self._catch_up(kind))
        self.result.bytes_caught_up = caught.get("bytes")
        try:
            await self._step(Step.PROMOTE, lambda: self._promote(kind))
        except _StepFailed:
            # A promotion that finished late is still a promotion: the target has every
            # write (the catch-up said so), so going on is right; rolling back would leave
            # it a diverged primary for nothing. Otherwise roll back.
            if await self.control.target_in_recovery() is not False:
                raise
            log.warning("cutover %s -> %s: the target left recovery after all; going on", self.source, self.target)
        # Point of no return: the target is a primary. From here a failure is not rolled
        # back (unfencing the source would make two writable primaries).
        self.swapped = True
        await self._step(Step.SWAP, self._swap)
        await self._step(Step.RESUME, self._resume)
        self.result.result = Result.SUCCESS
        finish = getattr(self.control, "finish_logical", None)
        if kind == "logical" and finish is not None:
            # Clients run on the target: a failure here is named, the cutover stands.
            try:
                await self._step(Step.FINISH, finish)
            except _StepFailed as exc:
                log.warning("cutover %s -> %s: the old subscription was not dropped (%s); drop it on the "
                            "target, and its slot on the source, by hand", self.source, self.target, exc)

    async def _preflight(self) -> dict[str, Any]:
        facts = await self.control.preflight()
        report = build_report(facts, max_lag_bytes=self.settings.max_lag_bytes)
        d = report.to_dict()
        if not report.ok:
            d["outcome"] = "failed"  # (taken out by _step: the report itself has no outcome)
        return d

    async def _pause(self) -> dict[str, Any]:
        in_flight, idle_tx = self.dataplane.census()
        timeout = self._budget(Step.PAUSE, self.settings.pause_timeout_s)
        self.holding = True
        self.dataplane.hold()
        try:
            drained = await self.dataplane.drain(timeout, cancel_idle_in_transaction=self.settings.cancel_idle_in_transaction)
        except TimeoutError as exc:
            hint = "" if self.settings.cancel_idle_in_transaction else (
                " (cutover.idle_in_transaction = \"cancel\" rolls such transactions back instead)")
            raise CutoverError(f"{exc}{hint}") from exc
        return {"in_flight": in_flight, "idle_in_transaction": idle_tx,
                "drain_seconds": round(drained.seconds, 4), "waited_for_units": drained.waited_for_units,
                "cancelled_transactions": drained.cancelled_transactions}

    async def _fence(self) -> dict[str, Any]:
        timeout = self._budget(Step.FENCE, self.settings.fence_timeout_s)
        self.fence_begun = True
        return await self.control.fence(timeout)

    async def _catch_up(self, kind: str) -> dict[str, Any]:
        end = self.clock() + self._budget(Step.CATCH_UP, self.settings.catchup_timeout_s)
        final = await self.control.final_lsn(max(0.0, end - self.clock()))
        return await self.control.catch_up(kind, final, max(0.0, end - self.clock()))

    async def _promote(self, kind: str) -> dict[str, Any]:
        if kind != "physical":
            return {"outcome": "skipped", "reason": f"a {kind} target is a primary already"}
        return await self.control.promote(self._budget(Step.PROMOTE, self.settings.promote_timeout_s))

    async def _swap(self) -> dict[str, Any]:
        topology = await self.dataplane.install(self.target)
        return {"cluster": self.target, "generation": getattr(topology, "generation", None)}

    def _release(self) -> float:
        paused = self.dataplane.release()
        self.holding = False
        self.result.pause_seconds = paused
        self.result.units_held = self.dataplane.held_units
        return paused

    async def _resume(self) -> dict[str, Any]:
        paused = self._release()
        return {"pause_seconds": round(paused, 4), "units_held": self.result.units_held}

    async def _rollback(self) -> None:
        async def undo() -> dict[str, Any]:
            detail: dict[str, Any] = {"unfenced": False}
            try:
                if self.fence_begun:
                    await self.control.unfence()
                    detail["unfenced"] = True
            finally:
                if self.holding:  # released even if unfencing failed: clients must not hang
                    detail["pause_seconds"] = round(self._release(), 4)
                    detail["units_held"] = self.result.units_held
            return detail

        try:
            await self._step(Step.ROLLBACK, undo)
            self.result.result = Result.ROLLED_BACK
        except _StepFailed as exc:
            self.result.result = Result.FAILED
            self.result.error = f"{self.result.error}; then the rollback failed: {exc} (the source may still be " \
                                "read-only: ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf())"
