"""Pools of server connections, one per (backend, user, database).

Owns: opening server connections (bounded by `pool.size`, or the user's `pool_size`), lending an idle one, a FIFO
wait queue with a deadline, taking connections back, and retiring them (lifetime, idle
timeout, a new topology generation). A connection is lent for one unit of work in
transaction mode, or for the client's whole session in session mode; the session decides
when to give it back. Must not know: routing, the protocol state of a unit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any
import socket
import time
from collections import deque
from time import monotonic
from dataclasses import dataclass

from proxy.auth import Credential
from proxy.config import PoolConfig
from proxy.errors import ConnectionFailure, PoolTimeout, ProxyError
from proxy.server.connection import ServerConnection, open_connection, send_cancel
from proxy.scram import ScramKeys
from proxy.server.prepared import Evictions, PreparedStatements, StatementNames
from router.tls import ServerTls

log = logging.getLogger("pgsplit.pool")


@dataclass(frozen=True, slots=True)
class Address:
    backend: str
    host: str
    port: int
    tls: ServerTls = ServerTls()


def tune_socket(conn: ServerConnection, settings: PoolConfig) -> None:
    """Keepalive and TCP_USER_TIMEOUT on a server connection's socket: a peer that went
    silent (a partition, a stopped host) ends the connection instead of holding it forever,
    whether it is idle (keepalive probes go unanswered) or has data in flight (not
    acknowledged within tcp_user_timeout_s)."""
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", settings.keepalive_idle_s),
                            ("TCP_KEEPINTVL", settings.keepalive_interval_s),
                            ("TCP_KEEPCNT", settings.keepalive_count)):
            if hasattr(socket, name):  # (Linux names; other systems keep their defaults)
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if settings.tcp_user_timeout_s and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(settings.tcp_user_timeout_s * 1000))
    except OSError as exc:  # pragma: no cover - the connection works without them
        log.warning("could not set keepalive on a connection to %s: %s", conn.backend, exc)


class Pool:
    def __init__(self, address: Address, user: str, database: str, credential: Credential,
                 settings: PoolConfig, *, generation: int = 0, on_connect=None,
                 evictions: Evictions | None = None, statement_names: StatementNames | None = None,
                 timeouts: dict[str, int] | None = None, size: int | None = None):
        self.address = address
        self.user = user
        self.database = database
        self._credential = credential
        self.settings = settings
        self.own_size = size  # the user's pool_size, overriding settings.size
        self._lifetime = settings.server_lifetime_s
        self.generation = generation
        self.idle: list[ServerConnection] = []  # LIFO: warm connections first
        self.busy: set[ServerConnection] = set()
        self.opening = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.closed = False
        self._on_connect = on_connect  # hook: (backend, exception or None)
        self.evictions = evictions if evictions is not None else Evictions()
        self.statement_names = statement_names if statement_names is not None else StatementNames()
        # units that failed with 53300 by backend, shared by the process's pools (a metric)
        self.timeouts = timeouts if timeouts is not None else {}

    def set_credential(self, credential: Credential) -> None:
        self._credential = credential

    def update_settings(self, settings: PoolConfig) -> None:
        """New settings for the connections opened and given back from now on; open ones
        keep their statements (a lower bound closes the extra at their next Parse)."""
        self.settings = settings
        self._lifetime = settings.server_lifetime_s
        for conn in self.connections():
            conn.prepared.limit = settings.max_prepared_statements

    @property
    def size(self) -> int:
        return self.own_size if self.own_size is not None else self.settings.size

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.opening

    def try_acquire(self) -> ServerConnection | None:
        """An idle connection now, without waiting; None if the caller must wait."""
        if self.waiters or not self.idle:
            return None
        conn = self.idle.pop()
        self.busy.add(conn)
        return conn

    async def acquire(self) -> ServerConnection:
        conn = self.try_acquire()
        if conn is not None:
            return conn
        if self.closed:
            raise ConnectionFailure(f"backend {self.address.backend} is no longer in use")
        if self.total < self.size and not self.waiters:
            return await self._open()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiters.append(fut)
        if self.total < self.size:
            loop.create_task(self._open_for_waiters())
        try:
            async with asyncio.timeout(self.settings.acquire_timeout_s):
                return await fut
        except TimeoutError:
            backend = self.address.backend
            self.timeouts[backend] = self.timeouts.get(backend, 0) + 1
            raise PoolTimeout(
                f"no server connection to {self.address.backend} became free within "
                f"{self.settings.acquire_timeout_s:g}s (pool size {self.size})",
                hint=(f'raise pool_size of user "{self.user}"' if self.own_size is not None else "raise pool.size")
                + " or pool.acquire_timeout_s, or shorten transactions",
            ) from None
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass

    async def _open(self) -> ServerConnection:
        self.opening += 1
        addr = self.address
        try:
            conn = await open_connection(
                addr.backend, addr.host, addr.port, self.user, self.database, self._credential, tls=addr.tls,
                timeout=self.settings.connect_timeout_s, pool=self, generation=self.generation,
                prepared=PreparedStatements(self.settings.max_prepared_statements, self.evictions,
                                            self.statement_names),
                on_lost=self._lost,
            )
        except BaseException as exc:
            self.opening -= 1
            if self._on_connect and isinstance(exc, Exception):
                self._on_connect(addr.backend, exc)
            self._wake_next()
            raise
        self.opening -= 1
        if self._on_connect:
            self._on_connect(addr.backend, None)
        tune_socket(conn, self.settings)
        if self.closed:
            conn.close()
            raise ConnectionFailure(f"backend {addr.backend} is no longer in use")
        self.busy.add(conn)
        return conn

    async def _open_for_waiters(self) -> None:
        try:
            conn = await self._open()
        except ProxyError as exc:
            # Tell one waiter why; the others keep waiting for a returned connection.
            if self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_exception(exc)
            return
        except Exception as exc:  # pragma: no cover - unexpected
            log.exception("opening a server connection failed: %s", exc)
            return
        self.busy.discard(conn)
        self._hand_over(conn)

    def _hand_over(self, conn: ServerConnection) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.busy.add(conn)
                fut.set_result(conn)
                return
        self.idle.append(conn)

    def _wake_next(self) -> None:
        if self.waiters and self.total < self.size:
            asyncio.get_running_loop().create_task(self._open_for_waiters())

    def release(self, conn: ServerConnection) -> None:
        """Take a connection back after a unit (or session) that left it idle. One with a
        cancel request in flight stays lent (to nobody) until that request is done: the
        server could still act on it, and the next borrower's statement must not be what
        it cancels."""
        if conn.cancels:
            conn.release_after_cancel = True
            return
        self.busy.discard(conn)
        now = monotonic()
        if (conn.closed or self.closed or conn.generation != self.generation
                or now - conn.created > self._lifetime):
            conn.close()
            self._wake_next()
            return
        conn.last_used = now
        if conn.sql_prepared:
            conn.drop_sql_statements()
        if self.waiters:
            self._hand_over(conn)
        else:
            self.idle.append(conn)

    def cancel(self, conn: ServerConnection) -> Coroutine[Any, Any, None]:
        """Ask the server to cancel what `conn` runs now (a CancelRequest on a connection of
        its own; the caller runs the coroutine); `conn` goes back to the pool only once the
        server has taken the request. Counted at once, not when the coroutine starts: the
        unit may end before it does."""
        conn.cancels += 1
        return self._cancel(conn)

    async def _cancel(self, conn: ServerConnection) -> None:
        try:
            await send_cancel(conn.host, conn.port, conn.process_id, conn.secret_key, conn.tls)
        finally:
            conn.cancels -= 1
            if not conn.cancels and conn.release_after_cancel:
                conn.release_after_cancel = False
                self.release(conn)

    def by_process_id(self, process_id: int) -> ServerConnection | None:
        """The connection whose server process is `process_id`, if it is one of these."""
        return next((conn for conn in self.connections() if conn.process_id == process_id), None)

    def discard(self, conn: ServerConnection) -> None:
        """Forget a broken connection (or one whose state cannot be trusted) and close it."""
        self.busy.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        conn.close()
        self._wake_next()

    def _lost(self, conn: ServerConnection, exc: Exception | None) -> None:
        if conn in self.busy:
            return  # the session lending it handles the loss and calls discard()
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._wake_next()

    def sweep(self, now: float) -> None:
        """Close idle connections past their idle timeout or lifetime."""
        keep = []
        for conn in self.idle:
            if (now - conn.last_used > self.settings.idle_timeout_s
                    or now - conn.created > self.settings.server_lifetime_s):
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep

    def retire(self) -> None:
        """Close idle connections now and busy ones when they come back."""
        self.generation += 1
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def close(self) -> None:
        self.closed = True
        self.retire()
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(ConnectionFailure(f"backend {self.address.backend} is no longer in use"))
        self.waiters.clear()

    def counts(self) -> dict[str, int]:
        return {"idle": len(self.idle), "active": len(self.busy), "opening": self.opening}

    def connections(self) -> list[ServerConnection]:
        return [*self.idle, *self.busy]


class Pools:
    """Every pool of the process, created on first use."""

    def __init__(self, settings: PoolConfig, passwords: dict[str, str], on_connect=None,
                 sizes: dict[str, int] | None = None):
        self.settings = settings
        self._passwords = passwords
        # user -> the ClientKey of its latest login, for users pgsplit has no password of
        self._keys: dict[str, ScramKeys] = {}
        self._sizes = sizes or {}  # user -> pool_size of [[users]]
        self._pools: dict[tuple[str, str, str], Pool] = {}
        self._on_connect = on_connect
        self.evictions = Evictions()  # statements closed to keep connections within the bound
        self.statement_names = StatementNames()  # the server-side names of client statements
        self.timeouts: dict[str, int] = {}  # units that waited acquire_timeout_s in vain, by backend

    def get(self, backend: str, host: str, port: int, user: str, database: str,
            tls: ServerTls = ServerTls()) -> Pool:
        """The pool for (backend, user, database); a new one (the old closed) when the
        backend's address or TLS settings changed (a reload)."""
        key = (backend, user, database)
        address = Address(backend, host, port, tls)
        pool = self._pools.get(key)
        if pool is None or pool.address != address:
            if pool is not None:
                pool.close()
            pool = self._pools[key] = Pool(
                address, user, database, self.credential(user), self.settings,
                on_connect=self._on_connect, evictions=self.evictions, statement_names=self.statement_names,
                timeouts=self.timeouts, size=self._sizes.get(user),
            )
        return pool

    def __iter__(self):
        return iter(list(self._pools.values()))

    def credential(self, user: str) -> Credential:
        return self._passwords.get(user) or self._keys.get(user)

    def update_credentials(self, passwords: dict[str, str], keep_key: Callable[[str, ScramKeys], bool]) -> None:
        """A reload: new logins use these passwords, and only the ClientKeys `keep_key`
        keeps (a user removed, given a password, or another verifier loses its key: it
        logs in to the backends again only after a client of it has); open connections
        stay (the server already trusts them)."""
        self._passwords = passwords
        self._keys = {user: keys for user, keys in self._keys.items() if keep_key(user, keys)}
        for pool in self:
            pool.set_credential(self.credential(pool.user))

    def remember_keys(self, user: str, keys: ScramKeys) -> None:
        """A client of a user known by its verifier logged in: its ClientKey logs the user in
        to backends from now on (replacing an older one: after a password change, the
        new key is the one the backends accept)."""
        self._keys[user] = keys
        for pool in self:
            if pool.user == user:
                pool.set_credential(self.credential(user))

    def update_settings(self, settings: PoolConfig) -> None:
        self.settings = settings
        for pool in self:
            pool.update_settings(settings)

    def update_sizes(self, sizes: dict[str, int]) -> None:
        """Users' own pool sizes, as for [pool] size: a pool opens no more connections
        than its new size; those it has above it end at their idle timeout or lifetime."""
        self._sizes = sizes
        for pool in self:
            pool.own_size = sizes.get(pool.user)

    def sweep(self) -> None:
        now = time.monotonic()
        for pool in self:
            pool.sweep(now)

    def retire_backends(self, keep: set[str]) -> None:
        """Close pools of backends that are no longer in the active set."""
        for key, pool in list(self._pools.items()):
            if key[0] not in keep:
                pool.close()
                del self._pools[key]

    def close(self) -> None:
        for pool in self:
            pool.close()
        self._pools.clear()

    def prepared_counts(self) -> dict[str, int]:
        """Protocol-level statements prepared on the open server connections, by backend."""
        out: dict[str, int] = {}
        for pool in self:
            name = pool.address.backend
            out[name] = out.get(name, 0) + sum(len(conn.prepared) for conn in pool.connections())
        return out

    def waiting_counts(self) -> dict[str, int]:
        """Units queued for a server connection (their pool is at its size, or opening
        connections for units queued before them), by backend."""
        out: dict[str, int] = {}
        for pool in self:
            name = pool.address.backend
            out[name] = out.get(name, 0) + len(pool.waiters)
        return out

    def timeout_counts(self) -> dict[str, int]:
        """Units that failed with 53300, by backend: 0 from a backend's first pool on, so
        that the first timeout is an increase a rate() or increase() can see."""
        out = {pool.address.backend: 0 for pool in self}
        out.update(self.timeouts)
        return out

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for pool in self:
            for state, n in pool.counts().items():
                key = (pool.address.backend, state)
                out[key] = out.get(key, 0) + n
        return out
