"""The parts of a client session, each on its own (the transaction's transitions, the
carried state's catch-up, the token's rules, unit framing), and a real ClientSession
driven through tests/support's FakeSessionHost with recording transports."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, strategies as st

from proxy import wire
from proxy.server.prepared import StatementNames
from proxy.session.carried import CarriedState
from proxy.session.consistency import SessionToken, outcome
from proxy.session.transaction import Phase, Transaction, TransitionError
from proxy.session.units import extended_unit, is_lone_query, scan_unit, unit_facts
from router.classify.classifier import Classifier
from proxy.session.client import State
from proxy.config import parse_config
from tests.support.fakes import CONFIG, FakeSessionHost, new_session, taken

I, T, E = wire.TX_IDLE, wire.TX_IN_BLOCK, wire.TX_FAILED
classifier = Classifier(1000)


def analyse(sql: str):
    return classifier.classify(sql)


def execute() -> bytes:
    return wire.message(wire.F_EXECUTE, b"\0\0\0\0\0")


# --- transaction -------------------------------------------------------------------------


def test_a_deferred_begin_is_sent_once_and_the_server_then_decides():
    tx = Transaction()
    tx.begin_answered(b"BEGIN")
    assert (tx.phase, tx.status, tx.deferred_begin) == (Phase.DEFERRED, T, b"BEGIN")
    assert tx.begin_sent() == b"BEGIN"
    assert (tx.phase, tx.status, tx.deferred_begin) == (Phase.IN_BLOCK, T, None)
    tx.ready(E)
    assert (tx.phase, tx.status) == (Phase.FAILED, E)
    tx.ready(I)
    assert (tx.phase, tx.status) == (Phase.IDLE, I)


def test_an_error_answered_fails_an_open_block_and_leaves_an_idle_session_idle():
    tx = Transaction()
    tx.error_answered()
    assert tx.status == I
    tx.begin_answered(b"BEGIN")
    tx.error_answered()
    assert (tx.phase, tx.status, tx.deferred_begin) == (Phase.DEFERRED_FAILED, E, b"BEGIN")
    tx.end_answered()
    assert (tx.phase, tx.status, tx.deferred_begin) == (Phase.IDLE, I, None)


def test_a_rollback_by_the_proxy_lasts_until_the_client_ends_the_block():
    tx = Transaction()
    tx.ready(T)
    tx.rolled_back_here("the cutover")
    assert (tx.status, tx.aborted) == (E, "the cutover")
    tx.rollback_answered()
    assert (tx.status, tx.aborted) == (I, None)


@pytest.mark.parametrize("event", ["begin_sent", "end_answered", "rollback_answered"])
def test_an_event_the_phase_does_not_allow_fails_loudly(event):
    tx = Transaction()
    with pytest.raises(TransitionError):
        getattr(tx, event)()
    assert tx.status == I


def test_a_begin_inside_a_block_is_not_answered_again():
    tx = Transaction()
    tx.ready(T)
    with pytest.raises(TransitionError):
        tx.begin_answered(b"BEGIN")


def test_session_effects_in_a_transaction_wait_for_its_commit():
    carried = CarriedState(classifier.classify, StatementNames())
    tx = Transaction()
    step = SimpleNamespace(status=T, error=None, writes=False, role="primary",
                           analyses=[analyse("SET work_mem = '64MB'")])
    assert tx.after_unit(step, carried, None) is None
    assert "work_mem" not in carried.settings
    step = SimpleNamespace(status=I, error=None, writes=False, role="primary", analyses=[analyse("COMMIT")])
    tx.after_unit(step, carried, None)
    assert carried.settings["work_mem"].lower().startswith("set work_mem")


def test_a_write_that_ended_asks_for_its_commit_to_be_noted():
    carried = CarriedState(classifier.classify, StatementNames())
    tx = Transaction()
    step = SimpleNamespace(status=I, error=None, writes=True, role="primary", analyses=None)
    assert tx.after_unit(step, carried, None) is True  # (the default: commits may be asynchronous)
    carried.async_default = False
    assert tx.after_unit(step, carried, None) is False
    step.role = "replica"
    assert tx.after_unit(step, carried, None) is None


# --- carried state ------------------------------------------------------------------------


def test_a_connection_is_sent_the_settings_it_lacks_once():
    carried = CarriedState(classifier.classify, StatementNames())
    carried.startup({"application_name": "it's"})
    conn = SimpleNamespace(settings_key=(), sql_prepared={})
    replay = carried.settings_for(conn)
    assert replay == wire.query("RESET SESSION AUTHORIZATION;\nRESET ALL;\nSET application_name = 'it''s'")
    assert carried.settings_for(conn) is None
    carried.apply(analyse("SET work_mem = '64MB'"), None)
    assert b"work_mem" in carried.settings_for(conn)
    carried.apply(analyse("RESET ALL"), None)
    assert carried.settings_for(conn) == replay


def test_a_connection_is_sent_the_sql_prepared_statements_a_unit_executes():
    carried = CarriedState(classifier.classify, StatementNames())
    carried.apply(analyse("PREPARE q AS SELECT 1"), None)
    conn = SimpleNamespace(settings_key=(), sql_prepared={})
    assert carried.sql_prepares_for(conn, analyse("EXECUTE q")) == ["PREPARE q AS SELECT 1"]
    assert carried.sql_prepares_for(conn, analyse("EXECUTE q")) == []
    conn.sql_prepared["q"] = "PREPARE q AS SELECT 2"  # another client's, left there
    assert carried.sql_prepares_for(conn, analyse("EXECUTE q")) == ['DEALLOCATE "q";\nPREPARE q AS SELECT 1']


def test_pins_come_and_go_with_their_statements():
    carried = CarriedState(classifier.classify, StatementNames())
    carried.pin(analyse("LISTEN x"))
    assert carried.pins
    carried.pin(analyse("UNLISTEN *"))
    assert not carried.pins


# --- token -------------------------------------------------------------------------------


def test_a_read_after_a_commit_needs_its_lsn_fetched_then_carries_it():
    token = SessionToken("session")
    assert token.read_requirement(False) == (None, False)
    token.note_commit(7, False, 1.0)
    assert token.read_requirement(False) == (None, True)
    assert token.read_requirement(True) == (None, False)  # a write needs no token
    assert token.learned(100) == 100
    assert token.learned(50) == 100  # never goes back
    assert token.read_requirement(False) == (100, False)


def test_the_modes_of_the_token():
    token = SessionToken("token")
    token.min_lsn = 500
    assert token.read_requirement(False) == (500, False)
    assert token.learned(100) == 500
    token.mode = "global"
    assert token.read_requirement(False) == (None, True)
    token.mode = "eventual"
    assert token.read_requirement(False) == (None, False)
    token.restart(42)
    assert (token.lsn, token.min_lsn, token.pending) == (42, None, False)


def test_how_a_read_with_a_token_was_served():
    assert [outcome(True, False), outcome(True, True), outcome(False, True), outcome(False, False)] == \
        ["immediate", "waited", "fallback", "fallback"]


# --- units -------------------------------------------------------------------------------


def test_the_shapes_of_the_common_unit():
    assert is_lone_query(wire.query("SELECT 1"))
    assert not is_lone_query(wire.query("SELECT 1") + wire.query("SELECT 2"))
    parse = wire.build_parse(b"", b"SELECT $1", b"\0\0")
    bind = wire.build_bind(b"", b"", b"\0\0\0\0\0\0")
    ext = extended_unit(parse + bind + execute() + wire.SYNC, {})
    assert ext is not None and (ext.stmt, ext.sql, ext.described) == (None, b"SELECT $1", False)
    assert extended_unit(parse + bind + execute() + wire.FLUSH, {}) is None


def test_a_unit_ends_at_its_sync_and_waits_for_it():
    buf = wire.build_parse(b"", b"UPDATE t SET a = 1", b"\0\0") + wire.build_bind(b"", b"", b"\0\0\0\0\0\0")
    whole = buf + execute() + wire.SYNC
    frames, _ = wire.split_messages(whole)
    last, analyses, fcall = scan_unit(whole, frames, 0, lambda sql: analyse(sql.decode()), {}, None)
    assert (last, len(analyses), fcall) == (3, 2, False)  # the Bind runs the unnamed Parse's statement
    assert unit_facts(analyses, fcall, {}, False).writes
    more = whole + wire.query("SELECT 1")  # a unit behind it, cut short
    frames, _ = wire.split_messages(more + b"Q\0\0\0\x20SEL")
    assert scan_unit(more, frames, 0, lambda sql: analyse(sql.decode()), {}, None)[0] == 3


def test_an_execute_of_a_prepared_read_is_a_read():
    facts = unit_facts([analyse("EXECUTE q")], False, {"q": analyse("SELECT 1")}, False)
    assert not facts.writes


# --- a session through the fake host ------------------------------------------------------


def drive(script):
    async def go():
        await script()
    asyncio.run(go())


def test_a_read_runs_on_the_replica_and_its_connection_goes_back():
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.query("SELECT 1"))
        server = session.server
        assert server is host.servers["r"] and host.load == {"r": 1}
        assert taken(server.transport) == wire.query("SELECT 1")
        server.data_received(wire.command_complete("SELECT 1") + wire.ready_for_query())
        assert session.server is None and host.load == {"r": 0}
        assert host.pools["r"].released == [server]
        assert taken(session.transport) == wire.command_complete("SELECT 1") + wire.ready_for_query()
    drive(script)


def test_a_read_a_replica_refused_goes_to_the_primary_even_when_it_waits_for_a_connection():
    """A read the replica refuses as read-only (25006) runs again on the primary. When no
    primary connection is idle at that moment, the unit waits for one: it must still go
    to the primary then (deciding once to try, then again after the wait, must not lose
    the reason), not back to the replica that refused it."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.query("SELECT 1"))
        replica = session.server
        assert replica is host.servers["r"]
        taken(replica.transport)
        primary = host.pools["p"].idle.pop()  # lent to another client just now
        replica.data_received(wire.error_response("25006", "cannot execute nextval() in a read-only transaction")
                              + wire.ready_for_query())
        assert session.waiting and session.server is None
        host.pools["p"].idle.append(primary)  # given back
        await asyncio.gather(*host.tasks)
        assert session.server is primary
        assert taken(primary.transport) == wire.query("SELECT 1")
    drive(script)


