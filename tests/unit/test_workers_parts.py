"""The parts of `pgsplit run --workers N` that need no server: the control channel over a
real socket pair, the metrics of many processes added up, the cancel key's worker
number, and a worker's monitor installing the supervisor's snapshots."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from types import SimpleNamespace

import pytest

from metrics import Metrics, counters_only, merge_snapshots, render
from proxy.admin.operations import AdminOps
from proxy.dataplane import DrainReport
from proxy.listener import new_cancel_key
from proxy.workers.channel import Channel, ChannelClosed, RemoteError
from proxy.workers.follower import FollowerMonitor
from router.monitor.lag import initial_topology
from router.monitor.probe import MonitorSettings
from router.topology import BackendSpec, Role, TopologyHolder


# --- the channel ----------------------------------------------------------------------------------

async def channel_pair(left_handlers: dict, right_handlers: dict) -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a, left_handlers, name="left"), Channel(b, right_handlers, name="right")
    await left.start()
    await right.start()
    return left, right


async def test_requests_go_both_ways_and_are_answered_in_kind():
    async def slow_double(n):
        await asyncio.sleep(0.01)
        return 2 * n

    def refuse():
        raise ValueError("not paused")

    seen = []
    left, right = await channel_pair({"echo": lambda x: x}, {"double": slow_double, "refuse": refuse,
                                                            "note": seen.append})
    try:
        assert await left.request("double", 21, timeout=2) == 42
        assert await right.request("echo", {"a": (1, b"x")}, timeout=2) == {"a": (1, b"x")}
        answers = await asyncio.gather(*(left.request("double", i, timeout=2) for i in range(50)))
        assert answers == [2 * i for i in range(50)]
        with pytest.raises(RemoteError, match="not paused") as caught:
            await left.request("refuse", timeout=2)
        assert caught.value.kind == "ValueError"
        left.notify("note", "first")
        left.notify("note", "second")
        assert await left.request("double", 0, timeout=2) == 0
        assert seen == ["first", "second"]  # (in order with everything else)
    finally:
        await left.aclose()
        await right.aclose()


async def test_a_request_has_a_deadline_and_a_closed_end_fails_every_waiter():
    never = asyncio.Event()

    async def hang():
        await never.wait()

    left, right = await channel_pair({}, {"hang": hang})
    try:
        with pytest.raises(TimeoutError, match="did not answer 'hang'"):
            await left.request("hang", timeout=0.1)
        waiting = asyncio.ensure_future(left.request("hang", timeout=10))
        await asyncio.sleep(0.05)
        await right.aclose()  # (the other process died)
        with pytest.raises(ChannelClosed):
            await asyncio.wait_for(waiting, 2)
        assert left.closed.is_set()
        with pytest.raises(ChannelClosed):
            await left.request("hang", timeout=1)
    finally:
        await left.aclose()


async def test_a_channel_whose_other_end_died_says_so_at_once_and_never_raises_on_send():
    """The first write to a dead worker closes the transport; until the read loop runs,
    the channel must not look open (a fan-out that raised there stopped halfway: a pause
    that held some workers and could never be resumed)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left = Channel(a, {}, name="left")
    await left.start()
    b.close()  # (the worker died)
    try:
        sent = [left.notify("hold") for _ in range(3)]  # no await in between: the read loop has not run
        assert sent[1:] == [False, False] and not left.is_open
        with pytest.raises(ChannelClosed):
            await left.request("drain", timeout=1)
    finally:
        await left.aclose()


# --- RESUME with workers: the release comes before asking them for their counts ------------------

class _Plane:
    def __init__(self):
        self.holding, self.held_units, self.paused_at = False, 0, None

    def hold(self):
        self.holding = True

    async def drain(self, timeout, *, cancel_idle_in_transaction=False):
        return DrainReport(0.0, 0, 0)

    def release(self):
        self.holding = False
        return 0.0


class _Supervised:
    """What AdminOps uses of a supervisor's process: its refresh asks every worker (it yields)."""

    def __init__(self):
        self.dataplane = _Plane()
        self.config = SimpleNamespace(cutover=SimpleNamespace(pause_timeout_s=1.0))

    async def refresh(self):
        await asyncio.sleep(0.02)


async def test_two_resumes_at_once_release_one_pause_and_the_other_is_refused():
    """Had RESUME awaited the workers' counts before releasing, a second RESUME in flight
    would pass its checks too, and release the next PAUSE taken in between."""
    ops = AdminOps(_Supervised())
    await ops.pause()
    first, second = await asyncio.gather(ops.resume(), ops.resume(), return_exceptions=True)
    assert first["resumed"] is True
    assert isinstance(second, ValueError) and "not paused" in str(second)


