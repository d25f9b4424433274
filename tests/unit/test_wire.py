"""proxy.wire: the sans-IO codec, on bytes alone.

Layouts are checked against the PostgreSQL docs, "Frontend/Backend Protocol",
55.7 Message Formats: every message after startup is a type byte + Int32 length that
counts itself but not the type byte; startup-phase packets are Int32 length + Int32 code.
"""

from __future__ import annotations

import warnings
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import wire
from proxy.wire import (
    CancelRequest,
    Framer,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    StartupMessage,
    read_startup_packet,
    split_messages,
)

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

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def startup(code: int, payload: bytes) -> bytes:
    """A startup-phase packet: Int32 length (counting itself), Int32 code, payload."""
    return struct.pack("!ii", 8 + len(payload), code) + payload


def kv(*pairs: str) -> bytes:
    """Name/value C strings followed by the list terminator."""
    return b"".join(s.encode() + b"\0" for s in pairs) + b"\0"


# --- startup packets ----------------------------------------------------------------


def test_startup_message_with_params():
    pkt = startup(wire.PROTOCOL_3_0, kv("user", "app", "database", "shop", "application_name", "psql"))
    got, used = read_startup_packet(pkt)
    assert used == len(pkt)
    assert got == StartupMessage(3, 0, {"user": "app", "database": "shop", "application_name": "psql"}, ())


def test_startup_message_builder_round_trips():
    params = {"user": "app", "database": "db", "options": "-c search_path=x", "empty": ""}
    pkt = wire.startup_message(params)
    assert struct.unpack_from("!ii", pkt) == (len(pkt), wire.PROTOCOL_3_0)
    got, used = read_startup_packet(pkt)
    assert used == len(pkt)
    assert isinstance(got, StartupMessage) and got.params == params


def test_startup_message_without_params():
    # Only the terminator: a valid layout (a missing `user` is the server's business, not framing's).
    got, used = read_startup_packet(startup(wire.PROTOCOL_3_0, b"\0"))
    assert got == StartupMessage(3, 0, {}, ()) and used == 9


def test_startup_message_empty_value():
    got, _ = read_startup_packet(startup(wire.PROTOCOL_3_0, kv("user", "app", "options", "")))
    assert got.params == {"user": "app", "options": ""}


def test_startup_packet_only_consumes_its_own_bytes():
    pkt = startup(wire.PROTOCOL_3_0, kv("user", "app"))
    trailing = wire.query("SELECT 1")
    got, used = read_startup_packet(pkt + trailing)
    assert isinstance(got, StartupMessage)
    assert used == len(pkt)


def test_startup_message_bytearray_input():
    pkt = bytearray(startup(wire.PROTOCOL_3_0, kv("user", "app")))
    got, used = read_startup_packet(pkt)
    assert got.params == {"user": "app"} and used == len(pkt)


def test_ssl_request():
    assert read_startup_packet(wire.ssl_request()) == (SSLRequest(), 8)
    assert wire.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # 1234 << 16 | 5679


def test_gssenc_request():
    pkt = startup(wire.GSSENC_REQUEST, b"")
    assert pkt == b"\x00\x00\x00\x08\x04\xd2\x16\x30"  # 1234 << 16 | 5680
    assert read_startup_packet(pkt) == (GSSENCRequest(), 8)


def test_cancel_request_4_byte_key():
    pkt = startup(wire.CANCEL_REQUEST, struct.pack("!i", 4242) + b"\x01\x02\x03\x04")
    assert len(pkt) == 16
    assert read_startup_packet(pkt) == (CancelRequest(4242, b"\x01\x02\x03\x04"), 16)


def test_cancel_request_protocol_3_2_long_key():
    # PostgreSQL 18 / protocol 3.2: the secret key is variable length (up to 256 bytes).
    key = bytes(range(32))
    pkt = startup(wire.CANCEL_REQUEST, struct.pack("!i", 77) + key)
    assert read_startup_packet(pkt) == (CancelRequest(77, key), 8 + 4 + 32)
    longest = bytes(256)
    pkt = startup(wire.CANCEL_REQUEST, struct.pack("!i", 77) + longest)
    assert read_startup_packet(pkt)[0] == CancelRequest(77, longest)


