"""The monitor: asyncpg pollers that tell routing which backends answer, what they are,
how far replicas lag, and which replicas receive reads.

Owns: one control connection per backend of the active set (plus one to the primary for
the commit-LSN query, and a short-lived one for the volatile-function catalog), the poll
rounds, the lag arithmetic and the rotation decision (design.md, "Lag filtering",
"Split-brain"), and every `TopologyHolder.install` of the active set.
Must not know: client sessions, pools, the wire protocol, the config file (it is handed
plain `BackendSpec`s and `MonitorSettings`; proxy/ builds them).

Shape of the code: the decisions are pure functions of data (`Sample.from_row`,
`compute_lag`, `next_rotation`, `build_topology`, `describe_changes`), unit-tested without a
server; the `Monitor` class only gathers samples and installs what they compute.

A round (every `interval_s`, 100 ms by default):

1. every backend's probe starts its poll unless the previous one is still running; a
   probe (re)connects first if it has no connection;
2. the round waits for the polls of backends believed up, at most half an interval, so a
   slow or dead backend never holds back the others: it keeps its last sample until its
   own `timeout_s` has passed, then counts as down (a failed poll counts at once);
3. the samples are turned into a new `Topology` (`build_topology`), installed with one
   assignment; state changes are logged and gauges updated; LSN waiters are woken.

Read-your-writes: sessions announce each commit's LSN (`want_lsn`) and may wait for a
replica to replay it (`wait_for_lsn`). Between rounds, each replica in rotation that is
behind the highest LSN wanted runs one query at a time that returns as soon as it has
replayed it (router.lsn.REPLAY_WAIT_SQL), on a connection of its own: its replay position
is known one round trip after the replay, with no polling in between.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import asyncpg

from router.classify import VOLATILE_FUNCTIONS_SQL, volatile_function_names
from router.lsn import REPLAY_WAIT_SQL, format_lsn, parse_lsn
from router.topology import BackendState, Role, Topology, TopologyHolder

if TYPE_CHECKING:
    from metrics import Metrics

__all__ = [
    "BackendSpec",
    "LagLimits",
    "Monitor",
    "MonitorSettings",
    "PollError",
    "Sample",
    "SAMPLE_SQL",
    "behind_for",
    "build_topology",
    "compute_lag",
    "describe_changes",
    "initial_topology",
    "next_rotation",
    "prune_history",
    "reference_lsn",
]

log = logging.getLogger("pgsplit.monitor")

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
# A commit that returned with synchronous_commit on (or local, remote_*) is flushed, so the
# flush position covers it, and it is as far as replicas can get (WAL is streamed up to
# it). A commit with synchronous_commit = off may not be flushed yet: only the insert
# position covers it (replicas reach it once the WAL writer flushes).
COMMIT_LSN_SQL = "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text"
APPLICATION_NAME = "pgsplit-monitor"


# --- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend of a set, as configured (limits already resolved against [routing])."""

    name: str
    host: str
    port: int
    role: Role
    weight: float = 1.0
    max_lag_bytes: int = 16 * 1024 * 1024
    max_lag_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    user: str
    password: str | None
    dbname: str = "postgres"
    interval_s: float = 0.1  # routing.monitor_interval_ms
    timeout_s: float = 1.0  # routing.monitor_timeout_ms: a backend silent this long is down
    catalog_refresh_s: float = 60.0
    connect_timeout_s: float = 5.0  # for (re)connecting; the round never waits for it


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


class CommitLsns(NamedTuple):
    """What a read after a commit waits for (see COMMIT_LSN_SQL)."""

    flush: int
    insert: int

    def covering(self, async_commit: bool) -> int:
        """The LSN that covers a commit made before the query: a synchronous one is flushed,
        an asynchronous one (synchronous_commit = off) only inserted."""
        return self.insert if async_commit else self.flush


