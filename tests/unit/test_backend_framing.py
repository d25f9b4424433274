"""Server replies cut at every byte position, through a real ClientSession and
ServerConnection (loadtest.microbench's transports record the bytes instead of sending
them): the client gets exactly the server's replies for its own messages, every step ends
at its ReadyForQuery, and the connection goes back to the pool. A read from a socket can
end anywhere, mid-message included."""

from __future__ import annotations

import asyncio

import pytest

from loadtest import microbench as mb
from proxy import wire

T = ord("T")


def execute() -> bytes:
    return wire.message(wire.F_EXECUTE, b"\0\0\0\0\0")


def taken(transport) -> bytes:
    out = b"".join(transport.out)
    transport.out.clear()
    return out


def feed(conn, data: bytes, cuts) -> None:
    pos = 0
    for cut in [*cuts, len(data)]:
        if cut > pos:
            conn.data_received(data[pos:cut])
            pos = cut


def run(coro_fn):
    async def go():
        coro_fn()
    asyncio.run(go())


REPLY = (wire.row_description(["a"]) + wire.data_row(["x" * 40]) + wire.data_row(["y" * 3])
         + wire.command_complete("SELECT 2") + wire.ready_for_query())


@pytest.mark.parametrize("cut", range(1, len(REPLY)))
def test_a_reply_cut_anywhere_ends_its_step(cut):
    def body():
        app, session, servers = mb.build(False)
        session.data_received(wire.query("SELECT a FROM t"))
        conn = session.server
        taken(conn.transport)
        feed(conn, REPLY, [cut])
        assert taken(session.transport) == REPLY
        assert not conn.steps and session.server is None  # the step ended, the connection went back
        session.data_received(wire.query("SELECT 1"))  # and the next unit starts clean
        feed(session.server, REPLY, [])
        assert taken(session.transport) == REPLY and session.server is None
    run(body)


def _prepared_in_transaction(cut_first: tuple[int, ...], cut_second: tuple[int, ...]) -> None:
    """asyncpg's shape: two named statements prepared (Parse, Describe, Sync), BEGIN
    (answered by the proxy), then Bind/Execute/Sync of each inside the transaction on a
    connection that has never seen them: each Parse goes out ahead of its Bind and its
    ParseComplete must not reach the client."""
    app, session, servers = mb.build(False)
    p = servers["p"]
    for name, sql in ((b"s1", b"INSERT INTO t VALUES (1) RETURNING id"), (b"s2", b"UPDATE c SET n = n + 1")):
        session.data_received(wire.build_parse(name, sql, b"\0\0") + wire.message(wire.F_DESCRIBE, b"S" + name + b"\0")
                              + wire.SYNC)
        p.data_received(wire.PARSE_COMPLETE + wire.message(ord("t"), b"\0\0") + wire.message(ord("n"))
                        + wire.ready_for_query())
        taken(session.transport)
        taken(p.transport)
    p.prepared.clear()  # as if the pool lent a connection that has never seen them
    session.data_received(wire.query("BEGIN"))
    assert taken(session.transport).endswith(wire.ready_for_query(T))
    session.data_received(wire.build_bind(b"", b"s1", b"\0\0\0\0\0\0") + execute() + wire.SYNC)
    assert taken(p.transport).count(b"INSERT INTO t") == 1
    row = wire.data_row(["7"])
    feed(p, wire.command_complete("BEGIN") + wire.ready_for_query(T) + wire.PARSE_COMPLETE + wire.BIND_COMPLETE
         + row + wire.command_complete("INSERT 0 1") + wire.ready_for_query(T), cut_first)
    assert taken(session.transport) == wire.BIND_COMPLETE + row + wire.command_complete("INSERT 0 1") \
        + wire.ready_for_query(T)
    session.data_received(wire.build_bind(b"", b"s2", b"\0\0\0\0\0\0") + execute() + wire.SYNC)
    assert taken(p.transport).count(b"UPDATE c SET") == 1
    feed(p, wire.PARSE_COMPLETE + wire.BIND_COMPLETE + wire.command_complete("UPDATE 1") + wire.ready_for_query(T),
         cut_second)
    assert taken(session.transport) == wire.BIND_COMPLETE + wire.command_complete("UPDATE 1") + wire.ready_for_query(T)
    session.data_received(wire.query("COMMIT"))
    feed(p, wire.command_complete("COMMIT") + wire.ready_for_query(), [])
    assert taken(session.transport) == wire.command_complete("COMMIT") + wire.ready_for_query()
    assert session.server is None and not p.steps


FIRST_LEN = 17 + 5 + 5 + 12 + 16 + 6  # BEGIN's C and Z, 1, 2, D, C, Z


@pytest.mark.parametrize("cut", range(1, FIRST_LEN))
def test_statements_prepared_inside_a_transaction_with_replies_cut_anywhere(cut):
    run(lambda: [_prepared_in_transaction((cut,), (c,)) for c in range(1, 30)])  # the second reply is 30 bytes
