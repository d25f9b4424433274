"""router.classify.literal_shape and the cache tier it keys: the same statement with
other constants must get exactly the analysis a classifier with empty caches gives it."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.classify.classifier import Classifier
from router.classify.prefilter import literal_shape

from test_classify import ROWS

SHAPES = [
    ("UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 74353;",
     b"UPDATE pgbench_accounts SET abalance = abalance + -0000 WHERE aid = 00000;"),
    ("SELECT * FROM t WHERE name = 'it''s 5' AND x = 1.5", b"SELECT * FROM t WHERE name = '''' AND x = 0.0"),
    ("SELECT 'a''; DELETE FROM t; SELECT ''b'", b"SELECT ''''''"),  # one string
    ("SELECT 'a'; DELETE FROM t; SELECT 'b'", b"SELECT ''; DELETE FROM t; SELECT ''"),
    ("SELECT a FROM t WHERE b = t.5", b"SELECT a FROM t WHERE b = t.0"),
    # a digit in a name, an exponent, a type name: declined (they would look like numbers)
    ("SELECT t1 FROM t", None),
    ("SELECT 1e5", None),
    ("SELECT x::int4 FROM t", None),
    # what only the real lexer delimits: declined
    ('SELECT "a" FROM t', None),
    ("SELECT 1 -- 'x", None),
    ("SELECT /* 'x */ 1", None),
    ("SELECT $$a$$", None),
    ("SELECT $1", None),
    ("SELECT E'\\''", None),
    ("SELECT U&'d!0061t' UESCAPE '!'", None),
    ("SELECT 'a", None),
    ("SELECT 'é'", None),
    ("SELECT 1\x00; DROP TABLE t", None),
]


@pytest.mark.parametrize(("sql", "shape"), SHAPES)
def test_literal_shape(sql: str, shape: bytes | None) -> None:
    assert literal_shape(sql) == shape


# Texts where a careless shape would share one answer between different statements.
TRAPS = [
    "SELECT audit1(a) FROM t",  # volatile below; audit2 is not
    "SELECT audit2(a) FROM t",
    "SELECT a FROM t WHERE b = 1e5",
    "INSERT INTO t VALUES ('synchronous_commit')",
    "INSERT INTO t VALUES ('plain')",
    "SELECT 'a''; DELETE FROM t; SELECT ''b'",
    "SELECT 'a'; DELETE FROM t; SELECT 'b'",
    "SELECT set_config('work_mem', '64MB', false)",
    "SELECT set_config('synchronous_commit', 'off', true)",
    "EXPLAIN (ANALYZE 0) UPDATE t SET a = 1",
    "EXPLAIN (ANALYZE 1) UPDATE t SET a = 1",
    "SELECT pg_advisory_lock(7)",
    "SELECT nextval('s1')",
]
TEXTS = [sql for sql, _ in ROWS] + TRAPS
VOLATILE = frozenset({"audit1"})

_NUMBER = re.compile(r"\d+")
_STRING = re.compile(r"'[^']*'")
_CONTENTS = ["", "x", "synchronous_commit", "a;b", "it''s", "12", "READ ONLY", "--", "$$", "\\"]


@st.composite
def with_other_constants(draw: st.DrawFn) -> str:
    """A text of the tables above with its numbers and string contents redrawn."""
    sql = draw(st.sampled_from(TEXTS))
    sql = _NUMBER.sub(lambda m: str(draw(st.integers(0, 10**7))), sql)
    return _STRING.sub(lambda m: "'" + draw(st.sampled_from(_CONTENTS)) + "'", sql)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(with_other_constants(), min_size=2, max_size=12))
def test_shape_cache_answers_like_empty_caches(texts: list[str]) -> None:
    shared = Classifier(volatile_functions=VOLATILE)
    for sql in TEXTS:  # every shape is in the cache before the redrawn texts come
        shared.classify(sql)
    for sql in texts:
        assert shared.classify(sql) == Classifier(volatile_functions=VOLATILE).classify(sql), sql


def test_constants_alone_are_not_parsed_again() -> None:
    c = Classifier()
    for n in range(1000, 1100):
        c.classify(f"UPDATE pgbench_tellers SET tbalance = tbalance + {n} WHERE tid = {n % 10}")
        c.classify(f"INSERT INTO h (a, b) VALUES ({n}, 'x{n}')")
    info = c.cache_info()
    assert (info.misses, info.fingerprint_hits, info.shape_hits, info.shape_size) == (2, 0, 198, 2)
    c.set_volatile_functions(frozenset({"f"}))  # new volatile functions: the shapes go too
    assert c.cache_info().shape_size == 0


def test_long_texts_are_not_kept_by_shape() -> None:
    c = Classifier()
    values = ", ".join(["(1, 'x')"] * 2000)  # a bulk INSERT: its shape would be as long
    for n in range(3):
        c.classify(f"INSERT INTO h (a, b) VALUES ({n}, 'y'), {values}")
    assert c.cache_info().shape_size == 0 and c.cache_info().fingerprint_hits == 2
