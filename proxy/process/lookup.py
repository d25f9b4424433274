"""[auth_query]: the SCRAM verifier of a user not in [[users]], read on the server.

Owns: one asyncpg control connection to the active cluster's primary (as the [monitor]
account, or [auth_query]'s own login), the lookup's deadline (connecting, logging in and
the query together within `timeout_s`: a dead or slow server fails the login that needs
it, nothing else), and a small cache of answers (also "no such user", so that a client
trying names does not make one query per attempt). Must not know: the SCRAM exchange.
"""

from __future__ import annotations

import asyncio
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
    """The server did not say (dead, slow, refused the lookup's login, a bad query)."""

    fatal = True


class UserLookup:
    def __init__(self, settings: LookupSettings):
        self.settings = settings
        self._cache: OrderedDict[str, tuple[float, Verifier | None]] = OrderedDict()
        self._conn: asyncpg.Connection | None = None
        self._conn_at: pg.Endpoint | None = None
        self._lock = asyncio.Lock()  # one query at a time on the one connection

    async def verifier(self, user: str, server: BackendState) -> Verifier | None:
        """The user's verifier on `server` (the active primary), None when the server has
        none (no such role, no password, an md5 hash), or LookupFailed within `timeout_s`."""
        cached = self._cached(user)
        if cached is not None:
            return cached[1]
        s = self.settings
        where = f"{server.name} ({server.host}:{server.port})"
        try:
            async with asyncio.timeout(s.timeout_s):
                async with self._lock:
                    cached = self._cached(user)  # (answered while this one waited)
                    if cached is not None:
                        return cached[1]
                    text = await self._query(user, server)
        except TimeoutError:
            raise LookupFailed(f'could not look up user "{user}": the auth_query server {where} did not answer '
                               f"within {s.timeout_s:g}s (auth_query.timeout_s)") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise LookupFailed(f'could not look up user "{user}" on the auth_query server {where}: '
                               f"{pg.error_text(exc)}") from None
        verifier = None
        if text is not None:
            try:
                verifier = Verifier.parse(text)
            except BadVerifier:
                log.warning('auth_query: the server holds no SCRAM-SHA-256 verifier for user "%s" (an md5 hash?): '
                            "its logins are refused", user)
        self._remember(user, verifier)
        return verifier

    def _cached(self, user: str) -> tuple[float, Verifier | None] | None:
        hit = self._cache.get(user)
        if hit is None or hit[0] <= time.monotonic():
            return None
        return hit

    def _remember(self, user: str, verifier: Verifier | None) -> None:
        self._cache[user] = (time.monotonic() + self.settings.cache_ttl_s, verifier)
        self._cache.move_to_end(user)
        while len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)

    async def _query(self, user: str, server: BackendState) -> str | None:
        s = self.settings
        ep = pg.Endpoint(server.host, server.port, s.user, s.password, s.dbname, s.timeout_s, server.tls)
        try:
            if self._conn is None or self._conn.is_closed() or self._conn_at != ep:
                self._drop()  # (a cutover moved the primary, or the first lookup)
                self._conn = await pg.connect(ep, application_name="pgsplit auth_query")
                self._conn_at = ep
            row = await self._conn.fetchrow(s.query, user)
        except BaseException:
            self._drop()  # (a query cut off by the deadline may still run there)
            raise
        return None if row is None or row[-1] is None else str(row[-1])

    def _drop(self) -> None:
        conn, self._conn, self._conn_at = self._conn, None, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    def close(self) -> None:
        self._drop()
        self._cache.clear()
