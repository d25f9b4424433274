"""The routing policy: (unit, session, topology snapshot) -> where the unit runs.

A pure function of data: no I/O, no clock, no globals, no randomness (the caller passes a
tie-breaker), so every rule has a table-driven unit test without a database. The rules,
in order (design.md, "Units of work and routing"):

1. A session pinned to the primary (temp tables, LISTEN, session advisory locks, WITH HOLD
   cursors), `SET pgsplit.route = 'primary'`, or a `/* pgsplit:primary */` hint -> the
   primary, and only the primary (no replica stands in while it is down).
2. A unit that writes, or opens a transaction that is not read only -> primary, unless a
   `/* pgsplit:replica */` hint says to treat it as a read (a replica that refuses a write
   answers 25006 and the unit is retried on the primary). The hint does not lift
   read-your-writes: the replica must still have the session's token.
3. A read -> the least-loaded replica in rotation (load / weight) whose replay LSN has
   reached the session's token; if replicas are in rotation but none has reached the token
   yet, the caller may wait for one (`wait_lsn`); otherwise the primary serves it.
4. The primary: only while it reports itself as one. Down -> a clear error for writes;
   two primaries -> writes refused (split brain); reads fall back to replicas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from router.topology import BackendState, Role, Topology


_PRIMARY, _REPLICA = Role.PRIMARY, Role.REPLICA  # (read once: through the enum class each read costs)


# Immutable value types; NamedTuples because one of each is built per unit of work.


class UnitFacts(NamedTuple):
    writes: bool  # any statement needs the primary (unknown counts as a write)
    hint: Role | None = None  # from /* pgsplit:primary */ or /* pgsplit:replica */


class SessionFacts(NamedTuple):
    force_primary: bool = False  # pinned, or SET pgsplit.route = 'primary'
    token: int | None = None  # replicas must have replayed at least this LSN


class Decision(NamedTuple):
    backend: BackendState | None
    reason: str
    error: tuple[str, str] | None = None  # (SQLSTATE, message) when nothing can serve
    wait_lsn: int | None = None  # set when a replica may soon reach the token

    @property
    def role(self) -> Role | None:
        return self.backend.role if self.backend is not None else None


def decide_route(
    unit: UnitFacts,
    session: SessionFacts,
    topo: Topology,
    load: Mapping[str, int],
    *,
    tiebreak: int = 0,
    allow_wait: bool = True,
) -> Decision:
    if session.force_primary or unit.hint is _PRIMARY:
        # Asked for the primary (or pinned to it): no replica stands in for it.
        return _primary(topo, writes=True, reason="session pinned or primary hint")
    if unit.writes and unit.hint is not _REPLICA:
        return _primary(topo, writes=True, reason="write")
    return _read(session, topo, load, tiebreak, allow_wait)


def _read(session: SessionFacts, topo: Topology, load: Mapping[str, int], tiebreak: int,
          allow_wait: bool) -> Decision:
    rotation = topo.rotation
    token = session.token
    if not rotation:
        return _primary(topo, writes=False, reason="read, no replica in rotation", token=token,
                        load=load, tiebreak=tiebreak)
    if token is None:
        return Decision(_pick(rotation, load, tiebreak), "read")
    ready = _replayed(rotation, token)
    if ready:
        return Decision(_pick(ready, load, tiebreak), "read, replica has the session's writes")
    if allow_wait:
        return Decision(None, "read, waiting for a replica to reach the session's writes", wait_lsn=token)
    return _primary(topo, writes=False, reason="read, no replica reached the session's writes in time",
                    token=token, load=load, tiebreak=tiebreak)


def replica_to_check(topo: Topology, load: Mapping[str, int], tiebreak: int = 0) -> BackendState | None:
    """For a read told to wait (`wait_lsn`): the replica in rotation to ask to wait for
    the token itself, before the read runs there. The one furthest along (likeliest to
    get there first; one held back by an apply delay would only make the read wait and
    go to the primary), the least loaded of those that are level."""
    rotation = topo.rotation
    if len(rotation) < 2:
        return rotation[0] if rotation else None
    furthest = max(r.replay_lsn or 0 for r in rotation)
    return _pick(tuple(r for r in rotation if (r.replay_lsn or 0) == furthest), load, tiebreak)


def _pick(candidates: tuple[BackendState, ...], load: Mapping[str, int], tiebreak: int) -> BackendState | None:
    """Least outstanding units per unit of weight; ties broken by the caller's counter."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    best: list[BackendState] = []
    best_score = 0.0
    for b in candidates:
        score = (load.get(b.name, 0) + 1) / b.weight
        if not best or score < best_score:
            best, best_score = [b], score
        elif score == best_score:
            best.append(b)
    return best[tiebreak % len(best)]


def _replayed(replicas: tuple[BackendState, ...], token: int | None) -> tuple[BackendState, ...]:
    """Those of `replicas` that have replayed `token` (all of them without one). (A
    function of its own: compiled, a generator inside a function costs every call of it.)"""
    if token is None:
        return replicas
    return tuple(r for r in replicas if r.replay_lsn is not None and r.replay_lsn >= token)


def _primary(topo: Topology, *, writes: bool, reason: str, token: int | None = None,
             load: Mapping[str, int] | None = None, tiebreak: int = 0) -> Decision:
    p = topo.primary
    if writes:
        if topo.split_brain:
            return Decision(None, reason, error=(
                "57P03",
                f"writes are refused: more than one backend of cluster {topo.cluster!r} reports itself "
                "as primary (split brain); an operator must resolve it",
            ))
        if not p.up:
            return Decision(None, reason, error=(
                "57P03", f"the primary {p.name} ({p.host}:{p.port}) is not available: {p.error or 'not answering'}",
            ))
        if p.in_recovery is True:
            return Decision(None, reason, error=(
                "57P03", f"the primary {p.name} ({p.host}:{p.port}) is in recovery and cannot accept writes",
            ))
        return Decision(p, reason)
    if p.up:
        return Decision(p, reason)
    return _read_without_primary(topo, reason, token, load, tiebreak)


def _read_without_primary(topo: Topology, reason: str, token: int | None, load: Mapping[str, int] | None,
                          tiebreak: int) -> Decision:
    # Reads keep working while the primary is down, on any replica that answers and,
    # for a read that carries a token, has replayed it: a stale read is never the answer.
    p = topo.primary
    answering = _replayed(tuple(r for r in topo.replicas if r.up), token)
    if answering:
        return Decision(_pick(answering, load or {}, tiebreak), reason + "; primary down, served by a replica")
    if token is not None and any(r.up for r in topo.replicas):
        return Decision(None, reason, error=(
            "57P03", f"the primary {p.name} is not answering and no replica has replayed this session's "
                     "writes yet; retry shortly",
        ))
    return Decision(None, reason, error=(
        "57P03", f"no backend of cluster {topo.cluster!r} is available: the primary {p.name} ({p.host}:{p.port}) "
                 f"is not available: {p.error or 'not answering'}",
    ))


def startup_backend(topo: Topology, load: Mapping[str, int]) -> Decision:
    """Where a freshly authenticated client learns its parameters: the primary when it
    answers (even in recovery or split brain: nothing is written), else a replica, so
    that new clients can log in and read while the primary is down."""
    if topo.primary.up:
        return Decision(topo.primary, "startup")
    return _primary(topo, writes=False, reason="startup", token=None, load=load)
