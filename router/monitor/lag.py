"""The monitor's decisions: pure functions from poll samples to the next `Topology`.

Owns: what one poll returns (`SAMPLE_SQL`, `Sample`), the lag arithmetic, the rotation
decision with hysteresis (design.md, "Lag filtering"), split-brain detection
("Split-brain"), the snapshot a round builds (`build_topology`) and the log lines its
changes deserve (`describe_changes`).
Must not know: asyncpg, the event loop, clocks. Times are passed in, so every function is
unit-tested from tables without a server (tests/unit/test_monitor_logic.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from router.lsn import format_lsn, parse_lsn
from router.topology import BackendSpec, BackendState, Role, Topology

# One query per poll. LSNs travel as pg_lsn text (parsed by router.lsn: no custom codec,
# the full 64-bit range); timestamps as epoch seconds. pg_current_wal_lsn() raises 55000 on
# a server in recovery, hence the CASE. now() is the server's clock, the same clock (on
# the primary) that stamped pg_last_xact_replay_timestamp(), modulo skew between hosts.
SAMPLE_SQL = """\
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
       pg_last_wal_replay_lsn()::text,
       pg_last_wal_receive_lsn()::text,
       extract(epoch FROM pg_last_xact_replay_timestamp())::float8,
       extract(epoch FROM now())::float8"""

# A primary that only answers slowly is busy more often than dead: writes stop after this
# many timed-out polls in a row (a refused or broken connection stops them at once).
PRIMARY_TIMEOUTS_DOWN = 3


@dataclass(frozen=True, slots=True)
class LagLimits:
    max_bytes: int
    max_seconds: float


@dataclass(frozen=True, slots=True)
class Sample:
    """What one poll of one backend saw."""

    in_recovery: bool
    current_lsn: int | None  # pg_current_wal_lsn(); None in recovery
    replay_lsn: int | None
    receive_lsn: int | None
    last_replay_ts: float | None  # pg_last_xact_replay_timestamp(), epoch seconds
    server_now: float  # the backend's now(), epoch seconds
    started_at: float = 0.0  # monitor (loop) time the poll was sent

    @classmethod
    def from_row(cls, row: Sequence[Any], started_at: float = 0.0) -> Sample:
        in_recovery, current, replay, receive, replay_ts, now = row
        return cls(
            in_recovery=bool(in_recovery),
            current_lsn=None if current is None else parse_lsn(current),
            replay_lsn=None if replay is None else parse_lsn(replay),
            receive_lsn=None if receive is None else parse_lsn(receive),
            last_replay_ts=None if replay_ts is None else float(replay_ts),
            server_now=float(now),
            started_at=started_at,
        )


def initial_topology(cluster_name: str, backends: Iterable[BackendSpec], generation: int = 1) -> Topology:
    """The optimistic snapshot installed before the first poll: all up, replicas in rotation."""
    specs = list(backends)
    primaries = [s for s in specs if s.role is Role.PRIMARY]
    if len(primaries) != 1:
        raise ValueError(f"cluster {cluster_name!r} needs exactly one primary, got {len(primaries)}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"cluster {cluster_name!r} names a backend twice: {names}")
    return Topology(
        generation=generation,
        cluster=cluster_name,
        primary=BackendState.configured(primaries[0]),
        replicas=tuple(BackendState.configured(s) for s in specs if s.role is Role.REPLICA),
    )


def compute_lag(
    reference_lsn: int | None,
    replay_lsn: int | None,
    last_replay_ts: float | None,
    server_now: float | None,
    behind_seconds: float | None = None,
) -> tuple[int | None, float | None]:
    """(byte lag, time lag) of a replica against the primary's WAL position.

    Byte lag = reference - replay, clamped at 0. Time lag is 0 when the replica has
    replayed everything the primary has written (an idle primary must not make replicas
    look late); otherwise the smaller of

    - the replica's now() - its last replayed commit's timestamp (the textbook figure; it
      overstates the lag of a replica that was idle before the first unreplayed write), and
    - `behind_seconds`: how long the monitor has seen the primary ahead of this replay
      position (see `behind_for`); the age of the oldest unreplayed WAL, to one interval.

    None where the inputs do not tell (no primary LSN known yet, replica never replayed).
    """
    if reference_lsn is None or replay_lsn is None:
        return None, None
    if replay_lsn >= reference_lsn:
        return 0, 0.0
    candidates = []
    if last_replay_ts is not None and server_now is not None:
        candidates.append(max(0.0, server_now - last_replay_ts))
    if behind_seconds is not None:
        candidates.append(max(0.0, behind_seconds))
    return reference_lsn - replay_lsn, (min(candidates) if candidates else None)


def behind_for(history: Sequence[tuple[float, int]], replay_lsn: int, now: float) -> float | None:
    """Seconds since the monitor first saw the primary past `replay_lsn`.

    `history` holds (monitor time, reference LSN) pairs, oldest first, LSNs non-decreasing.
    None when no entry is past `replay_lsn` (the replica has what the monitor has seen),
    and None when even the oldest entry is past it: the monitor does not know since when
    (it started after, or pruned), so only the replay timestamp can tell (`compute_lag`).
    """
    if not history or history[0][1] > replay_lsn:
        return None
    for at, lsn in history:
        if lsn > replay_lsn:
            return max(0.0, now - at)
    return None


def prune_history(history: Sequence[tuple[float, int]], cutoff: float) -> list[tuple[float, int]]:
    """Drop entries older than `cutoff`, but keep the newest of those (it still bounds the
    age of everything written after it)."""
    keep_from = 0
    for i, (at, _) in enumerate(history):
        if at < cutoff:
            keep_from = i
        else:
            break
    return list(history[keep_from:])


def next_rotation(
    previous_in_rotation: bool,
    lag_bytes: int | None,
    lag_seconds: float | None,
    limits: LagLimits,
) -> bool:
    """Does a replica that answers, and is in recovery, receive reads after this round?

    In rotation: it leaves when either lag exceeds its limit. Out of rotation: it comes
    back only when both lags are below half their limits (hysteresis, so a replica hovering
    at the limit does not flap), or zero. Unknown lags change nothing while in rotation
    and keep it out otherwise (an unknown time lag defers to the byte lag).
    """
    if previous_in_rotation:
        if lag_bytes is not None and lag_bytes > limits.max_bytes:
            return False
        if lag_seconds is not None and lag_seconds > limits.max_seconds:
            return False
        return True
    if lag_bytes is None or not _below_half(lag_bytes, limits.max_bytes):
        return False
    if lag_seconds is not None and not _below_half(lag_seconds, limits.max_seconds):
        return False
    return True


def _below_half(value: float, limit: float) -> bool:
    return value == 0 or value < limit / 2


def reference_lsn(previous: Topology, samples: Mapping[str, Sample | BaseException]) -> int | None:
    """The WAL position replicas are measured against: the primary's pg_current_wal_lsn()
    of this round (its last known one if it did not answer), raised to any replica's
    receive LSN (WAL a replica received was written by the primary, even if the primary's
    own sample is older than the replica's)."""
    candidates = [previous.primary_lsn]
    p = samples.get(previous.primary.name)
    if isinstance(p, Sample):
        candidates.append(p.current_lsn)
    for r in previous.replicas:
        s = samples.get(r.name)
        if isinstance(s, Sample) and s.in_recovery:
            candidates.append(s.receive_lsn)
    known = [c for c in candidates if c is not None]
    return max(known) if known else None


def build_topology(
    previous: Topology,
    samples: Mapping[str, Sample | BaseException],
    generation: int,
    *,
    now: float = 0.0,
    history: Sequence[tuple[float, int]] = (),
) -> Topology:
    """The next snapshot of `previous`'s backend set from one round of samples.

    `samples` maps backend names to what their poll gave: a `Sample`, or the exception of a
    failed or timed-out poll (the backend is down at once). A backend without an entry
    keeps its previous state (its poll is still in flight). `history` is the
    (time, reference LSN) record of earlier rounds (see `behind_for`); `now` is this
    round's monitor time.
    """
    ref = reference_lsn(previous, samples)
    if ref is not None and (not history or history[-1][1] < ref):
        history = (*history, (now, ref))
    p_sample = samples.get(previous.primary.name)
    primary_lsn, primary_lsn_at = previous.primary_lsn, previous.primary_lsn_at
    if isinstance(p_sample, Sample) and p_sample.current_lsn is not None:
        primary_lsn, primary_lsn_at = p_sample.current_lsn, p_sample.started_at
    primary = _next_primary(previous.primary, p_sample)
    replicas = tuple(_next_replica(r, samples.get(r.name), ref, history, now) for r in previous.replicas)
    # Split brain: more than one backend claims to be a primary. A backend that did not
    # answer keeps its last claim while a split brain stands, so it is not declared over
    # just because one of the two stopped answering the monitor.
    claims = [b for b in (primary, *replicas)
              if b.in_recovery is False and (b.up or previous.split_brain)]
    return Topology(
        generation=generation,
        cluster=previous.cluster,
        primary=primary,
        replicas=replicas,
        primary_lsn=primary_lsn,
        primary_lsn_at=primary_lsn_at,
        split_brain=len(claims) > 1,
        polled_at=now,
    )



def error_text(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _next_primary(prev: BackendState, sample: Sample | BaseException | None) -> BackendState:
    if sample is None:
        return prev
    if isinstance(sample, BaseException):
        failures = prev.failures + 1
        down = not getattr(sample, "timed_out", False) or failures >= PRIMARY_TIMEOUTS_DOWN
        return replace(prev, up=prev.up and not down, failures=failures, error=error_text(sample))
    return replace(prev, up=True, in_recovery=sample.in_recovery, error=None, failures=0)


def _next_replica(
    prev: BackendState,
    sample: Sample | BaseException | None,
    ref: int | None,
    history: Sequence[tuple[float, int]],
    now: float,
) -> BackendState:
    if sample is None:
        return prev
    if isinstance(sample, BaseException):
        return replace(prev, up=False, in_rotation=False, lag_bytes=None, lag_seconds=None,
                       error=error_text(sample))
    if not sample.in_recovery:
        # A promoted (or misconfigured) server is not a replica: it serves no reads as one.
        return replace(prev, up=True, in_recovery=False, in_rotation=False,
                       replay_lsn=sample.replay_lsn, receive_lsn=sample.receive_lsn,
                       lag_bytes=None, lag_seconds=None, error=None)
    behind = behind_for(history, sample.replay_lsn, now) if sample.replay_lsn is not None else None
    lag_bytes, lag_seconds = compute_lag(ref, sample.replay_lsn, sample.last_replay_ts,
                                         sample.server_now, behind)
    was_in = prev.up and prev.in_rotation and prev.in_recovery is not False
    limits = LagLimits(prev.max_lag_bytes, prev.max_lag_seconds)
    return replace(
        prev, up=True, in_recovery=True, replay_lsn=sample.replay_lsn, receive_lsn=sample.receive_lsn,
        lag_bytes=lag_bytes, lag_seconds=lag_seconds,
        in_rotation=next_rotation(was_in, lag_bytes, lag_seconds, limits), error=None,
    )


def describe_changes(old: Topology, new: Topology) -> list[tuple[int, str]]:
    """(logging level, message) for each state change worth a log line, old -> new."""
    out: list[tuple[int, str]] = []
    for b in new.backends:
        a = old.backend(b.name)
        if a is None:
            continue
        what = f"{b.role.value} {b.name} ({b.host}:{b.port})"
        if a.up and not b.up:
            out.append((logging.WARNING, f"{what} is down: {b.error or 'not answering'}"))
        elif not a.up and b.up:
            out.append((logging.INFO, f"{what} answers again"))
        if b.role is Role.PRIMARY:
            if b.in_recovery is True and a.in_recovery is not True:
                out.append((logging.ERROR, f"{what} reports it is in recovery: writes are refused"))
            elif b.in_recovery is False and a.in_recovery is True:
                out.append((logging.INFO, f"{what} is out of recovery: writes accepted"))
            continue
        if b.up and b.in_recovery is False and a.in_recovery is not False:
            out.append((logging.ERROR, f"{what} is not in recovery (promoted?): it is no longer "
                                       "used as a replica"))
        if a.in_rotation and a.up and b.up and not b.in_rotation and b.in_recovery is not False:
            out.append((logging.WARNING, f"{what} left rotation: {_lag_reason(b)}"))
        elif b.up and b.in_rotation and not (a.up and a.in_rotation):
            out.append((logging.INFO, f"{what} joined rotation: {_lag_figures(b)}"))
    if new.split_brain and not old.split_brain:
        claims = ", ".join(b.name for b in new.backends if b.in_recovery is False)
        out.append((logging.ERROR, f"split brain in cluster {new.cluster!r}: {claims} all report "
                                   "not in recovery; writes are refused until it is resolved"))
    elif old.split_brain and not new.split_brain:
        out.append((logging.WARNING, f"split brain in cluster {new.cluster!r} resolved"))
    return out


def _lag_figures(b: BackendState) -> str:
    lb = "?" if b.lag_bytes is None else str(b.lag_bytes)
    ls = "?" if b.lag_seconds is None else f"{b.lag_seconds:.3f}"
    replay = "?" if b.replay_lsn is None else format_lsn(b.replay_lsn)
    return f"lag {lb} bytes, {ls} s, replay at {replay}"


def _lag_reason(b: BackendState) -> str:
    reasons = []
    if b.lag_bytes is not None and b.lag_bytes > b.max_lag_bytes:
        reasons.append(f"lag {b.lag_bytes} bytes > max_lag_bytes {b.max_lag_bytes}")
    if b.lag_seconds is not None and b.lag_seconds > b.max_lag_seconds:
        reasons.append(f"lag {b.lag_seconds:.3f} s > max_lag_seconds {b.max_lag_seconds:g}")
    return "; ".join(reasons) + f" ({_lag_figures(b)})" if reasons else _lag_figures(b)

