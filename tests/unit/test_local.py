"""proxy.session.replies: replies the proxy composes must have exactly the shape a server's would.

Message flow per the PostgreSQL docs, "Frontend/Backend Protocol", 55.2 Message Flow
(Simple Query; Extended Query): ParseComplete '1', BindComplete '2', CloseComplete '3',
ParameterDescription 't', RowDescription 'T', NoData 'n', DataRow 'D', CommandComplete 'C',
ErrorResponse 'E', NoticeResponse 'N', ReadyForQuery 'Z'. After an error the server
discards messages up to Sync; ReadyForQuery then says 'E' inside a transaction block.
"""

from __future__ import annotations

import struct
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import wire
from proxy.errors import InvalidParameterValue, UndefinedObject
from proxy.session import replies as local
from proxy.session.replies import Answer

# See tests/unit/test_policy.py: keeps a failing hypothesis example readable under
# filterwarnings=error (libcst warns on import when hypothesis prints a patch).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:
        pass

I, T, E = wire.TX_IDLE, wire.TX_IN_BLOCK, wire.TX_FAILED
PARSE, BIND, EXECUTE, SYNC, FLUSH = (wire.F_PARSE, 0), (wire.F_BIND, 0), (wire.F_EXECUTE, 0), (wire.F_SYNC, 0), (wire.F_FLUSH, 0)
DESCRIBE_S, DESCRIBE_P = (wire.F_DESCRIBE, 0x53), (wire.F_DESCRIBE, 0x50)
CLOSE_S, CLOSE_P = (wire.F_CLOSE, 0x53), (wire.F_CLOSE, 0x50)

SHOW = Answer(tag="SHOW", columns=("pgsplit.last_lsn",), rows=(("0/16B3748",),))
TWO_ROWS = Answer(tag="SELECT 2", columns=("name", "value"), rows=(("a", "1"), ("b", None)))
SET = Answer(tag="SET")
ERR = Answer(error=InvalidParameterValue('invalid value for parameter "pgsplit.consistency": "bogus"'))
NOTICE = wire.notice_response("00000", "pgsplit: noted")


def messages(reply: bytes) -> list[tuple[str, bytes]]:
    """The reply cut into (type char, body); it must frame exactly, with backend types only."""
    frames, pos = wire.split_messages(reply)
    assert pos == len(reply), "reply ends inside a message"
    return [(chr(t), reply[s + 5 : e]) for t, s, e in frames]


def types(reply: bytes) -> str:
    return "".join(t for t, _ in messages(reply))


def rfq_status(reply: bytes) -> str:
    t, body = messages(reply)[-1]
    assert t == "Z" and len(body) == 1
    return body.decode()


# --- simple query ------------------------------------------------------------------------


def test_simple_result_set():
    reply = local.simple(SHOW, I)
    assert types(reply) == "TDCZ"
    (_, rd), (_, dr), (_, cc), (_, z) = messages(reply)
    assert rd == wire.row_description(["pgsplit.last_lsn"])[5:]
    assert dr == struct.pack("!hi", 1, 9) + b"0/16B3748"
    assert cc == b"SHOW\0"
    assert z == b"I"


def test_simple_several_rows_with_null():
    reply = local.simple(TWO_ROWS, T)
    assert types(reply) == "TDDCZ"
    assert messages(reply)[2][1] == struct.pack("!hi", 2, 1) + b"b" + struct.pack("!i", -1)
    assert messages(reply)[3][1] == b"SELECT 2\0"
    assert rfq_status(reply) == "T"


def test_simple_result_set_with_no_rows():
    reply = local.simple(Answer(tag="SELECT 0", columns=("x",)), I)
    assert types(reply) == "TCZ"


def test_simple_command():
    reply = local.simple(SET, I)
    assert types(reply) == "CZ"
    assert messages(reply)[0][1] == b"SET\0"


@pytest.mark.parametrize("status", [I, T])
def test_simple_status_passed_through(status):
    assert rfq_status(local.simple(SET, status)) == chr(status)


def test_simple_begin_reports_in_block():
    assert local.simple(Answer(tag="BEGIN"), T) == wire.command_complete("BEGIN") + wire.ready_for_query(T)


def test_simple_notices_come_first():
    reply = local.simple(Answer(tag="SET", notices=(NOTICE,)), I)
    assert types(reply) == "NCZ"


def test_simple_error_outside_transaction():
    reply = local.simple(ERR, I)
    assert types(reply) == "EZ"
    fields = wire.parse_fields(messages(reply)[0][1])
    assert fields["C"] == "22023" and fields["S"] == "ERROR" and "pgsplit.consistency" in fields["M"]
    assert rfq_status(reply) == "I"


def test_simple_error_inside_transaction_reports_failed_block():
    # A server that answers a Query with ErrorResponse inside a transaction block follows it
    # with ReadyForQuery 'E' (the block is aborted), as extended() already does at Sync.
    reply = local.simple(ERR, T)
    assert types(reply) == "EZ"
    assert rfq_status(reply) == "E"


def test_simple_error_has_no_result_set():
    reply = local.simple(Answer(tag="SHOW", columns=("x",), rows=(("1",),), error=UndefinedObject("nope")), I)
    assert types(reply) == "EZ"


# --- extended query ----------------------------------------------------------------------


