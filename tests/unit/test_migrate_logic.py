"""ops.migrate's decisions and texts, without a server: names, quoting, lag and ETA
arithmetic, sequence targets, the verify statements, reports and errors.

What needs PostgreSQL (the catalog queries, the copy, the subscription) is in
tests/integration/test_migrate.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psycopg
import pytest

from ops.migrate.control import CatchUpTimeout, MigrateError, slot_name_for
from ops.migrate.handover import sequence_is_past, sequence_target_value
from ops.migrate.plan import (
    Blocker,
    BlockedError,
    ClusterFacts,
    DatabaseFacts,
    DatabasePlan,
    Plan,
    TableFacts,
    assess,
)
from ops.cutover.preflight import PreflightFacts, ReplicationFacts, ServerState, build_report, record_schemas
from ops.migrate.programs import find_client_bindir
from ops.migrate.status import Status, SubscriptionStatus, TableCopy, estimate_eta, lag_seconds_from, with_rates
from ops.migrate.verify import RangeDiff, TableCheck, VerifyReport, range_sql, source_chunk_sql
from ops.schema import FINGERPRINT_SQL, Fingerprint, comparable_fingerprint
from router.pg import Endpoint, quote_ident, quote_literal

MB = 1024 * 1024


# --------------------------------------------------------------------------- names, quoting


@pytest.mark.parametrize("name, db, slot", [
    ("pgsplit", "app", "pgsplit_app"),
    ("pgsplit", "My-DB.prod", "pgsplit_my_db_prod"),
    ("pgsplit_reverse", "app", "pgsplit_reverse_app"),
])
def test_slot_names(name: str, db: str, slot: str) -> None:
    assert slot_name_for(name, db) == slot


def test_long_slot_names_stay_unique_within_63_bytes() -> None:
    a = slot_name_for("pgsplit", "x" * 80 + "a")
    b = slot_name_for("pgsplit", "x" * 80 + "b")
    assert len(a) == len(b) == 63 and a != b
    assert a.startswith("pgsplit_xxx")


@pytest.mark.parametrize("password", ["plain", "with space", "it's", "back\\slash", "",
                                      "p=q 'r' \\s"])
def test_conninfo_round_trips_through_libpq(password: str) -> None:
    ep = Endpoint("10.0.0.5", 6543, user="repl user", password=password, database="my db")
    parsed = psycopg.conninfo.conninfo_to_dict(ep.conninfo())
    assert parsed == {"host": "10.0.0.5", "port": "6543", "user": "repl user",
                      "password": password, "dbname": "my db"}
    without = psycopg.conninfo.conninfo_to_dict(ep.conninfo("other", password=False))
    assert "password" not in without and without["dbname"] == "other"
    assert ep.where() == "10.0.0.5:6543/my db"


def test_sql_quoting() -> None:
    assert quote_ident('we"ird') == '"we""ird"'
    assert quote_literal("it's") == "'it''s'"


# --------------------------------------------------------------------------- schema


class _FakeConn:
    def __init__(self, rows: list[tuple]) -> None:
        self.rows = rows

    async def fetch(self, query: str) -> list[tuple]:
        assert query == FINGERPRINT_SQL
        return self.rows


async def test_fingerprint_leaves_out_not_null_constraints_of_postgresql_18() -> None:
    common = [("table", "public.t", None, "table"),
              ("column", "public.t.id", "public.t", "integer not null"),
              ("constraint", "public.t.t_pkey", "public.t", "PRIMARY KEY (id)")]
    pg15 = await comparable_fingerprint(_FakeConn(common))
    pg18 = await comparable_fingerprint(_FakeConn(
        common + [("constraint", "public.t.t_id_not_null", "public.t", "NOT NULL id")]))
    assert pg15 == pg18
    assert pg18.count("constraint") == 1


# --------------------------------------------------------------------------- status


def _sub(db: str = "app", *, states: str = "rr", source_lsn: int = 10 * MB,
         confirmed: int | None = 10 * MB, sizes: tuple[int, int] = (4 * MB, 6 * MB),
         copied: tuple[int, int] | None = None, running: bool = True,
         lag_s: float = 0.5) -> SubscriptionStatus:
    copied = copied or sizes
    tables = tuple(TableCopy(f"public.t{i}", s, sizes[i], copied[i])
                   for i, s in enumerate(states))
    lag = source_lsn - confirmed if confirmed is not None else source_lsn
    return SubscriptionStatus(db, "pgsplit", f"pgsplit_{db}", True, running, tables,
                              source_lsn, confirmed, confirmed, lag, lag,
                              lag_seconds_from(lag, None, lag_s), True)


def test_status_properties() -> None:
    st = Status("pgsplit", 0.0, 100.0, (_sub(), _sub("b", states="dr", copied=(MB, 6 * MB),
                                                      confirmed=9 * MB)))
    assert not st.ready
    assert st.lag_bytes == MB and st.lag_seconds == 0.5
    assert st.copy_total_bytes == 20 * MB and st.copy_done_bytes == 17 * MB
    assert st.table_states() == {"app.public.t0": "r", "app.public.t1": "r",
                                 "b.public.t0": "d", "b.public.t1": "r"}
    text = st.render()
    assert "copying" in text and "public.t0: data copy (1.0 MB of 4.0 MB)" in text
    assert Status("pgsplit", 0.0, 0.0, (_sub(),)).ready
    assert not Status("pgsplit", 0.0, 0.0, (_sub(running=False),)).ready


def test_rates_and_eta_from_two_samples() -> None:
    # a backlog: 1 MB behind a source writing 0.5 MB/s is 2 s behind
    before = Status("pgsplit", 0.0, 100.0, (_sub(states="dr", copied=(0, 6 * MB),
                                                 source_lsn=10 * MB, confirmed=8 * MB, lag_s=4.0),))
    after = Status("pgsplit", 2.0, 102.0, (_sub(states="dr", copied=(2 * MB, 6 * MB),
                                                source_lsn=11 * MB, confirmed=10 * MB, lag_s=2.0),))
    st = with_rates(after, before)
    assert st.copy_bytes_per_s == MB  # 2 MB in 2 s
    assert st.apply_bytes_per_s == MB and st.source_wal_bytes_per_s == MB / 2
    # 2 MB of copy left at 1 MB/s, then 1 MB of lag closing at 0.5 MB/s
    assert st.eta_seconds == pytest.approx(4.0)
    assert with_rates(after, None) is after


def test_eta_right_after_the_copy_is_the_time_lag_not_noise() -> None:
    """Every table ready, a light write load, 10 kB in flight: two rounds' rates differ
    by the subscriber's last confirmation step. The ETA was 10 kB / (apply - WAL rate)
    (13 s in the report, 20 s here), or none when that step fell the other way; it is
    the time lag."""
    kB = 1024
    before = Status("pgsplit", 0.0, 100.0, (_sub(source_lsn=10 * MB, confirmed=10 * MB - 10 * kB - 512,
                                                 lag_s=0.004),))
    # 9 kB/s written, 9.5 kB/s confirmed: 10 kB / 0.5 kB/s was "20 s"
    after = Status("pgsplit", 1.0, 101.0, (_sub(source_lsn=10 * MB + 9 * kB, confirmed=10 * MB - kB,
                                                lag_s=0.004),))
    # 9 kB/s both: was no ETA at all
    later = Status("pgsplit", 2.0, 102.0, (_sub(source_lsn=10 * MB + 18 * kB, confirmed=10 * MB + 8 * kB,
                                                lag_s=0.004),))
    for st in (with_rates(after, before), with_rates(later, after)):
        assert st.lag_bytes == 10 * kB and st.ready
        assert st.eta_seconds == pytest.approx(0.004), (st.apply_bytes_per_s, st.source_wal_bytes_per_s)


@pytest.mark.parametrize("remaining, copy_rate, lag, apply, wal, eta", [
    (0, None, 0, None, None, 0.0),  # done
    (10 * MB, 2 * MB, 0, None, None, 5.0),
    (10 * MB, 0.0, 0, None, None, None),  # copy not moving
    (0, None, 4 * MB, 3 * MB, 1 * MB, 2.0),
    (0, None, 4 * MB, 1 * MB, 1 * MB, None),  # not closing the gap
    (0, None, 4 * MB, None, None, None),  # rates unknown
    (2 * MB, MB, 4 * MB, MB, 2 * MB, 2.0),  # copy ETA, the lag after it unknown
])
def test_eta(remaining: int, copy_rate: float | None, lag: int, apply: float | None,
             wal: float | None, eta: float | None) -> None:
    assert estimate_eta(remaining, copy_rate, lag, apply, wal) == eta
    # PostgreSQL measures the lag over a second: a backlog, the same arithmetic
    assert estimate_eta(remaining, copy_rate, lag, apply, wal, lag_seconds=5.0) == eta


@pytest.mark.parametrize("remaining, copy_rate, lag, apply, wal, lag_s, eta", [
    (0, None, 10_240, 9_300.0, 8_500.0, 0.003, 0.003),  # was 10 kB / 800 B/s = 12.8 s
    (0, None, 10_240, 8_500.0, 9_300.0, 0.003, 0.003),  # was None: "not closing"
    (0, None, 10_240, 0.0, 9_300.0, 0.003, 0.003),  # no confirmation this round
    (2 * MB, MB, 10_240, 9_300.0, 8_500.0, 0.25, 2.25),  # the copy, then the time lag
    (0, None, 4 * MB, 3 * MB, 1 * MB, 1.0, 2.0),  # a second behind: a backlog
])
def test_eta_of_a_lag_in_flight(remaining: int, copy_rate: float | None, lag: int, apply: float,
                                wal: float, lag_s: float, eta: float) -> None:
    assert estimate_eta(remaining, copy_rate, lag, apply, wal, lag_s) == pytest.approx(eta)


@pytest.mark.parametrize("lag, replay_lag, age, expected", [
    (0, 3.0, 9.0, 0.0),  # nothing unconfirmed: an idle source is no lag
    (100, 0.2, 9.0, 0.2),  # the walsender's replay_lag first
    (100, None, 1.5, 1.5),  # else the age of the subscriber's last word
    (100, None, None, None),
])
def test_lag_seconds(lag: int, replay_lag: float | None, age: float | None,
                     expected: float | None) -> None:
    assert lag_seconds_from(lag, replay_lag, age) == expected


# --------------------------------------------------------------------------- sequences


@pytest.mark.parametrize("last, inc, headroom, lo, hi, value", [
    (100, 1, 0, 1, 2**63 - 1, 100),
    (100, 1, 1000, 1, 2**63 - 1, 1100),
    (100, 5, 10, 1, 2**63 - 1, 150),
    (-100, -1, 10, -(2**63), -1, -110),  # descending
    (2**31 - 10, 1, 1000, 1, 2**31 - 1, 2**31 - 1),  # kept inside the bounds
])
def test_sequence_target_value(last: int, inc: int, headroom: int, lo: int, hi: int,
                               value: int) -> None:
    assert sequence_target_value(last, inc, headroom, lo, hi) == value


def test_sequence_is_past() -> None:
    assert not sequence_is_past(None, 100, 1)
    assert sequence_is_past(100, 100, 1) and sequence_is_past(200, 100, 1)
    assert not sequence_is_past(99, 100, 1)
    assert sequence_is_past(-200, -100, -1) and not sequence_is_past(-99, -100, -1)


# --------------------------------------------------------------------------- verify


def test_chunk_statements() -> None:
    one = source_chunk_sql('"public"."t"', ["id"], ["id", "v"], after=True)
    assert "WHERE t.\"id\" > $2 ORDER BY t.\"id\" LIMIT $1" in one
    assert "md5(ROW(t.\"id\", t.\"v\")::text)" in one
    two = source_chunk_sql('"public"."t"', ["a", "b"], ["a", "b"], after=True)
    assert "WHERE (t.\"a\", t.\"b\") > ($2, $3) ORDER BY t.\"a\", t.\"b\" LIMIT $1" in two
    assert "ORDER BY \"a\" DESC, \"b\" DESC LIMIT 1" in two
    first = source_chunk_sql('"public"."t"', ["id"], ["id"], after=False)
    assert "WHERE" not in first.split("LIMIT $1")[0]
    rng = range_sql('"public"."t"', ["a", "b"], ["a", "b"], lower=True, upper=True)
    assert rng.endswith("WHERE (t.\"a\", t.\"b\") > ($1, $2) AND (t.\"a\", t.\"b\") <= ($3, $4)")
    assert range_sql('"s"."t"', ["id"], ["id"], lower=False, upper=True).endswith(
        "WHERE t.\"id\" <= $1")
    assert range_sql('"s"."t"', ["id"], ["id"], lower=True, upper=False).endswith(
        "WHERE t.\"id\" > $1")
    assert "WHERE" not in range_sql('"s"."t"', [], ["x"], lower=False, upper=False)
    weird = source_chunk_sql('"s"."t"', ['k"y'], ['k"y'], after=True)
    assert 't."k""y"' in weird


def test_verify_report_lines() -> None:
    diffs = (RangeDiff((120000,), (130000,), 10000, 10000),
             RangeDiff(None, ((5, "k5")), 10000, 9999),
             RangeDiff((7, "x"), None, 3, 5))
    t = TableCheck("app", "public.t", ("id",), 20003, 20004, 3, diffs)
    other = TableCheck("app", "public.u", (), 0, 0, 0, problems=("missing on the target",))
    ok = TableCheck("app", "public.v", ("id",), 5, 5, 1)
    report = VerifyReport((t, other, ok), 1.5)
    assert not report.equal and ok.equal
    assert report.differences == [
        "database app: table public.t: keys (120000, 130000]: source 10000 rows, "
        "target 10000 rows, checksums differ",
        "database app: table public.t: keys (-inf, (5, k5)]: source 10000 rows, "
        "target 9999 rows, row counts differ",
        "database app: table public.t: keys ((7, x), +inf]: source 3 rows, target 5 rows, "
        "row counts differ",
        "database app: table public.u: missing on the target",
    ]
    assert report.table("public.v") is ok
    assert "DIFFERENT" in report.render()
    with pytest.raises(KeyError):
        report.table("public.nope")


# --------------------------------------------------------------------------- plan, errors


def _plan(blockers: tuple[Blocker, ...]) -> Plan:
    db = DatabasePlan("app", tables=("public.t",), sequences=("public.s",),
                              table_bytes=3 * MB, schema_diff=("table public.t: only on "
                                                               "the source",))
    return Plan("pgsplit", "15.18", "18.6", 15, 18, "logical", 18, "/x/bin", (db,), blockers,
                ("a note",))


def test_plan_render_and_blocked_error() -> None:
    b1 = Blocker("source", "table public.nopk (database app)", "has no primary key")
    b2 = Blocker("target", "extension adminpack", "not available")
    p = _plan((b1, b2))
    assert not p.ok and _plan(()).ok
    text = p.render()
    assert "15.18 -> target PostgreSQL 18.6" in text
    assert "  - source table public.nopk (database app): has no primary key" in text
    assert "schema: table public.t: only on the source" in text and "a note" in text
    err = BlockedError(p)
    assert err.side == "source" and err.object == "table public.nopk (database app)"
    assert str(err) == ("source table public.nopk (database app): has no primary key "
                        "(and 1 more)")
    assert isinstance(CatchUpTimeout("source", "slot s", "late"), TimeoutError)
    assert str(MigrateError("target", "subscription x", "is disabled")) == \
        "target subscription x: is disabled"


def test_find_client_bindir(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    for prog, text in (("pg_dump", "pg_dump (PostgreSQL) 18.6"),
                       ("psql", "psql (PostgreSQL) 18.6")):
        path = fake / prog
        path.write_text(f"#!/bin/sh\necho '{text}'\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    assert find_client_bindir(18, fake) == fake
    with pytest.raises(MigrateError) as exc:
        find_client_bindir(17, fake)
    assert exc.value.side == "local" and exc.value.object == "pg_dump/psql 17"
    assert str(fake) in str(exc.value)
    with pytest.raises(MigrateError, match="pg_dump/psql 9"):
        find_client_bindir(9)
    os.environ["PGSPLIT_PG18_BINDIR"] = str(fake)
    try:
        assert find_client_bindir(18) == fake
    finally:
        del os.environ["PGSPLIT_PG18_BINDIR"]


# --------------------------------------------------------------------------- assess

PG15 = ClusterFacts(150018, "15.18", roles=frozenset({"postgres", "app"}),
                   available_extensions=frozenset({"plpgsql", "adminpack"}),
                   databases=frozenset({"postgres", "app"}))
PG18 = ClusterFacts(180006, "18.6", roles=frozenset({"postgres"}),
                   available_extensions=frozenset({"plpgsql"}),
                   databases=frozenset({"postgres", "app"}))
SRC_SCHEMA = Fingerprint({("table", "public.t"): (None, "table"),
                          ("column", "public.t.id"): ("public.t", "integer not null")})


def _blockers(plan: Plan) -> list[str]:
    return [str(b) for b in plan.blockers]


@pytest.mark.parametrize("table, blocked", [
    (TableFacts("public.t"), False),  # a primary key
    (TableFacts("public.t", has_primary_key=False), True),
    (TableFacts("public.t", has_primary_key=False, replica_identity="f"), False),
    (TableFacts("public.t", has_primary_key=False, replica_identity="i",
                has_identity_index=True), False),
    (TableFacts("public.t", replica_identity="n"), True),  # REPLICA IDENTITY NOTHING
    (TableFacts("public.t", has_primary_key=False, persistence="u"), False),  # unpublished
    (TableFacts("public.t", kind="p", has_primary_key=False), False),  # its leaves count
])
def test_tables_without_replica_identity_block(table: TableFacts, blocked: bool) -> None:
    plan = assess("pgsplit", PG15, PG15, [DatabaseFacts("app", tables=(table,))])
    assert plan.ok is not blocked
    if blocked:
        assert _blockers(plan)[0].startswith(
            "source table public.t (database app): has no primary key or replica identity")
        assert plan.databases[0].tables_without_identity == ("public.t",)


def test_assess_names_every_blocker() -> None:
    facts = DatabaseFacts(
        "app", tables=(TableFacts("public.t", bytes=100), TableFacts("public.l",
                                                                    persistence="u")),
        roles=("app", "postgres"), sequences=("public.s",),
        extensions=(("plpgsql", "1.0"), ("adminpack", "2.1")), large_objects=2,
        publication_all_tables=False, source_schema=SRC_SCHEMA,
        target_schema=Fingerprint({("table", "public.other"): (None, "table")}))
    src = ClusterFacts(150018, "15.18", wal_level="replica", free_slots=0,
                      slots=frozenset({"pgsplit_app"}), databases=frozenset({"app"}))
    plan = assess("pgsplit", src, PG18, [facts], missing=["gone"],
                  dump_problem=Blocker("local", "pg_dump/psql 18", "not found"))
    assert _blockers(plan) == [
        "source wal_level: is 'replica', logical replication needs 'logical' "
        "(ALTER SYSTEM SET wal_level = logical, then restart)",
        "local pg_dump/psql 18: not found",
        "source database gone: does not exist",
        "target extension adminpack: is installed in database app on the source "
        "(version 2.1) but not available on the target",
        "target role app: owns or is granted objects in database app on the source but "
        "does not exist on the target (create it first; pg_dumpall --roles-only)",
        "target database app: already has tables and its schema differs from the source's "
        "(2 differences, first: table public.other: only on the target)",
        "source replication slot pgsplit_app: already exists (left by an earlier run?): "
        "drop it with pg_drop_replication_slot() or use another name",
        "source publication pgsplit (database app): exists but is not FOR ALL TABLES",
        "source max_replication_slots: 0 free, 1 needed (one per database)",
    ]
    (db,) = plan.databases
    assert db.unlogged_tables == ("public.l",) and db.table_bytes == 100
    assert db.missing_extensions == ("adminpack",) and db.missing_roles == ("app",)
    assert any("UNLOGGED" in n for n in plan.notes)
    assert any("2 large objects" in n for n in plan.notes)
    assert any("1 sequences are not replicated" in n for n in plan.notes)
    assert any("major version upgrade 15 -> 18" in n for n in plan.notes)


def test_assess_a_clean_migration_and_one_already_started() -> None:
    fresh = DatabaseFacts("app", tables=(TableFacts("public.t"),), source_schema=SRC_SCHEMA)
    plan = assess("pgsplit", PG15, PG15, [fresh])
    assert plan.ok and plan.dump_major == 15
    assert plan.databases[0].schema_diff == ("table public.t: only on the source",)
    # started: the target has the tables, the slot exists, and neither blocks
    started = DatabaseFacts("app", tables=(TableFacts("public.t"),), source_schema=SRC_SCHEMA,
                            target_schema=SRC_SCHEMA, started=True,
                            publication_all_tables=True)
    src = ClusterFacts(150018, "15.18", free_slots=0, slots=frozenset({"pgsplit_app"}))
    plan = assess("pgsplit", src, PG18, [started])
    assert plan.ok, _blockers(plan)
    assert plan.databases[0].started and plan.databases[0].schema_diff == ()
    # an older target is allowed, with a warning
    assert any("older than the source" in n for n in assess("pgsplit", PG18, PG15, []).notes)


def test_plan_names_what_the_cutover_will_refuse_with_the_preflights_own_words() -> None:
    """Tables in ``postgres`` and a database outside [migration] databases: `start` has
    nothing against them, the cutover refuses. The plan's blockers for them are the
    preflight's (build_report on the facts the cutover will find), word for word."""
    leftover = Fingerprint({("table", "public.leftover"): (None, "table")})
    empty = Fingerprint()
    prints = {"source": {"app": SRC_SCHEMA, "postgres": leftover, "other": leftover},
              "target": {"postgres": empty}}
    fresh = DatabaseFacts("app", tables=(TableFacts("public.t"),), source_schema=SRC_SCHEMA)
    plan = assess("pgsplit_next", PG15, PG18, [fresh], prints=prints,
                  servers=("main_primary", "next_primary"))
    assert not plan.ok and plan.blockers == ()  # start is not refused; the plan says "blocked"
    # what the real preflight reports once `app` is copied and subscribed
    facts = PreflightFacts(ServerState("main_primary", "h:1", reachable=True, version_num=150018),
                           ServerState("next_primary", "h:2", reachable=True, version_num=180006),
                           ReplicationFacts("logical", status="streaming", subscription="pgsplit_next",
                                            databases=["app"]))
    record_schemas(facts, {"source": prints["source"], "target": {**prints["target"], "app": SRC_SCHEMA}})
    expected = build_report(facts, max_lag_bytes=1 << 20).blockers
    assert list(plan.cutover_blockers) == expected
    assert expected == [
        "database other has tables on the source but the target next_primary has no subscription "
        "pgsplit_next there: its rows would not be carried over",
        "database postgres has tables on the source but the target next_primary has no subscription "
        "pgsplit_next there: its rows would not be carried over",
        "schemas differ: database other: only on the source; "
        "database postgres: table public.leftover: only on the source"]
    text = plan.render()
    assert "blockers:" in text.splitlines() and "  - the cutover will refuse: database other has tables on the " \
        "source but the target next_primary has no subscription pgsplit_next there: its rows would not be " \
        "carried over" in text.splitlines()
    # the same migration with `other` carried too and postgres's table gone: nothing left
    other = DatabaseFacts("other", tables=(TableFacts("public.leftover"),), source_schema=leftover)
    clean = {"source": {**prints["source"], "postgres": empty}, "target": prints["target"]}
    plan = assess("pgsplit_next", PG15, PG18, [fresh, other], prints=clean)
    assert plan.ok and plan.cutover_blockers == () and "blockers: none" in plan.render().splitlines()
    # once started, drift on the target counts as the cutover counts it
    started = DatabaseFacts("app", tables=(TableFacts("public.t"),), source_schema=SRC_SCHEMA,
                            target_schema=empty, started=True, publication_all_tables=True)
    plan = assess("pgsplit_next", PG15, PG18, [started],
                  prints={"source": {"app": SRC_SCHEMA}, "target": {"app": empty}})
    assert plan.cutover_blockers == ("schemas differ: database app: table public.t: only on the source",)
