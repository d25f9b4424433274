"""The reply loop of a server connection against a recording StepOwner: no session, no
socket (loadtest.microbench's transport records what the proxy writes to the server)."""

from __future__ import annotations


import pytest

from loadtest.microbench import FakeTransport
from proxy import wire
from proxy.server.connection import ServerConnection
from proxy.server.replies import ForwardStep, LocalStep, Step, SwallowStep

T = ord("T")


class RecordingOwner:
    """A StepOwner that keeps what the connection told it."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.ready: list[Step] = []
        self.lost: list[list[ForwardStep]] = []
        self.paused: list[str] = []
        self.stmts: dict = {}

    def unit_ready(self, conn, step: Step) -> None:
        self.ready.append(step)

    def server_lost(self, conn, exc, pending: list[ForwardStep]) -> None:
        self.lost.append(pending)

    def pause_reading(self, reason: str) -> None:
        self.paused.append(reason)

    def resume_reading(self, reason: str) -> None:
        self.paused.remove(reason)


def lent() -> tuple[ServerConnection, RecordingOwner]:
    conn = ServerConnection("r", "127.0.0.1", 1, "app", "app")
    conn.connection_made(FakeTransport())
    owner = RecordingOwner()
    conn.attach(owner, owner.out.append)
    return conn, owner


SELECT_REPLY = (wire.row_description(["a"]) + wire.data_row(["1"]) + wire.command_complete("SELECT 1")
                + wire.ready_for_query())


def test_forwarded_replies_reach_the_owner_and_end_the_step():
    conn, owner = lent()
    step = ForwardStep()
    conn.push(step)
    conn.data_received(SELECT_REPLY)
    assert b"".join(owner.out) == SELECT_REPLY
    assert owner.ready == [step] and not conn.steps
    assert step.error is None and step.retry_reason is None


def test_swallowed_replies_go_to_the_callback_only():
    conn, owner = lent()
    seen: list[SwallowStep] = []
    step = conn.swallow(wire.query("SELECT 1"), seen.append, rows=True)
    assert conn.transport.out == [wire.query("SELECT 1")]
    conn.data_received(SELECT_REPLY)
    assert seen == [step] and step.rows == [wire.data_row(["1"])[5:]]
    assert owner.out == [] and owner.ready == []


def test_a_local_answer_waits_for_the_units_before_it():
    conn, owner = lent()
    first = ForwardStep()
    conn.push(first)
    answer = LocalStep(wire.command_complete("SET"))
    conn.push(answer)
    assert owner.out == []  # its turn has not come
    conn.data_received(wire.command_complete("BEGIN") + wire.ready_for_query(T))
    assert b"".join(owner.out) == (wire.command_complete("BEGIN") + wire.ready_for_query(T)
                                   + wire.command_complete("SET") + wire.ready_for_query(T))
    assert owner.ready == [first, answer] and answer.status == T


def test_a_refused_read_is_dropped_with_its_reason():
    conn, owner = lent()
    step = ForwardStep()
    step.retry = wire.query("SELECT 1")
    conn.push(step)
    error = wire.error_response("25006", "cannot execute UPDATE in a read-only transaction")
    conn.data_received(error + wire.ready_for_query())
    assert owner.out == []  # nothing reached the client: the session sends it elsewhere
    assert step.retrying and step.retry_reason == "25006" and owner.ready == [step]


def test_an_error_that_cannot_be_retried_reaches_the_client():
    conn, owner = lent()
    step = ForwardStep()
    step.retry = wire.query("SELECT x")
    conn.push(step)
    error = wire.error_response("42703", "column \"x\" does not exist")
    conn.data_received(error + wire.ready_for_query())
    assert b"".join(owner.out) == error + wire.ready_for_query()
    assert not step.retrying and step.retry_reason is None and step.error["C"] == "42703"


def test_a_detached_connection_writes_nowhere():
    conn, owner = lent()
    conn.detach(owner)
    conn.push(ForwardStep())
    conn.data_received(SELECT_REPLY)
    assert owner.out == [] and owner.ready == [] and not conn.steps


def test_write_pressure_pauses_the_owner():
    conn, owner = lent()
    conn.pause_writing()
    assert owner.paused == ["server"]
    conn.resume_writing()
    assert owner.paused == []


def test_a_lost_connection_hands_back_the_units_in_flight():
    conn, owner = lent()
    seen: list[SwallowStep] = []
    conn.swallow(wire.query("SET a = 1"), seen.append)
    unit = ForwardStep()
    conn.push(unit)
    conn.connection_lost(None)
    assert owner.lost == [[unit]]
    assert seen and seen[0].error["C"] == "08006"


@pytest.mark.parametrize("length", [0x80000010, 0xFFFFFFFF])
def test_a_length_past_two_gigabytes_streams_through_as_the_head_of_one_long_message(length):
    """Compiled, the reply loop frames with C integers: a length whose high bit is set
    must stay the large positive number it is (a C int overflowing to a negative one
    froze the event loop in an endless loop, or raised IndexError)."""
    conn, owner = lent()
    step = ForwardStep()
    conn.push(step)
    head = bytes([ord("D")]) + length.to_bytes(4, "big") + b"x" * 11
    conn.data_received(head)  # returns: the message goes through as it arrives
    assert b"".join(owner.out) == head
    assert conn._skip == 1 + length - len(head)
    assert conn.steps[0] is step and not owner.ready
