"""The framing relay's Framer on bytes: whole messages out, whatever the reads' split."""

from __future__ import annotations

import struct

import pytest

from loadtest.framing_relay import Framer, FramingError


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", 4 + len(body)) + body


def startup(code: int = 196608, body: bytes = b"user\0app\0\0") -> bytes:
    return struct.pack("!II", 8 + len(body), code) + body


SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSS_REQUEST = struct.pack("!II", 8, 80877104)

CLIENT = [startup(), msg(b"p", b"SCRAM-SHA-256\0" + b"x" * 40), msg(b"Q", b"SELECT 1\0"),
          msg(b"P", b"\0SELECT $1\0\0\0"), msg(b"B", b"\0" * 12), msg(b"S")]
SERVER = [msg(b"R", b"\0\0\0\0"), msg(b"S", b"a\0b\0"), msg(b"Z", b"I"), msg(b"D", b"y" * 70000),
          msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I")]


def boundaries(messages: list[bytes]) -> set[int]:
    out, pos = {0}, 0
    for m in messages:
        pos += len(m)
        out.add(pos)
    return out


def feed_all(framer: Framer, chunks: list[bytes]) -> list[bytes]:
    outs = []
    for c in chunks:
        out, answer = framer.feed(c)
        assert answer == b""
        outs.append(out)
    return outs


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("messages,is_client", [(CLIENT, True), (SERVER, False)])
@pytest.mark.parametrize("cuts", [
    [],  # every message in one read (merged)
    [1], [3], [4], [5], [7], [9],  # cut inside the first header
    "bytewise",
    [30, 31, 60, 200, 70010],
])
def test_reads_of_any_split_forward_whole_messages(messages, is_client, cuts):
    stream = b"".join(messages)
    if cuts == "bytewise":
        cuts = list(range(1, len(stream)))
    framer = Framer(startup=is_client)
    outs = feed_all(framer, split(stream, [c for c in cuts if c < len(stream)]))
    assert b"".join(outs) == stream
    ends = boundaries(messages)
    pos = 0
    for out in outs:  # every write ends on a message boundary
        pos += len(out)
        assert pos in ends
    assert framer.messages == len(messages)


def test_a_read_with_a_partial_tail_forwards_only_the_whole_messages():
    framer = Framer()
    a, b = msg(b"C", b"SELECT 1\0"), msg(b"Z", b"I")
    assert framer.feed(a + b[:3]) == (a, b"")
    assert framer.feed(b[3:]) == (b, b"")


def test_only_the_first_client_message_is_length_only():
    # a startup packet whose bytes would read as a typed header of length 0x00000008...
    framer = Framer(startup=True)
    s = startup()
    out, _ = framer.feed(s + msg(b"X"))
    assert out == s + msg(b"X")
    # ...and a typed message at the start of a server stream is not taken as a startup packet
    framer = Framer()
    assert framer.feed(msg(b"R", b"\0\0\0\0")[:5]) == (b"", b"")


@pytest.mark.parametrize("request_", [SSL_REQUEST, GSS_REQUEST])
def test_encryption_requests_are_answered_no_and_not_forwarded(request_):
    framer = Framer(startup=True)
    assert framer.feed(request_[:5]) == (b"", b"")
    assert framer.feed(request_[5:]) == (b"", b"N")
    s = startup()
    assert framer.feed(s) == (s, b"")  # the startup packet that follows is forwarded
    assert framer.messages == 1


def test_both_encryption_requests_then_startup_in_one_read():
    framer = Framer(startup=True)
    s = startup()
    assert framer.feed(GSS_REQUEST + SSL_REQUEST + s) == (s, b"NN")


def test_a_cancel_request_is_forwarded_as_the_startup_packet():
    framer = Framer(startup=True)
    cancel = struct.pack("!IIII", 16, 80877102, 1234, 5678)
    assert framer.feed(cancel) == (cancel, b"")


@pytest.mark.parametrize("data,is_client", [
    (b"Q\0\0\0\x03", False),  # a length below 4 cannot be
    (struct.pack("!II", 4, 196608), True),  # a startup length below 8
    (struct.pack("!II", 1 << 20, 196608), True),  # a startup packet over 10000 bytes
])
def test_impossible_lengths_raise(data, is_client):
    with pytest.raises(FramingError):
        Framer(startup=is_client).feed(data)