@pytest.mark.parametrize("payload", [b"", b"\0\0\0\1", b"\0\0\0\1\2\3\4", struct.pack("!i", 1) + bytes(257)])
def test_cancel_request_bad_key_length(payload):
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.CANCEL_REQUEST, payload))


def test_cancel_request_builder_layout():
    pkt = wire.cancel_request(1234, b"\xde\xad\xbe\xef")
    # Int32 16, Int32 80877102, Int32 process id, 4 bytes of key.
    assert pkt == struct.pack("!iii", 16, 80877102, 1234) + b"\xde\xad\xbe\xef"
    assert len(pkt) == 16
    assert read_startup_packet(pkt) == (CancelRequest(1234, b"\xde\xad\xbe\xef"), 16)
    long_key = bytes(range(100, 132))
    pkt = wire.cancel_request(5, long_key)
    assert struct.unpack_from("!i", pkt)[0] == len(pkt) == 8 + 4 + 32
    assert read_startup_packet(pkt)[0] == CancelRequest(5, long_key)


def test_protocol_3_1_minor_version():
    got, _ = read_startup_packet(startup((3 << 16) | 1, kv("user", "app")))
    assert (got.major, got.minor) == (3, 1)
    assert got.params == {"user": "app"}


def test_protocol_3_2_minor_version():
    got, _ = read_startup_packet(startup((3 << 16) | 2, kv("user", "app")))
    assert (got.major, got.minor) == (3, 2)


def test_pq_options_collected_not_params():
    pkt = startup(
        (3 << 16) | 0,
        kv("user", "app", "_pq_.command_compression", "on", "database", "d", "_pq_.other", "1"),
    )
    got, _ = read_startup_packet(pkt)
    assert got.params == {"user": "app", "database": "d"}
    assert got.unknown_options == ("_pq_.command_compression", "_pq_.other")


@pytest.mark.parametrize("major", [2, 4, 1234])
def test_unsupported_major_version(major):
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(major << 16, kv("user", "app")))


def test_missing_list_terminator():
    # "user\0app\0" without the final NUL that ends the list.
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, b"user\0app\0"))


def test_missing_string_terminator():
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, b"user\0app"))


def test_empty_payload_startup_message():
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, b""))


def test_odd_number_of_strings():
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, kv("user", "app", "database")))


def test_empty_parameter_name():
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, kv("", "x")))


def test_non_utf8_parameter_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation):
        read_startup_packet(startup(wire.PROTOCOL_3_0, b"user\0\xff\xfe\0\0"))


# PostgreSQL compares the length without its own 4 bytes to 10000: 10004 in all is the most.
@pytest.mark.parametrize("length", [-1, 0, 4, 7, 10005, 2**31 - 1])
def test_startup_length_out_of_range(length):
    with pytest.raises(ProtocolViolation):
        read_startup_packet(struct.pack("!ii", length, wire.PROTOCOL_3_0) + b"\0" * 16)


@pytest.mark.parametrize("length", [-1, 0, 7, 10005])
def test_startup_length_out_of_range_seen_from_4_bytes(length):
    # The length alone is enough to refuse; no need to wait for the code.
    with pytest.raises(ProtocolViolation):
        read_startup_packet(struct.pack("!i", length))


def test_startup_length_10000_is_accepted():
    value = "x" * (10000 - 8 - len(b"user\0app\0application_name\0\0") - 1)
    pkt = startup(wire.PROTOCOL_3_0, kv("user", "app", "application_name", value))
    assert len(pkt) == 10000
    got, used = read_startup_packet(pkt)
    assert used == 10000 and got.params["application_name"] == value


def test_partial_startup_packets_need_more():
    pkt = startup(wire.PROTOCOL_3_0, kv("user", "app", "database", "d"))
    for cut in range(len(pkt)):
        assert read_startup_packet(pkt[:cut]) == (None, 0), cut
    assert read_startup_packet(pkt)[1] == len(pkt)


# --- framing -------------------------------------------------------------------------


def stream_of_messages() -> bytes:
    return b"".join([
        wire.query("SELECT 1"),
        wire.build_parse(b"s1", b"SELECT $1", b"\0\1\0\0\0\x17"),
        wire.build_bind(b"", b"s1", b"\0\0\0\1\0\0\0\x01" b"7" b"\0\0"),
        wire.build_target(wire.F_DESCRIBE, 0x50, b""),
        wire.message(wire.F_EXECUTE, b"\0\0\0\0\0"),
        wire.SYNC,
        wire.FLUSH,
        wire.message(wire.F_COPY_DATA, bytes(range(256))),
        wire.TERMINATE,
    ])


