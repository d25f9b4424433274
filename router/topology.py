"""The model of the cluster that routing decides on: immutable snapshots, swapped whole.

Owns: a backend as configured (`BackendSpec`), what is known about each backend of the
active set at one moment (`BackendState`: the configured fields plus health, recovery
state, LSNs, lag, rotation) and the generation number of the set. The monitor builds a
new Topology per poll round and installs it with one assignment; readers take
`holder.current` once per decision and never see half an update. A cutover installs a
snapshot of another set with a higher generation.
Must not know: sockets, sessions, pools.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from router.tls import ServerTls


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """One backend of a set, as configured (limits already resolved against [routing])."""

    name: str
    host: str
    port: int
    role: Role  # as the active cluster names it
    weight: float = 1.0
    max_lag_bytes: int = 16 * 1024 * 1024
    max_lag_seconds: float = 5.0
    tls: ServerTls = ServerTls()  # how every connection to it (data plane, monitor, cutover) uses TLS


@dataclass(frozen=True, slots=True)
class BackendState(BackendSpec):
    """A configured backend and what the monitor knows of it. The configured fields are
    inherited, not wrapped, so that routing reads `b.host` or `b.weight` in one step."""

    up: bool = True  # optimistic until the monitor has asked
    in_recovery: bool | None = None
    replay_lsn: int | None = None  # replicas: pg_last_wal_replay_lsn()
    receive_lsn: int | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    in_rotation: bool = True  # replicas: receives reads
    error: str | None = None  # why the monitor could not reach it
    failures: int = 0  # polls in a row that did not answer

    @classmethod
    def configured(cls, spec: BackendSpec) -> BackendState:
        """The optimistic state of a backend nobody has asked yet."""
        return cls(spec.name, spec.host, spec.port, spec.role, spec.weight, spec.max_lag_bytes, spec.max_lag_seconds,
                   spec.tls)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


@dataclass(frozen=True, slots=True)
class Topology:
    generation: int
    cluster: str
    primary: BackendState
    replicas: tuple[BackendState, ...] = ()
    primary_lsn: int | None = None  # pg_current_wal_lsn() at the last poll that reached the primary
    primary_lsn_at: float = 0.0  # loop time that poll was sent
    split_brain: bool = False
    polled_at: float = 0.0  # loop time of the poll round that built it
    rotation: tuple[BackendState, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", tuple(r for r in self.replicas if r.up and r.in_rotation))

    @property
    def backends(self) -> tuple[BackendState, ...]:
        return (self.primary, *self.replicas)

    def backend(self, name: str) -> BackendState | None:
        for b in self.backends:
            if b.name == name:
                return b
        return None

    @property
    def primary_writable(self) -> bool:
        """Writes go only to the named primary, only while it reports itself as one."""
        p = self.primary
        return p.up and p.in_recovery is not True and not self.split_brain

    def with_backend(self, state: BackendState) -> "Topology":
        if state.name == self.primary.name:
            return replace(self, primary=state)
        return replace(self, replicas=tuple(state if r.name == state.name else r for r in self.replicas))


class TopologyHolder:
    """Holds the current snapshot; wakes those waiting for a newer one."""

    def __init__(self, initial: Topology):
        self.current = initial
        self._changed: asyncio.Event | None = None
        self.listeners: list[Callable[[Topology], None]] = []  # told each install (a supervisor's workers)

    def install(self, topology: Topology) -> None:
        self.current = topology  # the one assignment readers rely on
        for listener in self.listeners:
            listener(topology)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self, timeout: float) -> bool:
        """Wait for the next install; False on timeout."""
        if self._changed is None:
            self._changed = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
            return True
        except TimeoutError:
            return False