# --- metrics of many processes -----------------------------------------------------------------------

def _value(text: bytes, line_start: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in the exposition")


def test_counters_and_per_worker_gauges_add_up_and_the_monitors_gauges_do_not():
    supervisor, w0, w1 = Metrics(), Metrics(), Metrics()
    supervisor.backend_up.labels("p", "primary").set(1)
    for worker, n in ((w0, 3), (w1, 4)):
        for _ in range(n):
            worker.units.record("r1", "replica", "read", 0.002)
        worker.retries.labels("25006").inc(n)
        worker.client_counts = lambda n=n: {"idle": n}
        worker.backend_up.labels("p", "primary").set(1)  # (a worker's stale copy must not add up)
    text = render(merge_snapshots(supervisor.snapshot(), [w0.snapshot(), w1.snapshot()]))
    assert _value(text, 'pgsplit_units_total{backend="r1",kind="read",role="replica"}') == 7
    assert _value(text, 'pgsplit_unit_duration_seconds_count{role="replica"}') == 7
    assert _value(text, 'pgsplit_retries_total{reason="25006"}') == 7
    assert _value(text, 'pgsplit_client_connections{state="idle"}') == 7
    assert _value(text, 'pgsplit_backend_up{backend="p",role="primary"}') == 1
    assert text.count(b"# TYPE pgsplit_units_total counter") == 1


def test_a_dead_workers_counters_stay_and_its_gauges_go():
    worker = Metrics()
    worker.units.record("r1", "replica", "read", 0.002)
    worker.client_counts = lambda: {"idle": 5}
    retired = merge_snapshots([], [counters_only(worker.snapshot())])
    text = render(merge_snapshots(Metrics().snapshot(), [retired]))
    assert _value(text, 'pgsplit_units_total{backend="r1",kind="read",role="replica"}') == 1
    assert b'pgsplit_client_connections{state="idle"} 5' not in text


# --- the cancel key ----------------------------------------------------------------------------------

def test_a_workers_cancel_keys_carry_its_number_in_the_low_byte():
    for worker in (0, 1, 7, 255):
        for _ in range(50):
            process_id, secret = new_cancel_key(worker)
            assert process_id & 0xFF == worker and 0 <= process_id <= 0x7FFFFFFF and len(secret) == 4
    assert len({new_cancel_key()[0] & 0xFF for _ in range(500)}) > 100  # (one process: all 31 bits random)


# --- a worker's monitor --------------------------------------------------------------------------------

SPECS = [BackendSpec("p", "127.0.0.1", 1, Role.PRIMARY), BackendSpec("r", "127.0.0.1", 2, Role.REPLICA)]
OTHER = [BackendSpec("q", "127.0.0.1", 3, Role.PRIMARY)]


def follower() -> FollowerMonitor:
    holder = TopologyHolder(initial_topology("main", SPECS))
    return FollowerMonitor(holder, SPECS, MonitorSettings(user="m", password="x", dbname="postgres"))


def with_replay(topo, lsn):
    return topo.with_backend(replace(topo.backend("r"), replay_lsn=lsn))


async def test_a_worker_installs_its_sets_snapshots_never_older_and_keeps_what_it_learnt():
    monitor = follower()
    base = monitor.holder.current
    pushed = with_replay(initial_topology("main", SPECS, base.generation), 100)
    monitor.install_pushed(pushed)
    assert monitor.holder.current.backend("r").replay_lsn == 100
    # this worker's replay wait learnt 150; the supervisor's next round still says 120
    monitor.holder.install(with_replay(monitor.holder.current, 150))
    monitor.install_pushed(with_replay(pushed, 120))
    assert monitor.holder.current.backend("r").replay_lsn == 150
    # an older generation is dropped; another set waits for its swap
    newer = initial_topology("main", SPECS, base.generation + 2)
    monitor.install_pushed(newer)
    monitor.install_pushed(initial_topology("main", SPECS, base.generation + 1))
    assert monitor.holder.current is newer
    other = initial_topology("next", OTHER, base.generation + 3)
    monitor.install_pushed(other)
    assert monitor.holder.current is newer
    monitor.expect(other)
    assert await monitor.retarget("next", OTHER) is other
    assert monitor.primary_spec() == OTHER[0]
    await monitor.stop()