def test_message_layout():
    assert wire.message(0x51, b"abc") == b"Q\x00\x00\x00\x07abc"
    assert wire.SYNC == b"S\x00\x00\x00\x04"
    assert wire.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert wire.header_length(b"xQ\x00\x00\x01\x02", 1) == 0x102


def test_split_complete_messages():
    buf = stream_of_messages()
    frames, pos = split_messages(buf)
    assert pos == len(buf)
    assert [chr(t) for t, _, _ in frames] == ["Q", "P", "B", "D", "E", "S", "H", "d", "X"]
    # Frames tile the buffer exactly, and each end = start + 1 + length.
    prev = 0
    for t, s, e in frames:
        assert s == prev and buf[s] == t
        assert e == s + 1 + struct.unpack_from("!i", buf, s + 1)[0]
        prev = e


def test_split_incomplete_message():
    q = wire.query("SELECT 1")
    frames, pos = split_messages(q + q[:3])
    assert frames == [(0x51, 0, len(q))] and pos == len(q)
    frames, pos = split_messages(q + q[:-1])
    assert frames == [(0x51, 0, len(q))] and pos == len(q)
    assert split_messages(b"") == ([], 0)
    assert split_messages(b"Q\0\0\0") == ([], 0)


def test_split_from_a_position():
    q = wire.query("SELECT 1")
    frames, pos = split_messages(b"junk" + q, 4)
    assert frames == [(0x51, 4, 4 + len(q))] and pos == 4 + len(q)


def test_split_at_most_limit_messages():
    buf = b"".join(wire.query(f"SELECT {i}") for i in range(10))
    everything, end = wire.split_messages(buf)
    pos, batches = 0, []
    while pos < len(buf):
        frames, pos = wire.split_messages(buf, pos, limit=3)
        assert 0 < len(frames) <= 3
        batches += frames
    assert batches == everything and pos == end == len(buf)


def test_split_at_every_boundary_gives_same_frames():
    whole = stream_of_messages()
    expected = [(t, bytes(whole[s:e])) for t, s, e in split_messages(whole)[0]]
    for cut in range(len(whole) + 1):
        got = []
        buf = bytearray()
        for chunk in (whole[:cut], whole[cut:]):
            buf += chunk
            frames, pos = split_messages(buf)
            got += [(t, bytes(buf[s:e])) for t, s, e in frames]
            del buf[:pos]
        assert got == expected, cut
        assert not buf


def test_split_byte_by_byte_gives_same_frames():
    whole = stream_of_messages()
    expected = [(t, bytes(whole[s:e])) for t, s, e in split_messages(whole)[0]]
    got, buf = [], bytearray()
    for i in range(len(whole)):
        buf += whole[i : i + 1]
        frames, pos = split_messages(buf)
        got += [(t, bytes(buf[s:e])) for t, s, e in frames]
        del buf[:pos]
    assert got == expected


@pytest.mark.parametrize("length", [0, 1, 3])
def test_split_length_below_4_raises(length):
    with pytest.raises(ProtocolViolation):
        split_messages(b"Q" + struct.pack("!i", length) + b"xxxx")


def test_split_negative_and_huge_lengths_raise():
    with pytest.raises(ProtocolViolation):
        split_messages(b"Q\xff\xff\xff\xff")  # -1 as Int32
    with pytest.raises(ProtocolViolation):
        split_messages(b"Q" + struct.pack("!I", wire.MAX_MESSAGE + 1))


def test_split_bad_length_after_good_message_raises():
    with pytest.raises(ProtocolViolation):
        split_messages(wire.SYNC + b"Q\0\0\0\2")


def test_split_length_4_is_an_empty_body():
    assert split_messages(b"S\0\0\0\4") == ([(0x53, 0, 5)], 5)


