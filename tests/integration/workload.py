"""The application load of the cutover tests: clients that write, read their own writes and
run transactions through the proxy while a cutover happens, keeping what was acknowledged.

Tables (the caller creates them): acks (id bigserial PRIMARY KEY, client int, seq int),
counters (client int PRIMARY KEY, n int) with a row per client.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

from helpers import async_wait_until

STUCK_S = 30.0  # a statement with no answer this long is a failure of its own (a cutover holds units < 1 s)


@dataclass
class Client:
    """One application connection: autocommit inserts, reads of its own rows (read-your-
    writes), explicit transactions; every acknowledged write kept as (seq, id, server port)."""

    index: int
    conn: asyncpg.Connection
    think_s: float
    seq: int = 0
    acked: list[tuple[int, int, int]] = field(default_factory=list)
    ops: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, kind)
    errors: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.index)
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            r = rng.random()
            t0 = loop.time()
            kind = "write" if r < 0.45 else "read" if r < 0.8 else "tx"
            try:
                async with asyncio.timeout(STUCK_S):
                    await self._one(kind)
            except TimeoutError:
                # Reported, and this client stops: its connection is in an unknown state.
                self.errors.append(f"client {self.index} {kind}: no answer in {STUCK_S:g} s")
                return
            except Exception as exc:  # noqa: BLE001  every client-visible error is a failure
                self.errors.append(f"client {self.index} {kind}: {type(exc).__name__}: {exc}")
                if self.conn.is_closed():
                    return
            self.ops.append((t0, loop.time(), kind))
            await asyncio.sleep(self.think_s)

    async def _one(self, kind: str) -> None:
        """One statement, or one transaction, of `kind`."""
        if kind == "write":
            self.seq += 1
            row = await self.conn.fetchrow(
                "INSERT INTO acks (client, seq) VALUES ($1, $2) RETURNING id, inet_server_port()",
                self.index, self.seq)
            self.acked.append((self.seq, row[0], row[1]))
        elif kind == "read":
            n = await self.conn.fetchval("SELECT count(*) FROM acks WHERE client = $1", self.index)
            if n != len(self.acked):
                self.stale.append(f"client {self.index} read {n} of its {len(self.acked)} rows")
        else:
            self.seq += 1
            async with self.conn.transaction():
                ident = await self.conn.fetchval(
                    "INSERT INTO acks (client, seq) VALUES ($1, $2) RETURNING id", self.index, self.seq)
                await self.conn.execute("UPDATE counters SET n = n + 1 WHERE client = $1", self.index)
                port = await self.conn.fetchval("SELECT inet_server_port()")
            self.acked.append((self.seq, ident, port))


class Workload:
    """`n` clients, plus an observer connection opened with them (it asks questions between
    them, on a connection as old as theirs)."""

    def __init__(self, dsn: str, n: int, think_s: float):
        self.dsn, self.n, self.think_s = dsn, n, think_s
        self.clients: list[Client] = []
        self.conns: list[asyncpg.Connection] = []
        self.observer: asyncpg.Connection | None = None
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def start(self, warm_ops: int = 3) -> "Workload":
        *self.conns, self.observer = await asyncio.gather(
            *(asyncpg.connect(self.dsn, timeout=10) for _ in range(self.n + 1)))
        self.clients = [Client(i, c, self.think_s) for i, c in enumerate(self.conns)]
        self.tasks = [asyncio.create_task(c.run(self.stop)) for c in self.clients]
        await async_wait_until(lambda: all(len(c.ops) >= warm_ops for c in self.clients), timeout=30,
                               message="every client to run a few statements")
        return self

    async def finish(self) -> None:
        """Stop the clients and wait for their last statements (connections stay open)."""
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def close(self) -> None:
        """Stop the clients (each within STUCK_S of its last statement) and close every
        connection, ending those that do not close in time."""
        self.stop.set()
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=STUCK_S + 5)
            for task in late:  # (cannot happen while the timeouts above hold)
                task.cancel()
        conns = [c for c in [*self.conns, self.observer] if c is not None and not c.is_closed()]
        for conn, result in zip(conns, await asyncio.gather(*(c.close(timeout=5) for c in conns),
                                                            return_exceptions=True)):
            if isinstance(result, BaseException):
                conn.terminate()

    @property
    def errors(self) -> list[str]:
        return [e for c in self.clients for e in c.errors]

    @property
    def stale(self) -> list[str]:
        return [e for c in self.clients for e in c.stale]

    def acked(self, ports: Iterable[int] | None = None) -> set[tuple[int, int]]:
        """(client, seq) of the acknowledged writes, those taken by `ports` when given."""
        ports = None if ports is None else set(ports)
        return {(c.index, seq) for c in self.clients for seq, _, p in c.acked if ports is None or p in ports}

    def ids(self, port: int) -> list[int]:
        return [i for c in self.clients for _, i, p in c.acked if p == port]

    def count(self, port: int) -> int:
        return sum(1 for c in self.clients for _, _, p in c.acked if p == port)

    def longest_wait(self, t0: float, t1: float) -> float:
        """The longest statement that overlapped [t0, t1]: what a client saw of the pause."""
        return max((end - start for c in self.clients for start, end, _ in c.ops if end >= t0 and start <= t1),
                   default=0.0)

    def finished_after(self, t: float) -> float:
        """How long after `t` the last statement in flight at `t` ended."""
        return max((end - t for c in self.clients for start, end, _ in c.ops if start < t < end), default=0.0)

    def ops_per_second(self, t0: float, t1: float) -> float:
        return sum(1 for c in self.clients for _, end, _ in c.ops if t0 <= end <= t1) / (t1 - t0)

    def same_connections(self) -> bool:
        """Every client still on the connection it started with, and the observer too."""
        return all(c.conn is self.conns[i] and not c.conn.is_closed() for i, c in enumerate(self.clients)) \
            and self.observer is not None and not self.observer.is_closed()