def test_a_transaction_goes_to_the_primary_with_its_begin_ahead_and_its_commit_is_noted():
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.query("BEGIN"))
        assert session.status == T and session.server is None
        assert taken(session.transport) == wire.command_complete("BEGIN") + wire.ready_for_query(T)
        session.data_received(wire.query("SELECT 1"))
        server = session.server
        assert server is host.servers["p"]
        assert taken(server.transport) == wire.query("BEGIN") + wire.query("SELECT 1")
        server.data_received(wire.command_complete("BEGIN") + wire.ready_for_query(T)
                             + wire.command_complete("SELECT 1") + wire.ready_for_query(T))
        session.data_received(wire.query("INSERT INTO t VALUES (1)"))
        server.data_received(wire.command_complete("INSERT 0 1") + wire.ready_for_query(T))
        session.data_received(wire.query("COMMIT"))
        server.data_received(wire.command_complete("COMMIT") + wire.ready_for_query(I))
        assert session.status == I and session.server is None
        assert session.token.pending and host.consistency.tickets == 1
    drive(script)


def test_a_read_after_a_commit_fetches_the_token_from_the_host_then_reads_where_it_is_replayed():
    async def script():
        host = FakeSessionHost(replica_lsn=200)
        host.consistency.primary_lsn = 150
        session = new_session(host)
        session.token.note_commit(1, False, 0.0)
        session.data_received(wire.query("SELECT 1"))
        assert session.waiting and session.server is None
        await asyncio.gather(*host.tasks)
        assert not session.waiting and session.server is host.servers["r"]
        assert session.token.lsn == 150 and host.consistency.counted == ["immediate"]
    drive(script)


