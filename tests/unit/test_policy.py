"""router.policy.decide_route on router.topology snapshots: one row per rule of the
module docstring, plus properties that must hold for every snapshot."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy import Decision, SessionFacts, UnitFacts, decide_route, replica_to_check
from router.topology import BackendState, Role, Topology

# Hypothesis' pytest plugin imports libcst (hypothesis.extra._patching) to print a patch for a
# failing example. libcst 1.0 emits a DeprecationWarning on import (mypy_extensions.TypedDict),
# which filterwarnings=error turns into an INTERNALERROR that ends the whole run instead of
# reporting the failure. Import it once here with that warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

P, R = Role.PRIMARY, Role.REPLICA


def primary(**kw) -> BackendState:
    kw.setdefault("in_recovery", False)
    return BackendState("pg1", "10.0.0.1", 5432, P, **kw)


def replica(n: int, **kw) -> BackendState:
    kw.setdefault("in_recovery", True)
    return BackendState(f"pg{n}", f"10.0.0.{n}", 5432, R, **kw)


def topo(p: BackendState | None = None, *replicas: BackendState, split_brain: bool = False) -> Topology:
    return Topology(generation=1, cluster="main", primary=p or primary(), replicas=replicas,
                    split_brain=split_brain)


TWO = (replica(2), replica(3))

READ, WRITE = UnitFacts(writes=False), UnitFacts(writes=True)
READ_P, WRITE_P = UnitFacts(False, hint=P), UnitFacts(True, hint=P)
READ_R, WRITE_R = UnitFacts(False, hint=R), UnitFacts(True, hint=R)
FREE, PINNED = SessionFacts(), SessionFacts(force_primary=True)


def tok(lsn: int) -> SessionFacts:
    return SessionFacts(token=lsn)


@dataclass
class Row:
    id: str
    unit: UnitFacts
    session: SessionFacts
    topo: Topology
    expect: str | None  # backend name, or None
    error: str | None = None  # SQLSTATE
    wait_lsn: int | None = None
    load: dict[str, int] = field(default_factory=dict)
    tiebreak: int = 0
    allow_wait: bool = True


ROWS = [
    # 1. pinned / SET pgsplit.route = 'primary' / primary hint -> primary
    Row("pinned read -> primary", READ, PINNED, topo(None, *TWO), "pg1"),
    Row("pinned write -> primary", WRITE, PINNED, topo(None, *TWO), "pg1"),
    Row("pinned read with a token -> primary", READ, SessionFacts(True, token=10), topo(None, *TWO), "pg1"),
    Row("primary hint read -> primary", READ_P, FREE, topo(None, *TWO), "pg1"),
    Row("primary hint write -> primary", WRITE_P, FREE, topo(None, *TWO), "pg1"),
    # 2. replica hint -> a replica, whatever the statement
    Row("replica hint read -> replica", READ_R, FREE, topo(None, *TWO), "pg2"),
    Row("replica hint write -> replica", WRITE_R, FREE, topo(None, *TWO), "pg2"),
    Row("replica hint, least loaded", READ_R, FREE, topo(None, *TWO), "pg3", load={"pg2": 4, "pg3": 1}),
    Row("replica hint, no replica in rotation -> primary", READ_R, FREE,
        topo(None, replica(2, in_rotation=False)), "pg1"),
    Row("replica hint write, no replica -> primary", WRITE_R, FREE, topo(None), "pg1"),
    Row("primary hint beats replica rules even with replicas idle", READ_P, FREE, topo(None, replica(2)), "pg1"),
    # 3. writes -> primary
    Row("write -> primary", WRITE, FREE, topo(None, *TWO), "pg1"),
    Row("write with a token -> primary", WRITE, tok(1 << 40), topo(None, *TWO), "pg1"),
    Row("write, no replicas -> primary", WRITE, FREE, topo(None), "pg1"),
    # 4. reads -> replicas
    Row("read -> replica", READ, FREE, topo(None, *TWO), "pg2"),
    Row("read, no replicas configured -> primary", READ, FREE, topo(None), "pg1"),
    Row("read, replicas out of rotation -> primary", READ, FREE,
        topo(None, replica(2, in_rotation=False), replica(3, in_rotation=False)), "pg1"),
    Row("read, replicas down -> primary", READ, FREE,
        topo(None, replica(2, up=False), replica(3, up=False)), "pg1"),
    Row("read skips the replica out of rotation", READ, FREE,
        topo(None, replica(2, in_rotation=False), replica(3)), "pg3"),
    Row("read skips the replica that is down", READ, FREE, topo(None, replica(2, up=False), replica(3)), "pg3"),
    # read-your-writes
    Row("token: the replica that has replayed it", READ, tok(200),
        topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=250)), "pg3"),
    Row("token: replay_lsn == token is enough", READ, tok(200),
        topo(None, replica(2, replay_lsn=199), replica(3, replay_lsn=200)), "pg3"),
    Row("token: caught-up replica wins even when busier", READ, tok(200),
        topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=300)), "pg3", load={"pg2": 0, "pg3": 50}),
    Row("token: least loaded among caught-up replicas", READ, tok(200),
        topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=300), replica(4, replay_lsn=301)), "pg4",
        load={"pg3": 5, "pg4": 1}),
    Row("token: replicas behind -> wait", READ, tok(200),
        topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=150)), None, wait_lsn=200),
    Row("token: unknown replay LSN counts as behind -> wait", READ, tok(200),
        topo(None, replica(2), replica(3)), None, wait_lsn=200),
    Row("token: replicas behind, no wait -> primary", READ, tok(200),
        topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=150)), "pg1", allow_wait=False),
    Row("token: a caught-up replica out of rotation is not used", READ, tok(200),
        topo(None, replica(2, replay_lsn=500, in_rotation=False), replica(3, replay_lsn=100)), "pg1",
        allow_wait=False),
    Row("token: no replica in rotation -> primary, no wait", READ, tok(200),
        topo(None, replica(2, replay_lsn=500, up=False)), "pg1"),
    # load balancing
    Row("least loaded replica", READ, FREE, topo(None, *TWO), "pg3", load={"pg2": 3, "pg3": 1}),
    Row("missing load counts as idle", READ, FREE, topo(None, *TWO), "pg3", load={"pg2": 1}),
    Row("weight: heavier replica takes more load", READ, FREE,
        topo(None, replica(2, weight=4.0), replica(3)), "pg2", load={"pg2": 2, "pg3": 0}),
    Row("weight: lighter replica once the heavy one is busy enough", READ, FREE,
        topo(None, replica(2, weight=4.0), replica(3)), "pg3", load={"pg2": 4, "pg3": 0}),
    Row("weight: idle heavier replica first", READ, FREE,
        topo(None, replica(2), replica(3, weight=2.0)), "pg3"),
    Row("tie, tiebreak 0", READ, FREE, topo(None, *TWO), "pg2", tiebreak=0),
    Row("tie, tiebreak 1", READ, FREE, topo(None, *TWO), "pg3", tiebreak=1),
    Row("tie, tiebreak 2 wraps", READ, FREE, topo(None, *TWO), "pg2", tiebreak=2),
    Row("tiebreak only among the tied best", READ, FREE, topo(None, replica(2), replica(3), replica(4)), "pg4",
        load={"pg2": 1, "pg3": 0, "pg4": 0}, tiebreak=1),
    # 5. the primary's health
    Row("write, primary down -> 57P03", WRITE, FREE, topo(primary(up=False, error="timeout"), *TWO), None,
        error="57P03"),
    Row("pinned write, primary down -> 57P03", WRITE, PINNED, topo(primary(up=False), *TWO), None, error="57P03"),
    Row("write, primary in recovery -> 57P03", WRITE, FREE, topo(primary(in_recovery=True), *TWO), None,
        error="57P03"),
    Row("write, split brain -> 57P03", WRITE, FREE, topo(None, *TWO, split_brain=True), None, error="57P03"),
    Row("primary-hinted write, split brain -> 57P03", WRITE_P, FREE, topo(None, *TWO, split_brain=True), None,
        error="57P03"),
    Row("read, split brain -> replica", READ, FREE, topo(None, *TWO, split_brain=True), "pg2"),
    Row("read with token, split brain -> caught-up replica", READ, tok(5),
        topo(None, replica(2, replay_lsn=1), replica(3, replay_lsn=9), split_brain=True), "pg3"),
    Row("read, primary down -> replica", READ, FREE, topo(primary(up=False), *TWO), "pg2"),
    Row("read, primary down, no rotation -> a replica that is up", READ, FREE,
        topo(primary(up=False), replica(2, up=False), replica(3, in_rotation=False)), "pg3"),
    Row("replica hint, primary down, no rotation -> a replica that is up", READ_R, FREE,
        topo(primary(up=False), replica(2, up=False), replica(3, in_rotation=False)), "pg3"),
    Row("read, everything down -> 57P03", READ, FREE,
        topo(primary(up=False), replica(2, up=False), replica(3, up=False)), None, error="57P03"),
    Row("read, primary down, no replicas -> 57P03", READ, FREE, topo(primary(up=False)), None, error="57P03"),
    Row("write, everything down -> 57P03", WRITE, FREE,
        topo(primary(up=False), replica(2, up=False)), None, error="57P03"),
    Row("read, primary in recovery still serves reads", READ, FREE, topo(primary(in_recovery=True)), "pg1"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_rule(row: Row):
    d = decide_route(row.unit, row.session, row.topo, row.load, tiebreak=row.tiebreak, allow_wait=row.allow_wait)
    assert isinstance(d, Decision)
    assert (d.backend.name if d.backend else None) == row.expect, d.reason
    assert (d.error[0] if d.error else None) == row.error, d
    assert d.wait_lsn == row.wait_lsn, d
    assert d.reason
    if d.backend is not None:
        assert d.backend is row.topo.backend(d.backend.name)  # the snapshot's own object
        assert d.role is d.backend.role
        assert d.backend.up
    else:
        assert d.role is None
    if row.error is not None:
        assert d.error[1]


def test_primary_down_error_names_the_primary():
    t = topo(primary(up=False, error="connection refused"), *TWO)
    d = decide_route(WRITE, FREE, t, {})
    assert d.backend is None and d.error[0] == "57P03"
    assert "pg1" in d.error[1] and "10.0.0.1:5432" in d.error[1] and "connection refused" in d.error[1]


def test_primary_in_recovery_error_names_the_primary():
    d = decide_route(WRITE, FREE, topo(primary(in_recovery=True)), {})
    assert d.error[0] == "57P03" and "pg1" in d.error[1] and "recovery" in d.error[1]


def test_split_brain_error_says_so():
    d = decide_route(WRITE, FREE, topo(None, *TWO, split_brain=True), {})
    assert d.error[0] == "57P03" and "split brain" in d.error[1] and "main" in d.error[1]


def test_all_down_error_names_cluster_and_primary():
    d = decide_route(READ, FREE, topo(primary(up=False), replica(2, up=False)), {})
    assert d.error[0] == "57P03" and "pg1" in d.error[1] and "main" in d.error[1]


def test_read_with_token_primary_down_is_never_stale():
    """Design: "A stale read is a bug, never a trade-off." With the primary down and the only
    answering replica behind the session's token, the read must not go to that replica."""
    t = topo(primary(up=False), replica(2, replay_lsn=100))
    d = decide_route(READ, tok(200), t, {}, allow_wait=False)
    assert d.backend is None or d.backend.replay_lsn is not None and d.backend.replay_lsn >= 200, d
    # Same with the lagging replica out of rotation (the fallback looks at every replica that is up).
    t = topo(primary(up=False), replica(2, replay_lsn=100, in_rotation=False))
    d = decide_route(READ, tok(200), t, {}, allow_wait=True)
    assert d.backend is None or d.backend.replay_lsn is not None and d.backend.replay_lsn >= 200, d


