"""The fault suite's short form (loadtest/faults.py) against the session cluster: under a
mixed asyncpg + psycopg load, every fault not awaiting a fix, one at a time; no
acknowledged write lost, no statement waiting past the configured bounds, every client
error with a SQLSTATE and a message, the proxy's files and memory back near baseline.

PGSPLIT_FAULTS_INCLUDE_AWAITING_FIX=1 also runs what loadtest.faults.AWAITING_FIX lists
(=NAME,... only those).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from loadtest.faults import AWAITING_FIX, FAULTS, awaiting_included, run_suite


@pytest.mark.timeout(150)
def test_fault_suite_short(cluster):
    include = os.environ.get("PGSPLIT_FAULTS_INCLUDE_AWAITING_FIX")
    result = asyncio.run(run_suite(cluster, short=True, include_awaiting_fix=include))
    print(result.report())
    ran = {row.name for row in result.rows}
    included = awaiting_included(include)
    assert ran == {"baseline", *(n for n in FAULTS if n in included or n not in AWAITING_FIX)}, ran
    assert all(row.ops > 0 and row.acked > 0 for row in result.rows), result.table()
    assert result.failures == [], result.report()
