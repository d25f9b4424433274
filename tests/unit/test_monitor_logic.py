"""router.monitor's decisions as tables: lag, rotation with hysteresis, snapshots, logs.

No server: samples are built by hand, the way `Sample.from_row` builds them from a poll.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields, replace

import pytest

from router.monitor.lag import (
    PRIMARY_TIMEOUTS_DOWN,
    SAMPLE_SQL,
    LagLimits,
    Sample,
    behind_for,
    build_topology,
    compute_lag,
    describe_changes,
    initial_topology,
    next_rotation,
    prune_history,
    reference_lsn,
)
from router.monitor.probe import MonitorSettings, PollError, Probe
from router.topology import BackendSpec, BackendState, Role, Topology

MB = 1024 * 1024
NOW = 1_700_000_000.0  # a server clock reading (epoch seconds)

SPECS = [
    BackendSpec("pg1", "10.0.0.1", 5432, Role.PRIMARY),
    BackendSpec("pg2", "10.0.0.2", 5432, Role.REPLICA, weight=2.0, max_lag_bytes=1 * MB, max_lag_seconds=2.0),
    BackendSpec("pg3", "10.0.0.3", 5433, Role.REPLICA, max_lag_bytes=1 * MB, max_lag_seconds=2.0),
]


def primary(lsn: int, *, in_recovery: bool = False) -> Sample:
    return Sample(in_recovery=in_recovery, current_lsn=None if in_recovery else lsn, replay_lsn=None,
                  receive_lsn=None, last_replay_ts=None, server_now=NOW)


def replica(replay: int, *, receive: int | None = None, last_replay_ts: float | None = NOW - 0.01,
            server_now: float = NOW, in_recovery: bool = True) -> Sample:
    return Sample(in_recovery=in_recovery, current_lsn=None if in_recovery else replay, replay_lsn=replay,
                  receive_lsn=replay if receive is None else receive, last_replay_ts=last_replay_ts,
                  server_now=server_now)


def topo0() -> Topology:
    return initial_topology("main", SPECS)


# --- initial topology ---------------------------------------------------------------------------


def test_initial_topology_is_optimistic_and_keeps_the_configured_figures() -> None:
    t = initial_topology("main", [SPECS[1], SPECS[0], SPECS[2]], generation=7)
    assert t.generation == 7 and t.cluster == "main"
    assert t.primary.name == "pg1" and [r.name for r in t.replicas] == ["pg2", "pg3"]
    assert all(b.up for b in t.backends)
    assert [r.name for r in t.rotation] == ["pg2", "pg3"]
    pg2 = t.backend("pg2")
    assert pg2 is not None and pg2.weight == 2.0 and pg2.max_lag_bytes == MB and pg2.max_lag_seconds == 2.0
    assert not t.split_brain and t.primary_writable


def test_a_configured_state_keeps_every_configured_field_and_knows_nothing_yet() -> None:
    state = BackendState.configured(SPECS[1])
    configured = {f.name: getattr(SPECS[1], f.name) for f in fields(BackendSpec)}
    assert {name: getattr(state, name) for name in configured} == configured
    assert state == BackendState(**configured)
    assert state.up and state.in_rotation and state.in_recovery is None and state.replay_lsn is None


@pytest.mark.parametrize("specs", [
    [SPECS[1], SPECS[2]],
    [SPECS[0], replace(SPECS[1], role=Role.PRIMARY)],
    [SPECS[0], SPECS[1], SPECS[1]],
])
def test_initial_topology_refuses_bad_sets(specs: list[BackendSpec]) -> None:
    with pytest.raises(ValueError, match="main"):
        initial_topology("main", specs)


# --- samples ------------------------------------------------------------------------------------


def test_sample_from_row() -> None:
    s = Sample.from_row((True, None, "0/3000060", "0/3000100", NOW - 1.5, NOW), started_at=12.5)
    assert s == Sample(True, None, 0x3000060, 0x3000100, NOW - 1.5, NOW, 12.5)
    p = Sample.from_row((False, "16/B374D848", None, None, None, NOW))
    assert p.current_lsn == 0x16_B374D848 and p.replay_lsn is None and not p.in_recovery
    with pytest.raises(ValueError):
        Sample.from_row((True, None, "garbage", None, None, NOW))


def test_sample_sql_is_one_statement_asking_for_every_field() -> None:
    assert SAMPLE_SQL.count(";") == 0
    for fn in ("pg_is_in_recovery()", "pg_current_wal_lsn()", "pg_last_wal_replay_lsn()",
               "pg_last_wal_receive_lsn()", "pg_last_xact_replay_timestamp()", "now()"):
        assert fn in SAMPLE_SQL


# --- lag ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "replay", "replay_ts", "server_now", "behind", "expected"), [
    # caught up: 0 whatever the last replayed commit's age (an idle primary)
    (1000, 1000, NOW - 3600, NOW, None, (0, 0.0)),
    (1000, 1200, NOW - 3600, NOW, None, (0, 0.0)),  # sampled after the primary: clamped
    # behind: bytes, and the replay timestamp's age
    (5000, 1000, NOW - 2.5, NOW, None, (4000, pytest.approx(2.5))),
    # ... unless the monitor saw the primary move past the replay position more recently
    (5000, 1000, NOW - 3600, NOW, 0.3, (4000, 0.3)),
    (5000, 1000, NOW - 0.2, NOW, 5.0, (4000, pytest.approx(0.2))),
    (5000, 1000, None, NOW, 0.3, (4000, 0.3)),  # nothing replayed since start
    (5000, 1000, None, NOW, None, (4000, None)),
    (5000, 1000, NOW + 2, NOW, None, (4000, 0.0)),  # clock skew: never negative
    # unknown inputs
    (None, 1000, NOW, NOW, None, (None, None)),
    (1000, None, NOW, NOW, None, (None, None)),
])
def test_compute_lag(ref, replay, replay_ts, server_now, behind, expected) -> None:
    assert compute_lag(ref, replay, replay_ts, server_now, behind) == expected


HISTORY = [(10.0, 100), (10.1, 200), (10.5, 300)]


@pytest.mark.parametrize(("replay", "now", "expected"), [
    (300, 11.0, None),  # has everything the monitor has seen
    (400, 11.0, None),
    (250, 11.0, 0.5),  # behind since 10.5
    (150, 11.0, pytest.approx(0.9)),
    (200, 11.0, 0.5),
    (100, 11.0, pytest.approx(0.9)),
    (99, 11.0, None),  # behind the oldest entry: since when is unknown
])
def test_behind_for(replay: int, now: float, expected) -> None:
    assert behind_for(HISTORY, replay, now) == expected
    assert behind_for([], replay, now) is None


def test_prune_history_keeps_the_newest_old_entry() -> None:
    h = [(1.0, 10), (2.0, 20), (3.0, 30), (9.0, 90)]
    assert prune_history(h, 5.0) == [(3.0, 30), (9.0, 90)]
    assert prune_history(h, 0.5) == h
    assert prune_history(h, 10.0) == [(9.0, 90)]
    assert prune_history([], 10.0) == []


# --- rotation -----------------------------------------------------------------------------------

LIMITS = LagLimits(max_bytes=1000, max_seconds=2.0)


@pytest.mark.parametrize(("was_in", "lag_bytes", "lag_seconds", "expected"), [
    # in rotation: leaves only above a limit
    (True, 0, 0.0, True),
    (True, 1000, 2.0, True),  # at the limit: stays
    (True, 1001, 0.0, False),
    (True, 0, 2.01, False),
    (True, 5000, 9.0, False),
    (True, None, None, True),  # unknown: no change
    (True, None, 3.0, False),
    (True, 2000, None, False),
    # out of rotation: back only below half of both limits
    (False, 0, 0.0, True),
    (False, 499, 0.99, True),
    (False, 500, 0.0, False),  # at half: not yet
    (False, 0, 1.0, False),
    (False, 800, 0.0, False),  # below the limit but above half: hysteresis keeps it out
    (False, 0, 1.5, False),
    (False, None, 0.0, False),  # unknown byte lag: stays out
    (False, 100, None, True),  # unknown time lag defers to bytes
])
def test_next_rotation(was_in: bool, lag_bytes, lag_seconds, expected: bool) -> None:
    assert next_rotation(was_in, lag_bytes, lag_seconds, LIMITS) is expected


@pytest.mark.parametrize(("was_in", "lag", "expected"), [
    (True, 0, True), (True, 1, False), (False, 0, True), (False, 1, False),
])
def test_next_rotation_with_zero_limits(was_in: bool, lag: int, expected: bool) -> None:
    assert next_rotation(was_in, lag, 0.0, LagLimits(0, 0.0)) is expected


def test_hysteresis_over_a_sequence_of_rounds() -> None:
    lags = [0, 600, 1001, 900, 600, 499, 700, 1000, 1001]
    state, seen = True, []
    for lag in lags:
        state = next_rotation(state, lag, 0.0, LIMITS)
        seen.append(state)
    assert seen == [True, True, False, False, False, True, True, True, False]


# --- snapshots ----------------------------------------------------------------------------------


def test_reference_is_the_primary_lsn_raised_by_replicas_receive_lsn() -> None:
    t = topo0()
    assert reference_lsn(t, {}) is None
    assert reference_lsn(t, {"pg1": primary(5000)}) == 5000
    assert reference_lsn(t, {"pg1": primary(5000), "pg2": replica(4000, receive=6000)}) == 6000
    # the primary did not answer: its last known LSN, and what replicas received
    t = replace(t, primary_lsn=7000)
    assert reference_lsn(t, {"pg1": PollError("down"), "pg2": replica(4000, receive=6500)}) == 7000
    # a server that is not in recovery is no evidence of the primary's position
    assert reference_lsn(t, {"pg2": replica(9000, in_recovery=False)}) == 7000


def test_healthy_round() -> None:
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(4900)},
                       generation=1, now=100.0)
    assert t.primary_lsn == 5000 and t.polled_at == 100.0 and t.generation == 1
    assert t.primary.up and t.primary.in_recovery is False and t.primary_writable
    pg2, pg3 = t.replicas
    assert (pg2.up, pg2.in_recovery, pg2.replay_lsn, pg2.lag_bytes, pg2.lag_seconds) == (True, True, 5000, 0, 0.0)
    # first round, seen behind: 100 bytes; no history yet, so the last replayed commit's age
    assert pg3.lag_bytes == 100 and pg3.lag_seconds == pytest.approx(0.01)
    assert [r.name for r in t.rotation] == ["pg2", "pg3"]
    assert not t.split_brain


def test_an_idle_primary_does_not_make_replicas_late() -> None:
    # Nothing committed for an hour; every replica has replayed the primary's position.
    old = NOW - 3600
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000, last_replay_ts=old),
                                 "pg3": replica(5000, last_replay_ts=old)}, generation=1, now=100.0)
    assert [(r.lag_bytes, r.lag_seconds) for r in t.replicas] == [(0, 0.0), (0, 0.0)]
    assert len(t.rotation) == 2


def test_a_write_after_a_long_idle_time_is_not_an_hour_of_lag() -> None:
    # The primary was idle for an hour, then wrote: a replica that has not replayed the
    # write yet is as stale as the write is old (seen 0.3 s ago), not an hour.
    old = NOW - 3600
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000, last_replay_ts=old),
                                 "pg3": replica(5000, last_replay_ts=old)}, generation=1, now=100.0,
                       history=[(50.0, 5000)])
    history = [(50.0, 5000), (100.0, 5100)]
    t = build_topology(t, {"pg1": primary(5100), "pg2": replica(5000, last_replay_ts=old),
                           "pg3": replica(5100, last_replay_ts=old)}, generation=1, now=100.3,
                       history=history)
    pg2, pg3 = t.replicas
    assert pg2.lag_bytes == 100 and pg2.lag_seconds == pytest.approx(0.3)
    assert (pg3.lag_bytes, pg3.lag_seconds) == (0, 0.0)
    assert len(t.rotation) == 2


def test_a_replica_leaves_on_byte_lag_and_returns_below_half() -> None:
    t = topo0()
    history: list[tuple[float, int]] = []
    rounds = [  # (primary LSN, pg2 replay LSN, pg2 in rotation after the round)
        (10 * MB, 10 * MB, True),
        (11 * MB, 10 * MB, True),  # exactly 1 MB behind: at the limit
        (11 * MB + 1, 10 * MB, False),
        (11 * MB + 1, 10 * MB + MB // 4, False),  # 0.75 MB: below the limit, above half
        (11 * MB + 1, 11 * MB - MB // 2, False),  # exactly half: not yet
        (11 * MB + 1, 11 * MB, True),  # 1 byte behind
    ]
    now = 0.0
    for primary_lsn, replay, expected in rounds:
        now += 0.1
        t = build_topology(t, {"pg1": primary(primary_lsn), "pg2": replica(replay),
                               "pg3": replica(primary_lsn)}, generation=1, now=now, history=history)
        if not history or history[-1][1] < primary_lsn:
            history.append((now, primary_lsn))
        pg2 = t.backend("pg2")
        assert pg2 is not None and pg2.in_rotation is expected, (primary_lsn, replay, pg2)
        assert pg2.lag_bytes == max(0, primary_lsn - replay)
    assert [r.name for r in t.rotation] == ["pg2", "pg3"]


def test_a_replica_delayed_before_the_monitor_started_is_out_at_once() -> None:
    # recovery_min_apply_delay = 5 min, little traffic: few bytes behind, but the monitor
    # has no history reaching back to its replay position: the replay timestamp tells.
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(4900, last_replay_ts=NOW - 300),
                                 "pg3": replica(5000)}, generation=1, now=0.0)
    pg2 = t.backend("pg2")
    assert pg2 is not None and pg2.lag_bytes == 100 and pg2.lag_seconds == pytest.approx(300)
    assert not pg2.in_rotation and [r.name for r in t.rotation] == ["pg3"]


def test_a_replica_leaves_on_time_lag() -> None:
    history = [(0.0, 1000), (1.0, 2000)]
    # pg2 stuck at 1000: behind since the monitor saw 2000 at t=1.0 -> 2.5 s at t=3.5
    t = build_topology(topo0(), {"pg1": primary(2000), "pg2": replica(1000, last_replay_ts=NOW - 10),
                                 "pg3": replica(2000)}, generation=1, now=3.5, history=history)
    pg2 = t.backend("pg2")
    assert pg2 is not None and pg2.lag_seconds == pytest.approx(2.5) and pg2.lag_bytes == 1000
    assert not pg2.in_rotation and [r.name for r in t.rotation] == ["pg3"]


@pytest.mark.parametrize("error", [PollError("poll: no answer within 1000 ms"), ConnectionRefusedError()])
def test_a_replica_that_does_not_answer_is_down_at_once(error: BaseException) -> None:
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": error, "pg3": replica(5000)},
                       generation=1, now=1.0)
    pg2 = t.backend("pg2")
    assert pg2 is not None and not pg2.up and not pg2.in_rotation
    assert pg2.error == (str(error) or type(error).__name__)
    assert [r.name for r in t.rotation] == ["pg3"]
    # back: it must be below half the limits again, like any replica out of rotation
    t = build_topology(t, {"pg1": primary(5000 + MB), "pg2": replica(5000), "pg3": replica(5000 + MB)},
                       generation=1, now=1.1)
    pg2 = t.backend("pg2")
    assert pg2 is not None and pg2.up and pg2.error is None and not pg2.in_rotation  # 1 MB behind
    t = build_topology(t, {"pg1": primary(5000 + MB), "pg2": replica(5000 + MB), "pg3": replica(5000 + MB)},
                       generation=1, now=1.2)
    assert [r.name for r in t.rotation] == ["pg2", "pg3"]


def test_a_backend_without_news_keeps_its_state() -> None:
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(4000)},
                       generation=3, now=1.0)
    t2 = build_topology(t, {"pg1": primary(6000), "pg2": replica(6000)}, generation=3, now=1.1)
    assert t2.backend("pg3") == t.backend("pg3")
    assert t2.generation == 3 and t2.primary_lsn == 6000


def test_a_primary_that_does_not_answer() -> None:
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                       generation=1, now=1.0)
    t = build_topology(t, {"pg1": PollError("connect: ConnectionRefusedError: refused"),
                           "pg2": replica(5000), "pg3": replica(5000)}, generation=1, now=1.1)
    assert not t.primary.up and t.primary.error == "connect: ConnectionRefusedError: refused"
    assert t.primary.in_recovery is False  # last known
    assert not t.primary_writable
    assert t.primary_lsn == 5000  # last known; replicas still measured against it
    assert len(t.rotation) == 2


async def test_a_poll_still_in_flight_past_its_timeout_is_a_slow_primary_not_a_dead_one() -> None:
    """A round that finds the primary's poll still unanswered after the poll timeout (a
    stall of the server: a checkpoint's fsync, a starved CPU) counts it as timed out, like
    the poll's own timeout: writes stop after PRIMARY_TIMEOUTS_DOWN such rounds, not at
    the first one (measured: a one-second stall under load made every write fail for
    one round, though the primary answered 50 ms later)."""
    probe = Probe(SPECS[0], MonitorSettings(user="m", password=None, timeout_s=1.0))
    stalled = asyncio.Event()
    probe.task, probe.task_started = asyncio.ensure_future(stalled.wait()), 10.0
    try:
        error = probe.current(11.5)
        assert isinstance(error, PollError) and error.timed_out
        t = build_topology(topo0(), {"pg1": primary(5000)}, generation=1, now=1.0)
        for n in range(1, PRIMARY_TIMEOUTS_DOWN + 1):
            t = build_topology(t, {"pg1": error}, generation=1, now=1.0 + n / 10)
            assert t.primary_writable == (n < PRIMARY_TIMEOUTS_DOWN), n
    finally:
        probe.task.cancel()


def test_a_primary_in_recovery_is_recorded() -> None:
    t = build_topology(topo0(), {"pg1": primary(0, in_recovery=True)}, generation=1, now=1.0)
    assert t.primary.up and t.primary.in_recovery is True and not t.primary_writable


def test_a_promoted_replica_leaves_rotation_and_is_split_brain() -> None:
    t = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                       generation=1, now=1.0)
    t = build_topology(t, {"pg1": primary(5000), "pg2": replica(5100, in_recovery=False),
                           "pg3": replica(5000)}, generation=1, now=1.1)
    pg2 = t.backend("pg2")
    assert pg2 is not None and pg2.up and pg2.in_recovery is False and not pg2.in_rotation
    assert t.split_brain and not t.primary_writable
    assert [r.name for r in t.rotation] == ["pg3"]
    # One of the two stops answering: still split brain (its last claim stands).
    t = build_topology(t, {"pg1": primary(5000), "pg2": PollError("down"), "pg3": replica(5000)},
                       generation=1, now=1.2)
    assert t.split_brain
    # It answers again, as a replica (rebuilt by an operator): resolved.
    t = build_topology(t, {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                       generation=1, now=1.3)
    assert not t.split_brain and t.primary_writable
    assert [r.name for r in t.rotation] == ["pg2", "pg3"]


def test_a_promoted_replica_with_the_primary_down_is_no_split_brain() -> None:
    t = build_topology(topo0(), {"pg1": PollError("down"), "pg2": replica(5100, in_recovery=False),
                                 "pg3": replica(5000)}, generation=1, now=1.0)
    assert not t.split_brain  # one claimant that answers; writes still fail (primary down)
    assert not t.primary_writable
    assert [r.name for r in t.rotation] == ["pg3"]


def test_mark_down_then_a_stale_round_keeps_it_down() -> None:
    # mark_down installs up=False; a round without a fresh sample of it keeps that.
    t = topo0()
    b = t.backend("pg2")
    assert b is not None
    t = t.with_backend(replace(b, up=False, in_rotation=False, error="a server connection failed"))
    t = build_topology(t, {"pg1": primary(5000), "pg3": replica(5000)}, generation=1, now=1.0)
    pg2 = t.backend("pg2")
    assert pg2 is not None and not pg2.up and pg2.error == "a server connection failed"


# --- log lines ----------------------------------------------------------------------------------


def _messages(old: Topology, new: Topology) -> list[tuple[int, str]]:
    return describe_changes(old, new)


def test_no_change_no_log() -> None:
    samples = {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)}
    t1 = build_topology(topo0(), samples, generation=1, now=1.0)
    t2 = build_topology(t1, samples, generation=1, now=1.1)
    assert describe_changes(t1, t2) == []


def test_log_lines_for_state_changes() -> None:
    t1 = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                        generation=1, now=1.0)
    t2 = build_topology(t1, {"pg1": primary(5000 + 2 * MB), "pg2": replica(5000),
                             "pg3": PollError("poll: no answer within 1000 ms")}, generation=1, now=1.1)
    lines = describe_changes(t1, t2)
    assert (logging.WARNING, "replica pg3 (10.0.0.3:5433) is down: poll: no answer within 1000 ms") in lines
    left = [m for level, m in lines if "left rotation" in m]
    assert len(left) == 1 and left[0].startswith("replica pg2 (10.0.0.2:5432) left rotation: lag 2097152 bytes "
                                                 "> max_lag_bytes 1048576")
    t3 = build_topology(t2, {"pg1": primary(5000 + 2 * MB), "pg2": replica(5000 + 2 * MB),
                             "pg3": replica(5000 + 2 * MB)}, generation=1, now=1.2)
    lines = describe_changes(t2, t3)
    assert (logging.INFO, "replica pg3 (10.0.0.3:5433) answers again") in lines
    joined = sorted(m for _, m in lines if "joined rotation" in m)
    assert len(joined) == 2 and joined[0].startswith("replica pg2 (10.0.0.2:5432) joined rotation: lag 0 bytes")


def test_log_lines_for_split_brain_and_recovery() -> None:
    t1 = build_topology(topo0(), {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                        generation=1, now=1.0)
    t2 = build_topology(t1, {"pg1": primary(5000), "pg2": replica(5000, in_recovery=False),
                             "pg3": replica(5000)}, generation=1, now=1.1)
    levels = {m: level for level, m in describe_changes(t1, t2)}
    assert any("split brain in cluster 'main': pg1, pg2" in m and lvl == logging.ERROR for m, lvl in levels.items())
    assert any("pg2" in m and "not in recovery" in m for m in levels)
    t3 = build_topology(t2, {"pg1": primary(5000), "pg2": replica(5000), "pg3": replica(5000)},
                        generation=1, now=1.2)
    assert any("resolved" in m for _, m in describe_changes(t2, t3))
    t4 = build_topology(t3, {"pg1": primary(0, in_recovery=True)}, generation=1, now=1.3)
    assert any(level == logging.ERROR and "pg1" in m and "in recovery" in m for level, m in describe_changes(t3, t4))