def test_a_session_setting_follows_the_client_to_the_next_connection():
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.query("SET work_mem = '64MB'"))
        server = session.server
        assert server is host.servers["r"]  # (a SET reads nothing)
        taken(server.transport)
        server.data_received(wire.command_complete("SET") + wire.ready_for_query(I))
        assert session.server is None and server.settings_key == session.carried.settings_key
        session.data_received(wire.query("INSERT INTO t VALUES (1)"))
        primary = host.servers["p"]
        assert session.server is primary
        replay = session.carried.settings_for(SimpleNamespace(settings_key=()))
        assert b"SET work_mem = '64MB'" in replay
        # the settings ahead of the write, in the same write (then the commit's LSN query)
        assert taken(primary.transport).startswith(replay + wire.query("INSERT INTO t VALUES (1)"))
    drive(script)


def test_the_activity_a_pause_waits_for():
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        assert session.activity() == (False, False)
        session.data_received(wire.query("BEGIN"))
        assert session.activity() == (False, False)  # (its BEGIN never left the proxy)
        session.data_received(wire.query("UPDATE t SET a = 1"))
        assert session.activity() == (True, False)
        session.server.data_received(wire.command_complete("BEGIN") + wire.ready_for_query(T)
                                     + wire.command_complete("UPDATE 1") + wire.ready_for_query(T))
        assert session.activity() == (False, True)
    drive(script)