def test_valid_types_enforced():
    buf = wire.query("SELECT 1") + wire.message(ord("Z"), b"I")
    with pytest.raises(ProtocolViolation):
        split_messages(buf, valid_types=wire.FRONTEND_TYPES)
    frames, _ = split_messages(buf)
    assert [t for t, _, _ in frames] == [0x51, 0x5A]
    frames, pos = split_messages(stream_of_messages(), valid_types=wire.FRONTEND_TYPES)
    assert len(frames) == 9 and pos == len(stream_of_messages())


def test_valid_types_checked_before_message_is_complete():
    # A header is enough to tell the type is wrong; no need to buffer a huge body first.
    with pytest.raises(ProtocolViolation):
        split_messages(b"Z\0\0\x10\0", valid_types=wire.FRONTEND_TYPES)


def test_framer_yields_whole_messages():
    f = Framer()
    whole = stream_of_messages()
    out = []
    for i in range(0, len(whole), 7):
        out += f.feed(whole[i : i + 7])
    assert [(t, body) for t, body in out] == [
        (t, bytes(whole[s + 5 : e])) for t, s, e in split_messages(whole)[0]
    ]
    assert f.take_rest() == b""


def test_framer_keeps_the_incomplete_tail():
    f = Framer()
    q = wire.query("SELECT 1")
    assert f.feed(q + q[:6]) == [(0x51, b"SELECT 1\0")]
    assert f.take_rest() == q[:6]
    assert f.take_rest() == b""
    assert f.feed(q) == [(0x51, b"SELECT 1\0")]


def test_framer_raises_on_bad_length():
    with pytest.raises(ProtocolViolation):
        Framer().feed(b"R\0\0\0\1")


# --- builders and parsers ------------------------------------------------------------


def frame(msg: bytes) -> tuple[int, bytes]:
    frames, pos = split_messages(msg)
    assert pos == len(msg) and len(frames) == 1, "a builder must produce exactly one message"
    t, s, e = frames[0]
    return t, bytes(msg[s + 5 : e])


def test_error_response_round_trip():
    t, body = frame(wire.error_response("57P03", "the primary is down", detail="pg1:5432", hint="retry"))
    assert t == wire.B_ERROR
    assert body.endswith(b"\0\0")
    assert wire.parse_fields(body) == {
        "S": "ERROR", "V": "ERROR", "C": "57P03", "M": "the primary is down", "D": "pg1:5432", "H": "retry",
    }


def test_error_response_layout_and_optional_fields():
    msg = wire.error_response("08P01", "bad", severity="FATAL")
    body = b"SFATAL\0VFATAL\0C08P01\0Mbad\0\0"  # no D/H fields when not given; list ends with NUL
    assert len(body) == 27
    assert msg == b"E" + struct.pack("!i", 4 + 27) + body
    assert wire.parse_fields(frame(msg)[1]) == {"S": "FATAL", "V": "FATAL", "C": "08P01", "M": "bad"}


def test_notice_response_round_trip():
    t, body = frame(wire.notice_response("01000", "hello", detail="d"))
    assert t == wire.B_NOTICE
    assert wire.parse_fields(body) == {"S": "NOTICE", "V": "NOTICE", "C": "01000", "M": "hello", "D": "d"}


def test_fields_response_round_trip():
    fields = {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "relation \"x\" does not exist", "P": "15",
              "F": "parse_relation.c", "L": "1392", "R": "parserOpenTable"}
    t, body = frame(wire.fields_response(fields))
    assert t == wire.B_ERROR and wire.parse_fields(body) == fields


def test_parse_fields_non_utf8_and_truncated():
    assert wire.parse_fields(b"M\xff\0\0") == {"M": "\ufffd"}
    assert wire.parse_fields(b"Cabc") == {}
    assert wire.parse_fields(b"") == {}


def test_parameter_status_round_trip():
    t, body = frame(wire.parameter_status("in_hot_standby", "off"))
    assert t == wire.B_PARAMETER_STATUS
    assert body == b"in_hot_standby\0off\0"
    assert wire.parse_parameter_status(body) == ("in_hot_standby", "off")
    assert wire.parse_parameter_status(frame(wire.parameter_status("TimeZone", ""))[1]) == ("TimeZone", "")


