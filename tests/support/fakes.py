"""A session's process, faked: FakeSessionHost implements proxy.session.host.SessionHost
with plain parts (no Proxy, no PBKDF2, no monitor, no sockets), so a real ClientSession
and real ServerConnections can be driven byte by byte. The transports are
loadtest.microbench's, which records what is written."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from loadtest.microbench import CONFIG as MICROBENCH_CONFIG
from loadtest.microbench import FakeTransport
from metrics import Metrics
from proxy.server.connection import ServerConnection
from proxy.server.pool import Pool
from proxy.server.prepared import StatementNames
from proxy.config import parse_config
from proxy.session.client import ClientSession, State
from router.classify.classifier import Classifier
from router.topology import BackendState, Role, Topology, TopologyHolder

CONFIG = MICROBENCH_CONFIG + '[routing]\nconsistency = "{consistency}"\n'  # one primary, one replica


def taken(transport: FakeTransport) -> bytes:
    """What was written to `transport` since the last call."""
    out = b"".join(transport.out)
    transport.out.clear()
    return out


class FakePool(Pool):
    """One backend's connections for one user: what a session asks of a pool (a Pool by
    type, as the compiled session holds it; none of its own workings)."""

    def __init__(self, backend: BackendState):
        self.address = SimpleNamespace(backend=backend.name, host=backend.host, port=backend.port, tls=backend.tls)
        self.closed = False
        self.idle: list[ServerConnection] = []
        self.released: list[ServerConnection] = []
        self.discarded: list[ServerConnection] = []

    def add(self) -> ServerConnection:
        conn = ServerConnection(self.address.backend, self.address.host, self.address.port, "app", "app")
        conn.connection_made(FakeTransport())
        conn.pool = self
        self.idle.append(conn)
        return conn

    def try_acquire(self) -> ServerConnection | None:
        return self.idle.pop() if self.idle else None

    async def acquire(self) -> ServerConnection:
        while not self.idle:
            await asyncio.sleep(0)
        return self.idle.pop()

    def release(self, conn: ServerConnection) -> None:
        self.released.append(conn)
        self.idle.append(conn)

    def discard(self, conn: ServerConnection) -> None:
        self.discarded.append(conn)

    async def cancel(self, conn: ServerConnection) -> None:
        return None


class FakeConsistency:
    """The process's side of read-your-writes: the primary's position is `primary_lsn`."""

    def __init__(self) -> None:
        self.primary_lsn = 0
        self.tickets = 0
        self.counted: list[str] = []
        self.wanted: list[int] = []
        self.replays: list[tuple[str, int]] = []

    def ticket(self) -> int:
        self.tickets += 1
        return self.tickets

    async def token_for(self, token) -> int:
        return token.learned(self.primary_lsn)

    async def wait_for_replica(self, lsn: int) -> None:
        return None

    def replayed(self, backend: str, lsn: int) -> None:
        self.replays.append((backend, lsn))

    def want(self, lsn: int) -> None:
        self.wanted.append(lsn)

    def count(self, outcome: str, waited_s: float | None = None) -> None:
        self.counted.append(outcome)


class FakeSessionHost:
    """A primary "p" and a replica "r" (`replica_lsn`: what it has replayed), one idle
    server connection each."""

    def __init__(self, consistency: str = "session", replica_lsn: int | None = None):
        self.config = parse_config(CONFIG.format(consistency=consistency))
        primary = BackendState("p", "127.0.0.1", 1, Role.PRIMARY)
        replica = BackendState("r", "127.0.0.1", 2, Role.REPLICA, replay_lsn=replica_lsn)
        self.topology = TopologyHolder(Topology(1, "main", primary, (replica,)))
        self.load: dict[str, int] = {}
        self.session_pooling = False
        self.dataplane = SimpleNamespace(holding=False, hold_session=lambda session: None)
        self.classifier = Classifier(1000)
        self.metrics = Metrics()
        self.consistency = FakeConsistency()
        self.statement_names = StatementNames()
        self.pools = {b.name: FakePool(b) for b in (primary, replica)}
        self.servers = {name: pool.add() for name, pool in self.pools.items()}
        self.sessions: set = set()
        self.tasks: list[asyncio.Task] = []

    def pool_for(self, backend: BackendState, user: str, database: str) -> FakePool:
        return self.pools[backend.name]

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    async def check_backend(self, backend: str) -> bool:
        return True

    def client_opened(self, session) -> None:
        self.sessions.add(session)

    def client_closed(self, session) -> None:
        self.sessions.discard(session)


def new_session(host: FakeSessionHost) -> ClientSession:
    """A session past its handshake, with a recording transport."""
    session = ClientSession(host)
    session.connection_made(FakeTransport())
    session.user = session.database = "app"
    session.set_startup_settings({})
    session.state = State.READY
    return session
