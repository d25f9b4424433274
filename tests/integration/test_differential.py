"""Differential test: random scripts of client operations give the same replies through
pgsplit (transaction pooling, a pool smaller than the number of clients) as directly on
the primary, and no client sees state another client created (settings, prepared
statements, temp tables, cursors, LISTEN, advisory locks). See differential.py.

The proxy's cluster here has only the primary, so routing cannot change a result.

CI runs a fixed set of examples (derandomized): a few per family of operations, each mixed
with transactions and session ends, then scripts mixing families at random. For a long run
(random examples, a new set each run):
``PGSPLIT_DIFF_EXAMPLES=500 python -m pytest -p no:cacheprovider --timeout=0 tests/integration/test_differential.py``
``PGSPLIT_DIFF_KNOWN_DEFECTS=all`` (or a comma-separated list of names from
differential.KNOWN_DEFECT_OPS) adds the operations left out until their defects are fixed.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from differential import Script, World, first_difference, op_families, scripts
from loadtest.harness import NodeSet

LONG_RUN = int(os.environ.get("PGSPLIT_DIFF_EXAMPLES", "0"))
THEMES = sorted(set(op_families()) - {"transactions", "session_end"})


def run_settings(examples: int):
    return settings(
        max_examples=LONG_RUN or examples, deadline=None, derandomize=not LONG_RUN, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
    )


@pytest.fixture
def worlds(make_proxy, cluster):
    def make(pool_size: int) -> tuple[World, World]:
        proxy = make_proxy(clusters={"main": NodeSet.of(cluster, "primary")},
                           pool={"size": pool_size, "acquire_timeout_s": 20})
        admin = cluster.primary.dsn(user="postgres", dbname="app")
        direct = World("directly", cluster.primary.dsn(user="app", dbname="app"), admin)
        proxied = World("through pgsplit", proxy.dsn(), admin)
        return direct, proxied
    return make


def check(script: Script, direct: World, proxied: World) -> None:
    expected = asyncio.run(script.run(direct))
    got = asyncio.run(script.run(proxied))
    assert got == expected, first_difference(expected, got)


@pytest.mark.parametrize("theme", THEMES)
def test_two_psycopg_clients_over_one_server_connection(worlds, theme) -> None:
    direct, proxied = worlds(1)

    @run_settings(5)
    @given(scripts(2, [theme, "transactions", "session_end"]))
    def run(steps):
        check(Script(steps, ["psycopg", "psycopg"], pool_size=1), direct, proxied)

    run()


def test_three_mixed_clients_over_two_server_connections(worlds) -> None:
    direct, proxied = worlds(2)

    @run_settings(30)
    @given(st.sampled_from([["psycopg", "asyncpg", "psycopg"], ["asyncpg", "psycopg", "asyncpg"]]),
           scripts(3))
    def run(kinds, steps):
        check(Script(steps, kinds, pool_size=2), direct, proxied)

    run()
