"""How the fault suite names what a client saw (loadtest.faults.error_pair)."""

from __future__ import annotations

import asyncpg

from loadtest.faults import error_pair, understandable


def test_a_connection_closed_between_statements_counts_as_connection_does_not_exist():
    """asyncpg raises InterfaceError, without a SQLSTATE, when a transaction block ends on a
    connection the server's FATAL closed in between; against PostgreSQL too."""
    pair = error_pair(asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the underlying connection is closed"))
    assert pair[0] == "08003" and understandable(pair)


def test_any_other_error_without_sqlstate_stays_without_one():
    pair = error_pair(asyncpg.InterfaceError("cannot perform operation: another operation is in progress"))
    assert pair[0] is None and not understandable(pair)
    assert error_pair(RuntimeError("boom")) == (None, "boom")