def test_build_bind_round_trip():
    rest = b"\0\1\0\0" b"\0\1" b"\0\0\0\x02" b"42" b"\0\1\0\1"
    msg = wire.build_bind(b"portal", b"stmt", rest)
    t, body = frame(msg)
    assert t == wire.F_BIND
    portal, stmt, pos = wire.parse_bind_names(body)
    assert (portal, stmt) == (b"portal", b"stmt") and body[pos:] == rest
    # memoryview rest and unnamed names
    msg = wire.build_bind(b"", b"", memoryview(rest))
    assert wire.parse_bind_names(frame(msg)[1]) == (b"", b"", 2)


def test_build_parse_round_trip():
    params = b"\0\2\0\0\0\x17\0\0\0\x19"  # two parameter types: int4, text
    t, body = frame(wire.build_parse(b"__asyncpg_stmt_1__", b"SELECT $1::int, $2", params))
    assert t == wire.F_PARSE
    assert wire.parse_parse(body) == (b"__asyncpg_stmt_1__", b"SELECT $1::int, $2", params)
    assert wire.parse_parse(frame(wire.build_parse(b"", b"SELECT 1"))[1]) == (b"", b"SELECT 1", b"\0\0")


@pytest.mark.parametrize("type_byte", [wire.F_DESCRIBE, wire.F_CLOSE])
@pytest.mark.parametrize("kind", [0x53, 0x50])
@pytest.mark.parametrize("name", [b"", b"S_1", b"a portal"])
def test_build_target_round_trip(type_byte, kind, name):
    t, body = frame(wire.build_target(type_byte, kind, name))
    assert t == type_byte
    assert wire.parse_target(body) == (kind, name)


@pytest.mark.parametrize("body", [b"", b"S", b"X\0", b"Sname", b"\0\0"])
def test_parse_target_rejects(body):
    with pytest.raises(ProtocolViolation):
        wire.parse_target(body)


def test_parse_query():
    assert wire.parse_query(frame(wire.query("SELECT 'x'"))[1]) == b"SELECT 'x'"
    with pytest.raises(ProtocolViolation):
        wire.parse_query(b"SELECT 1")


@pytest.mark.parametrize("body", [b"", b"name", b"name\0SELECT 1"])
def test_parse_parse_rejects(body):
    with pytest.raises(ProtocolViolation):
        wire.parse_parse(body)


@pytest.mark.parametrize("body", [b"", b"portal", b"portal\0stmt"])
def test_parse_bind_names_rejects(body):
    with pytest.raises(ProtocolViolation):
        wire.parse_bind_names(body)


def test_row_description_layout():
    msg = wire.row_description(["a", "bc"])
    t, body = frame(msg)
    assert t == ord("T")
    # Int16 field count
    assert struct.unpack_from("!h", body, 0) == (2,)
    pos = 2
    for name in (b"a", b"bc"):
        assert body[pos : pos + len(name) + 1] == name + b"\0"
        pos += len(name) + 1
        # Int32 table oid, Int16 attnum, Int32 type oid, Int16 typlen, Int32 typmod, Int16 format
        table_oid, = struct.unpack_from("!i", body, pos)
        attnum, = struct.unpack_from("!h", body, pos + 4)
        type_oid, = struct.unpack_from("!i", body, pos + 6)
        typlen, = struct.unpack_from("!h", body, pos + 10)
        typmod, = struct.unpack_from("!i", body, pos + 12)
        fmt, = struct.unpack_from("!h", body, pos + 16)
        assert (table_oid, attnum, type_oid, typlen, typmod, fmt) == (0, 0, 25, -1, -1, 0)
        pos += 18
    assert pos == len(body)
    # and byte by byte for one column
    assert wire.row_description(["x"]) == (
        b"T" + struct.pack("!i", 4 + 2 + 2 + 18) + b"\x00\x01" + b"x\x00"
        + b"\x00\x00\x00\x00" + b"\x00\x00" + b"\x00\x00\x00\x19" + b"\xff\xff" + b"\xff\xff\xff\xff" + b"\x00\x00"
    )


def test_row_description_no_columns():
    assert wire.row_description([]) == b"T\0\0\0\x06\0\0"


def test_data_row_layout():
    msg = wire.data_row(["1", None, "", "é"])
    assert msg == (
        b"D" + struct.pack("!i", 4 + 2 + (4 + 1) + 4 + 4 + (4 + 2))
        + b"\x00\x04"
        + b"\x00\x00\x00\x01" + b"1"
        + b"\xff\xff\xff\xff"  # NULL: length -1, no bytes
        + b"\x00\x00\x00\x00"  # empty string: length 0
        + b"\x00\x00\x00\x02" + "é".encode()
    )
    frame(msg)


