"""A small blocking raw-protocol client for integration tests: startup, SCRAM-SHA-256
(scramp), md5 and cleartext authentication, simple queries, and hand-built messages.

Owns: building v3 packets with struct and reading whatever comes back, so a test can send
bytes no driver would (garbage startup packets, bad lengths, unknown message types) and
assert exactly what a client sees. Independent of the proxy's code (it must not import
proxy/): the tests compare the proxy with PostgreSQL itself, so the client is written from
the protocol documentation (PostgreSQL docs, "Frontend/Backend Protocol").
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from dataclasses import dataclass, field

from scramp import ScramClient

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_1 = (3 << 16) | 1
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

SCRAM = "SCRAM-SHA-256"

__all__ = [
    "PROTOCOL_3_0", "PROTOCOL_3_1", "RawClient", "Result", "ServerError", "error_fields",
    "gssenc_request", "message", "query_message", "ssl_request", "startup_packet",
    "terminate_message", "TLS_CLIENT_HELLO",
]


# --- builders -------------------------------------------------------------------------


def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", 8 + len(body), protocol) + body


def ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!ii", 8, GSSENC_REQUEST_CODE)


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """A typed message: type byte, int32 length (counting itself), body."""
    return type_byte + struct.pack("!i", 4 + len(body)) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def terminate_message() -> bytes:
    return message(b"X")


# The first bytes of a real TLS 1.2/1.3 ClientHello record (content type 22, version 3.1,
# record length 0x0200, handshake type 1 ClientHello ...), padded with random-looking bytes.
TLS_CLIENT_HELLO = bytes.fromhex("160301020001 0001fc 0303") + bytes(range(32)) + b"\x00" * 40


# --- parsing --------------------------------------------------------------------------


def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse / NoticeResponse body: {code letter: value}."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


class ServerError(Exception):
    """An ErrorResponse received by the raw client."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(f"{fields.get('V', fields.get('S'))} {fields.get('C')}: {fields.get('M')}")
        self.fields = fields

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def severity(self) -> str | None:
        return self.fields.get("V", self.fields.get("S"))


