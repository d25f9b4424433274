"""A userspace WAN relay: a loopback TCP port that forwards to another address with a
configurable one-way delay, jitter and bandwidth cap, in both directions.

This machine's kernel has no netem, so "another region" is played in userspace: point a
replica's ``primary_conninfo``, a subscription's connection or the proxy's backend at the
relay's port instead of the server's.

Owns: the relay's sockets and tasks, and the link model (`Shaper`, pure: time in,
schedule out). Must not know: PostgreSQL; it moves bytes.

The link model, per direction (client -> server and server -> client):

- a chunk read from one side occupies the direction's link for ``len / bandwidth``
  seconds (the link is shared by every connection of the relay, like one WAN link);
  the reader does not read the next chunk before its chunk starts transmitting, so a
  capped link pushes back on the sender through TCP instead of queueing without bound;
- the chunk is delivered ``delay +- jitter`` (uniform) after its transmission ends, but
  never before the chunk read before it on the same connection: jitter varies the delay,
  it never reorders bytes within a direction;
- at most ``buffer_bytes`` per connection and direction are read and not yet delivered;
  above that the relay stops reading that side until the writer has drained half of it
  (and the writer waits for the destination's socket, ``drain()``), so a slow receiver
  slows the sender instead of growing memory.

An EOF from one side is delivered (``write_eof``) after the data before it; the other
direction goes on (half-close) until it ends too. A reset on either side ends both.

Command line::

    python -m loadtest.relay --listen PORT --to HOST:PORT --delay-ms 40 [--jitter-ms 5]
                             [--bandwidth-mbit 100] [--buffer-kb 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["LinkProfile", "Relay", "RelayStats", "RelayThread", "Shaper", "main"]

log = logging.getLogger("pgsplit.relay")

READ_SIZE = 64 * 1024
MIN_READ_SIZE = 1024


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """One direction's behaviour (both directions get the same)."""

    delay_ms: float = 0.0  # one-way
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter] around delay, floored at 0
    bandwidth_mbit: float | None = None  # None: no cap
    buffer_bytes: int = 8 * 1024 * 1024  # read but not delivered, per connection+direction

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise ValueError("bandwidth_mbit must be > 0 (or None for no cap)")
        if self.buffer_bytes < MIN_READ_SIZE:
            raise ValueError(f"buffer_bytes must be >= {MIN_READ_SIZE}")

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.bandwidth_mbit is None else self.bandwidth_mbit * 1e6 / 8

    @property
    def read_size(self) -> int:
        """Bytes read at a time: at most ~5 ms of the link's time, so a capped link
        delivers in steps no coarser than that."""
        rate = self.bytes_per_s
        if rate is None:
            return READ_SIZE
        return max(MIN_READ_SIZE, min(READ_SIZE, int(rate * 0.005)))


class Shaper:
    """The schedule of one direction of the link: when a chunk may start transmitting
    and when it is delivered. Pure: the caller passes ``now``. One instance per
    direction, shared by the relay's connections (the bandwidth is the link's); the
    no-reordering rule is per connection (``last_delivery``, kept by the caller)."""

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile = profile
        self._rng = rng
        self._free_at = 0.0  # when the link has finished transmitting what it was given

    def schedule(self, now: float, nbytes: int, last_delivery: float) -> tuple[float, float]:
        """(transmission start, delivery time) of ``nbytes`` read at ``now``, delivered
        no earlier than ``last_delivery`` (the same connection's previous chunk)."""
        p = self.profile
        start = max(now, self._free_at)
        rate = p.bytes_per_s
        end = start + (nbytes / rate if rate else 0.0)
        self._free_at = end
        delay = p.delay_ms / 1000
        if p.jitter_ms:
            delay += self._rng.uniform(-p.jitter_ms, p.jitter_ms) / 1000
        return start, max(end + max(0.0, delay), last_delivery)


@dataclass
class RelayStats:
    connections: int = 0  # accepted so far
    active: int = 0
    refused: int = 0  # the destination could not be reached
    bytes_up: int = 0  # client -> server, delivered
    bytes_down: int = 0  # server -> client, delivered
    max_buffered: int = 0  # the most bytes one direction of one connection held


@dataclass
class _Pipe:
    """One direction of one connection."""

    name: str
    shaper: Shaper
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buffer_bytes: int
    queue: deque[tuple[float, bytes | None]] = field(default_factory=deque)
    queued: int = 0
    last_delivery: float = 0.0
    has_items: asyncio.Event = field(default_factory=asyncio.Event)
    has_room: asyncio.Event = field(default_factory=asyncio.Event)