# --- a server lost while the client's group is open ------------------------------------------


PREPARE = (wire.build_parse(b"", b"SELECT 1") + wire.build_target(wire.F_DESCRIBE, ord("S"), b"")
           + wire.FLUSH)
PREPARED = (wire.message(wire.B_PARSE_COMPLETE) + wire.message(wire.B_PARAM_DESCRIPTION, b"\0\0")
            + wire.message(wire.B_NO_DATA))
EXECUTE = wire.build_bind(b"", b"", b"\0\0\0\0\0\0") + execute() + wire.SYNC


def _error_codes(data: bytes) -> list[str]:
    frames, _ = wire.split_messages(data)
    return [wire.parse_fields(data[s + 5 : e])["C"] for t, s, e in frames if t == wire.B_ERROR]


def test_a_server_lost_between_a_prepare_and_its_execute_answers_the_execute():
    """asyncpg's shape: Parse, Describe, Flush, its replies, and (later) Bind, Execute,
    Sync. The connection lost in between: the client, waiting for nothing, is sent
    nothing then; its execute gets the error and a ReadyForQuery, and the session goes
    on with another connection."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(PREPARE)
        server = session.server
        assert taken(server.transport) == PREPARE
        server.data_received(PREPARED)
        assert taken(session.transport) == PREPARED
        server.connection_lost(None)
        await asyncio.gather(*host.tasks)
        assert taken(session.transport) == b"", "an ErrorResponse the client did not ask for"
        session.data_received(EXECUTE)
        reply = taken(session.transport)
        assert _error_codes(reply) == ["08006"] and reply.endswith(wire.ready_for_query(I)), reply
        assert session.state is State.READY and session.server is None
        fresh = host.pools["r"].add()
        session.data_received(wire.query("SELECT 1"))
        assert session.server is fresh
    drive(script)


def test_a_server_lost_while_the_client_waits_for_its_group_replies_answers_at_once():
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(PREPARE)
        server = session.server
        server.connection_lost(None)
        await asyncio.gather(*host.tasks)
        assert _error_codes(taken(session.transport)) == ["08006"]  # (no ReadyForQuery: the Sync is to come)
        session.data_received(EXECUTE)
        assert taken(session.transport) == wire.ready_for_query(I)
        assert session.state is State.READY
    drive(script)


# --- a Bind too large to hold whole ---------------------------------------------------------------


def test_a_large_bind_in_an_open_group_passes_through_renamed_as_it_arrives():
    """asyncpg's shape with a 2 MB parameter: Parse, Describe, Flush, then Bind, Execute,
    Sync, the Bind arriving in pieces. Its head goes out at once under the proxy's name
    for the statement, with the length of the message as renamed, and the rest of it as
    it comes; the proxy never holds the Bind whole."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        parse = wire.build_parse(b"s1", b"SELECT length($1::bytea)")
        session.data_received(parse + wire.build_target(wire.F_DESCRIBE, ord("S"), b"s1") + wire.FLUSH)
        server = session.server
        sent_parse = taken(server.transport)
        server_name = session.stmts[b"s1"].server_name
        assert server_name in sent_parse
        server.data_received(PREPARED)
        taken(session.transport)
        value = bytes(range(256)) * 8192  # 2 MiB
        rest = b"\0\0\0\1\0\0\0\0" + len(value).to_bytes(4, "big") + value + b"\0\0"
        bind = wire.build_bind(b"", b"s1", rest)
        tail = execute() + wire.SYNC
        data = bind + tail
        for cut in (300_000, 1_500_000):  # (a read brings a piece; the rest follows)
            session.data_received(data[:cut])
            data = data[cut:]
            assert len(session._stash) < 64 << 10 and not session._parts
        session.data_received(data)
        assert taken(server.transport) == wire.build_bind(b"", server_name, rest) + tail
    drive(script)