def test_ready_for_query():
    assert wire.ready_for_query() == b"Z\0\0\0\x05I"
    assert wire.ready_for_query(wire.TX_IN_BLOCK) == b"Z\0\0\0\x05T"
    assert wire.ready_for_query(wire.TX_FAILED) == b"Z\0\0\0\x05E"


def test_negotiate_protocol_version_layout():
    # Int32 newest minor supported, Int32 number of unrecognised options, then their names.
    msg = wire.negotiate_protocol_version(0, ("_pq_.a", "_pq_.bb"))
    assert msg == b"v" + struct.pack("!iii", 4 + 8 + 7 + 8, 0, 2) + b"_pq_.a\0_pq_.bb\0"
    assert wire.negotiate_protocol_version(0, ()) == b"v" + struct.pack("!iii", 12, 0, 0)


def test_command_complete_and_tag():
    t, body = frame(wire.command_complete("SELECT 1"))
    assert t == ord("C") and body == b"SELECT 1\0"
    assert wire.parse_command_tag(body) == "SELECT 1"


def test_constant_messages():
    assert wire.PARSE_COMPLETE == b"1\0\0\0\4"
    assert wire.BIND_COMPLETE == b"2\0\0\0\4"
    assert wire.CLOSE_COMPLETE == b"3\0\0\0\4"
    assert wire.NO_DATA == b"n\0\0\0\4"
    assert wire.EMPTY_QUERY == b"I\0\0\0\4"
    assert wire.FLUSH == b"H\0\0\0\4"
    assert wire.TERMINATE == b"X\0\0\0\4"


def test_auth_and_backend_key_round_trips():
    t, body = frame(wire.auth_ok())
    assert t == wire.B_AUTH and wire.parse_auth(body) == (0, b"")
    t, body = frame(wire.auth_sasl(["SCRAM-SHA-256"]))
    code, payload = wire.parse_auth(body)
    assert code == wire.AUTH_SASL and wire.parse_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]
    assert payload == b"SCRAM-SHA-256\0\0"
    t, body = frame(wire.backend_key_data(99, b"\1\2\3\4"))
    assert t == wire.B_BACKEND_KEY and wire.parse_backend_key(body) == (99, b"\1\2\3\4")
    with pytest.raises(ProtocolViolation):
        wire.parse_backend_key(b"\0\0\0\1\2")
    with pytest.raises(ProtocolViolation):
        wire.parse_auth(b"\0\0")


def test_sasl_initial_response_round_trip():
    t, body = frame(wire.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert t == wire.F_PASSWORD
    assert wire.parse_sasl_initial(body) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation):
        wire.parse_sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc")  # declared 9, has 3
    with pytest.raises(ProtocolViolation):
        wire.parse_sasl_initial(b"SCRAM-SHA-256\0\0\0")  # length cut short


# --- fuzz ----------------------------------------------------------------------------