def test_weights_share_reads_proportionally():
    """Units that never finish: each pick adds one to the load. Shares follow the weights."""
    t = topo(None, replica(2, weight=1.0), replica(3, weight=3.0), replica(4, weight=2.0))
    load: dict[str, int] = {}
    for i in range(600):
        d = decide_route(READ, FREE, t, load, tiebreak=i)
        load[d.backend.name] = load.get(d.backend.name, 0) + 1
    assert abs(load["pg2"] - 100) <= 2 and abs(load["pg3"] - 300) <= 2 and abs(load["pg4"] - 200) <= 2


def test_tiebreak_spreads_equal_replicas():
    t = topo(None, replica(2), replica(3), replica(4))
    picks = Counter(decide_route(READ, FREE, t, {}, tiebreak=i).backend.name for i in range(30))
    assert picks == {"pg2": 10, "pg3": 10, "pg4": 10}


def test_pure_same_inputs_same_decision():
    t = topo(None, replica(2, replay_lsn=5), replica(3, replay_lsn=7))
    load = {"pg2": 1}
    first = decide_route(READ, tok(6), t, load, tiebreak=3)
    assert all(decide_route(READ, tok(6), t, load, tiebreak=3) == first for _ in range(5))
    assert load == {"pg2": 1}  # the load map is read, never written


