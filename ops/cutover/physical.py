"""The database side of a cutover to a physical standby: the control connections that
read the preflight's facts, fence the source, read its final WAL position, wait for the
target (and its standbys) to replay it, and promote the target.

Owns: `PhysicalControl` (the `Control` of ops.cutover.machine for a standby target) and
the SQL it sends. logical.py's `LogicalControl` builds on it for a logical subscriber.
Must not know: the state machine's order (machine.py), the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg

from ops.cutover.machine import CutoverError
from ops.cutover.preflight import PreflightFacts, ReplicationFacts, ServerState, record_schemas
from ops.schema import Fingerprint, fingerprint_for
from router import pg
from router.lsn import format_lsn, parse_lsn
from router.pg import Endpoint, error_text
from router.tls import ServerTls

__all__ = ["APPLICATION_NAME", "POLL_S", "WRITE_LSN_SQL", "PhysicalControl", "ServerAddress"]

APPLICATION_NAME = "pgsplit-cutover"
# The proxy's own pollers (router.monitor) only read; they are not terminated by the fence,
# so the monitor keeps an accurate view of the source while the cutover may still roll back.
MONITOR_APPLICATION_PREFIX = "pgsplit-monitor"
POLL_S = 0.002  # catch-up, promotion and fence polls: each step is a few milliseconds of work
XLOG_BLCKSZ = 8192
XLOG_LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD: the most a page header moves the insert position


class ServerAddress(Protocol):
    """A configured server, as the cutover needs it (router.topology's BackendSpec is one)."""

    @property
    def name(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def tls(self) -> ServerTls: ...


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
_SHOW_READ_ONLY = "SHOW default_transaction_read_only"
_LEFT_SQL = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
_INSERT_LSN_SQL = "SELECT pg_current_wal_insert_lsn()::text"
WRITE_LSN_SQL = "SELECT pg_current_wal_lsn()::text"
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


class PhysicalControl:
    """The control connections of one cutover: one to the source primary, one to the
    target primary (opened by the preflight, kept until `close`), short-lived ones for
    the schema fingerprints and the target's replicas. ``account`` is the control login
    (a superuser: ALTER SYSTEM, pg_terminate_backend, pg_promote); its host and port are
    each server's own."""

    def __init__(self, source: ServerAddress, target: ServerAddress, target_replicas: Sequence[ServerAddress],
                 account: Endpoint):
        self.source = source
        self.target = target
        self.target_replicas = list(target_replicas)
        self.account = account
        self.src: asyncpg.Connection | None = None
        self.tgt: asyncpg.Connection | None = None
        self.replicas: dict[str, asyncpg.Connection] = {}  # the target's standbys that answered
        self.kind: str | None = None
        self.target_read_only = False  # default_transaction_read_only = on in the target's configuration
        self.terminate_writers: Any = None  # asyncpg PreparedStatement of _TERMINATE_WRITERS_SQL on src

    def _endpoint(self, spec: ServerAddress) -> Endpoint:
        return self.account.at(spec.host, spec.port, spec.tls)

    async def _connect(self, spec: ServerAddress, database: str | None = None) -> asyncpg.Connection:
        return await pg.connect(self._endpoint(spec), application_name=APPLICATION_NAME, database=database)

    async def close(self) -> None:
        for conn in (self.src, self.tgt, *self.replicas.values()):
            await pg.close(conn, 1)
        self.src = self.tgt = None
        self.replicas = {}

    # --- preflight ------------------------------------------------------------------------

    async def _server(self, spec: ServerAddress) -> tuple[ServerState, asyncpg.Connection | None]:
        facts = ServerState(spec.name, f"{spec.host}:{spec.port}")
        try:
            conn = await self._connect(spec)
        except Exception as exc:  # noqa: BLE001  reported, a blocker
            facts.error = error_text(exc)
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
            facts.error = error_text(exc)
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
        for sql in (_SHOW_READ_ONLY, _INSERT_LSN_SQL, WRITE_LSN_SQL):
            await self.src.fetchval(sql)
        await self.src.fetchval(_LEFT_SQL, [])
        self.terminate_writers = await self.src.prepare(_TERMINATE_WRITERS_SQL)
        for conn in (self.tgt, *self.replicas.values()):
            for sql in (_REPLAY_LSN_SQL, _IN_RECOVERY_SQL):
                await conn.fetchval(sql)
        if not target.in_recovery:  # a logical target, a primary: its WAL position and the unfence
            for sql in (_SHOW_READ_ONLY, WRITE_LSN_SQL):
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
        return await self._primary_replication(facts)

    async def _primary_replication(self, facts: PreflightFacts) -> ReplicationFacts:
        """The target is a primary: not a standby of the source (logical.py looks further,
        for a subscription)."""
        return ReplicationFacts(detail=f"{facts.target.name} is a primary (not in recovery), "
                                       f"not a standby of {facts.source.name}")

    async def _schema(self, facts: PreflightFacts) -> None:
        prints: dict[str, dict[str, Fingerprint]] = {"source": {}, "target": {}}
        # Across major versions, what only the version changes is left out (PostgreSQL 18
        # lists every NOT NULL as a constraint too): the migration's own comparison.
        take = fingerprint_for(facts.source.major, facts.target.major)
        for side, spec, conn in (("source", self.source, self.src), ("target", self.target, self.tgt)):
            for db in await pg.databases(conn, with_postgres=True):
                try:
                    if db == self.account.database:
                        prints[side][db] = await take(conn)
                    else:
                        other = await self._connect(spec, db)
                        try:
                            prints[side][db] = await take(other)
                        finally:
                            await other.close()
                except Exception as exc:  # noqa: BLE001  reported; the rest is still compared
                    facts.schema_errors.append(f"schema of database {db} on the {side} not read: {error_text(exc)}")
        record_schemas(facts, prints)

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
        src = self.src
        if src is None or src.is_closed():
            src = self.src = await self._connect(self.source)
        await src.execute("ALTER SYSTEM RESET default_transaction_read_only")
        await src.execute("SELECT pg_reload_conf()")
        await self._wait_setting(src, "off", 10.0)
        return {"read_only": False}

    async def _set_read_only(self, conn: asyncpg.Connection, on: bool, timeout: float) -> None:
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on
                           else "ALTER SYSTEM RESET default_transaction_read_only")
        await conn.execute("SELECT pg_reload_conf()")
        await self._wait_setting(conn, "on" if on else "off", timeout)

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
            write = parse_lsn(await src.fetchval(WRITE_LSN_SQL))
            if write >= insert or (write % XLOG_BLCKSZ == 0 and insert - write <= XLOG_LONG_PAGE_HEADER):
                return write
            if time.monotonic() > deadline:
                raise CutoverError(f"the source's WAL write position stayed at {format_lsn(write)}, "
                                   f"short of {format_lsn(insert)}, for {timeout:g}s")
            await asyncio.sleep(POLL_S)

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        first = await self._replayed(self.target.name, self.tgt, lsn, deadline)
        # The target's own standbys too: the swap resets every session's LSN token, so a
        # session's first read after it may go to any replica in rotation, which must
        # therefore have every write made before the fence. (They stream from the target,
        # a few milliseconds behind it.)
        await self._replicas_replayed(lsn, deadline)
        return {"final_lsn": format_lsn(lsn), "bytes": max(0, lsn - first),
                "replicas": sorted(self.replicas)}

    async def _replicas_replayed(self, lsn: int, deadline: float) -> None:
        """Wait until each of the target's standbys has replayed `lsn`."""
        for name, conn in self.replicas.items():
            await self._replayed(name, conn, lsn, deadline)

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

    async def finish(self) -> dict[str, Any]:
        """A promoted standby has nothing to finish."""
        return {}