def startup_like() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and bytes that start with a plausible header so the parser gets deep."""
    code = st.sampled_from([wire.PROTOCOL_3_0, (3 << 16) | 2, wire.SSL_REQUEST, wire.GSSENC_REQUEST,
                            wire.CANCEL_REQUEST, 2 << 16]) | st.integers(-(2**31), 2**31 - 1)
    body = st.binary(max_size=300) | st.lists(
        st.binary(max_size=12).filter(lambda b: b"\0" not in b), max_size=9
    ).map(lambda xs: b"".join(x + b"\0" for x in xs) + b"\0")

    @st.composite
    def packet(draw):
        payload = draw(body)
        c = draw(code)
        length = draw(st.sampled_from([8 + len(payload)]) | st.integers(-5, 10010))
        tail = draw(st.binary(max_size=20))
        return struct.pack("!ii", length, c) + payload + tail

    return st.binary(max_size=400) | packet()


@FUZZ
@given(startup_like())
def test_fuzz_read_startup_packet(buf):
    try:
        pkt, used = read_startup_packet(buf)
    except ProtocolViolation:
        return
    if pkt is None:
        assert used == 0
    else:
        assert 8 <= used <= len(buf)
        assert used == struct.unpack_from("!i", buf)[0]


def frames_like() -> st.SearchStrategy[bytes]:
    one = st.builds(
        lambda t, body, delta: bytes((t,)) + struct.pack("!I", max(0, 4 + len(body) + delta) & 0xFFFFFFFF) + body,
        st.integers(0, 255),
        st.binary(max_size=40),
        st.sampled_from([0, 0, 0, -1, 1, -5, 7]),
    )
    return st.binary(max_size=300) | st.lists(one, max_size=8).map(b"".join)


@FUZZ
@given(frames_like(), st.booleans())
def test_fuzz_split_messages(buf, restrict):
    try:
        frames, pos = split_messages(buf, valid_types=wire.FRONTEND_TYPES if restrict else None)
    except ProtocolViolation:
        return
    assert 0 <= pos <= len(buf)
    prev = 0
    for t, s, e in frames:
        assert s == prev and s + 5 <= e <= len(buf) and buf[s] == t
        assert e - s - 1 == struct.unpack_from("!i", buf, s + 1)[0]
        prev = e
    assert prev == pos
    # What is left is an incomplete message (fewer than 5 bytes, or a body still missing).
    if len(buf) - pos >= 5:
        assert pos + 1 + struct.unpack_from("!I", buf, pos + 1)[0] > len(buf)


@FUZZ
@given(st.lists(st.binary(max_size=50), max_size=6))
def test_fuzz_framer_matches_split(chunks):
    whole = b"".join(chunks)
    try:
        expected, pos = split_messages(whole)
    except ProtocolViolation:
        return
    f = Framer()
    got = []
    for c in chunks:
        got += f.feed(c)  # earlier chunks hold only prefixes of valid messages: no raise
    assert got == [(t, whole[s + 5 : e]) for t, s, e in expected]
    assert f.take_rest() == whole[pos:]


# Each parser with the exceptions its code admits to. ProtocolViolation is the contract;
# ValueError (UnicodeDecodeError is one) comes from cstring()'s bytes.index, which its
# docstring-less callers let through.
PARSERS = [
    wire.parse_query,
    wire.parse_parse,
    wire.parse_bind_names,
    wire.parse_target,
    wire.parse_fields,
    wire.parse_parameter_status,
    wire.parse_auth,
    wire.parse_backend_key,
    wire.parse_command_tag,
    wire.parse_sasl_initial,
    wire.parse_sasl_mechanisms,
    wire.parse_data_row,
]


@FUZZ
@pytest.mark.parametrize("parse", PARSERS, ids=lambda f: f.__name__)
@given(body=st.binary(max_size=80) | st.lists(st.binary(max_size=8), max_size=5).map(b"\0".join))
def test_fuzz_parsers_raise_only_documented_errors(parse, body):
    try:
        parse(body)
    except (ProtocolViolation, ValueError):
        pass


@FUZZ
@given(st.integers(0, 2**16 - 1).map(lambda m: (3 << 16) | m),
       st.dictionaries(st.text(min_size=1).filter(lambda s: "\0" not in s),
                       st.text().filter(lambda s: "\0" not in s), max_size=5))
def test_fuzz_startup_round_trip(code, params):
    payload = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    pkt = startup(code, payload)
    if len(pkt) > wire.MAX_STARTUP_PACKET:
        return
    got, used = read_startup_packet(pkt)
    assert used == len(pkt)
    assert got.minor == code & 0xFFFF
    assert got.params == {k: v for k, v in params.items() if not k.startswith("_pq_.")}
    assert got.unknown_options == tuple(k for k in params if k.startswith("_pq_."))


@FUZZ
@given(st.lists(st.none() | st.text(max_size=20), max_size=6))
def test_fuzz_data_row_round_trip(values):
    row = wire.data_row(values)
    assert wire.parse_data_row(row[5:]) == [None if v is None else v.encode() for v in values]


@pytest.mark.parametrize("body", [b"", b"\0", b"\0\1", b"\0\1\0\0\0", b"\0\1\0\0\0\3ab"])
def test_data_row_cut_short_is_a_protocol_violation(body):
    with pytest.raises(ProtocolViolation):
        wire.parse_data_row(body)
