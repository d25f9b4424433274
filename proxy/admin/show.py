"""The rows of the admin console's SHOW commands (proxy.admin.console).

Owns: each SHOW's columns and what a value means, from plain data: the `*Info` records
the console reads off the process (`client_info`, `server_info`, `pool_info`), the
process's status dict (the one GET /v1/status answers), the metrics' counters, the
redacted config. Column names are PgBouncer's where the concept is the same (cl_active,
sv_idle, total_xact_count, ...), so its exporters and habits carry over; a PgBouncer column
whose fact pgsplit does not have is left out rather than filled with a guess.
Must not know: the wire protocol (proxy.admin.console writes the rows), sockets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Value = str | int | float | bool | None
Table = tuple[list[str], list[list[Value]]]


def text(value: Value) -> str | None:
    """A value as the console sends it (text format; NULL for None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"  # (PgBouncer's paused/disabled are 0/1 too)
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "NaN"
    return str(value)


def timestamp(epoch: float | None) -> str | None:
    """A wall-clock time as PgBouncer shows one: "2026-12-07 16:20:35 UTC"."""
    return None if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# --- clients, servers, pools ------------------------------------------------------------------


@dataclass(frozen=True)
class ClientInfo:
    """One client session of the listener."""

    user: str
    database: str
    state: str  # see client_state
    addr: str
    port: int | None
    local_addr: str
    local_port: int | None
    connect_time: float  # time.time()
    tls: bool
    application_name: str
    prepared_statements: int  # the client's named statements
    id: int  # the process id the client was given (its cancel key's)
    backend: str | None  # the backend of the server connection it holds
    server_pid: int | None  # that connection's server process


def client_state(*, login: bool, console: bool, waiting: bool, has_server: bool) -> str:
    """"login" (not authenticated yet), "waiting" (a unit waits for a route, a server
    connection, a read-your-writes token or a pause), "active" (holds a server connection:
    a unit in flight, a transaction, or session pooling; a console client is active while
    it is being answered), else "idle"."""
    if login:
        return "login"
    if console:
        return "active"
    if waiting:
        return "waiting"
    return "active" if has_server else "idle"


CLIENT_COLUMNS = ["type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
                  "connect_time", "tls", "application_name", "prepared_statements", "id", "backend",
                  "server_pid"]


def clients(infos: Iterable[ClientInfo]) -> Table:
    rows = [["C", c.user, c.database, c.state, c.addr, c.port, c.local_addr, c.local_port,
             timestamp(c.connect_time), c.tls, c.application_name, c.prepared_statements, c.id, c.backend,
             c.server_pid]
            for c in sorted(infos, key=lambda c: (c.connect_time, c.id))]
    return CLIENT_COLUMNS, rows


@dataclass(frozen=True)
class ServerInfo:
    """One pooled server connection."""

    user: str
    database: str
    backend: str
    state: str  # "active" (lent to a client, or held by a cancel in flight) or "idle"
    addr: str
    port: int
    local_addr: str
    local_port: int | None
    connect_time: float  # time.time()
    remote_pid: int
    tls: bool
    prepared_statements: int
    client_id: int | None  # the id (SHOW CLIENTS) of the client it is lent to


SERVER_COLUMNS = ["type", "user", "database", "backend", "state", "addr", "port", "local_addr", "local_port",
                  "connect_time", "remote_pid", "tls", "prepared_statements", "client_id"]


def servers(infos: Iterable[ServerInfo]) -> Table:
    rows = [["S", s.user, s.database, s.backend, s.state, s.addr, s.port, s.local_addr, s.local_port,
             timestamp(s.connect_time), s.remote_pid, s.tls, s.prepared_statements, s.client_id]
            for s in sorted(infos, key=lambda s: (s.backend, s.database, s.user, s.connect_time))]
    return SERVER_COLUMNS, rows


@dataclass(frozen=True)
class PoolInfo:
    """One pool: server connections of one (backend, user, database)."""

    database: str
    user: str
    backend: str
    role: str | None  # the backend's role in the active cluster (None: not in it any more)
    sv_active: int
    sv_idle: int
    sv_login: int  # being opened
    cl_waiting: int  # units queued for a connection of this pool
    pool_size: int


POOL_COLUMNS = ["database", "user", "backend", "role", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                "sv_login", "pool_size", "pool_mode"]


def pools(infos: Iterable[PoolInfo], holders: Mapping[tuple[str, str, str], int], mode: str) -> Table:
    """`holders`: clients holding a server connection, by (database, user, backend). A
    client is counted on the backend whose connection it holds: one without a server
    connection belongs to no backend's pool (SHOW CLIENTS lists it, idle or waiting)."""
    rows = []
    for p in sorted(infos, key=lambda p: (p.database, p.user, p.backend)):
        rows.append([p.database, p.user, p.backend, p.role, holders.get((p.database, p.user, p.backend), 0),
                     p.cl_waiting, p.sv_active, p.sv_idle, p.sv_login, p.pool_size, mode])
    return POOL_COLUMNS, rows


# --- databases and stats ----------------------------------------------------------------------


STATS_COLUMNS = ["database", "total_xact_count", "total_query_count", "total_query_time"]


def stats(counters: Mapping[str, list]) -> Table:
    """Per database since the start, from metrics.UnitStats.databases: transactions
    ended (a lone statement's too, as PgBouncer counts), units of work (a Query, or an
    extended-protocol group up to Sync: what PgBouncer counts as a query), and the
    microseconds from each unit's first byte to its ReadyForQuery (kept as float seconds,
    which the sessions add without a conversion per unit)."""
    return STATS_COLUMNS, [[db, c[0], c[1], round(c[2] * 1_000_000)] for db, c in sorted(counters.items())]


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    max_client_connections: int | None  # [databases.NAME]'s, None: no limit
    current_client_connections: int
    current_connections: int  # server connections to it, every backend
    console: bool  # the admin console's database: no pool, no backend


DATABASE_COLUMNS = ["name", "pool_size", "pool_mode", "max_client_connections", "current_client_connections",
                    "current_connections", "paused"]


def databases(infos: Iterable[DatabaseInfo], pool_size: int, mode: str, paused: bool) -> Table:
    rows = [[d.name, None if d.console else pool_size, None if d.console else mode, d.max_client_connections,
             d.current_client_connections, d.current_connections, paused]
            for d in sorted(infos, key=lambda d: d.name)]
    return DATABASE_COLUMNS, rows


# --- config and version -----------------------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """The config as (dotted key, value): tables become key prefixes, arrays of tables
    ([[users]], [[access]]) take their index ("users.0.name"), other lists stay values;
    an empty table or list is one row of its own ("{}", "[]")."""
    if isinstance(data, Mapping):
        if not data and prefix:
            return [(prefix, {})]  # an empty table is shown as an empty list is: its key, "{}"
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        return out
    if isinstance(data, list) and data and all(isinstance(item, Mapping) for item in data):
        return [pair for index, item in enumerate(data) for pair in flatten(item, f"{prefix}.{index}")]
    return [(prefix, data)]


CONFIG_COLUMNS = ["key", "value", "changeable"]


def config(redacted: Mapping[str, Any], restart_only: Iterable[str]) -> Table:
    """`redacted`: Config.redacted_dict() (every secret already "********"); `restart_only`:
    dotted keys or key prefixes a reload does not apply (proxy.admin.reload)."""
    fixed = tuple(restart_only)

    def changeable(key: str) -> bool:
        return not any(key == f or key.startswith(f + ".") for f in fixed)

    rows = []
    for key, value in flatten(redacted):
        shown = json.dumps(value) if isinstance(value, (list, dict)) else value
        if isinstance(shown, bool):
            shown = "true" if shown else "false"  # as the file says it (text() gives 1/0)
        elif isinstance(shown, float):
            shown = repr(shown)  # the configured value, not rounded as text() rounds measurements
        rows.append([key, shown, changeable(key)])
    return CONFIG_COLUMNS, rows


def version(number: str) -> Table:
    return ["version"], [[f"pgsplit {number}"]]


# --- pgsplit's own: backends, consistency, cutover, migration --------------------------------


BACKEND_COLUMNS = ["name", "role", "host", "port", "up", "in_recovery", "in_rotation", "lag_bytes",
                   "lag_seconds", "weight", "load", "sv_active", "sv_idle", "sv_login", "error"]


def backends(status: Mapping[str, Any]) -> Table:
    """From the process's status (GET /v1/status, `pgsplit status`): the active cluster's
    backends as the monitor sees them. in_rotation: a replica that receives reads (NULL
    for the primary); load: units running on it now."""
    rows = []
    for b in status["backends"]:
        conns = b["server_connections"]
        rows.append([b["name"], b["role"], b["host"], b["port"], b["up"], b["in_recovery"], b["in_rotation"],
                     b["lag_bytes"], b["lag_seconds"], b["weight"], b["load"], conns.get("active", 0),
                     conns.get("idle", 0), conns.get("opening", 0), b["error"]])
    return BACKEND_COLUMNS, rows


CONSISTENCY_COLUMNS = ["mode", "wait_limit_ms", "immediate", "waited", "fallback"]


def consistency(mode: str, wait_limit_ms: int, outcomes: Mapping[str, int]) -> Table:
    """Reads that needed a replica at the session's LSN since the start, by how they were
    served (pgsplit_consistency_waits_total): on a replica that had the writes, on one
    after waiting for it, or on the primary."""
    return CONSISTENCY_COLUMNS, [[mode, wait_limit_ms, outcomes.get("immediate", 0), outcomes.get("waited", 0),
                                  outcomes.get("fallback", 0)]]


CUTOVER_COLUMNS = ["active_cluster", "generation", "clusters", "in_progress", "paused_seconds", "units_held",
                   "last_target", "last_result", "last_at", "last_seconds", "last_pause_seconds", "last_error"]


def cutover(state: Mapping[str, Any]) -> Table:
    """From AdminOps.cutover_state(): the operation holding the data plane now ("pause",
    "cutover" or NULL), and the last cutover that ran (NULL columns: none since the start)."""
    last = state.get("last") or {}
    return CUTOVER_COLUMNS, [[
        state["active"], state["generation"], ",".join(state["clusters"]), state["in_progress"],
        None if state["paused_seconds"] is None else round(state["paused_seconds"], 3), state["units_held"],
        last.get("target"), last.get("result"), timestamp(last.get("at")), last.get("seconds"),
        last.get("pause_seconds"), last.get("error")]]


MIGRATION_COLUMNS = ["target", "source", "name", "state", "ready", "lag_bytes", "tables", "drift", "checked_at",
                     "error"]


@dataclass(frozen=True)
class MigrationInfo:
    target: str
    source: str
    name: str
    state: str  # "watching", "stopped" (its watch ended) or "finished" (a cutover ended it)
    ready: bool | None  # every table copied and the apply workers running (None: not known yet)
    lag_bytes: int | None
    tables: Mapping[str, int]  # tables by copy state
    drift: int  # schema differences found by the last round
    checked_at: float | None
    error: str | None


def migrations(infos: Iterable[MigrationInfo]) -> Table:
    """Migrations watched since they started here, and those a cutover ended, from the
    watch's last round (no query is sent: `pgsplit migrate status` asks afresh)."""
    rows = [[m.target, m.source, m.name, m.state, m.ready, m.lag_bytes,
             " ".join(f"{k.replace(' ', '_')}={v}" for k, v in m.tables.items() if v) or None, m.drift,
             timestamp(m.checked_at), m.error]
            for m in sorted(infos, key=lambda m: m.target)]
    return MIGRATION_COLUMNS, rows


def help_table(commands: Mapping[str, str]) -> Table:
    return ["command", "description"], [[name, about] for name, about in commands.items()]
