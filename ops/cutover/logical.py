"""The database side of a cutover to a logical subscriber of the source (an online
migration's target, ops.migrate): everything `PhysicalControl` does, and in the catch-up
the subscription's last changes applied, the sequences moved, the subscription disabled,
the way back begun; after the swap, the old subscription dropped.

Owns: `LogicalControl` (the `Control` the proxy hands the state machine: it finds out at
the preflight whether the target is a standby or a subscriber, and acts accordingly),
`LogicalOptions`, and what a rollback must undo of a logical catch-up.
Must not know: the state machine's order (machine.py), the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ops.cutover.machine import CutoverError
from ops.cutover.physical import APPLICATION_NAME, POLL_S, WRITE_LSN_SQL, PhysicalControl, ServerAddress
from ops.cutover.preflight import PreflightFacts, ReplicationFacts
from ops.migrate.control import Connections, MigrateError, slot_name_for
from ops.migrate.finish import drop_slots, enable, finish, reverse
from ops.migrate.handover import logical_catch_up, prepare_cutover, sync_sequences
from router.lsn import format_lsn, parse_lsn
from router.pg import Endpoint, error_text

__all__ = ["LogicalControl", "LogicalOptions"]

log = logging.getLogger("pgsplit.cutover")


@dataclass(frozen=True, slots=True)
class LogicalOptions:
    """What a cutover to a logical subscriber does besides catching up (ops.migrate)."""

    reverse: bool = False  # leave a reverse publication/subscription (new -> old) to come back by
    reverse_name: str = "pgsplit_reverse"  # its name (publication, subscription; slot per database)
    reverse_conninfo: str | None = None  # how the old primary reaches the new one ({database} replaced)
    sequence_headroom: int = 0  # increments past the source's last value


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


class LogicalControl(PhysicalControl):
    """`PhysicalControl`, and for a target that subscribes to the source (found by the
    preflight) the logical catch-up, its undo on a rollback, and the finish after the
    swap. A standby target gets PhysicalControl's steps unchanged."""

    def __init__(self, source: ServerAddress, target: ServerAddress, target_replicas: Sequence[ServerAddress],
                 account: Endpoint, logical: LogicalOptions | None = None):
        super().__init__(source, target, target_replicas, account)
        self.logical = logical or LogicalOptions()
        # a logical target: its subscription, and what the catch-up changed (for a rollback)
        self.subscription: str | None = None
        self.databases: list[str] = []
        self.mig: Connections | None = None
        self.mig_sequences: Connections | None = None
        self.disabled = False  # the subscription was disabled
        self.reversed = False  # the reverse replication was (being) created
        self.target_unfenced = False  # the target's default_transaction_read_only was reset

    async def close(self) -> None:
        for conns in (self.mig, self.mig_sequences):
            if conns is not None:
                await conns.close()
        self.mig = self.mig_sequences = None
        await super().close()

    async def _primary_replication(self, facts: PreflightFacts) -> ReplicationFacts:
        """The target is a primary: a subscriber of the source's slots, one subscription
        per database, the same name in each (ops.migrate)? Its connections for the
        catch-up are opened now, their statements prepared."""
        s, t = facts.source, facts.target
        subs = await self.tgt.fetch(_SUBSCRIPTIONS_SQL)
        slots = {r[0]: r for r in await self.src.fetch(_LOGICAL_SLOTS_SQL, [r[1] for r in subs if r[1]])} if subs else {}
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
            await prepare_cutover(self._endpoint(self.source), self._endpoint(self.target), conns,
                                  name=name, databases=self.databases)
        await self.src.fetchval(_CONFIRMED_SQL, [])
        return rep

    async def _open_migration_connections(self) -> None:
        """ops.migrate's connections for the catch-up, opened now, before the pause: the
        source's survive the fence (they carry this module's application_name), and a
        far target's logins do not add round trips while clients wait."""
        self.mig = Connections(APPLICATION_NAME)
        self.mig_sequences = Connections(APPLICATION_NAME)  # the sequence sync runs next to the catch-up
        dbs: list[str | None] = [None, *self.databases]
        await asyncio.gather(self.mig.open(self._endpoint(self.source), "source", dbs),
                             self.mig.open(self._endpoint(self.target), "target", dbs),
                             self.mig_sequences.open(self._endpoint(self.source), "source", self.databases),
                             self.mig_sequences.open(self._endpoint(self.target), "target", self.databases))

    async def unfence(self) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.disabled or self.reversed or self.target_unfenced:
            # The migration as it was before the catch-up (its subscription enabled, no
            # reverse): a later cutover can try again. A failure here is named, and the
            # source is unfenced all the same (clients must not stay held).
            try:
                detail["logical"] = await self._undo_logical()
            except Exception as exc:  # noqa: BLE001
                detail["logical_error"] = error_text(exc)
                log.warning("cutover rollback: undoing the logical catch-up failed: %s "
                            "(check the subscription %s on %s)", error_text(exc), self.subscription, self.target.name)
        return {**await super().unfence(), **detail}

    async def _undo_logical(self) -> list[str]:
        """A rollback after the logical catch-up began: what it changed, undone."""
        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        notes: list[str] = []
        if self.reversed:
            notes += await finish(tgt_ep, src_ep, name=self.logical.reverse_name,
                                  databases=self.databases, connections=self.mig)
            notes += await drop_slots(
                tgt_ep, "target", [slot_name_for(self.logical.reverse_name, db) for db in self.databases],
                connections=self.mig)
            self.reversed = False
        if self.target_unfenced:
            await self._set_read_only(self.tgt, True, 10.0)
            notes.append(f"target {self.target.name}: default_transaction_read_only = on again")
            self.target_unfenced = False
        if self.disabled:
            notes += await enable(src_ep, tgt_ep, name=self.subscription, databases=self.databases,
                                  connections=self.mig)
            self.disabled = False
        return notes

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict[str, Any]:
        if kind == "logical":
            return await self.catch_up_logical(lsn, timeout)
        return await super().catch_up(kind, lsn, timeout)

    async def catch_up_logical(self, lsn: int, timeout: float) -> dict[str, Any]:
        """A logical subscriber of the source (ops.migrate), source fenced, clients held:

        1. wait until the subscription has applied `lsn` in every database it carries
           (ops.migrate's `logical_catch_up`);
        2. meanwhile, move every sequence of the target past the source's
           (`sync_sequences`): logical replication does not carry them;
        3. disable the subscription (ops.migrate's `finish(drop=False)`): nothing more comes
           from the old side; dropping it (and its slot and publication) waits until after
           the swap (`LogicalControl.finish`), so a rollback until then finds the migration
           as it was (`unfence` enables it again);
        4. with `LogicalOptions.reverse`, the target's half of the way back
           (`reverse(subscribe=False)`): a publication and a slot on the target,
           the slot starting at the target's WAL position now, before any client writes
           there (the subscription on the source, which logs in to the target, comes
           after the resume, in `LogicalControl.finish`);
        5. a target with default_transaction_read_only on (fenced by an earlier cutover)
           is unfenced;
        6. the target's own standbys replay the target's WAL position after all that.

        Each uses ops.migrate's connections opened (and its statements prepared) by
        the preflight: to a target in another region every round trip is what clients
        wait for."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.001, deadline - time.monotonic())

        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        name, dbs, conns = self.subscription, self.databases, self.mig
        if name is None or conns is None:
            raise CutoverError("the preflight found no subscription of the source on the target")
        slots = [slot_name_for(name, db) for db in dbs]
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
                timed("apply", logical_catch_up(src_ep, tgt_ep, lsn, left(), name=name, databases=dbs,
                                                poll_interval=POLL_S, connections=conns)),
                timed("sequences", sync_sequences(src_ep, tgt_ep, databases=dbs,
                                                  headroom=self.logical.sequence_headroom,
                                                  connections=self.mig_sequences)))
        except MigrateError as exc:
            raise CutoverError(str(exc)) from exc
        t2 = time.monotonic()
        detail: dict[str, Any] = {
            "final_lsn": format_lsn(lsn), "subscription": name, "databases": dbs,
            "bytes": max(0, lsn - parse_lsn(before)) if before else None,
            "apply_wait_seconds": round(waited, 4), "sequences_moved": sum(1 for q in synced if q.changed)}
        self.disabled = True
        await finish(src_ep, tgt_ep, name=name, databases=dbs, drop=False, wait=False,
                     connections=conns)
        t3 = time.monotonic()
        if self.logical.reverse:
            # the target's half (publication, slot) now; the subscription after the resume
            self.reversed = True
            detail["reverse"] = await reverse(
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
            await self._replicas_replayed(parse_lsn(await self.tgt.fetchval(WRITE_LSN_SQL)), deadline)
            detail["replicas"] = sorted(self.replicas)
        detail["seconds"] = {**timings, "disable": round(t3 - t2, 4), "reverse": round(t4 - t3, 4),
                             "unfence_target_and_replicas": round(time.monotonic() - t4, 4)}
        return detail

    async def finish(self) -> dict[str, Any]:
        """After the swap, clients running on the target: the disabled forward subscription
        dropped (its slot on the old primary with it) and the publication there (ops.migrate's
        `finish`); then, with the reverse, its subscription on the old primary, on the slot
        the catch-up created (`reverse`). A failure is named; the cutover stands."""
        src_ep, tgt_ep = self._endpoint(self.source), self._endpoint(self.target)
        # Dropped first: DROP SUBSCRIPTION waits for its workers to be gone, so nothing the
        # reverse brings to the old primary can come round again.
        detail: dict[str, Any] = {"notes": await finish(
            src_ep, tgt_ep, name=self.subscription, databases=self.databases, connections=self.mig)}
        if self.logical.reverse:
            detail["reverse"] = await reverse(
                src_ep, tgt_ep, name=self.logical.reverse_name, databases=self.databases,
                forward_name=self.subscription, target_conninfo=self.logical.reverse_conninfo,
                connections=self.mig)
        return detail