class Relay:
    """The relay: ``await Relay(...).start()``, ``relay.port``, ``await relay.close()``
    (or ``async with``). Listens on a loopback address only."""

    def __init__(self, to_host: str, to_port: int, profile: LinkProfile | None = None, *,
                 listen_host: str = "127.0.0.1", listen_port: int = 0,
                 seed: int | None = None) -> None:
        if not _is_loopback(listen_host):
            raise ValueError(f"the relay listens on loopback addresses only, not "
                             f"{listen_host!r}")
        self.to_host = to_host
        self.to_port = to_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._profile = profile or LinkProfile()
        rng = random.Random(seed)
        self._up = Shaper(self._profile, rng)
        self._down = Shaper(self._profile, rng)
        self.stats = RelayStats()
        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    def set_profile(self, profile: LinkProfile) -> None:
        """Change the link for chunks read from now on (both directions)."""
        self._profile = profile
        self._up.profile = profile
        self._down.profile = profile

    @property
    def port(self) -> int:
        """The port it listens on (also after close)."""
        if self._port is None:
            raise RuntimeError("relay not started")
        return self._port

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.listen_host,
                                                  self._listen_port)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("relay %s:%d -> %s:%d (%s)", self.listen_host, self.port, self.to_host,
                 self.to_port, self._profile)
        return self

    async def __aenter__(self) -> Relay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening, end every connection (both sockets closed), wait for the
        tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ connections
    async def _accept(self, c_reader: asyncio.StreamReader,
                      c_writer: asyncio.StreamWriter) -> None:
        # The connection runs in a task of its own: close() cancels it, and the stream
        # server's callback task (which would log a cancelled callback) ends at once.
        if self._closed:
            c_writer.transport.abort()
            return
        # Registered here, not in _connection: close() may cancel the task before its first
        # step, and a coroutine cancelled before it starts never runs its finally, which
        # would leave the client's socket open for the garbage collector.
        self._writers.add(c_writer)
        task = asyncio.ensure_future(self._connection(c_reader, c_writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, c_reader: asyncio.StreamReader,
                          c_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        s_writer: asyncio.StreamWriter | None = None
        peer = c_writer.get_extra_info("peername")
        clean = False  # both directions ended with an EOF: flush, then close
        try:
            # the TCP handshake to the far side costs a round trip before any data
            await _sleep_until(time.monotonic() + 2 * self._profile.delay_ms / 1000)
            try:
                s_reader, s_writer = await asyncio.open_connection(self.to_host, self.to_port)
            except OSError as exc:
                self.stats.refused += 1
                log.info("relay: %s: cannot reach %s:%d: %s", peer, self.to_host,
                         self.to_port, exc)
                return
            self._writers.add(s_writer)
            for w in (c_writer, s_writer):
                _set_nodelay(w)
            up = _Pipe("up", self._up, c_reader, s_writer, self._profile.buffer_bytes)
            down = _Pipe("down", self._down, s_reader, c_writer, self._profile.buffer_bytes)
            pipes = [asyncio.ensure_future(self._run_pipe(p)) for p in (up, down)]
            try:
                # a pipe that fails (reset, aborted) ends the connection; one that ends
                # with an EOF leaves the other direction running (half-close)
                pending = set(pipes)
                while pending:
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    if any(t.exception() is not None for t in done):
                        break
                clean = not pending
            finally:
                for t in pipes:
                    t.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            for w in (c_writer, s_writer):
                if w is not None:
                    self._writers.discard(w)
                    if clean:
                        w.close()  # what is still in the transport's buffer goes out first
                    else:
                        w.transport.abort()
            self.stats.active -= 1

    async def _run_pipe(self, p: _Pipe) -> None:
        """Read and write one direction until its EOF is delivered; raise at once when
        either side fails."""
        p.has_room.set()
        tasks = [asyncio.ensure_future(self._read_side(p)),
                 asyncio.ensure_future(self._write_side(p))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            await tasks[1]  # the reader saw EOF: the writer delivers the rest, then EOF
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read_side(self, p: _Pipe) -> None:
        while True:
            await p.has_room.wait()
            data = await p.reader.read(self._profile.read_size)
            now = time.monotonic()
            if not data:
                p.queue.append((max(now, p.last_delivery), None))  # EOF, after the data
                p.has_items.set()
                return
            start, deliver = p.shaper.schedule(now, len(data), p.last_delivery)
            p.last_delivery = deliver
            p.queue.append((deliver, data))
            p.queued += len(data)
            self.stats.max_buffered = max(self.stats.max_buffered, p.queued)
            p.has_items.set()
            if p.queued >= p.buffer_bytes:
                p.has_room.clear()
            if start > now:  # the link is busy: read again when this chunk goes out
                await _sleep_until(start)

    async def _write_side(self, p: _Pipe) -> None:
        while True:
            if not p.queue:
                p.has_items.clear()
                await p.has_items.wait()
                continue
            due, data = p.queue[0]
            await _sleep_until(due)
            p.queue.popleft()
            if data is None:
                if p.writer.can_write_eof():
                    p.writer.write_eof()
                return
            p.writer.write(data)
            await p.writer.drain()
            p.queued -= len(data)
            if p.name == "up":
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            if p.queued <= p.buffer_bytes // 2:
                p.has_room.set()


async def _sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches `deadline`, never less: uvloop's clock is the one
    cached at the start of the loop's iteration, in whole milliseconds, so its timers can
    fire up to a millisecond before the real time they were set for."""
    while (wait := deadline - time.monotonic()) > 0:
        await asyncio.sleep(wait)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class RelayThread:
    """A `Relay` on its own event loop in a daemon thread, for synchronous callers (the
    sandbox and its tests block their thread; the relay must keep time meanwhile).
    ``with RelayThread(port, LinkProfile(delay_ms=40)) as relay: relay.port``."""

    def __init__(self, to_port: int, profile: LinkProfile | None = None, *,
                 to_host: str = "127.0.0.1", listen_port: int = 0,
                 seed: int | None = None) -> None:
        self._args = (to_host, to_port, profile)
        self._kwargs = {"listen_port": listen_port, "seed": seed}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.relay: Relay | None = None

    @property
    def port(self) -> int:
        assert self.relay is not None
        return self.relay.port

    @property
    def stats(self) -> RelayStats:
        assert self.relay is not None
        return self.relay.stats

    def set_profile(self, profile: LinkProfile) -> None:
        assert self._loop is not None and self.relay is not None
        self._loop.call_soon_threadsafe(self.relay.set_profile, profile)

    def start(self) -> RelayThread:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self.relay = loop.run_until_complete(
                    Relay(*self._args, **self._kwargs).start())  # type: ignore[arg-type]
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.relay.close())
                # A client accepted just before the listener closed reaches _accept (which
                # aborts it) only a few loop iterations later, through the loop's own tasks and
                # callbacks: run those out, so that no socket is left to the garbage collector
                # (whose warning lands in whichever later test collects it).
                while True:
                    loop.run_until_complete(asyncio.sleep(0))
                    if not (pending := asyncio.all_tasks(loop)):
                        break
                    loop.run_until_complete(asyncio.wait(pending))
                loop.close()

        self._thread = threading.Thread(target=run, name="pgsplit-relay", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    profile = LinkProfile(delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                          bandwidth_mbit=args.bandwidth_mbit,
                          buffer_bytes=args.buffer_kb * 1024)
    to_host, to_port = args.to
    relay = await Relay(to_host, to_port, profile, listen_host=args.listen_host,
                        listen_port=args.listen, seed=args.seed).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"relay {args.listen_host}:{relay.port} -> {to_host}:{to_port}: delay "
          f"{profile.delay_ms:g} ms, jitter {profile.jitter_ms:g} ms, bandwidth "
          f"{'unlimited' if profile.bandwidth_mbit is None else f'{profile.bandwidth_mbit:g} Mbit/s'}"
          " (each direction); Ctrl-C stops", flush=True)
    await stop.wait()
    await relay.close()
    s = relay.stats
    print(f"relay stopped: {s.connections} connections ({s.refused} refused), "
          f"{s.bytes_up} bytes up, {s.bytes_down} bytes down", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.relay",
        description="Loopback TCP relay with one-way delay, jitter and a bandwidth cap "
                    "in both directions (a WAN link without netem).")
    parser.add_argument("--listen", type=int, required=True, help="port to listen on (0: any)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--to", type=_host_port, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="uniform +- jitter around the delay (never reorders)")
    parser.add_argument("--bandwidth-mbit", type=float, default=None,
                        help="cap per direction, Mbit/s (default: none)")
    parser.add_argument("--buffer-kb", type=int, default=8192,
                        help="bytes in flight per connection and direction before the "
                             "relay stops reading (KiB)")
    parser.add_argument("--seed", type=int, default=None, help="jitter random seed")
    args = parser.parse_args(argv)
    if not _is_loopback(args.listen_host):
        parser.error(f"--listen-host must be a loopback address, not {args.listen_host!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from proxy.loop import run  # uvloop, chosen in one place

    run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