# --- properties -------------------------------------------------------------------------

lsns = st.none() | st.integers(0, 1000)


@st.composite
def snapshots(draw) -> Topology:
    p = primary(up=draw(st.booleans()), in_recovery=draw(st.sampled_from([False, True, None])))
    n = draw(st.integers(0, 4))
    reps = tuple(
        replica(i + 2, up=draw(st.booleans()), in_rotation=draw(st.booleans()), replay_lsn=draw(lsns),
                weight=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])))
        for i in range(n)
    )
    return topo(p, *reps, split_brain=draw(st.booleans()))


units = st.builds(UnitFacts, writes=st.booleans(), hint=st.sampled_from([None, P, R]))
sessions = st.builds(SessionFacts, force_primary=st.booleans(), token=lsns)
loads = st.dictionaries(st.sampled_from(["pg1", "pg2", "pg3", "pg4", "pg5"]), st.integers(0, 20))
PROPS = settings(max_examples=1500, deadline=None)


@PROPS
@given(units, sessions, snapshots(), loads, st.integers(0, 100), st.booleans())
def test_property_writes_never_go_to_a_replica(unit, session, t, load, tiebreak, allow_wait):
    if not unit.writes or (unit.hint is R and not session.force_primary):
        return  # a replica hint sends even a write to a replica, by rule 2
    d = decide_route(unit, session, t, load, tiebreak=tiebreak, allow_wait=allow_wait)
    if d.backend is not None:
        assert d.backend is t.primary, d
        assert t.primary_writable, d  # only while it is up, not in recovery, no split brain
    else:
        assert d.error is not None and d.wait_lsn is None, d


