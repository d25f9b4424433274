"""The event loop, chosen here and nowhere else: uvloop unless ``PGSPLIT_LOOP=asyncio``.

The proxy process, the test harness and the load tools all take their loops from this module,
so one environment variable runs all of them on uvloop (the default, what production runs) or
on the standard library's selector loop (what the suite also checks, so nothing depends on
one loop's timing or API).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

LOOP_ENV = "PGSPLIT_LOOP"
DEFAULT_LOOP = "uvloop"

_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    # the loop asyncio's default policy makes on Unix, named so no installed policy changes it
    "asyncio": asyncio.SelectorEventLoop,
}


def loop_name() -> str:
    """The loop ``PGSPLIT_LOOP`` asks for ("uvloop" when unset); ValueError for anything else."""
    name = os.environ.get(LOOP_ENV, "").strip() or DEFAULT_LOOP
    if name not in _FACTORIES:
        raise ValueError(f"{LOOP_ENV}={name!r}: expected one of {', '.join(sorted(_FACTORIES))}")
    return name


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A callable that makes a new loop of the chosen kind."""
    return _FACTORIES[loop_name()]


def new_event_loop() -> asyncio.AbstractEventLoop:
    return loop_factory()()


def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """A policy whose loops are of the chosen kind, for code that makes its loops through
    asyncio's policy (asyncio.run, the test runner's loop)."""
    if loop_name() == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


def run(main: Coroutine[Any, Any, Any]) -> Any:
    try:
        factory = loop_factory()
    except ValueError:
        main.close()  # never started: no "was never awaited" warning on top of the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
