"""Hooks for the whole suite: the event loop the tests run on.

The async tests, their fixtures and every asyncio.run() in the tests run on the loop
proxy.loop chooses (uvloop unless ``PGSPLIT_LOOP=asyncio``), the same kind as the proxy they
talk to, so one variable switches the whole suite from one loop to the other. It is set as
asyncio's policy, which pytest-asyncio's runner uses; a loop-factory parametrization would
do the same but makes pytest regroup the async tests of all files ahead of the others.
"""

from __future__ import annotations

import asyncio

from proxy import loop


def pytest_configure(config) -> None:
    asyncio.set_event_loop_policy(loop.event_loop_policy())