class PollError(Exception):
    """A backend did not answer its poll; the message says how."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out  # slow rather than refused: a busy server looks like this


# A primary that only answers slowly is busy more often than dead: writes stop after this
# many timed-out polls in a row (a refused or broken connection stops them at once).
PRIMARY_TIMEOUTS_DOWN = 3


# --- pure decisions -----------------------------------------------------------------------------


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
        primary=_state(primaries[0]),
        replicas=tuple(_state(s) for s in specs if s.role is Role.REPLICA),
    )


def _state(spec: BackendSpec) -> BackendState:
    return BackendState(
        name=spec.name, host=spec.host, port=spec.port, role=spec.role, weight=spec.weight,
        max_lag_bytes=spec.max_lag_bytes, max_lag_seconds=spec.max_lag_seconds,
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


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def _next_primary(prev: BackendState, sample: Sample | BaseException | None) -> BackendState:
    if sample is None:
        return prev
    if isinstance(sample, BaseException):
        failures = prev.failures + 1
        down = not getattr(sample, "timed_out", False) or failures >= PRIMARY_TIMEOUTS_DOWN
        return replace(prev, up=prev.up and not down, failures=failures, error=_error_text(sample))
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
                       error=_error_text(sample))
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


# --- I/O ----------------------------------------------------------------------------------------


def _poll_error(exc: BaseException, what: str, timeout: float) -> PollError:
    if isinstance(exc, TimeoutError):
        return PollError(f"{what}: no answer within {timeout * 1000:.0f} ms", timed_out=True)
    if isinstance(exc, asyncpg.PostgresError):
        return PollError(f"{what}: {exc.sqlstate} {_error_text(exc)}")
    return PollError(f"{what}: {type(exc).__name__}: {_error_text(exc)}")


async def _connect(spec: BackendSpec, settings: MonitorSettings, purpose: str,
                   database: str | None = None) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=spec.host, port=spec.port, user=settings.user, password=settings.password,
        database=database or settings.dbname, timeout=settings.connect_timeout_s,
        server_settings={"application_name": f"{APPLICATION_NAME} ({purpose})"},
    )


async def _close(conn: asyncpg.Connection | None) -> None:
    if conn is None or conn.is_closed():
        return
    try:
        await conn.close(timeout=0.5)
    except Exception:  # noqa: BLE001  a broken connection: just drop it
        conn.terminate()


class _Probe:
    """One backend's control connection and its poll in flight."""

    def __init__(self, spec: BackendSpec, settings: MonitorSettings):
        self.spec = spec
        self.settings = settings
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()  # one query at a time on the connection
        self.replay_conn: asyncpg.Connection | None = None  # Monitor._learn's
        self.task: asyncio.Task[None] | None = None
        self.task_started = 0.0
        self.latest: Sample | PollError | None = None
        self.latest_started = 0.0
        self.down_since: float | None = None  # mark_down: ignore samples sent before it

    @property
    def name(self) -> str:
        return self.spec.name

    def kick(self) -> asyncio.Task[None]:
        """Start a poll unless one is running; return the poll in flight."""
        if self.task is None or self.task.done():
            loop = asyncio.get_running_loop()
            self.task_started = loop.time()
            self.task = loop.create_task(self._poll(self.task_started), name=f"pgsplit-monitor-poll-{self.name}")
        return self.task

    def current(self, now: float) -> Sample | PollError | None:
        """The sample this round uses: the latest, or a failure if the poll in flight is
        older than the timeout (it may be stuck connecting)."""
        timeout = self.settings.timeout_s
        if self.task is not None and not self.task.done() and now - self.task_started > timeout:
            return PollError(f"poll: no answer within {timeout * 1000:.0f} ms")
        if self.latest is None:
            return None
        if self.down_since is not None and self.latest_started < self.down_since:
            return None  # sent before the data plane saw it fail: says nothing about now
        return self.latest

    async def connect(self) -> None:
        """Log in now (a staged probe: see Monitor.stage)."""
        async with self.lock:
            await self._connection()

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = None
            self.conn = await _connect(self.spec, self.settings, "poll")
        return self.conn

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()  # after a timeout the protocol state is unknown: no goodbye

    async def _poll(self, started: float) -> None:
        timeout = self.settings.timeout_s
        stage = "connect"
        try:
            async with self.lock:
                conn = await self._connection()
                stage = "poll"
                async with asyncio.timeout(timeout):
                    row = await conn.fetchrow(SAMPLE_SQL)
            result: Sample | PollError = Sample.from_row(row, started)
        except asyncio.CancelledError:
            self.drop_connection()
            raise
        except Exception as exc:  # noqa: BLE001  every failure means "down"; the reason is kept
            self.drop_connection()
            result = _poll_error(exc, stage, self.settings.connect_timeout_s if stage == "connect" else timeout)
        self.latest, self.latest_started = result, started

    async def replay_wait(self, lsn: int, timeout_ms: int) -> int | None:
        """The replica's replay position once it reaches `lsn`, or after `timeout_ms`
        (router.lsn.REPLAY_WAIT_SQL), asked on a connection of its own so that the regular
        poll never queues behind it. None when the server is not in recovery. Errors
        propagate; the connection is dropped then."""
        try:
            if self.replay_conn is None or self.replay_conn.is_closed():
                self.replay_conn = None
                self.replay_conn = await _connect(self.spec, self.settings, "replay")
            async with asyncio.timeout(self.settings.timeout_s + timeout_ms / 1000):
                text = await self.replay_conn.fetchval(REPLAY_WAIT_SQL, format_lsn(lsn), timeout_ms)
        except BaseException:
            conn, self.replay_conn = self.replay_conn, None
            if conn is not None and not conn.is_closed():
                conn.terminate()
            raise
        return None if text is None else parse_lsn(text)

    async def close(self) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self.conn = self.conn, None
        await _close(conn)
        conn, self.replay_conn = self.replay_conn, None
        await _close(conn)


