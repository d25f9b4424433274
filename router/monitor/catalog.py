"""The classifier's volatile-function catalog, read from the active primary.

Owns: reading the user functions marked VOLATILE
(router.classify.functions.VOLATILE_FUNCTIONS_SQL) in every database clients use, now and
then on a timer, and handing the names to the classifier through the callback it was given.
Must not know: the `Classifier` object (it is handed a callback), sessions, the poll
rounds. It lives with the monitor because it logs in to the primary as the monitor does
and follows the monitor's primary across a retarget; it is apart from the rounds because
a catalog read takes a login per database and must never delay a round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import asyncpg

from router.classify.functions import VOLATILE_FUNCTIONS_SQL, volatile_function_names
from router.monitor.probe import MonitorSettings, close_or_terminate, connect_as_monitor
from router.topology import BackendSpec

log = logging.getLogger("pgsplit.monitor")


class CatalogSource(Protocol):
    """What the catalog reads of the monitor that owns it."""

    settings: MonitorSettings  # replaced on reload: read it when needed
    databases: Callable[[], Iterable[str]]  # databases clients use

    def primary_spec(self) -> BackendSpec: ...


class VolatileFunctionCatalog:
    """Reads the volatile functions and hands them to `on_names`."""

    def __init__(self, source: CatalogSource, on_names: Callable[[frozenset[str]], None] | None):
        self._source = source
        self.on_names = on_names
        self._last_ok: bool | None = None  # did the last refresh of the loop succeed

    async def keep_fresh(self) -> None:
        """Refresh every `catalog_refresh_s`; after a failure, sooner."""
        refresh = self._source.settings.catalog_refresh_s
        while True:
            target = self._source.primary_spec()
            try:
                names = await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if self._last_ok is not False:
                    log.warning("volatile-function catalog refresh from %s failed: %s", target.name, exc)
                self._last_ok = False
                await asyncio.sleep(min(refresh, 5.0))
                continue
            if self._last_ok is False:
                log.info("volatile-function catalog read again from %s (%d names)", target.name, len(names))
            self._last_ok = True
            await asyncio.sleep(refresh)

    async def refresh(self) -> frozenset[str]:
        """Read the user functions marked VOLATILE from the primary, in every database
        clients use (functions live per database; a name volatile in any of them counts),
        and hand them to `on_names`; return them."""
        source = self._source
        target = source.primary_spec()
        settings = source.settings
        rows: list = []
        for database in sorted(set(source.databases()) | {settings.dbname}):
            try:
                conn = await connect_as_monitor(target, settings, "catalog", database)
            except asyncpg.InvalidCatalogNameError:
                continue  # a database that went away
            try:
                async with asyncio.timeout(max(settings.timeout_s, 5.0)):
                    rows += await conn.fetch(VOLATILE_FUNCTIONS_SQL)
            finally:
                await close_or_terminate(conn)
        names = volatile_function_names((r[0], r[1]) for r in rows)
        if self.on_names is not None:
            self.on_names(names)
        return names
