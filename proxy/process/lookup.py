"""[auth_query]: the SCRAM verifier of a user not in [[users]], read on the server.

Owns: a few asyncpg control connections to the active cluster's primary (as the [monitor]
account, or [auth_query]'s own login), at most `CONNECTIONS` lookups at once, one lookup in
flight per user name (the clients logging in as that name at the same time all wait for
it), the deadlines (a client waits at most `timeout_s` from its start; a lookup's
connecting, logging in and query end within `timeout_s` once it has a connection, else that
connection is dropped), and two small caches: the verifiers found, and, in a smaller one,
the names the server has none for (so that a client trying names does not push the real
users out, nor make one query per attempt). A client that leaves does not cancel the
lookup it waited for. Clients never see why a lookup failed (it may name a server, or the
lookup role's privileges): they get `GENERIC`, the log says the rest. Must not know: the
SCRAM exchange.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import asyncpg

from proxy.errors import ConnectionFailure
from proxy.scram import BadVerifier, Verifier
from router import pg
from router.topology import BackendState

log = logging.getLogger("pgsplit.auth_query")

CONNECTIONS = 3  # lookups at once, each on a control connection of its own
GENERIC = "authentication lookup failed; see the pgsplit log"


@dataclass(frozen=True)
class LookupSettings:
    query: str
    user: str
    password: str | None = field(repr=False)
    dbname: str
    timeout_s: float
    cache_ttl_s: float
    cache_size: int


class LookupFailed(ConnectionFailure):
    """The server did not say (dead, slow, refused the lookup's login, a bad query); the
    message is `GENERIC`, the reason is in the log."""

    fatal = True

    def __init__(self, message: str = GENERIC):
        super().__init__(message)


class UserLookup:
    def __init__(self, settings: LookupSettings, connections: int = CONNECTIONS):
        self.settings = settings
        self._found: OrderedDict[str, tuple[float, Verifier]] = OrderedDict()
        # "no such user" answers, kept apart and fewer: random names must not evict real users
        self._missing: OrderedDict[str, float] = OrderedDict()
        self._missing_size = max(1, settings.cache_size // 4)
        self._in_flight: dict[str, asyncio.Task] = {}
        self._connections = connections
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[tuple[pg.Endpoint, asyncpg.Connection]] = []
        self._busy: set[asyncpg.Connection] = set()
        self._closed = False

    async def verifier(self, user: str, server: BackendState) -> Verifier | None:
        """The user's verifier on `server` (the active primary), None when the server has
        none (no such role, no password, an md5 hash), or LookupFailed within `timeout_s`."""
        if self._closed:
            raise LookupFailed()
        hit = self._cached(user)
        if hit is not None:
            return hit[0]
        task = self._in_flight.get(user)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._look_up(user, server))
            self._in_flight[user] = task
            task.add_done_callback(functools.partial(self._landed, user))
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                # shield: a client that leaves does not cut the lookup (and its connection) off
                return await asyncio.shield(task)
        except TimeoutError:
            log.warning('auth_query: no answer for user "%s" within %gs (auth_query.timeout_s; %d lookups in '
                        "flight): the login is refused", user, self.settings.timeout_s, len(self._in_flight))
            raise LookupFailed() from None
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                raise LookupFailed() from None  # (close() stopped the lookup)
            raise

    def _landed(self, user: str, task: asyncio.Task) -> None:
        if self._in_flight.get(user) is task:
            del self._in_flight[user]
        if not task.cancelled():
            task.exception()  # (retrieved: every waiter may have left)

    async def _look_up(self, user: str, server: BackendState) -> Verifier | None:
        s = self.settings
        where = f"{server.name} ({server.host}:{server.port})"
        try:
            async with asyncio.timeout(s.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            log.warning('auth_query: could not look up user "%s": all %d lookup connections stayed busy for %gs',
                        user, self._connections, s.timeout_s)
            raise LookupFailed() from None
        try:
            if self._closed:
                raise LookupFailed()
            rows = await self._query(user, server)
        except TimeoutError:
            log.warning('auth_query: could not look up user "%s": the auth_query server %s did not answer within '
                        "%gs (auth_query.timeout_s)", user, where, s.timeout_s)
            raise LookupFailed() from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if self._closed:
                raise LookupFailed() from None
            log.warning('auth_query: could not look up user "%s" on the auth_query server %s: %s',
                        user, where, pg.error_text(exc))
            raise LookupFailed() from None
        finally:
            self._slots.release()
        if len(rows) > 1:
            log.error('auth_query: the query returned %d rows for user "%s" (at most one is allowed): the login is '
                      "refused; fix auth_query.query", len(rows), user)
            raise LookupFailed()
        text = None if not rows or rows[0][-1] is None else str(rows[0][-1])
        verifier = None
        if text is not None:
            try:
                verifier = Verifier.parse(text)
            except BadVerifier:
                log.warning('auth_query: the server holds no SCRAM-SHA-256 verifier for user "%s" (an md5 hash?): '
                            "its logins are refused", user)
        if not self._closed:
            self._remember(user, verifier)
        return verifier

    async def _query(self, user: str, server: BackendState) -> list:
        """The query's rows, on an idle connection to `server` or a new one, within
        `timeout_s`; a connection that fails or runs past it is dropped (the query may
        still run there), one that answered is kept for the next lookup."""
        s = self.settings
        ep = pg.Endpoint(server.host, server.port, s.user, s.password, s.dbname, s.timeout_s, server.tls)
        conn = self._take_idle(ep)
        try:
            async with asyncio.timeout(s.timeout_s):
                if conn is None:
                    conn = await pg.connect(ep, application_name="pgsplit auth_query")
                    if self._closed:
                        raise LookupFailed()
                self._busy.add(conn)
                rows = await conn.fetch(s.query, user)
        except BaseException:
            if conn is not None:
                self._busy.discard(conn)
                _terminate(conn)
            raise
        self._busy.discard(conn)
        if self._closed:
            _terminate(conn)
        else:
            self._idle.append((ep, conn))
        return rows

    def _take_idle(self, ep: pg.Endpoint) -> asyncpg.Connection | None:
        while self._idle:
            at, conn = self._idle.pop()
            if at == ep and not conn.is_closed():
                return conn
            _terminate(conn)  # (a cutover moved the primary, or the server closed it)
        return None

    def _cached(self, user: str) -> tuple[Verifier | None] | None:
        now = time.monotonic()
        found = self._found.get(user)
        if found is not None and found[0] > now:
            return (found[1],)
        missing = self._missing.get(user)
        if missing is not None and missing > now:
            return (None,)
        return None

    def _remember(self, user: str, verifier: Verifier | None) -> None:
        until = time.monotonic() + self.settings.cache_ttl_s
        if verifier is None:
            self._found.pop(user, None)
            self._missing[user] = until
            self._missing.move_to_end(user)
            while len(self._missing) > self._missing_size:
                self._missing.popitem(last=False)
        else:
            self._missing.pop(user, None)
            self._found[user] = (until, verifier)
            self._found.move_to_end(user)
            while len(self._found) > self.settings.cache_size:
                self._found.popitem(last=False)

    def close(self) -> None:
        """No lookup from now on: those in flight fail with LookupFailed, every
        connection is closed and none is opened again."""
        self._closed = True
        for task in list(self._in_flight.values()):
            task.cancel()
        for _, conn in self._idle:
            _terminate(conn)
        for conn in list(self._busy):
            _terminate(conn)
        self._idle.clear()
        self._busy.clear()
        self._found.clear()
        self._missing.clear()


def _terminate(conn: asyncpg.Connection) -> None:
    if not conn.is_closed():
        conn.terminate()