class Monitor:
    """Polls the active backend set and installs its snapshots (see the module docstring)."""

    def __init__(
        self,
        holder: TopologyHolder,
        backends: Sequence[BackendSpec],
        settings: MonitorSettings,
        metrics: Metrics | None = None,
        on_volatile_functions: Callable[[frozenset[str]], None] | None = None,
        *,
        cluster_name: str | None = None,
    ):
        self.holder = holder
        self.settings = settings
        self.metrics = metrics
        self.on_volatile_functions = on_volatile_functions
        self.databases: Callable[[], Iterable[str]] = tuple  # databases clients use (the proxy sets it)
        self._cluster = cluster_name if cluster_name is not None else holder.current.cluster
        self._specs = list(backends)
        initial_topology(self._cluster, self._specs)  # validates the set
        self._probes = [_Probe(s, settings) for s in self._specs]
        self._staged: tuple[str, list[_Probe]] | None = None  # logged in ahead of a retarget
        self._epoch = 0  # +1 per retarget: results of an older set are dropped
        self._history: list[tuple[float, int]] = []
        self._round_lock = asyncio.Lock()
        self._started = False
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._wanted = 0  # the highest LSN sessions announced (want_lsn)
        self._learning: dict[str, asyncio.Task[None]] = {}  # replica -> its _learn task
        self._confirm_task: asyncio.Task[None] | None = None
        self._waiters: dict[int, tuple[int, asyncio.Future[bool]]] = {}
        self._waiter_seq = 0
        self._lsn_conn: asyncpg.Connection | None = None
        self._lsn_target: BackendSpec | None = None
        self._lsn_lock = asyncio.Lock()
        self._catalog_ok: bool | None = None
        self.rounds = 0  # poll rounds installed (tests and status)
        self.replay_waits = 0  # replay-wait queries sent by _learn (tests and status)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll once (so the proxy starts with real figures), then keep polling."""
        if self._started:
            return
        self._started = True
        await self.poll_now(wait=self.settings.timeout_s)  # the optimistic snapshot: all "up"
        self._spawn(self._run(), "pgsplit-monitor")
        if self.on_volatile_functions is not None:
            self._spawn(self._catalog_loop(), "pgsplit-monitor-catalog")

    async def stop(self) -> None:
        """Cancel the pollers and close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self._probes), return_exceptions=True)
        await self.unstage()
        async with self._lsn_lock:
            conn, self._lsn_conn = self._lsn_conn, None
        await _close(conn)
        for _, fut in self._waiters.values():
            if not fut.done():
                fut.set_result(False)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.interval_s
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval
            if next_at < loop.time():  # fell behind (a long stall): do not burst to catch up
                next_at = loop.time() + interval
            try:
                await self.poll_now()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001  the monitor must outlive any one bad round
                log.exception("monitor round failed")

    # --- rounds ---------------------------------------------------------------------------------

    async def poll_now(self, wait: float | None = None) -> Topology:
        """Run one round now and return the snapshot it installed. The round waits for the
        polls of backends believed up, at most `wait` (default half an interval): a poll
        that takes longer is used by a later round, so one slow backend costs the others
        at most that much freshness; backends known to be down are not waited for."""
        wait = self.settings.interval_s / 2 if wait is None else wait
        if self._stopped:
            return self.holder.current
        async with self._round_lock:
            probes = self._probes
            current = self.holder.current
            awaited = []
            for p in probes:
                task = p.kick()
                b = current.backend(p.name)
                if b is None or b.up:
                    awaited.append(task)
            if awaited:
                await asyncio.wait(awaited, timeout=wait)
            return self._install_round(self._previous(), probes)

    def _previous(self) -> Topology:
        """The snapshot to build on: the installed one if it is of our set."""
        cur = self.holder.current
        if cur.cluster == self._cluster and [b.name for b in cur.backends] == [
            s.name for s in sorted(self._specs, key=lambda s: s.role is not Role.PRIMARY)
        ]:
            return cur
        return initial_topology(self._cluster, self._specs, cur.generation)

    def _install_round(self, previous: Topology, probes: Sequence[_Probe], generation: int | None = None) -> Topology:
        now = asyncio.get_running_loop().time()
        samples: dict[str, Sample | BaseException] = {}
        for p in probes:
            s = p.current(now)
            if s is not None:
                samples[p.name] = s
        topo = build_topology(previous, samples,
                              previous.generation if generation is None else generation,
                              now=now, history=self._history)
        ref = reference_lsn(previous, samples)
        if ref is not None and (not self._history or self._history[-1][1] < ref):
            self._history.append((now, ref))
            horizon = 2 * max([s.max_lag_seconds for s in self._specs] + [1.0]) + 1.0
            if self._history[0][0] < now - horizon:
                self._history = prune_history(self._history, now - horizon)
        self.rounds += 1
        self._install(topo, previous)
        return topo

    def _install(self, topo: Topology, previous: Topology | None) -> None:
        self.holder.install(topo)  # the one assignment readers rely on
        if previous is not None:
            for level, message in describe_changes(previous, topo):
                log.log(level, "%s", message)
        self._export(topo)
        self._wake_waiters(topo)

    def _export(self, topo: Topology) -> None:
        m = self.metrics
        if m is None:
            return
        for b in topo.backends:
            m.backend_up.labels(b.name, b.role.value).set(1 if b.up else 0)
        for r in topo.replicas:
            m.replica_lag_bytes.labels(r.name).set(math.nan if r.lag_bytes is None else r.lag_bytes)
            m.replica_lag_seconds.labels(r.name).set(math.nan if r.lag_seconds is None else r.lag_seconds)
            m.replica_in_rotation.labels(r.name).set(1 if (r.up and r.in_rotation) else 0)
        m.topology_generation.set(topo.generation)
        m.split_brain.set(1 if topo.split_brain else 0)

    def _forget_metrics(self, names: Iterable[tuple[str, Role]]) -> None:
        m = self.metrics
        if m is None:
            return
        for name, role in names:
            for gauge, labels in ((m.backend_up, (name, role.value)), (m.replica_lag_bytes, (name,)),
                                  (m.replica_lag_seconds, (name,)), (m.replica_in_rotation, (name,))):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass

    # --- the data plane's reports -------------------------------------------------------------

    def mark_down(self, name: str, reason: str) -> None:
        """A server connection to `name` failed. A replica leaves rotation now (one
        install); a poll sent after this call decides whether it comes back. The primary is
        not taken down on the data plane's word (one failed connection may be one user's
        problem, e.g. 53300 too many connections, and refusing every write for it would be
        an outage of our own making, as PgCat reasons): an immediate poll confirms it."""
        topo = self.holder.current
        b = topo.backend(name)
        if b is None:
            return
        for p in self._probes:
            if p.name == name:
                p.down_since = asyncio.get_running_loop().time()
        if b.role is Role.REPLICA and b.up:
            self._install(topo.with_backend(replace(b, up=False, in_rotation=False, error=reason)), topo)
        if self._started and not self._stopped and (self._confirm_task is None or self._confirm_task.done()):
            self._confirm_task = self._spawn(self._confirm(), "pgsplit-monitor-confirm")

    async def check(self, name: str) -> bool:
        """The data plane lost one server connection to `name`: poll it now (a poll sent
        after this call, at most two poll timeouts) and install the round. True when it
        answered: the loss was that connection's alone, and the backend stays as it was."""
        probe = next((p for p in self._probes if p.name == name), None)
        if probe is None or not self._started or self._stopped:
            return True
        asked = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(2 * self.settings.timeout_s):
                while True:
                    task = probe.kick()
                    started = probe.task_started
                    await asyncio.wait([task])  # (not cancelled on timeout: the rounds use it)
                    if started >= asked:
                        break
        except TimeoutError:
            pass
        await self.poll_now(wait=0)
        return isinstance(probe.latest, Sample) and probe.latest_started >= asked

    async def _confirm(self) -> None:
        try:
            await self.poll_now()
        except Exception:  # noqa: BLE001  the regular rounds carry on
            log.exception("monitor confirmation round failed")

    # --- read-your-writes -----------------------------------------------------------------------

    def want_lsn(self, lsn: int) -> None:
        """A session committed up to `lsn` and will read soon: have the replicas behind it
        report as soon as they replay it. Cheap when nothing new is wanted (every commit)."""
        if lsn > self._wanted:
            self._wanted = lsn
            self._learn_all()

    async def wait_for_lsn(self, lsn: int, timeout: float) -> bool:
        """True as soon as a replica in rotation has replayed `lsn`; False after `timeout`."""
        if _reached(self.holder.current, lsn):
            return True
        if timeout <= 0 or self._stopped:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiter_seq += 1
        key = self._waiter_seq
        self._waiters[key] = (lsn, fut)
        # Also when nothing new is wanted: a replica whose replay-wait ended (an error, out
        # of rotation for a while) is asked again for what is still missing.
        self._wanted = max(self._wanted, lsn)
        self._learn_all()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return False
        finally:
            del self._waiters[key]

    def _wake_waiters(self, topo: Topology) -> None:
        if not self._waiters:
            return
        best = max((r.replay_lsn for r in topo.rotation if r.replay_lsn is not None), default=None)
        if best is None:
            return
        for lsn, fut in self._waiters.values():
            if lsn <= best and not fut.done():
                fut.set_result(True)

    def _learn_all(self) -> None:
        if not self._started or self._stopped:
            return
        wanted = self._wanted
        for r in self.holder.current.rotation:
            if (r.replay_lsn is None or r.replay_lsn < wanted) and r.name not in self._learning:
                probe = next((p for p in self._probes if p.name == r.name), None)
                if probe is not None:
                    self._learning[r.name] = self._spawn(self._learn(probe, self._epoch), "pgsplit-monitor-replay")

    async def _learn(self, probe: _Probe, epoch: int) -> None:
        """One replica's replay-wait queries, one at a time, each for the highest LSN wanted
        when it starts (commits that come meanwhile share the next one), until the replica
        has replayed everything wanted or leaves rotation. A wait lasts at most one round:
        the rounds keep reporting a replica that falls behind."""
        timeout_ms = max(1, int(self.settings.interval_s * 1000))
        try:
            while not self._stopped and epoch == self._epoch:
                target = self._wanted
                b = self.holder.current.backend(probe.name)
                if b is None or not b.in_rotation or not b.up or (b.replay_lsn is not None and b.replay_lsn >= target):
                    return
                self.replay_waits += 1
                lsn = await probe.replay_wait(target, timeout_ms)
                if lsn is None or epoch != self._epoch:
                    return  # not in recovery: the rounds will say what it is
                self._install_replay({probe.name: lsn})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  the rounds report health; waiters time out
            log.debug("replay wait on %s failed: %s", probe.name, exc)
        finally:
            if self._learning.get(probe.name) is asyncio.current_task():
                del self._learning[probe.name]

    def note_replay(self, name: str, lsn: int) -> None:
        """Replica `name` has replayed `lsn` (a read's replay check said so)."""
        self._install_replay({name: lsn})

    def _install_replay(self, replay: Mapping[str, int | None]) -> None:
        topo = self.holder.current  # read-modify-install with no await in between
        new = topo
        for name, lsn in replay.items():
            b = new.backend(name)
            if lsn is None or b is None or (b.replay_lsn is not None and lsn <= b.replay_lsn):
                continue
            ref = self._history[-1][1] if self._history else None
            lag_bytes = b.lag_bytes if ref is None else max(0, ref - lsn)
            new = new.with_backend(replace(b, replay_lsn=lsn, lag_bytes=lag_bytes))
        if new is not topo:
            self.holder.install(new)
            self._wake_waiters(new)

    async def primary_commit_lsns(self) -> CommitLsns:
        """The active primary's WAL flush and insert positions, over a connection of its
        own (a slow poll never delays it). Errors propagate as PollError."""
        async with self._lsn_lock:
            target = self._primary_spec()
            stage = "connect"
            try:
                if self._lsn_conn is None or self._lsn_conn.is_closed() or self._lsn_target != target:
                    old, self._lsn_conn = self._lsn_conn, None
                    if old is not None:
                        old.terminate()
                    self._lsn_conn = await _connect(target, self.settings, "commit lsn")
                    self._lsn_target = target
                stage = "query"
                async with asyncio.timeout(self.settings.timeout_s):
                    row = await self._lsn_conn.fetchrow(COMMIT_LSN_SQL)
            except Exception as exc:
                conn, self._lsn_conn = self._lsn_conn, None
                if conn is not None:
                    conn.terminate()
                timeout = self.settings.connect_timeout_s if stage == "connect" else self.settings.timeout_s
                raise _poll_error(exc, f"the WAL position of primary {target.name} "
                                       f"({target.host}:{target.port}), {stage}", timeout) from exc
            return CommitLsns(parse_lsn(row[0]), parse_lsn(row[1]))

    def _primary_spec(self) -> BackendSpec:
        return next(s for s in self._specs if s.role is Role.PRIMARY)

    # --- the volatile-function catalog --------------------------------------------------------

    async def _catalog_loop(self) -> None:
        assert self.on_volatile_functions is not None
        refresh = self.settings.catalog_refresh_s
        while True:
            target = self._primary_spec()
            try:
                names = await self.refresh_catalog()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if self._catalog_ok is not False:
                    log.warning("volatile-function catalog refresh from %s failed: %s", target.name, exc)
                self._catalog_ok = False
                await asyncio.sleep(min(refresh, 5.0))
                continue
            if self._catalog_ok is False:
                log.info("volatile-function catalog read again from %s (%d names)", target.name, len(names))
            self._catalog_ok = True
            await asyncio.sleep(refresh)

    async def refresh_catalog(self) -> frozenset[str]:
        """Read the user functions marked VOLATILE from the primary, in every database
        clients use (functions live per database; a name volatile in any of them counts),
        and hand them to `on_volatile_functions`; return them."""
        target = self._primary_spec()
        rows: list = []
        for database in sorted(set(self.databases()) | {self.settings.dbname}):
            try:
                conn = await _connect(target, self.settings, "catalog", database)
            except asyncpg.InvalidCatalogNameError:
                continue  # a database that went away
            try:
                async with asyncio.timeout(max(self.settings.timeout_s, 5.0)):
                    rows += await conn.fetch(VOLATILE_FUNCTIONS_SQL)
            finally:
                await _close(conn)
        names = volatile_function_names((r[0], r[1]) for r in rows)
        if self.on_volatile_functions is not None:
            self.on_volatile_functions(names)
        return names

    # --- cutover --------------------------------------------------------------------------------

    async def stage(self, cluster_name: str, backends: Sequence[BackendSpec]) -> int:
        """Log in to a backend set that a retarget may switch to soon (a cutover's warm-up),
        so that the switch costs one poll instead of a login per backend: several round
        trips each, while clients are held. Returns how many logins succeeded; a failed
        one is simply tried again at the switch."""
        await self.unstage()
        probes = [_Probe(s, self.settings) for s in backends]
        self._staged = (cluster_name, probes)
        done = await asyncio.gather(*(p.connect() for p in probes), return_exceptions=True)
        return sum(1 for d in done if not isinstance(d, BaseException))

    async def unstage(self) -> None:
        """Close the connections of a staged set that was not switched to."""
        staged, self._staged = self._staged, None
        if staged is not None:
            await asyncio.gather(*(p.close() for p in staged[1]), return_exceptions=True)

    def _take_staged(self, cluster_name: str, specs: Sequence[BackendSpec]) -> list[_Probe]:
        staged, self._staged = self._staged, None
        ready = {p.spec: p for p in staged[1]} if staged is not None and staged[0] == cluster_name else {}
        probes = [ready.pop(s, None) or _Probe(s, self.settings) for s in specs]
        for p in ready.values():  # staged for backends no longer configured
            self._spawn(p.close(), "pgsplit-monitor-unstage")
        return probes

    async def retarget(self, cluster_name: str, backends: Sequence[BackendSpec], *,
                       generation: int | None = None, settings: MonitorSettings | None = None) -> Topology:
        """Switch to another backend set: poll it once, install its first snapshot with
        generation + 1 (or `generation`) in one assignment, and poll it from then on
        (logged in with `settings`, when given: a reloaded [monitor] or [routing])."""
        specs = list(backends)
        initial_topology(cluster_name, specs)  # validates before anything changes
        async with self._round_lock:
            if settings is not None:
                self.settings = settings
            old_probes, old_specs = self._probes, self._specs
            self._epoch += 1
            self._cluster, self._specs = cluster_name, specs
            self._probes = self._take_staged(cluster_name, specs)
            self._history = []
            gen = generation if generation is not None else self.holder.current.generation + 1
            base = initial_topology(cluster_name, specs, gen)
            if self._started and not self._stopped:
                await asyncio.wait([p.kick() for p in self._probes], timeout=self.settings.timeout_s)
            previous = self.holder.current
            topo = self._install_round(base, self._probes, gen)
        log.info("monitor switched from cluster %r (generation %d) to %r (generation %d): %s",
                 previous.cluster, previous.generation, cluster_name, gen,
                 ", ".join(f"{b.name}={'up' if b.up else 'down'}" for b in topo.backends))
        gone = {(s.name, s.role) for s in old_specs} - {(s.name, s.role) for s in specs}
        self._forget_metrics(gone)
        await asyncio.gather(*(p.close() for p in old_probes), return_exceptions=True)
        if self._stopped:
            await asyncio.gather(*(p.close() for p in self._probes), return_exceptions=True)
        return topo


def _reached(topo: Topology, lsn: int) -> bool:
    return any(r.replay_lsn is not None and r.replay_lsn >= lsn for r in topo.rotation)
