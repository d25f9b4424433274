"""Fixtures and hooks for the whole suite: the event loop the async tests run on.

Async tests and fixtures run on the loop proxy.loop chooses (uvloop unless
``PGSPLIT_LOOP=asyncio``), the same kind as the proxy they talk to, so one variable switches
the whole suite from one loop to the other.
"""

from __future__ import annotations

from proxy import loop


def pytest_asyncio_loop_factories(config, item):
    return {loop.loop_name(): loop.loop_factory()}
