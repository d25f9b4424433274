"""The monitor's connections: one probe per backend, its poll and its replay waits.

Owns: `MonitorSettings`, `PollError`, logging in to a backend as the monitor (the
`application_name` says which of its connections it is), and `Probe`: one backend's
control connection, the poll in flight on it, the latest sample, and the separate
connection its replay waits run on (router.monitor.replay drives those).
Must not know: topologies, rotation, sessions. A probe reports what it saw; the round
(router.monitor.monitor) decides what that means.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from router import pg
from router.lsn import REPLAY_WAIT_SQL, format_lsn, parse_lsn
from router.monitor.lag import SAMPLE_SQL, Sample, error_text
from router.topology import BackendSpec

APPLICATION_NAME = "pgsplit-monitor"
CLOSE_TIMEOUT_S = 0.5  # a goodbye the server does not answer this fast is not waited for


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    user: str
    password: str | None
    dbname: str = "postgres"
    interval_s: float = 0.1  # routing.monitor_interval_ms
    timeout_s: float = 1.0  # routing.monitor_timeout_ms: a backend silent this long is down
    catalog_refresh_s: float = 60.0
    connect_timeout_s: float = 5.0  # for (re)connecting; the round never waits for it


class PollError(Exception):
    """A backend did not answer its poll; the message says how."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out  # slow rather than refused: a busy server looks like this


def poll_error(exc: BaseException, what: str, timeout: float) -> PollError:
    if isinstance(exc, TimeoutError):
        return PollError(f"{what}: no answer within {timeout * 1000:.0f} ms", timed_out=True)
    if isinstance(exc, asyncpg.PostgresError):
        return PollError(f"{what}: {exc.sqlstate} {error_text(exc)}")
    return PollError(f"{what}: {type(exc).__name__}: {error_text(exc)}")


async def connect_as_monitor(spec: BackendSpec, settings: MonitorSettings, purpose: str,
                             database: str | None = None) -> asyncpg.Connection:
    account = pg.Endpoint(spec.host, spec.port, settings.user, settings.password, settings.dbname,
                          settings.connect_timeout_s, spec.tls)
    return await pg.connect(account, application_name=f"{APPLICATION_NAME} ({purpose})", database=database)


async def close_or_terminate(conn: asyncpg.Connection | None) -> None:
    await pg.close(conn, CLOSE_TIMEOUT_S)


class Probe:
    """One backend's control connection and its poll in flight."""

    def __init__(self, spec: BackendSpec, settings: MonitorSettings):
        self.spec = spec
        self.settings = settings
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()  # one query at a time on the connection
        self.replay_conn: asyncpg.Connection | None = None  # for replay_wait
        self.task: asyncio.Task[None] | None = None
        self.task_started = 0.0
        self.latest: Sample | PollError | None = None
        self.latest_started = 0.0
        self.unreported: PollError | None = None  # a failed poll no round has installed yet
        self.down_since: float | None = None  # mark_down: ignore samples sent before it

    @property
    def name(self) -> str:
        return self.spec.name

    def ensure_poll(self) -> asyncio.Task[None]:
        """The poll in flight, started now unless one is running."""
        if self.task is None or self.task.done():
            loop = asyncio.get_running_loop()
            self.task_started = loop.time()
            self.task = loop.create_task(self._poll(self.task_started), name=f"pgsplit-monitor-poll-{self.name}")
        return self.task

    def take(self, now: float) -> Sample | PollError | None:
        """What a round installs: `current(now)`, but a failed poll first, even when a
        later poll has answered since. A poll fails (say, at its timeout) between rounds,
        and the next round starts a new one on a new connection: where only the old
        connection hung, that one answers within the round's wait and would hide the
        failure from every round. Timer order makes this a race: the timeout can fall on
        the same millisecond as a round (uvloop's clock counts whole milliseconds) or
        between two (a timeout that is not a multiple of the interval)."""
        failure, self.unreported = self.unreported, None
        return failure if failure is not None else self.current(now)

    def current(self, now: float) -> Sample | PollError | None:
        """The latest sample, or a failure if the poll in flight is older than the
        timeout (it may be stuck connecting): a timed-out one, slow rather than refused,
        as the poll's own timeout would say."""
        timeout = self.settings.timeout_s
        if self.task is not None and not self.task.done() and now - self.task_started > timeout:
            return PollError(f"poll: no answer within {timeout * 1000:.0f} ms", timed_out=True)
        if self.latest is None:
            return None
        if self.down_since is not None and self.latest_started < self.down_since:
            return None  # sent before the data plane saw it fail: says nothing about now
        return self.latest

    async def connect(self) -> None:
        """Log in now (a staged probe: see Monitor.stage)."""
        async with self.lock:
            await self._connection()

    async def _connection(self) -> asyncpg.Connection:
        if self.conn is None or self.conn.is_closed():
            self.conn = None
            self.conn = await connect_as_monitor(self.spec, self.settings, "poll")
        return self.conn

    def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()  # after a timeout the protocol state is unknown: no goodbye

    async def _poll(self, started: float) -> None:
        timeout = self.settings.timeout_s
        stage = "connect"
        try:
            async with self.lock:
                conn = await self._connection()
                stage = "poll"
                async with asyncio.timeout(timeout):
                    row = await conn.fetchrow(SAMPLE_SQL)
            result: Sample | PollError = Sample.from_row(row, started)
        except asyncio.CancelledError:
            self.drop_connection()
            raise
        except Exception as exc:  # noqa: BLE001  every failure means "down"; the reason is kept
            self.drop_connection()
            result = poll_error(exc, stage, self.settings.connect_timeout_s if stage == "connect" else timeout)
            self.unreported = result
        self.latest, self.latest_started = result, started

    async def replay_wait(self, lsn: int, timeout_ms: int) -> int | None:
        """The replica's replay position once it reaches `lsn`, or after `timeout_ms`
        (router.lsn.REPLAY_WAIT_SQL), asked on a connection of its own so that the regular
        poll never queues behind it. None when the server is not in recovery. Errors
        propagate; the connection is dropped then."""
        try:
            if self.replay_conn is None or self.replay_conn.is_closed():
                self.replay_conn = None
                self.replay_conn = await connect_as_monitor(self.spec, self.settings, "replay")
            async with asyncio.timeout(self.settings.timeout_s + timeout_ms / 1000):
                text = await self.replay_conn.fetchval(REPLAY_WAIT_SQL, format_lsn(lsn), timeout_ms)
        except BaseException:
            conn, self.replay_conn = self.replay_conn, None
            if conn is not None and not conn.is_closed():
                conn.terminate()
            raise
        return None if text is None else parse_lsn(text)

    async def close(self) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self.conn = self.conn, None
        await close_or_terminate(conn)
        conn, self.replay_conn = self.replay_conn, None
        await close_or_terminate(conn)