def test_a_large_bind_that_starts_its_unit_is_routed_from_its_head():
    """psycopg's prepare=True: Parse and Sync (answered by the proxy), later Bind,
    Describe, Execute, Sync with a 2 MB parameter. The unit is routed from the Bind's head
    (a read: the replica), the statement prepared there first, and the Bind streamed."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.build_parse(b"s2", b"SELECT length($1::bytea)") + wire.SYNC)
        assert taken(session.transport) == wire.PARSE_COMPLETE + wire.ready_for_query(I)
        st = session.stmts[b"s2"]
        value = bytes(range(256)) * 8192
        rest = b"\0\0\0\1\0\0\0\0" + len(value).to_bytes(4, "big") + value + b"\0\0"
        tail = wire.build_target(wire.F_DESCRIBE, ord("P"), b"") + execute() + wire.SYNC
        data = wire.build_bind(b"", b"s2", rest) + tail
        session.data_received(data[:200_000])
        server = session.server
        assert server is host.servers["r"] and len(session._stash) < 64 << 10 and not session._parts
        session.data_received(data[200_000:])
        assert taken(server.transport) == st.parse + wire.build_bind(b"", st.server_name, rest) + tail
        server.data_received(wire.message(wire.B_PARSE_COMPLETE) + wire.message(wire.B_BIND_COMPLETE)
                             + wire.message(wire.B_NO_DATA) + wire.command_complete("SELECT 1")
                             + wire.ready_for_query())
        assert taken(session.transport) == (wire.message(wire.B_BIND_COMPLETE) + wire.message(wire.B_NO_DATA)
                                            + wire.command_complete("SELECT 1") + wire.ready_for_query())
        assert session.server is None and host.pools["r"].released == [server]
    drive(script)


def _prepare_here(session, name: bytes, sql: bytes) -> None:
    session.data_received(wire.build_parse(name, sql) + wire.SYNC)
    taken(session.transport)


LONG_REST = b"\0\0\0\1\0\0\0\0" + (2 << 20).to_bytes(4, "big") + bytes(range(256)) * 8192 + b"\0\0"


def test_a_request_queued_ahead_never_lands_inside_a_streaming_bind():
    """A stale-plan error for an earlier Bind of the group arrives while a long Bind
    streams: the connection queues its Closes behind the group's Sync, with a Flush
    `ahead` of the next request. The rest of the Bind is not a request: it goes out as
    it is, and the server reads the Bind intact."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        _prepare_here(session, b"a", b"SELECT * FROM t")
        _prepare_here(session, b"b", b"SELECT length($1::bytea)")
        head = wire.build_bind(b"", b"a", b"\0\0\0\0\0\0") + execute()
        data = head + wire.build_bind(b"", b"b", LONG_REST) + execute() + wire.SYNC
        cut = len(head) + 1_100_000
        session.data_received(data[:cut])
        server = session.server
        assert session._skip
        server.data_received(wire.message(wire.B_PARSE_COMPLETE) + wire.fields_response(
            {"S": "ERROR", "V": "ERROR", "C": "0A000", "M": "cached plan must not change result type",
             "R": "RevalidateCachedQuery"}))
        assert server.ahead == wire.FLUSH
        session.data_received(data[cut:])
        out = taken(server.transport)
        bind = wire.build_bind(b"", session.stmts[b"b"].server_name, LONG_REST)
        assert bind in out, "the Bind reached the server split by a request of the proxy's"
    drive(script)


