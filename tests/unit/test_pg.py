"""router.pg's pure parts: an endpoint moved to another server, error texts, versions."""

from __future__ import annotations

import asyncpg

from router.pg import Endpoint, error_text, major_version, quote_qualified


def test_at_keeps_the_account_and_changes_the_server() -> None:
    account = Endpoint("10.0.0.1", 5432, "admin", "s3cret", "ops", 2.5)
    moved = account.at("10.0.0.9", 6543)
    assert moved == Endpoint("10.0.0.9", 6543, "admin", "s3cret", "ops", 2.5)
    assert account.host == "10.0.0.1"  # frozen: a new endpoint, not a changed one


def test_error_text_names_a_servers_error_by_sqlstate() -> None:
    assert error_text(asyncpg.UniqueViolationError("duplicate key")) == "23505 duplicate key"
    assert error_text(OSError("connection refused")) == "connection refused"
    assert error_text(TimeoutError()) == "TimeoutError"


def test_major_versions_before_and_after_10() -> None:
    assert [major_version(n) for n in (90624, 100023, 150004, 180001)] == [906, 10, 15, 18]


def test_quote_qualified() -> None:
    assert quote_qualified("my schema", 'we"ird') == '"my schema"."we""ird"'
