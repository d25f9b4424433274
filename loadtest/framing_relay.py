"""A header-framing relay: the floor of what a Python proxy on uvloop costs per transaction.

One server connection per client connection (no pooling, no authentication of its own:
the client's startup and login pass through). In each direction the byte stream is cut
into protocol messages by their headers (type byte + 4-byte big-endian length; the
client's first message is a startup packet, a 4-byte length and no type byte), and each
read forwards the whole messages it completed in one write. That is the framing work any
proxy must do, and nothing else; the benchmark runs it as a target (`relay`).

SSLRequest and GSSENCRequest are answered 'N' by the relay itself: past an 'S' the bytes
are TLS records, which cannot be framed, and the server's one-byte answer has no header,
so passing the request through would break the framing of the server's stream.

Command line::

    python -m loadtest.framing_relay --listen PORT --to HOST:PORT [--connect-timeout S]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_LEN = struct.Struct("!I")
_ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest
MAX_STARTUP = 10000  # PostgreSQL's own limit on a startup packet


class FramingError(ValueError):
    """The stream is not PostgreSQL protocol (a length that cannot be)."""


class Framer:
    """Cuts one direction's byte stream into whole protocol messages (sans-IO).

    `feed(data)` returns (the whole messages completed so far, in one bytes object; what
    to answer the sender directly: b"N" per SSLRequest/GSSENCRequest). A partial message
    is kept for the next feed. `messages` counts the messages passed on."""

    def __init__(self, startup: bool = False) -> None:
        self._startup = startup  # the client's stream starts with a length-only packet
        self._buf = b""
        self.messages = 0

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        answer = b""
        while self._startup:
            if n - pos < 4:
                break
            length = _LEN.unpack_from(buf, pos)[0]
            if length < 8 or length > MAX_STARTUP:
                raise FramingError(f"startup packet length {length}")
            if n - pos < length:
                break
            if _LEN.unpack_from(buf, pos + 4)[0] in _ENCRYPTION_REQUESTS:
                # refused here, not forwarded; the startup packet follows
                answer += b"N"
                buf = buf[length:]
                n -= length
                continue
            pos += length
            self._startup = False
            self.messages += 1
        while not self._startup and n - pos >= 5:
            length = _LEN.unpack_from(buf, pos + 1)[0]
            if length < 4:
                raise FramingError(f"message length {length}")
            end = pos + 1 + length
            if end > n:
                break
            pos = end
            self.messages += 1
        if pos == n:
            self._buf = b""
            return buf, answer
        self._buf = buf[pos:]
        return buf[:pos], answer


class _Side(asyncio.Protocol):
    """One connection of a pair; what it reads goes, framed, to its peer."""

    def __init__(self, framer: Framer) -> None:
        self.framer = framer
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending = b""  # read before the peer was connected (the startup packet)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            out, answer = self.framer.feed(data)
        except FramingError:
            self.close()
            return
        if answer:
            self.transport.write(answer)
        if out:
            if self.peer is None:
                self.pending += out
            else:
                self.peer.transport.write(out)

    def eof_received(self) -> bool:
        return False  # close this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    # a peer that cannot keep up stops this side's reads (bounded buffers)
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Client(_Side):
    def __init__(self, to: tuple[str, int], connect_timeout: float) -> None:
        super().__init__(Framer(startup=True))
        self.to, self.connect_timeout = to, connect_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        server = _Side(Framer())
        try:
            await asyncio.wait_for(loop.create_connection(lambda: server, *self.to),
                                   self.connect_timeout)
        except (OSError, asyncio.TimeoutError):
            self.close()
            return
        if self.transport.is_closing():  # the client left while we connected
            server.close()
            return
        server.peer, self.peer = self, server
        if self.pending:
            server.transport.write(self.pending)
            self.pending = b""


async def serve(listen_host: str, listen_port: int, to: tuple[str, int],
                connect_timeout: float = 10.0) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Client(to, connect_timeout), listen_host,
                                    listen_port, backlog=1024)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.framing_relay", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--to", type=_host_port, required=True, help="HOST:PORT of the server")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to connect to the server before closing the client (default 10)")
    args = p.parse_args(argv)
    import uvloop

    async def run() -> None:
        server = await serve(args.host, args.listen, args.to, args.connect_timeout)
        print(f"listening on {args.host}:{args.listen} -> {args.to[0]}:{args.to[1]}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        uvloop.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    """`python -m loadtest.framing_relay` as a child process, like pgsplit's ProxyProcess."""

    def __init__(self, to_host: str, to_port: int, *, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.to = f"{to_host}:{to_port}"
        self.dir = tempfile.mkdtemp(prefix="framing-relay-")
        self.log_path = Path(self.dir) / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "RelayProcess":
        root = Path(__file__).resolve().parents[1]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loadtest.framing_relay", "--listen", str(self.port),
                 "--to", self.to], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(root)})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the relay did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def __enter__(self) -> "RelayProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
