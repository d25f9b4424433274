"""proxy.loop: PGSPLIT_LOOP chooses the event loop of the proxy, the tests and the load tools."""

from __future__ import annotations

import asyncio

import pytest

from proxy import loop


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _is_uvloop(ev: asyncio.AbstractEventLoop) -> bool:
    return type(ev).__module__.startswith("uvloop")  # (only proxy.loop imports uvloop)


@pytest.mark.parametrize("value", [None, "", "uvloop", " uvloop "])
def test_uvloop_unless_asked_otherwise(monkeypatch, value) -> None:
    if value is None:
        monkeypatch.delenv(loop.LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(loop.LOOP_ENV, value)
    assert loop.loop_name() == "uvloop"
    assert _is_uvloop(loop.run(_running_loop()))


def test_asyncio_is_the_standard_librarys_selector_loop(monkeypatch) -> None:
    monkeypatch.setenv(loop.LOOP_ENV, "asyncio")
    ran_on = loop.run(_running_loop())
    assert type(ran_on).__module__.startswith("asyncio.")
    assert isinstance(ran_on, asyncio.SelectorEventLoop)
    fresh = loop.new_event_loop()
    try:
        assert isinstance(fresh, asyncio.SelectorEventLoop)
    finally:
        fresh.close()


def test_an_unknown_loop_is_an_error_naming_the_choices(monkeypatch) -> None:
    monkeypatch.setenv(loop.LOOP_ENV, "tokio")
    with pytest.raises(ValueError, match=r"PGSPLIT_LOOP='tokio': expected one of asyncio, uvloop"):
        loop.loop_name()
    main = _running_loop()
    with pytest.raises(ValueError):
        loop.run(main)
    assert main.cr_frame is None  # closed, not left to warn that it was never awaited


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_the_policy_makes_loops_of_the_chosen_kind(monkeypatch, name) -> None:
    monkeypatch.setenv(loop.LOOP_ENV, name)
    made = loop.event_loop_policy().new_event_loop()
    try:
        assert _is_uvloop(made) == (name == "uvloop")
        assert isinstance(made, asyncio.SelectorEventLoop) == (name == "asyncio")
    finally:
        made.close()


async def test_the_tests_run_on_the_chosen_kind() -> None:
    assert _is_uvloop(asyncio.get_running_loop()) == (loop.loop_name() == "uvloop")
