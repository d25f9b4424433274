"""loadtest.relay on loopback: the delay it adds, byte order under jitter, the bandwidth
cap, flow control, half-close and shutdown; and its link model (`Shaper`) as a function.

No PostgreSQL: an echo server (or a sink) on 127.0.0.1 sits behind the relay.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.relay import LinkProfile, Relay, RelayThread, Shaper, main


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _rtts(port: int, n: int, size: int = 100) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            writer.write(b"x" * size)
            await writer.drain()
            await reader.readexactly(size)
            out.append(time.perf_counter() - t)
        return out
    finally:
        writer.close()


# --------------------------------------------------------------------------- the model


def test_shaper_adds_the_delay_and_serializes_on_the_bandwidth() -> None:
    s = Shaper(LinkProfile(delay_ms=40, bandwidth_mbit=8), random.Random(1))  # 1 MB/s
    start, deliver = s.schedule(10.0, 1000, 0.0)
    assert start == 10.0 and deliver == pytest.approx(10.0 + 0.001 + 0.040)
    # the link is busy for 1 ms: the next chunk starts after it, whoever reads it
    start2, deliver2 = s.schedule(10.0, 1000, 0.0)
    assert start2 == pytest.approx(10.001) and deliver2 == pytest.approx(10.042)
    # an idle link starts at once
    assert s.schedule(20.0, 0, 0.0) == (20.0, pytest.approx(20.040))


@settings(max_examples=60, deadline=None)
@given(delay=st.integers(0, 50), jitter=st.integers(0, 100), seed=st.integers(0, 2**32),
       sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=40),
       gaps=st.lists(st.integers(0, 50), min_size=40, max_size=40))
def test_jitter_never_reorders_and_never_delivers_early(delay: int, jitter: int,
                                                        seed: int, sizes: list[int],
                                                        gaps: list[int]) -> None:
    s = Shaper(LinkProfile(delay_ms=delay, jitter_ms=jitter, bandwidth_mbit=100),
               random.Random(seed))
    now, last = 0.0, 0.0
    for size, gap_ms in zip(sizes, gaps):
        now += gap_ms / 1000
        start, deliver = s.schedule(now, size, last)
        assert start >= now
        assert deliver >= last  # order within a direction is kept
        assert deliver >= start + size / 12.5e6 - 1e-9  # not before it was transmitted
        last = deliver


def test_profile_checks_and_read_size() -> None:
    with pytest.raises(ValueError):
        LinkProfile(delay_ms=-1)
    with pytest.raises(ValueError):
        LinkProfile(bandwidth_mbit=0)
    assert LinkProfile().read_size == 65536
    assert LinkProfile(bandwidth_mbit=1).read_size == 1024  # 5 ms of 1 Mbit/s is 625 bytes
    assert LinkProfile(bandwidth_mbit=100).read_size == 62500


def test_listens_on_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        Relay("127.0.0.1", 1, listen_host="0.0.0.0")
    with pytest.raises(SystemExit):
        main(["--listen", "0", "--to", "127.0.0.1:1", "--listen-host", "10.1.2.3"])


# --------------------------------------------------------------------------- on loopback


async def test_round_trip_is_twice_the_delay(echo_port: int) -> None:
    direct = statistics.median(await _rtts(echo_port, 20))
    async with Relay("127.0.0.1", echo_port, LinkProfile(delay_ms=40)) as relay:
        rtts = await _rtts(relay.port, 25)
    rtt = statistics.median(rtts[1:])  # the first one also pays for the handshake
    print(f"\nrelay 40 ms one-way: RTT median {rtt * 1000:.2f} ms (direct "
          f"{direct * 1000:.3f} ms), min {min(rtts[1:]) * 1000:.2f}, "
          f"max {max(rtts[1:]) * 1000:.2f}")
    assert 0.080 <= rtt <= 0.090
    assert min(rtts[1:]) >= 0.080
    assert rtts[0] >= 0.160  # handshake (one RTT) + the first exchange


async def test_byte_order_survives_jitter(echo_port: int) -> None:
    # jitter as large as the delay: chunks would overtake each other if it could reorder
    profile = LinkProfile(delay_ms=5, jitter_ms=5)
    payload = random.Random(3).randbytes(3 * 1024 * 1024)
    async with Relay("127.0.0.1", echo_port, profile, seed=11) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)

        async def send() -> None:
            rng = random.Random(5)
            i = 0
            while i < len(payload):
                n = rng.randint(1, 20000)
                writer.write(payload[i:i + n])
                await writer.drain()
                i += n
                if rng.random() < 0.1:
                    await asyncio.sleep(rng.random() * 0.004)
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        got = await asyncio.wait_for(reader.read(-1), 30)  # until the echoed EOF
        await sender
        writer.close()
        assert relay.stats.bytes_up == relay.stats.bytes_down == len(payload)
    assert got == payload


async def test_bandwidth_cap(echo_port: int) -> None:
    size = 1_000_000
    async with Relay("127.0.0.1", echo_port, LinkProfile(bandwidth_mbit=40)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        t = time.perf_counter()
        writer.write(b"y" * size)
        await writer.drain()
        await reader.readexactly(size)
        elapsed = time.perf_counter() - t
        writer.close()
    mbit = size * 8 / elapsed / 1e6
    print(f"\nrelay capped at 40 Mbit/s: {mbit:.1f} Mbit/s through an echo (both ways)")
    # up and down are pipelined, each capped: the echo takes a bit more than 1 MB / 5 MB/s
    assert 0.2 <= elapsed <= 0.4


async def test_a_slow_receiver_bounds_the_relay_buffer() -> None:
    """Flow control: with a receiver that does not read, the relay holds at most its
    buffer (plus one read) per direction, and the sender is pushed back."""
    received = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # never reads
        received.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    buffer_bytes = 256 * 1024
    try:
        async with Relay("127.0.0.1", port, LinkProfile(buffer_bytes=buffer_bytes)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            chunk = b"z" * 65536
            sent = 0
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(1.0):
                    while True:
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
            assert received.is_set()
            assert sent < 64 * 1024 * 1024  # the sender was pushed back
            assert relay.stats.max_buffered <= buffer_bytes + 65536
            writer.transport.abort()
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_half_close_and_clean_shutdown(echo_port: int) -> None:
    relay = await Relay("127.0.0.1", echo_port, LinkProfile(delay_ms=10)).start()
    # the client's EOF reaches the server after the data; the reply still comes back
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"last words")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"last words"
    writer.close()
    # connections still open when the relay closes are ended, and close() returns
    others = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(3)]
    for _, w in others:
        w.write(b"ping")
    await asyncio.sleep(0.05)
    assert relay.stats.active == 3
    await asyncio.wait_for(relay.close(), 5)
    for r, w in others:
        try:
            rest = await asyncio.wait_for(r.read(-1), 5)
        except ConnectionError:
            rest = b""
        assert rest in (b"", b"ping")
        w.close()
    assert relay.stats.active == 0
    await relay.close()  # idempotent
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", relay.port)


async def test_unreachable_destination_closes_the_client() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with Relay("127.0.0.1", port) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            assert await asyncio.wait_for(reader.read(-1), 5) == b""
        except ConnectionError:
            pass
        writer.close()
        assert relay.stats.refused == 1


def test_relay_thread_for_synchronous_callers() -> None:
    import socket

    # a blocking client: the relay keeps time in its own thread meanwhile
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    with RelayThread(port, LinkProfile(delay_ms=20)) as relay:
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
            conn, _ = srv.accept()
            with conn:
                c.sendall(b"hello")
                conn.settimeout(5)
                assert conn.recv(5) == b"hello"
                conn.sendall(b"back")
                assert c.recv(4) == b"back"
        elapsed = time.perf_counter() - t
        assert relay.stats.connections == 1
    srv.close()
    # handshake (40 ms) + one way (20 ms) + back (20 ms)
    assert 0.080 <= elapsed < 0.5


def test_a_relay_thread_stopped_as_clients_arrive_leaves_no_socket_open(echo_port: int) -> None:
    """Clients that connect while a RelayThread stops are closed before its loop is: a
    socket left for the garbage collector warns (an error in this suite) in whichever
    later test happens to collect it."""
    import gc
    import socket
    import warnings

    for _ in range(30):
        relay = RelayThread(echo_port).start()
        clients = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(3)]
        relay.stop()
        for c in clients:
            c.close()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
        leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert not leaked, leaked
