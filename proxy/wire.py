"""Sans-IO codec for the PostgreSQL v3 frontend/backend protocol.

Owns: framing (type byte + int32 length), the startup-phase packets, builders for every
message the proxy sends itself, and parsers for the few messages a decision needs.
Must not know: sockets, asyncio, sessions, routing. Everything here is a function of
bytes, so it is unit-tested and fuzzed on bytes alone.

Reference: PostgreSQL docs, "Frontend/Backend Protocol" (55.2 Message Flow, 55.7 Message
Formats). Lengths count themselves but not the type byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# --- protocol constants -------------------------------------------------------------

PROTOCOL_3_0 = 196608  # (3 << 16) | 0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_STARTUP_PACKET = 10000  # PostgreSQL refuses larger startup packets (MAX_STARTUP_PACKET_LENGTH)
MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit for a message body (PQ_LARGE_MESSAGE_LIMIT)

# Frontend message types (as ints: indexing bytes yields ints).
F_BIND = 0x42  # B
F_CLOSE = 0x43  # C
F_COPY_DATA = 0x64  # d
F_COPY_DONE = 0x63  # c
F_COPY_FAIL = 0x66  # f
F_DESCRIBE = 0x44  # D
F_EXECUTE = 0x45  # E
F_FLUSH = 0x48  # H
F_FUNCTION_CALL = 0x46  # F
F_PARSE = 0x50  # P
F_PASSWORD = 0x70  # p (also SASLInitialResponse / SASLResponse)
F_QUERY = 0x51  # Q
F_SYNC = 0x53  # S
F_TERMINATE = 0x58  # X

FRONTEND_TYPES = frozenset(
    {F_BIND, F_CLOSE, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_DESCRIBE, F_EXECUTE,
     F_FLUSH, F_FUNCTION_CALL, F_PARSE, F_PASSWORD, F_QUERY, F_SYNC, F_TERMINATE}
)

# Backend message types.
B_AUTH = 0x52  # R
B_BACKEND_KEY = 0x4B  # K
B_BIND_COMPLETE = 0x32  # 2
B_CLOSE_COMPLETE = 0x33  # 3
B_COMMAND_COMPLETE = 0x43  # C
B_COPY_IN = 0x47  # G
B_COPY_OUT = 0x48  # H
B_COPY_BOTH = 0x57  # W
B_DATA_ROW = 0x44  # D
B_EMPTY_QUERY = 0x49  # I
B_ERROR = 0x45  # E
B_NEGOTIATE_VERSION = 0x76  # v
B_NO_DATA = 0x6E  # n
B_NOTICE = 0x4E  # N
B_NOTIFICATION = 0x41  # A
B_PARAM_DESCRIPTION = 0x74  # t
B_PARAMETER_STATUS = 0x53  # S
B_PARSE_COMPLETE = 0x31  # 1
B_PORTAL_SUSPENDED = 0x73  # s
B_READY = 0x5A  # Z
B_ROW_DESCRIPTION = 0x54  # T

# Authentication request codes ('R').
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# ReadyForQuery transaction status bytes.
TX_IDLE = 0x49  # I
TX_IN_BLOCK = 0x54  # T
TX_FAILED = 0x45  # E

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!ci")
_I32I32 = struct.Struct("!ii")


class ProtocolViolation(Exception):
    """Bytes that cannot be a valid message; the connection must end (SQLSTATE 08P01)."""


class UnsupportedProtocol(ProtocolViolation):
    """A startup packet for a protocol version the proxy does not speak (SQLSTATE 0A000)."""


# --- startup phase ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str] = field(default_factory=dict)
    unknown_options: tuple[str, ...] = ()  # "_pq_." protocol options we do not support


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def read_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket | None, int]:
    """Return (packet, bytes consumed), or (None, 0) if more bytes are needed.

    Raises ProtocolViolation for a length that no valid startup packet has.
    """
    if len(buf) < 8:
        if len(buf) >= 4:
            _check_startup_length(_I32.unpack_from(buf, 0)[0])
        return None, 0
    length, code = _I32I32.unpack_from(buf, 0)
    _check_startup_length(length)
    if len(buf) < length:
        return None, 0
    payload = bytes(buf[8:length])
    return parse_startup_packet(code, payload), length


def _check_startup_length(length: int) -> None:
    # PostgreSQL checks the length without its own 4 bytes against the limit.
    if length < 8 or length - 4 > MAX_STARTUP_PACKET:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")


def parse_startup_packet(code: int, payload: bytes) -> StartupPacket:
    if code == SSL_REQUEST and not payload:
        return SSLRequest()
    if code == GSSENC_REQUEST and not payload:
        return GSSENCRequest()
    if code == CANCEL_REQUEST:
        # 3.0/3.1: 4-byte key; 3.2 (PostgreSQL 18) allows up to 256 bytes.
        if len(payload) < 8 or len(payload) > 4 + 256:
            raise ProtocolViolation("invalid length of cancel request")
        return CancelRequest(_I32.unpack_from(payload, 0)[0], payload[4:])
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
        )
    if not payload or payload[-1] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    body = payload[:-1]  # drop the list terminator; each name and value ends with NUL
    if body and body[-1] != 0:
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    parts = body[:-1].split(b"\0") if body else []
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without a value")
    params: dict[str, str] = {}
    unknown: list[str] = []
    for i in range(0, len(parts), 2):
        try:
            name, value = parts[i].decode(), parts[i + 1].decode()
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid byte sequence in startup packet") from exc
        if not name:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        if name.startswith("_pq_."):
            unknown.append(name)
        else:
            params[name] = value
    return StartupMessage(major, minor, params, tuple(unknown))


def startup_message(params: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return _I32I32.pack(8 + len(body), PROTOCOL_3_0) + body


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    return _I32I32.pack(8 + 4 + len(secret_key), CANCEL_REQUEST) + _I32.pack(process_id) + secret_key


def ssl_request() -> bytes:
    return _I32I32.pack(8, SSL_REQUEST)


# --- framing ------------------------------------------------------------------------


def message(type_byte: int, body: bytes = b"") -> bytes:
    return bytes((type_byte,)) + _I32.pack(4 + len(body)) + body


def header_length(buf: bytes | bytearray | memoryview, pos: int) -> int:
    """Body length + 4 of the message whose type byte is at pos (needs pos+5 <= len)."""
    return int.from_bytes(buf[pos + 1 : pos + 5], "big")


def split_messages(
    buf: bytes | bytearray, pos: int = 0, *, valid_types: frozenset[int] | None = None, limit: int = 0,
) -> tuple[list[tuple[int, int, int]], int]:
    """Frame complete messages in buf from pos (at most `limit` of them, when given).

    Returns ([(type, start, end), ...], position after the last one framed).
    Raises ProtocolViolation on a length below 4 or above MAX_MESSAGE, or on a type byte
    outside valid_types when given.
    """
    out = []
    n = len(buf)
    while pos + 5 <= n and (not limit or len(out) < limit):
        t = buf[pos]
        length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
        if length < 4 or length > MAX_MESSAGE:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(t)!r}")
        if valid_types is not None and t not in valid_types:
            raise ProtocolViolation(f"invalid frontend message type {t}")
        end = pos + 1 + length
        if end > n:
            break
        out.append((t, pos, end))
        pos = end
    return out, pos


class Framer:
    """Accumulates bytes and yields whole messages (type, body). For control paths
    (authentication, the proxy's own connections), not for the forwarding hot path."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        frames, pos = split_messages(self._buf)
        out = [(t, bytes(self._buf[s + 5 : e])) for t, s, e in frames]
        del self._buf[:pos]
        return out

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# --- small decoders -----------------------------------------------------------------


def cstring(body: bytes, pos: int) -> tuple[bytes, int]:
    """The NUL-terminated string at pos and the position after its NUL."""
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolViolation("invalid message format: missing string terminator")
    return body[pos:end], end + 1


def parse_query(body: bytes) -> bytes:
    """SQL bytes of a Query body (without the NUL)."""
    end = body.find(b"\0")
    if end < 0:
        raise ProtocolViolation("invalid Query message: missing string terminator")
    return body[:end]


def parse_parse(body: bytes) -> tuple[bytes, bytes, bytes]:
    """Parse body -> (statement name, SQL, raw parameter-type section)."""
    name, pos = cstring(body, 0)
    sql, pos = cstring(body, pos)
    return name, sql, body[pos:]


def param_types_ok(param_section: bytes) -> bool:
    """A Parse's parameter-type section is whole: an int16 count, then that many OIDs."""
    return len(param_section) >= 2 and len(param_section) == 2 + 4 * int.from_bytes(param_section[:2], "big")


def build_parse(name: bytes, sql: bytes, param_section: bytes = b"\0\0") -> bytes:
    return message(F_PARSE, name + b"\0" + sql + b"\0" + param_section)


def parse_bind_names(body: bytes) -> tuple[bytes, bytes, int]:
    """Bind body -> (portal name, statement name, offset just after the statement name)."""
    portal, pos = cstring(body, 0)
    stmt, pos = cstring(body, pos)
    return portal, stmt, pos


def build_bind(portal: bytes, stmt: bytes, rest: bytes | memoryview) -> bytes:
    return bind_head(portal, stmt, len(rest)) + rest


def bind_head(portal: bytes, stmt: bytes, rest_length: int) -> bytes:
    """The start of a Bind whose body after the names (`rest_length` bytes) follows
    separately, as it arrives."""
    head = portal + b"\0" + stmt + b"\0"
    return bytes((F_BIND,)) + _I32.pack(4 + len(head) + rest_length) + head


def parse_target(body: bytes) -> tuple[int, bytes]:
    """Close/Describe body -> (b'S' or b'P' as int, name)."""
    if len(body) < 2 or body[0] not in (0x53, 0x50) or body[-1] != 0:
        raise ProtocolViolation("invalid Close/Describe message")
    return body[0], body[1:-1]


def build_target(type_byte: int, kind: int, name: bytes) -> bytes:
    return message(type_byte, bytes((kind,)) + name + b"\0")


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    out: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\0", pos + 1)
        if end < 0:
            break
        out[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = cstring(body, 0)
    value, _ = cstring(body, pos)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_auth(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolViolation("invalid authentication request")
    return _I32.unpack_from(body, 0)[0], body[4:]


def parse_backend_key(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8:
        raise ProtocolViolation("invalid BackendKeyData")
    return _I32.unpack_from(body, 0)[0], body[4:]


def parse_command_tag(body: bytes) -> str:
    return body.rstrip(b"\0").decode("ascii", "replace")


def parse_sasl_initial(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse body -> (mechanism, client-first-message)."""
    mech, pos = cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolViolation("invalid SASLInitialResponse")
    (length,) = _I32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if length != len(data) and not (length == -1 and not data):  # -1: no initial response
        raise ProtocolViolation("invalid SASLInitialResponse length")
    return mech.decode("ascii", "replace"), data


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    return [m.decode("ascii", "replace") for m in payload.split(b"\0") if m]


# --- builders: backend messages the proxy sends to clients --------------------------


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def error_response(code: str, msg: str, *, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None, type_byte: int = B_ERROR) -> bytes:
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(code) + b"M" + _cstr(msg)
    if detail:
        body += b"D" + _cstr(detail)
    if hint:
        body += b"H" + _cstr(hint)
    return message(type_byte, body + b"\0")


def notice_response(code: str, msg: str, *, severity: str = "NOTICE", detail: str | None = None) -> bytes:
    return error_response(code, msg, severity=severity, detail=detail, type_byte=B_NOTICE)


def fields_response(fields: dict[str, str], type_byte: int = B_ERROR) -> bytes:
    body = b"".join(k.encode() + _cstr(v) for k, v in fields.items()) + b"\0"
    return message(type_byte, body)


def auth_request(code: int, payload: bytes = b"") -> bytes:
    return message(B_AUTH, _I32.pack(code) + payload)


def auth_ok() -> bytes:
    return auth_request(AUTH_OK)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(B_PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(process_id: int, secret_key: bytes) -> bytes:
    return message(B_BACKEND_KEY, _I32.pack(process_id) + secret_key)


def ready_for_query(status: int = TX_IDLE) -> bytes:
    return message(B_READY, bytes((status,)))


def negotiate_protocol_version(newest_minor: int, unrecognized: tuple[str, ...]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unrecognized)) + b"".join(_cstr(o) for o in unrecognized)
    return message(B_NEGOTIATE_VERSION, body)


TEXT_OID = 25


def row_description(columns: list[str]) -> bytes:
    body = struct.pack("!h", len(columns))
    for name in columns:
        # table oid 0, column 0, type text, typlen -1, typmod -1, format text
        body += _cstr(name) + struct.pack("!ihihih", 0, 0, TEXT_OID, -1, -1, 0)
    return message(B_ROW_DESCRIPTION, body)


def text_values(values: list[str | None]) -> bytes:
    """A count, then each value as length + bytes (-1: NULL): a DataRow's body, and the
    parameters of a Bind in text format."""
    body = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            body += _I32.pack(-1)
        else:
            raw = v.encode()
            body += _I32.pack(len(raw)) + raw
    return body


def data_row(values: list[str | None]) -> bytes:
    return message(B_DATA_ROW, text_values(values))


def parse_data_row(body: bytes) -> list[bytes | None]:
    """A DataRow's column values (None for NULL)."""
    if len(body) < 2:
        raise ProtocolViolation("DataRow shorter than its column count")
    values: list[bytes | None] = []
    pos = 2
    for _ in range(int.from_bytes(body[:2], "big")):
        if pos + 4 > len(body):
            raise ProtocolViolation("DataRow ends inside a column length")
        n = int.from_bytes(body[pos : pos + 4], "big", signed=True)
        pos += 4
        if n < 0:
            values.append(None)
            continue
        if pos + n > len(body):
            raise ProtocolViolation("DataRow ends inside a column value")
        values.append(body[pos : pos + n])
        pos += n
    return values


def command_complete(tag: str) -> bytes:
    return message(B_COMMAND_COMPLETE, _cstr(tag))


PARSE_COMPLETE = message(B_PARSE_COMPLETE)
BIND_COMPLETE = message(B_BIND_COMPLETE)
CLOSE_COMPLETE = message(B_CLOSE_COMPLETE)
NO_DATA = message(B_NO_DATA)
EMPTY_QUERY = message(B_EMPTY_QUERY)

# --- builders: frontend messages the proxy sends to servers -------------------------


def query(sql: str | bytes) -> bytes:
    raw = sql.encode() if isinstance(sql, str) else sql
    return message(F_QUERY, raw + b"\0")


def password_message(payload: bytes) -> bytes:
    return message(F_PASSWORD, payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(F_PASSWORD, _cstr(mechanism) + _I32.pack(len(data)) + data)


SYNC = message(F_SYNC)
FLUSH = message(F_FLUSH)
TERMINATE = message(F_TERMINATE)