@PROPS
@given(units, sessions, snapshots(), loads, st.integers(0, 100), st.booleans())
def test_property_token_reads_never_see_a_lagging_replica(unit, session, t, load, tiebreak, allow_wait):
    if unit.writes or session.token is None or unit.hint is R:
        return  # the replica hint is the application opting out (see module docstring, rule 2)
    d = decide_route(unit, session, t, load, tiebreak=tiebreak, allow_wait=allow_wait)
    if d.backend is not None and d.backend.role is R:
        assert d.backend.replay_lsn is not None and d.backend.replay_lsn >= session.token, d


@PROPS
@given(units, sessions, snapshots(), loads, st.integers(0, 100), st.booleans())
def test_property_decision_is_well_formed(unit, session, t, load, tiebreak, allow_wait):
    d = decide_route(unit, session, t, load, tiebreak=tiebreak, allow_wait=allow_wait)
    outcomes = [d.backend is not None, d.error is not None, d.wait_lsn is not None]
    assert sum(outcomes) == 1, d  # exactly one of: a backend, an error, a wait
    if d.backend is not None:
        assert d.backend.up and d.backend in t.backends
    if d.wait_lsn is not None:
        assert allow_wait and d.wait_lsn == session.token


def test_replica_to_check_is_the_furthest_along_then_the_least_loaded():
    ahead = topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=50), replica(4, replay_lsn=900, in_rotation=False))
    assert replica_to_check(ahead, {"pg2": 3, "pg3": 1}).name == "pg2"  # further along beats less loaded
    assert replica_to_check(topo(None, replica(2), replica(3, replay_lsn=1)), {}).name == "pg3"  # unknown is last
    level = topo(None, replica(2, replay_lsn=100), replica(3, replay_lsn=100))
    assert replica_to_check(level, {"pg2": 3, "pg3": 1}).name == "pg3"
    assert replica_to_check(level, {"pg2": 1, "pg3": 3}).name == "pg2"
    assert {replica_to_check(level, {}, tiebreak=k).name for k in range(4)} == {"pg2", "pg3"}
    assert replica_to_check(topo(None, replica(2, up=False), replica(3)), {}).name == "pg3"
    assert replica_to_check(topo(None, replica(2, up=False)), {}) is None
    assert replica_to_check(topo(), {}) is None


@PROPS
@given(units, sessions, snapshots(), loads, st.integers(0, 100))
def test_property_a_wait_always_has_a_replica_to_check(unit, session, t, load, tiebreak):
    d = decide_route(unit, session, t, load, tiebreak=tiebreak, allow_wait=True)
    if d.wait_lsn is not None:
        r = replica_to_check(t, load, tiebreak)
        assert r is not None and r in t.rotation, (d, r)
