"""Integration-test fixtures: the real PostgreSQL sandbox cluster (loadtest.sandbox).

- ``cluster``: session-scoped primary + 2 streaming replicas (``replica1``, ``replica2``),
  users ``app`` (scram, owner of database ``app``), ``app_md5`` (md5) and ``app_trust``
  (trust), superuser ``postgres`` (scram over TCP). Stopped at the end of the session.
- ``wait_until`` / ``async_wait_until`` (from helpers.py): polling with a deadline.
- ``proxy``: a fresh pgsplit in front of ``cluster`` (cluster name "main", backends
  ``main_primary``, ``main_replica1``, ``main_replica2``), on its own event loop (the kind
  proxy.loop chooses: ``PGSPLIT_LOOP``) in a thread, on free ports; ``make_proxy(**sections)``
  builds one with config overrides, e.g. ``make_proxy(pool={"size": 5}, routing={"consistency": "eventual"})``.
- A failed test's report gets the tail of every sandbox node's server log.

Tests that reconfigure the shared cluster (apply delay, paused replay, killed nodes)
must put it back as they found it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(_ROOT))

from helpers import async_wait_until, wait_until  # noqa: E402,F401  (re-exported)

from loadtest.harness import ProxyThread, config_text  # noqa: E402
from loadtest.sandbox import Cluster, all_clusters  # noqa: E402

SESSION_USERS = {"app": "app-secret"}
SESSION_MD5_USERS = {"app_md5": "md5-secret"}
SESSION_TRUST_USERS = ["app_trust"]
LOG_TAIL_LINES = 40

_test_started = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    c = Cluster(2, name="it", users=SESSION_USERS, md5_users=SESSION_MD5_USERS,
                trust_users=SESSION_TRUST_USERS)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_proxy(cluster: Cluster):
    """Factory: make_proxy(clusters=None, active=None, **sections) -> started ProxyThread."""
    started: list[ProxyThread] = []

    def make(clusters: dict | None = None, active: str | None = None, backends: dict | None = None,
             **sections) -> ProxyThread:
        text = config_text(clusters or {"main": cluster}, active=active, sections=sections,
                           backend_overrides=backends)
        proxy = ProxyThread(text).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(make_proxy) -> ProxyThread:
    return make_proxy()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_test_started] = time.time()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        since = item.stash.get(_test_started, 0.0)
        for c in all_clusters():
            # running clusters, and those stopped during this test (their tails are kept)
            if not c.started and (c.stopped_at is None or c.stopped_at < since):
                continue
            for node, tail in c.log_tails(LOG_TAIL_LINES).items():
                report.sections.append((f"postgres log {c.name}/{node} (last lines)",
                                        tail or "(empty)"))
    return report
