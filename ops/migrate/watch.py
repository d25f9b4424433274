"""A started migration watched while it runs: its status and its schema drift every few
seconds, drift logged by name when it appears and when it goes.

Owns: `drift` (schema differences between the two sides, by name; logical replication
carries no DDL) and `Watch`, the admin API's view of a started migration.
Must not know: the proxy's metrics (`Watch` calls back with itself; the proxy exports).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ops import schema
from ops.migrate.control import SOURCE, TARGET, MigrateError, connection, databases_or_default
from ops.migrate.status import Status, status
from router.pg import Endpoint

__all__ = ["Watch", "drift"]

_log = logging.getLogger("pgsplit.migrate")


async def drift(source: Endpoint, target: Endpoint, *,
                databases: Sequence[str] | None = None) -> list[str]:
    """Schema differences between source and target, one line per object by name,
    prefixed by the database (ops.schema's `diff_databases`), e.g.
    ``"database app: column public.items.note: only on the source (text)"``. Logical
    replication carries no DDL, so any change made on one side after `start` shows here
    (and the cutover refuses to run while this is not empty)."""
    s_fps: dict[str, schema.Fingerprint] = {}
    t_fps: dict[str, schema.Fingerprint] = {}
    for db in databases_or_default(source, databases):
        async with connection(source, SOURCE, db) as sconn, \
                connection(target, TARGET, db) as tconn:
            s_fps[db], t_fps[db] = await asyncio.gather(schema.comparable_fingerprint(sconn),
                                                        schema.comparable_fingerprint(tconn))
    return schema.diff_databases(s_fps, t_fps)


class Watch:
    """A started migration watched while it runs: every ``interval`` seconds one round of
    `status` (rates from the round before) and `drift`, then ``on_update(self)``. The
    latest results stay here (``status``, ``drift``, ``error``, ``checked_at``). A
    difference in ``drift`` that was not there in the round before is logged at once,
    naming the object, and again when it is gone. A failed round (a side down, a
    connection ended by a cutover's fence) sets ``error`` and keeps the last results."""

    def __init__(self, source: Endpoint, target: Endpoint, *, name: str,
                 databases: Sequence[str], interval: float, label: str = "",
                 on_update: Any = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.source, self.target = source, target
        self.name = name
        self.databases = list(databases)
        self.interval = interval
        self.label = label or name
        self.on_update = on_update
        self.status: Status | None = None
        self.drift: list[str] = []
        self.error: str | None = None
        self.checked_at: float | None = None  # time.time() of the last good round
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._round = asyncio.Lock()

    def start(self) -> Watch:
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel the rounds and wait for them, at most `timeout` seconds: a round that a
        cancellation does not end (one swallowed somewhere below it) is logged with
        where it stands and left to end at its loop's next turn, so that the cutover
        or the shutdown that stops the watch is never held by it."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            where = io.StringIO()
            task.print_stack(file=where)
            _log.warning("migration %s: the watch did not stop within %g s; it ends at its next round. %s",
                         self.label, timeout, where.getvalue().strip())
        elif not task.cancelled() and task.exception() is not None:
            _log.warning("migration %s: the watch ended with %r", self.label, task.exception())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.check()
            except (MigrateError, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError):
                pass  # in ``error``, logged; the next round tries again
            except Exception:  # noqa: BLE001  a bug must not end the watch silently
                _log.exception("migration %s: watch round failed", self.label)
            await asyncio.sleep(self.interval)

    async def check(self) -> tuple[Status, list[str]]:
        """One round now (the admin API's status asks for a fresh one too); raises what
        the round raised, after noting it in ``error``."""
        async with self._round:
            try:
                st, lines = await asyncio.gather(
                    status(self.source, self.target, name=self.name,
                           databases=self.databases, previous=self.status),
                    drift(self.source, self.target, databases=self.databases))
            except (MigrateError, OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                error = str(exc) or type(exc).__name__
                if error != self.error:
                    _log.warning("migration %s: watch round failed: %s", self.label, error)
                self.error = error
                self._updated()
                raise
            self.record(st, lines)
            return st, lines

    def record(self, st: Status, lines: list[str]) -> None:
        """Take a round's results: log drift that appeared or went, tell the listener."""
        if self.error is not None:
            _log.info("migration %s: watch rounds work again", self.label)
        self.error = None
        for line in lines:
            if line not in self.drift:
                _log.warning("migration %s: schema drift: %s", self.label, line)
        for line in self.drift:
            if line not in lines:
                _log.info("migration %s: schema drift resolved: %s", self.label, line)
        self.status, self.drift = st, list(lines)
        self.checked_at = time.time()
        self.rounds += 1
        self._updated()

    def _updated(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self)
            except Exception:  # noqa: BLE001  a broken listener must not stop the watch
                _log.exception("migration %s: watch listener failed", self.label)