def test_a_long_bind_behind_a_read_that_may_run_again_elsewhere_is_not_streamed():
    """A read in flight on a replica may still be refused there and run again on the
    primary, its connection given back: a Bind half written behind it would leave that
    connection waiting for the rest (and send the rest to the primary). So such a Bind is
    gathered whole, as before."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        _prepare_here(session, b"b", b"SELECT length($1::bytea)")
        session.data_received(wire.query("SELECT 1"))
        replica = session.server
        assert replica is host.servers["r"]
        taken(replica.transport)
        unit = wire.build_bind(b"", b"b", LONG_REST) + execute() + wire.SYNC
        session.data_received(unit[:300_000])
        assert not session._skip and taken(replica.transport) == b""
        replica.data_received(wire.fields_response({"S": "ERROR", "V": "ERROR", "C": "40001", "M": "conflict"})
                              + wire.ready_for_query())
        session.data_received(unit[300_000:])
        primary = host.servers["p"]
        assert taken(primary.transport).startswith(wire.query("SELECT 1"))
        assert not any(b"\xcc\xcd\xce\xcf" in chunk for chunk in replica.transport.out)
    drive(script)


def test_a_unit_pipelined_behind_a_read_that_may_run_again_elsewhere_waits_for_it():
    """Two reads pipelined (the second sent before the first's reply): the replica
    refuses the first (a recovery conflict), which runs again on the primary, its replica
    connection given back. The second waited for that, and both replies reach the client
    in order; before, it was sent behind the first on the replica and lost with it."""
    async def script():
        host = FakeSessionHost()
        session = new_session(host)
        session.data_received(wire.query("SELECT 1"))
        replica = session.server
        taken(replica.transport)
        session.data_received(wire.query("SELECT 2"))
        assert taken(replica.transport) == b""
        replica.data_received(wire.fields_response({"S": "ERROR", "V": "ERROR", "C": "40001", "M": "conflict"})
                              + wire.ready_for_query())
        primary = host.servers["p"]
        assert taken(primary.transport) == wire.query("SELECT 1") + wire.query("SELECT 2")  # (in turn, there)
        assert replica in host.pools["r"].released and not replica.steps
        primary.data_received(wire.command_complete("SELECT 1") + wire.ready_for_query()
                              + wire.command_complete("SELECT 2") + wire.ready_for_query())
        assert taken(session.transport) == (wire.command_complete("SELECT 1") + wire.ready_for_query()
                                            + wire.command_complete("SELECT 2") + wire.ready_for_query())
    drive(script)


# --- a client's cancel and a read that may run again elsewhere ------------------------------

BEHIND = wire.row_description(["lsn"]) + wire.data_row(["0/63"]) + wire.command_complete("SELECT 1") \
    + wire.ready_for_query()  # the replay check's answer: the replica has replayed 99 of 200
CANCELLED = wire.error_response("57014", "canceling statement due to user request") + wire.ready_for_query()


def lagging_replica_session() -> tuple[FakeSessionHost, object]:
    """A session that wrote up to LSN 200, a replica at 100, reads checked there."""
    host = FakeSessionHost(replica_lsn=100)
    host.config = parse_config(CONFIG.format(consistency="session") + "consistency_wait_ms = 100\n")
    session = new_session(host)
    session.token.learned(200)
    return host, session


def test_a_cancel_that_reaches_the_replay_check_does_not_let_the_stale_read_through():
    """The cancel arrives while the check ahead of the read waits on the replica: the
    check is what it cancels. The read behind it must neither reach the client from the
    lagging replica nor run again on the primary: the client gets the cancellation."""
    async def script():
        host, session = lagging_replica_session()
        session.data_received(wire.query("SELECT v FROM t"))
        replica = session.server
        assert replica is host.servers["r"]
        taken(replica.transport)
        session.cancel()
        replica.data_received(CANCELLED + wire.row_description(["v"]) + wire.data_row(["stale"])
                              + wire.command_complete("SELECT 1") + wire.ready_for_query())
        await asyncio.gather(*host.tasks)
        out = taken(session.transport)
        assert b"stale" not in out and out == CANCELLED
        assert not host.pools["p"].idle[0].transport.out  # nothing ran on the primary
        assert not session._force_primary_next  # the next unit is routed as usual
    drive(script)


def test_a_cancel_while_the_read_waits_to_run_again_on_the_primary_is_not_lost():
    """The replica's read ended and is to run again on the primary, whose only connection
    is lent elsewhere: the unit waits for it, with no server connection to cancel on.
    The cancel is kept for it, and the unit is answered as cancelled instead of sent."""
    async def script():
        host, session = lagging_replica_session()
        session.data_received(wire.query("SELECT v FROM t"))
        replica = session.server
        taken(replica.transport)
        primary = host.pools["p"].idle.pop()  # lent to another client
        replica.data_received(BEHIND + wire.command_complete("SELECT 0") + wire.ready_for_query())
        assert session.waiting and session.server is None
        assert session.cancel() is None
        host.pools["p"].idle.append(primary)
        await asyncio.gather(*host.tasks)
        assert not taken(primary.transport)
        assert taken(session.transport) == CANCELLED
        session.data_received(wire.query("SELECT 1"))  # the session goes on
        assert session.server is not None
    drive(script)


def test_a_bind_of_the_unnamed_statement_from_an_earlier_group_is_not_run_again_without_it():
    """libpq's PQprepare with an empty name, then PQexecPrepared: the unit is a Bind of a
    statement parsed in an earlier group, so its bytes alone cannot run on the primary.
    It is not checked on a lagging replica (nor kept to run again): it waits for a
    replica that has the writes, or reads from the primary, whole."""
    async def script():
        host, session = lagging_replica_session()
        session.token.lsn = None  # (the prepare first, without a token)
        session.data_received(wire.build_parse(b"", b"SELECT v FROM t", b"\0\0") + wire.SYNC)
        first = session.server
        first.data_received(wire.PARSE_COMPLETE + wire.ready_for_query())
        taken(first.transport)
        session.token.learned(200)
        session.data_received(wire.build_bind(b"", b"", b"\0\0\0\0\0\0") + execute() + wire.SYNC)
        await asyncio.gather(*host.tasks)
        server = session.server
        sent = taken(server.transport)
        assert b"pgsplit_replay_wait" not in sent
        assert all(step.retry is None for step in server.steps)
    drive(script)


# --- the fast case's shapes, on any bytes (compiled: C loads of the length bytes) ------

_UNIT_PIECES = [
    wire.message(wire.F_QUERY, b"SELECT 1\0"),
    wire.message(wire.F_PARSE, b"\0SELECT 1\0\0\0"),
    wire.message(wire.F_BIND, b"\0s\0\0\0\0\0\0\0"),
    wire.message(wire.F_DESCRIBE, b"P\0"),
    wire.message(wire.F_EXECUTE, b"\0\0\0\0\0"),
    wire.SYNC,
]


@given(st.lists(st.sampled_from(_UNIT_PIECES), min_size=1, max_size=5), st.integers(0, 60), st.binary(max_size=12))
def test_the_fast_case_shapes_take_any_bytes_without_raising(pieces, cut, noise):
    """A client's read can end anywhere, and its bytes can be anything: recognising the
    two shapes either recognises one or declines (None/False), it never raises."""
    data = b"".join(pieces)
    for candidate in (data, data[:cut] or data, noise or b"\0", data[: max(1, len(data) - cut)] + noise):
        unit = extended_unit(candidate, {})
        assert unit is None or unit.stmt is None  # (no statement is known here: only the unnamed shape)
        assert is_lone_query(candidate) in (True, False)
    assert is_lone_query(_UNIT_PIECES[0])
    unnamed = _UNIT_PIECES[1] + wire.message(wire.F_BIND, b"\0\0" + b"\0" * 6) + _UNIT_PIECES[4] + wire.SYNC
    assert extended_unit(unnamed, {}).sql == b"SELECT 1"