def test_extended_parse_bind_describe_portal_execute_sync():
    reply = local.extended(SHOW, [PARSE, BIND, DESCRIBE_P, EXECUTE, SYNC], I)
    assert types(reply) == "12TDCZ"
    msgs = messages(reply)
    assert msgs[2][1] == wire.row_description(["pgsplit.last_lsn"])[5:]
    assert msgs[3][1] == struct.pack("!hi", 1, 9) + b"0/16B3748"
    assert msgs[4][1] == b"SHOW\0"
    assert rfq_status(reply) == "I"


def test_extended_describe_statement():
    # Describe of a statement: ParameterDescription, then RowDescription (or NoData).
    reply = local.extended(SHOW, [PARSE, DESCRIBE_S, SYNC], I)
    assert types(reply) == "1tTZ"
    assert messages(reply)[1][1] == b"\0\0"  # Int16 0 parameters
    assert types(local.extended(SET, [PARSE, DESCRIBE_S, SYNC], I)) == "1tnZ"


def test_extended_prepare_then_execute_like_asyncpg():
    # asyncpg: Parse/Describe(S)/Sync, then Bind/Execute/Sync.
    assert types(local.extended(SHOW, [PARSE, DESCRIBE_S, SYNC], I)) == "1tTZ"
    assert types(local.extended(SHOW, [BIND, EXECUTE, SYNC], I)) == "2DCZ"


def test_extended_describe_portal_without_result_is_nodata():
    assert types(local.extended(SET, [PARSE, BIND, DESCRIBE_P, EXECUTE, SYNC], I)) == "12nCZ"


def test_extended_execute_without_describe_sends_no_row_description():
    # Execute never sends RowDescription; only Describe does.
    assert types(local.extended(TWO_ROWS, [PARSE, BIND, EXECUTE, SYNC], T)) == "12DDCZ"


def test_extended_close_and_flush():
    reply = local.extended(SET, [CLOSE_S, CLOSE_P, FLUSH, SYNC], I)
    assert types(reply) == "33Z"


def test_extended_flush_without_sync_has_no_ready_for_query():
    assert types(local.extended(SET, [PARSE, BIND, EXECUTE, FLUSH], I)) == "12C"


def test_extended_status_inside_transaction():
    assert rfq_status(local.extended(SET, [PARSE, BIND, EXECUTE, SYNC], T)) == "T"


def test_extended_notices_at_execute():
    reply = local.extended(Answer(tag="SHOW", columns=("x",), rows=(("1",),), notices=(NOTICE,)),
                           [PARSE, BIND, DESCRIBE_P, EXECUTE, SYNC], I)
    assert types(reply) == "12TNDCZ"


def test_extended_error_at_execute_in_transaction():
    reply = local.extended(ERR, [PARSE, BIND, DESCRIBE_P, EXECUTE, SYNC], T)
    assert types(reply) == "12nEZ"
    assert wire.parse_fields(messages(reply)[3][1])["C"] == "22023"
    assert rfq_status(reply) == "E"


def test_extended_error_outside_transaction_is_idle():
    reply = local.extended(ERR, [PARSE, BIND, EXECUTE, SYNC], I)
    assert types(reply) == "12EZ"
    assert rfq_status(reply) == "I"


def test_extended_error_skips_everything_until_sync():
    msgs = [PARSE, BIND, EXECUTE, PARSE, BIND, DESCRIBE_P, EXECUTE, CLOSE_S, FLUSH, SYNC]
    reply = local.extended(ERR, msgs, T)
    assert types(reply) == "12EZ"
    assert rfq_status(reply) == "E"


def test_extended_error_in_failed_block_stays_failed():
    assert rfq_status(local.extended(ERR, [BIND, EXECUTE, SYNC], E)) == "E"


def test_extended_error_answer_describe_is_nodata():
    # The error comes at Execute; before it, the statement describes as returning nothing.
    assert types(local.extended(ERR, [PARSE, DESCRIBE_S, SYNC], I)) == "1tnZ"


def test_extended_messages_frame_and_are_backend_types():
    reply = local.extended(TWO_ROWS, [PARSE, BIND, DESCRIBE_S, DESCRIBE_P, EXECUTE, CLOSE_P, SYNC], I)
    assert types(reply) == "12tTTDDC3Z"


# --- property: the flow rules hold for any group --------------------------------------------

client_msgs = st.lists(st.sampled_from([PARSE, BIND, EXECUTE, FLUSH, DESCRIBE_S, DESCRIBE_P, CLOSE_S, CLOSE_P]),
                       max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(client_msgs, min_size=1, max_size=3), st.sampled_from([SHOW, SET, ERR, TWO_ROWS]),
       st.sampled_from([I, T]))
def test_property_one_ready_for_query_per_sync_and_nothing_after_an_error(groups, answer, status):
    sent = [m for g in groups for m in (*g, SYNC)]
    got = types(local.extended(answer, sent, status))
    assert got.count("Z") == len(groups)
    replies = got.split("Z")[:-1]
    for group, r in zip(groups, replies):
        if "E" in r:
            assert r.count("E") == 1 and r.endswith("E"), r  # nothing between the error and Sync
        else:
            # every Parse/Bind/Close answered once; Flush answers nothing
            assert r.count("1") == group.count(PARSE)
            assert r.count("2") == group.count(BIND)
            assert r.count("3") == group.count(CLOSE_S) + group.count(CLOSE_P)
            assert r.count("C") == group.count(EXECUTE)
            assert r.count("t") == group.count(DESCRIBE_S)
        if answer.error is not None:
            assert ("E" in r) == (EXECUTE in group)
