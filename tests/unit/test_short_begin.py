"""A lone BEGIN of an idle session is answered on the short path (ClientSession._common_unit)
exactly as the general path (ClientSession._process) answers it: the same reply, the same
session state, and the same bytes to the server for the statements after it. Real
ClientSession and ServerConnection; loadtest.microbench's transports record the bytes."""

from __future__ import annotations

import asyncio

import pytest

from loadtest import microbench as mb
from proxy import wire

T = ord("T")


def taken(transport) -> bytes:
    out = b"".join(transport.out)
    transport.out.clear()
    return out


def replay(script: list[bytes], general: bool) -> list[tuple]:
    """Send each client message (by the general path only, if `general`), answer what
    reaches a server with one CommandComplete and ReadyForQuery per Query sent, and
    record what the client and the server got."""
    seen: list[tuple] = []

    async def go():
        app, session, servers = mb.build(False)
        for msg in script:
            if general:
                session._process(msg)
            else:
                session.data_received(msg)
            server = session.server
            sent = taken(server.transport) if server is not None else b""
            seen.append((taken(session.transport), session.status, session.tx.deferred_begin, sent))
            if server is not None:
                queries = sent.count(b"Q\0\0\0")
                status = b"I" if b"COMMIT" in sent else b"T"
                server.data_received((wire.command_complete("X") + wire.ready_for_query(T)) * (queries - 1)
                                     + wire.command_complete("X") + wire.ready_for_query(status[0]))
                seen.append((taken(session.transport), session.status, session.server is None))

    asyncio.run(go())
    return seen


SCRIPTS = {
    "begin, a statement, commit": ["BEGIN", "UPDATE t SET n = 1", "COMMIT"],
    "begin with a trailing semicolon": ["begin;", "SELECT 1", "END"],
    "begin inside a begun transaction goes to the server": ["BEGIN", "BEGIN", "COMMIT"],
    "start transaction": ["START TRANSACTION", "SELECT 1", "ROLLBACK"],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_short_path_answers_begin_as_the_general_path_does(name):
    script = [wire.query(sql) for sql in SCRIPTS[name]]
    short, general = replay(script, general=False), replay(script, general=True)
    assert short == general
    assert short[0] == (wire.command_complete("BEGIN") + wire.ready_for_query(T), T,
                        wire.parse_query(script[0][5:]), b"")


def test_a_begin_inside_a_begun_transaction_is_not_answered_again():
    script = [wire.query("BEGIN"), wire.query("BEGIN"), wire.query("COMMIT")]
    second = replay(script, general=False)[1]
    # the server gets the deferred BEGIN and the client's own (PostgreSQL warns about it)
    assert second[0] == b"" and second[3] == wire.query("BEGIN") + wire.query("BEGIN")
