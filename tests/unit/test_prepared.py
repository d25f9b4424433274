"""The server-side statements of proxy.server.prepared: the LRU bound of one connection,
and the process's names for client statements."""

from __future__ import annotations

from proxy.server.prepared import Evictions, PreparedStatements, StatementNames


def test_a_connection_keeps_its_most_recently_used_statements_within_its_bound():
    evictions = Evictions()
    prepared = PreparedStatements(limit=2, evictions=evictions)
    prepared.add(b"a")
    prepared.add(b"b")
    assert prepared.make_room() == [b"a"] and evictions.count == 1
    prepared.add(b"c")
    prepared.move_to_end(b"b")
    assert prepared.make_room() == [b"c"] and list(prepared) == [b"b"]


def test_a_text_has_one_name_for_every_client_until_a_server_retires_it():
    names = StatementNames()
    first = names.name(b"SELECT * FROM t", b"\0\0")
    assert first == names.name(b"SELECT * FROM t", b"\0\0")
    assert first.startswith(b"pgsplit_") and len(first) == len(b"pgsplit_") + 20
    assert names.name(b"SELECT * FROM t", b"\0\1\0\0\0\x17") != first  # other parameter types
    names.retire(first)
    second = names.name(b"SELECT * FROM t", b"\0\0")
    assert second == first + b"_1"
    names.retire(first)  # a stale copy of the old name met on another connection: no change
    assert names.name(b"SELECT * FROM t", b"\0\0") == second
    names.retire(second)
    assert names.name(b"SELECT * FROM t", b"\0\0") == first + b"_2"
    assert names.name(b"SELECT 1", b"\0\0") != first  # other texts keep their names


def test_a_stale_plan_retires_every_name_the_connection_had():
    names = StatementNames()
    a, b = names.name(b"SELECT 1", b"\0\0"), names.name(b"SELECT 2", b"\0\0")
    prepared = PreparedStatements(limit=10, names=names)
    prepared.add(a)
    prepared.add(b)
    assert prepared.retire_all() == [a, b] and not prepared
    assert names.name(b"SELECT 1", b"\0\0") == a + b"_1" and names.name(b"SELECT 2", b"\0\0") == b + b"_1"


def test_ddl_gives_every_text_a_new_name():
    names = StatementNames()
    before = names.name(b"SELECT * FROM t", b"\0\0")
    names.new_epoch()
    after = names.name(b"SELECT * FROM t", b"\0\0")
    assert after != before and after.startswith(b"pgsplit_") and len(after) == len(before)
    names.new_epoch()
    assert names.name(b"SELECT * FROM t", b"\0\0") not in (before, after)
