"""A freshly authenticated client's first contact with a server.

Owns: borrowing a server connection for the login (the startup backend the policy picks,
the next one when a crashed backend refuses before the monitor noticed), checking there
that the database exists and that the client's startup settings apply, the parameter set
the client is shown, each (user, database)'s synchronous_commit default, and reading a
database's volatile functions before its first client's first statement is routed.
Must not know: the handshake's messages (proxy.listener), sessions' internals.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from proxy import wire
from proxy.errors import AuthenticationFailed, ConnectionFailure, RoutingError, ServerError
from proxy.server.connection import UNKNOWN_SETTINGS, ServerConnection
from router.monitor.monitor import Monitor
from router.policy import startup_backend
from router.topology import BackendState, TopologyHolder

log = logging.getLogger("pgsplit")


class LoginHost(Protocol):
    config: Any  # proxy.config.Config in force
    topology: TopologyHolder
    load: dict[str, int]

    def pool_for(self, backend: BackendState, user: str, database: str) -> Any: ...

    async def check_backend(self, backend: str) -> bool: ...


class Logins:
    def __init__(self, host: LoginHost, monitor: Monitor):
        self.host = host
        self.monitor = monitor
        self.catalog_databases: set[str] = set()  # databases whose catalog was read
        self._async_default: dict[tuple[str, str], bool] = {}  # (user, db): synchronous_commit off

    async def first_contact(self, session: Any) -> dict[str, str]:
        """Borrow a server connection for a freshly authenticated client: check that the
        database exists, apply the client's startup settings, learn the parameter set
        the client is shown."""
        host = self.host
        for attempt in range(2):
            decision = startup_backend(host.topology.current, host.load)
            if decision.error is not None:
                raise RoutingError(*decision.error)
            pool = host.pool_for(decision.backend, session.user, session.database)
            try:
                conn = await pool.acquire()
                break
            except ConnectionFailure:
                # The backend failed before the monitor noticed (a crashed primary refuses
                # connections): once its check agrees, the login goes where the next
                # decision says (a replica), instead of failing.
                if attempt or await host.check_backend(decision.backend.name):
                    raise
            except ServerError as exc:
                if exc.sqlstate.startswith("28"):
                    exc.message = f"pgsplit could not log in to backend {decision.backend.name}: {exc.message}"
                    exc.fields = {**exc.fields, "M": exc.message}
                raise
            except AuthenticationFailed as exc:  # (pgsplit's own refusal to answer the backend)
                exc.message = f"pgsplit could not log in to backend {decision.backend.name}: {exc.message}"
                raise
        try:
            replay = session.carried.settings_for(conn)
            if replay is not None:
                done = asyncio.get_running_loop().create_future()
                conn.swallow(replay, done.set_result)
                try:
                    step = await done
                except BaseException:
                    conn.settings_key = UNKNOWN_SETTINGS  # (whether the replay ran is not known)
                    raise
                if step.error is not None:
                    conn.settings_key = UNKNOWN_SETTINGS  # (the replay was undone as a whole)
                    raise ServerError(step.error, fatal=True)
            params = dict(conn.params)
            key = (session.user, session.database)
            if key not in self._async_default:
                self._async_default[key] = await _async_commit_default(conn)
            session.carried.async_default = self._async_default[key]
        finally:
            pool.release(conn)
        if "in_hot_standby" in params:
            params["in_hot_standby"] = "off"  # the proxy accepts writes wherever they run
        if session.database not in self.catalog_databases:
            await self._read_catalog(session.database)
        return params

    async def _read_catalog(self, database: str) -> None:
        """The first client of a database: read its volatile functions before its first
        statement is routed (later refreshes run in the monitor)."""
        self.catalog_databases.add(database)
        try:
            async with asyncio.timeout(self.host.config.routing.monitor_timeout_ms / 1000 * 5):
                await self.monitor.refresh_catalog()
        except Exception as exc:  # the periodic refresh tries again
            log.warning("reading the volatile-function catalog of database %r failed: %s", database, exc)


async def _async_commit_default(conn: ServerConnection) -> bool:
    """Whether this user's commits in this database are asynchronous unless the session
    says otherwise (synchronous_commit = off from the server, database or role settings)."""
    done = asyncio.get_running_loop().create_future()
    conn.swallow(wire.query(b"SELECT reset_val FROM pg_settings WHERE name = 'synchronous_commit'"),
                 done.set_result, rows=True)
    step = await done
    if step.error is not None or not step.rows:
        return True  # unknown: assume the worst (the insert position covers everything)
    return wire.parse_data_row(step.rows[0])[0] == b"off"