@dataclass
class Result:
    """Everything a simple Query produced, up to and including ReadyForQuery."""

    rows: list[list[str | None]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    status: str | None = None  # ReadyForQuery status: 'I', 'T' or 'E'


def _row_description(body: bytes) -> list[str]:
    (n,) = struct.unpack_from("!h", body, 0)
    pos, names = 2, []
    for _ in range(n):
        end = body.index(b"\0", pos)
        names.append(body[pos:end].decode())
        pos = end + 1 + 18
    return names


def _data_row(body: bytes) -> list[str | None]:
    (n,) = struct.unpack_from("!h", body, 0)
    pos, values = 2, []
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    return values


# --- the client -----------------------------------------------------------------------


class RawClient:
    """One blocking TCP connection speaking the v3 protocol by hand."""

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = bytearray()
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, bytes] | None = None
        self.negotiated: tuple[int, list[str]] | None = None  # NegotiateProtocolVersion
        self.auth_codes: list[int] = []
        self.status: str | None = None

    # -- lifecycle
    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed by the server ({len(self.buf)} bytes pending)")
            self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_message(self) -> tuple[str, bytes]:
        """(type letter, body) of the next typed message; EOFError when the server closed."""
        self._fill(5)
        type_byte = chr(self.buf[0])
        (length,) = struct.unpack_from("!i", self.buf, 1)
        if length < 4:
            raise AssertionError(f"server sent a message {type_byte!r} with length {length}")
        self._fill(1 + length)
        body = bytes(self.buf[5 : 1 + length])
        del self.buf[: 1 + length]
        return type_byte, body

    def read_fatal_or_eof(self, timeout: float = 5.0) -> dict[str, str] | None:
        """Read until the server closes; return the ErrorResponse fields sent before that
        (None if it closed without one). Fails if the connection stays open."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        error = None
        while True:
            try:
                t, body = self.read_message()
            except (EOFError, ConnectionResetError, BrokenPipeError):
                return error
            except socket.timeout:
                raise AssertionError(f"the server kept the connection open for {timeout}s "
                                     f"(error so far: {error})") from None
            if t == "E":
                error = error_fields(body)
            elif t not in ("N", "S"):
                raise AssertionError(f"unexpected message {t!r} {body[:80]!r} before close")
            if time.monotonic() > deadline:
                raise AssertionError("the server kept sending without closing")

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (EOF/reset) within timeout, without
        sending anything more."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False
        return data == b""

    # -- startup
    def login(self, user: str, password: str | None, database: str | None = None,
              params: dict[str, str] | None = None, protocol: int = PROTOCOL_3_0,
              preamble: bytes = b"") -> None:
        """Startup + authentication up to the first ReadyForQuery. Raises ServerError."""
        startup = {"user": user}
        if database is not None:
            startup["database"] = database
        startup.update(params or {})
        self.send(preamble + startup_packet(startup, protocol))
        self.finish_login(user, password)

    def finish_login(self, user: str, password: str | None) -> None:
        scram: ScramClient | None = None
        while True:
            t, body = self.read_message()
            if t == "v":
                minor, count = struct.unpack_from("!ii", body, 0)
                names = [n.decode() for n in body[8:].split(b"\0")[:count]]
                self.negotiated = (minor, names)
            elif t == "R":
                (code,) = struct.unpack_from("!i", body, 0)
                self.auth_codes.append(code)
                payload = body[4:]
                if code == 0:
                    continue
                if password is None:
                    raise AssertionError(f"server asked for authentication {code}, no password given")
                if code == 3:
                    self.send(message(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    digest = b"md5" + hashlib.md5(inner + payload[:4]).hexdigest().encode()
                    self.send(message(b"p", digest + b"\0"))
                elif code == 10:
                    mechanisms = [m.decode() for m in payload.split(b"\0") if m]
                    assert SCRAM in mechanisms, mechanisms
                    scram = ScramClient([SCRAM], user, password)
                    first = scram.get_client_first().encode()
                    self.send(message(b"p", SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first))
                elif code == 11:
                    assert scram is not None
                    scram.set_server_first(payload.decode())
                    self.send(message(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    assert scram is not None
                    scram.set_server_final(payload.decode())
                else:
                    raise AssertionError(f"unsupported authentication request {code}")
            elif t == "S":
                name, value = body.split(b"\0")[:2]
                self.parameters[name.decode()] = value.decode()
            elif t == "K":
                pid, = struct.unpack_from("!i", body, 0)
                self.backend_key = (pid, body[4:])
            elif t == "N":
                continue
            elif t == "E":
                raise ServerError(error_fields(body))
            elif t == "Z":
                self.status = chr(body[0])
                return
            else:
                raise AssertionError(f"unexpected message {t!r} during startup")

    # -- queries
    def read_result(self) -> Result:
        """Read replies up to and including the next ReadyForQuery."""
        result = Result()
        while True:
            t, body = self.read_message()
            if t == "T":
                result.columns = _row_description(body)
            elif t == "D":
                result.rows.append(_data_row(body))
            elif t == "C":
                result.tags.append(body.rstrip(b"\0").decode())
            elif t == "E":
                result.errors.append(error_fields(body))
            elif t == "N":
                result.notices.append(error_fields(body))
            elif t == "Z":
                result.status = self.status = chr(body[0])
                return result
            elif t in ("S", "A", "I", "1", "2", "3", "n", "t", "s"):
                continue
            else:
                raise AssertionError(f"unexpected message {t!r} in a query result")

    def query(self, sql: str) -> Result:
        self.send(query_message(sql))
        return self.read_result()

    def scalar(self, sql: str) -> str | None:
        result = self.query(sql)
        if result.errors:
            raise ServerError(result.errors[0])
        assert len(result.rows) == 1 and len(result.rows[0]) == 1, result
        return result.rows[0][0]
