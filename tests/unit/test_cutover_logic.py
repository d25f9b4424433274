"""ops.schema's diff and ops.cutover's report and state machine, without a server.

The state machine runs against a fake data plane and fake control functions that write
every call into one journal, so the order of operations and the rollback decisions are
asserted as sequences: what ran, in which order, and what was undone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ops.cutover.machine import Cutover, CutoverError, CutoverSettings, Result
from ops.cutover.preflight import PreflightFacts, ReplicationFacts, ServerState, build_report, report_lines
from ops.schema import Fingerprint, diff, diff_databases
from router.pg import major_version

# --- schema fingerprints ---------------------------------------------------------------------

BASE = [
    ("table", "public.orders", None, "table"),
    ("column", "public.orders.id", "public.orders", "bigint not null default nextval('orders_id_seq'::regclass)"),
    ("column", "public.orders.qty", "public.orders", "integer"),
    ("index", "public.orders_pkey", "public.orders", "CREATE UNIQUE INDEX orders_pkey ON public.orders USING btree (id)"),
    ("index", "public.orders_qty_idx", "public.orders", "CREATE INDEX orders_qty_idx ON public.orders USING btree (qty)"),
    ("constraint", "public.orders.orders_pkey", "public.orders", "PRIMARY KEY (id)"),
    ("sequence", "public.orders_id_seq", None, "bigint start 1 increment 1 min 1 max 9223372036854775807 cache 1"),
]


def fp(rows, drop=(), add=(), change=None) -> Fingerprint:
    change = change or {}
    out = []
    for kind, name, parent, definition in rows:
        if (kind, name) in drop:
            continue
        out.append((kind, name, parent, change.get((kind, name), definition)))
    return Fingerprint.from_rows(out + list(add))


def test_identical_schemas_have_no_differences_and_equal_digests() -> None:
    a, b = fp(BASE), fp(list(reversed(BASE)))
    assert diff(a, b) == []
    assert a.digest == b.digest
    assert a.count("column") == 2


def test_extra_column_missing_index_type_change_are_listed_by_name() -> None:
    target = fp(BASE, drop={("index", "public.orders_qty_idx")},
                add=[("column", "public.orders.note", "public.orders", "text")],
                change={("column", "public.orders.qty"): "bigint"})
    assert diff(fp(BASE), target) == [
        "column public.orders.note: only on the target (text)",
        "column public.orders.qty: integer on the source, bigint on the target",
        "index public.orders_qty_idx: only on the source "
        "(CREATE INDEX orders_qty_idx ON public.orders USING btree (qty))",
    ]
    assert fp(BASE).digest != target.digest


def test_a_missing_table_is_one_line_not_one_per_column() -> None:
    extra = [("table", "public.audit", None, "table"),
             ("column", "public.audit.at", "public.audit", "timestamp with time zone"),
             ("index", "public.audit_at_idx", "public.audit", "CREATE INDEX audit_at_idx ON public.audit (at)"),
             ("constraint", "public.audit.audit_at_check", "public.audit", "CHECK ((at IS NOT NULL))")]
    assert diff(fp(BASE, add=extra), fp(BASE)) == ["table public.audit: only on the source"]
    assert diff(fp(BASE), fp(BASE, add=extra), "old", "new") == ["table public.audit: only on the new"]


def test_constraints_sequences_and_table_kinds_are_compared() -> None:
    target = fp(BASE, change={("constraint", "public.orders.orders_pkey"): "PRIMARY KEY (id, qty)",
                              ("sequence", "public.orders_id_seq"): "integer start 1 increment 1 min 1 max 2147483647 cache 1",
                              ("table", "public.orders"): "partitioned table"})
    lines = diff(fp(BASE), target)
    assert lines[0] == "table public.orders: table on the source, partitioned table on the target"
    assert any(line.startswith("constraint public.orders.orders_pkey: PRIMARY KEY (id) on the source") for line in lines)
    assert any(line.startswith("sequence public.orders_id_seq: bigint") for line in lines)


def test_diff_databases_prefixes_and_lone_databases() -> None:
    a = {"app": fp(BASE), "postgres": Fingerprint(), "reports": Fingerprint()}
    b = {"app": fp(BASE, drop={("index", "public.orders_qty_idx")}), "postgres": Fingerprint(), "extra": Fingerprint()}
    assert diff_databases(a, b) == [
        "database app: index public.orders_qty_idx: only on the source "
        "(CREATE INDEX orders_qty_idx ON public.orders USING btree (qty))",
        "database extra: only on the target",
        "database reports: only on the source",
    ]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schema object kind"):
        Fingerprint.from_rows([("trigger", "public.t", None, "")])


# --- the preflight report --------------------------------------------------------------------------


def server(name: str, **kw: Any) -> ServerState:
    base = dict(address=f"10.0.0.{len(name)}:5432", reachable=True, version="15.4", version_num=150004,
                in_recovery=False, system_identifier="7000", timeline=1, wal_lsn=0x3000000, read_only=False,
                superuser=True)
    base.update(kw)
    return ServerState(name, **base)


def facts(source: dict | None = None, target: dict | None = None, **kw: Any) -> PreflightFacts:
    rep = kw.pop("replication", ReplicationFacts("physical", "direct", "streaming", lag_bytes=128))
    return PreflightFacts(server("pg1", **(source or {})),
                          server("pg4", **{"in_recovery": True, "wal_lsn": 0x2FFFF80, **(target or {})}),
                          replication=rep, schema_differences=kw.pop("schema_differences", []), **kw)


def test_a_caught_up_physical_standby_has_no_blockers() -> None:
    report = build_report(facts(), max_lag_bytes=1024)
    assert report.ok and report.blockers == [] and report.warnings == []
    assert report.versions == "same major version 15: source 15.4, target 15.4"
    d = report.to_dict()
    assert d["ok"] is True and d["target"]["wal_lsn"] == "0/2FFFF80"


def test_a_major_version_difference_is_reported_by_name_and_blocks_physical() -> None:
    f = facts(target={"version": "16.2", "version_num": 160002})
    report = build_report(f, max_lag_bytes=1024)
    assert report.versions.startswith("major versions differ: source pg1 runs 15 (15.4), target pg4 runs 16 (16.2)")
    assert any("major versions differ" in b and "only logical replication" in b for b in report.blockers)


def test_a_major_version_difference_is_allowed_with_logical_replication() -> None:
    f = facts(target={"version": "16.2", "version_num": 160002, "in_recovery": False},
              replication=ReplicationFacts("logical", "subscription s1, slot s1", "streaming", lag_bytes=0))
    report = build_report(f, max_lag_bytes=1024)
    assert not any("major versions" in b for b in report.blockers)
    assert report.ok, report.blockers  # the logical catch-up (ops.migrate) carries it over


def test_old_version_numbers() -> None:
    assert major_version(90624) == 906 and major_version(150004) == 15 and major_version(100023) == 10


@pytest.mark.parametrize(("change", "needle"), [
    ({"target": {"reachable": False, "error": "connection refused"}}, "target pg4 (10.0.0.3:5432) cannot be reached: connection refused"),
    ({"source": {"superuser": False}}, "not a superuser on the source pg1"),
    ({"replication": ReplicationFacts(detail="pg4 is a primary (not in recovery)")}, "does not replicate from the source pg1"),
    ({"target": {"system_identifier": "9999"}}, "standby of another cluster"),
    ({"target": {"timeline": 2}}, "follows timeline 2 but the source pg1 is on timeline 1"),
    ({"replication": ReplicationFacts("physical", "direct", "streaming", lag_bytes=4096)}, "4096 bytes behind"),
    ({"target": {"read_only": True}}, "default_transaction_read_only = on"),
    ({"source": {"in_recovery": True}}, "source pg1 is in recovery"),
])
def test_blockers(change: dict, needle: str) -> None:
    report = build_report(facts(**change), max_lag_bytes=1024)
    assert not report.ok
    assert any(needle in b for b in report.blockers), report.blockers


def test_schema_differences_block_a_logical_target_but_only_warn_for_a_standby() -> None:
    diffs = ["database app: column public.t.extra: only on the target (integer)"]
    physical = build_report(facts(schema_differences=diffs), max_lag_bytes=1024)
    assert physical.ok and "column public.t.extra" in physical.warnings[0]
    none = build_report(facts(schema_differences=diffs, replication=ReplicationFacts(detail="no")), max_lag_bytes=1024)
    assert any("schemas differ: database app: column public.t.extra" in b for b in none.blockers)


def test_a_replica_of_the_target_that_streams_from_elsewhere_is_named() -> None:
    f = facts(target_replicas=[server("pg5", in_recovery=True, sender="10.0.0.3:5432"),
                               server("pg6", in_recovery=True, sender="10.0.0.1:5432")])
    warnings = build_report(f, max_lag_bytes=1024).warnings
    assert len(warnings) == 1 and warnings[0].startswith("replica pg6 streams from 10.0.0.1:5432, not from the target pg4")


def test_replica_warnings_and_report_lines() -> None:
    f = facts(target_replicas=[server("pg5", reachable=False, error="timeout"),
                               server("pg6", in_recovery=False)],
              schema_errors=["schema of database x on the target not read: 28000 no"])
    report = build_report(f, max_lag_bytes=1024)
    assert report.ok
    assert [w.split(" ")[1] for w in report.warnings[1:]] == ["pg5", "pg6"]
    text = "\n".join(report_lines(report.to_dict()))
    assert "replication physical (direct, streaming), lag 128 bytes" in text
    assert "replica  pg5" in text and "warning  schema of database x" in text
    bad = build_report(facts(target={"version": "16.2", "version_num": 160002}), max_lag_bytes=1024)
    assert "BLOCKER  major versions differ" in "\n".join(report_lines(bad.to_dict()))


# --- the state machine ------------------------------------------------------------------------------


class Drained:
    seconds = 0.001
    waited_for_units = 2
    cancelled_transactions = 0


class Topo:
    generation = 7


class FakeDataPlane:
    def __init__(self, journal: list[str], fail: dict[str, BaseException]):
        self.journal = journal
        self.fail = fail
        self.held_units = 0
        self.holding = False

    def _call(self, name: str) -> None:
        self.journal.append(name)
        if name in self.fail:
            raise self.fail[name]

    def census(self) -> tuple[int, int]:
        return 3, 1

    def hold(self) -> None:
        self._call("hold")
        self.holding = True
        self.held_units = 5

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> Drained:
        self._call(f"drain(cancel={cancel_idle_in_transaction})")
        return Drained()

    async def install(self, cluster_name: str) -> Topo:
        self._call(f"install {cluster_name}")
        return Topo()

    def release(self) -> float:
        assert self.holding, "released without a hold"
        self.journal.append("release")
        self.holding = False
        return 0.25


class FakeControl:
    def __init__(self, journal: list[str], fail: dict[str, BaseException], facts_: PreflightFacts | None = None,
                 in_recovery_after_failed_promote: bool | None = True, slow: str | None = None):
        self.journal = journal
        self.fail = fail
        self.facts = facts_ or facts()
        self.in_recovery_after = in_recovery_after_failed_promote
        self.slow = slow
        self.timeouts: dict[str, float] = {}

    async def _call(self, name: str, timeout: float | None = None) -> None:
        self.journal.append(name)
        if timeout is not None:
            self.timeouts[name] = timeout
        if name == self.slow:
            await asyncio.sleep(3600)
        if name in self.fail:
            raise self.fail[name]

    async def preflight(self) -> PreflightFacts:
        await self._call("preflight")
        return self.facts

    async def fence(self, timeout: float) -> dict:
        await self._call("fence", timeout)
        return {"terminated_backends": 2}

    async def unfence(self) -> dict:
        await self._call("unfence")
        return {}

    async def final_lsn(self, timeout: float) -> int:
        await self._call("final_lsn", timeout)
        return 0x3000100

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict:
        await self._call(f"catch_up {kind}", timeout)
        return {"bytes": 256}

    async def promote(self, timeout: float) -> dict:
        await self._call("promote", timeout)
        return {"promoted": "pg4"}

    async def target_in_recovery(self) -> bool | None:
        self.journal.append("target_in_recovery?")
        return self.in_recovery_after

    async def finish(self) -> dict:
        await self._call("finish")
        return {}

    async def close(self) -> None:
        self.journal.append("close")


HAPPY = ["preflight", "hold", "drain(cancel=False)", "fence", "final_lsn", "catch_up physical", "promote",
         "install next", "release", "close"]


def make(fail: dict[str, BaseException] | None = None, settings: CutoverSettings | None = None, **control_kw: Any):
    journal: list[str] = []
    events: list[dict] = []
    fail = fail or {}
    dp = FakeDataPlane(journal, fail)
    control = FakeControl(journal, fail, **control_kw)
    cutover = Cutover("main", "next", dp, control, settings or CutoverSettings(max_lag_bytes=1024), events.append)
    return cutover, journal, events, control


async def test_success_runs_the_steps_in_order() -> None:
    cutover, journal, events, _ = make()
    result = await cutover.run()
    assert result.result is Result.SUCCESS and result.error is None
    assert journal == HAPPY
    assert result.pause_seconds == 0.25 and result.units_held == 5 and result.bytes_caught_up == 256
    steps = [(e["step"], e["phase"], e.get("outcome")) for e in events if e["event"] == "step"]
    names = ["preflight", "pause", "fence", "catch-up", "promote", "swap", "resume"]
    assert steps == [x for n in names for x in ((n, "start", None), (n, "end", "ok"))]
    assert events[0]["event"] == "begin" and events[-1]["event"] == "summary"
    summary = events[-1]
    assert summary["result"] == "success" and summary["report"]["ok"] is True
    assert summary["steps"][0]["detail"] == {"ok": True, "blockers": 0, "warnings": 0}
    swap = next(e for e in events if e.get("step") == "swap" and e["phase"] == "end")
    assert swap["detail"] == {"cluster": "next", "generation": 7}
    pause = next(e for e in events if e.get("step") == "pause" and e["phase"] == "end")
    assert pause["detail"]["in_flight"] == 3 and pause["detail"]["idle_in_transaction"] == 1


async def test_the_fence_precedes_the_promotion_and_the_swap_follows_it() -> None:
    cutover, journal, _, _ = make()
    await cutover.run()
    assert journal.index("hold") < journal.index("fence") < journal.index("final_lsn") \
        < journal.index("promote") < journal.index("install next") < journal.index("release")


async def test_dry_run_changes_nothing() -> None:
    cutover, journal, events, _ = make(settings=CutoverSettings(dry_run=True))
    result = await cutover.run()
    assert result.result is Result.DRY_RUN
    assert journal == ["preflight", "close"]
    assert events[-1]["report"]["source"]["name"] == "pg1"


async def test_a_dry_run_with_blockers_is_refused_and_says_why() -> None:
    bad = facts(target={"reachable": False, "error": "refused"})
    cutover, journal, events, _ = make(facts_=bad, settings=CutoverSettings(dry_run=True))
    result = await cutover.run()
    assert result.result is Result.REFUSED
    assert journal == ["preflight", "close"]
    assert result.error.startswith("preflight: the target ") and "cannot be reached: refused" in result.error
    assert events[-1]["result"] == "refused" and events[-1]["error"] == result.error


async def test_blockers_refuse_before_anything_changes() -> None:
    bad = facts(target={"reachable": False, "error": "refused"})
    cutover, journal, events, _ = make(facts_=bad)
    result = await cutover.run()
    assert result.result is Result.REFUSED
    assert journal == ["preflight", "close"]
    assert "cannot be reached" in result.error
    end = next(e for e in events if e.get("phase") == "end")
    assert end["outcome"] == "failed"


async def test_a_preflight_that_raises_refuses() -> None:
    cutover, journal, _, _ = make({"preflight": OSError("no route to host")})
    result = await cutover.run()
    assert result.result is Result.REFUSED and "no route to host" in result.error
    assert journal == ["preflight", "close"]


@pytest.mark.parametrize(("failing", "undo"), [
    # the failing call -> what runs after it (the rollback)
    ("drain(cancel=False)", ["release"]),  # not fenced: nothing to unfence
    ("fence", ["unfence", "release"]),  # a fence that failed halfway is undone too
    ("final_lsn", ["unfence", "release"]),
    ("catch_up physical", ["unfence", "release"]),
    ("promote", ["target_in_recovery?", "unfence", "release"]),
])
async def test_a_failure_before_the_swap_rolls_back(failing: str, undo: list[str]) -> None:
    cutover, journal, events, _ = make({failing: CutoverError(f"{failing} broke")})
    result = await cutover.run()
    assert result.result is Result.ROLLED_BACK
    assert f"{failing} broke" in result.error
    assert journal == HAPPY[: HAPPY.index(failing) + 1] + undo + ["close"]
    assert "install next" not in journal
    rollback = [e for e in events if e.get("step") == "rollback"]
    assert [e["phase"] for e in rollback] == ["start", "end"] and rollback[1]["outcome"] == "ok"
    assert rollback[1]["detail"]["unfenced"] is ("unfence" in undo)
    assert result.pause_seconds == 0.25


async def test_a_drain_timeout_rolls_back_with_a_hint() -> None:
    cutover, journal, _, _ = make({"drain(cancel=False)": TimeoutError("1 session(s) idle in a transaction")})
    result = await cutover.run()
    assert result.result is Result.ROLLED_BACK
    assert "idle_in_transaction = \"cancel\"" in result.error


async def test_cancel_idle_in_transaction_is_passed_to_the_drain() -> None:
    cutover, journal, _, _ = make(settings=CutoverSettings(cancel_idle_in_transaction=True, max_lag_bytes=1024))
    assert (await cutover.run()).result is Result.SUCCESS
    assert "drain(cancel=True)" in journal


async def test_a_promotion_that_finished_late_goes_on_to_the_swap() -> None:
    cutover, journal, events, _ = make({"promote": CutoverError("still in recovery after 60s")},
                                       in_recovery_after_failed_promote=False)
    result = await cutover.run()
    assert result.result is Result.SUCCESS
    assert "unfence" not in journal and journal[-3:] == ["install next", "release", "close"]
    promote = next(e for e in events if e.get("step") == "promote" and e["phase"] == "end")
    assert promote["outcome"] == "failed"


async def test_an_unknown_promotion_state_rolls_back() -> None:
    cutover, journal, _, _ = make({"promote": CutoverError("connection lost")}, in_recovery_after_failed_promote=None)
    assert (await cutover.run()).result is Result.ROLLED_BACK
    assert "unfence" in journal


async def test_a_failed_swap_is_not_rolled_back_but_releases_the_units() -> None:
    cutover, journal, _, _ = make({"install next": RuntimeError("monitor broke")})
    result = await cutover.run()
    assert result.result is Result.FAILED
    assert "unfence" not in journal  # the target is a primary now: never two writable ones
    assert journal[-2:] == ["release", "close"]
    assert "monitor broke" in result.error


async def test_a_failed_unfence_still_releases_and_says_what_to_do() -> None:
    cutover, journal, _, _ = make({"catch_up physical": CutoverError("replay paused"),
                                   "unfence": OSError("source down")})
    result = await cutover.run()
    assert result.result is Result.FAILED
    assert journal[-3:] == ["unfence", "release", "close"]
    assert "ALTER SYSTEM RESET default_transaction_read_only" in result.error


async def test_the_overall_timeout_caps_each_step_and_rolls_back_when_spent() -> None:
    now = [100.0]
    cutover, journal, _, control = make(settings=CutoverSettings(timeout_s=5, catchup_timeout_s=30, max_lag_bytes=1024))
    cutover.clock = lambda: now[0]
    original = control.fence

    async def slow_fence(timeout: float) -> dict:
        now[0] += 6  # the fence took longer than the whole budget
        return await original(timeout)

    control.fence = slow_fence
    result = await cutover.run()
    assert control.timeouts["fence"] == 5
    assert result.result is Result.ROLLED_BACK
    assert "timeout (5s) ran out before catch-up" in result.error
    assert journal[-3:] == ["unfence", "release", "close"]


async def test_cancelling_a_cutover_rolls_it_back() -> None:
    cutover, journal, _, _ = make(slow="catch_up physical")
    task = asyncio.ensure_future(cutover.run())
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert journal[-3:] == ["unfence", "release", "close"]


async def test_a_broken_event_listener_does_not_break_the_cutover() -> None:
    cutover, journal, _, _ = make()

    def listener(event: dict) -> None:
        raise RuntimeError("listener bug")

    cutover.on_event = listener
    assert (await cutover.run()).result is Result.SUCCESS
    assert journal == HAPPY


async def test_a_logical_target_skips_the_promotion() -> None:
    f = facts(replication=ReplicationFacts("logical", "subscription s", "streaming", lag_bytes=0))
    cutover, journal, events, control = make(facts_=f)
    cutover._preflight = _ok_preflight(f)
    result = await cutover.run()
    assert result.result is Result.SUCCESS
    assert "promote" not in journal and "catch_up logical" in journal
    promote = next(e for e in events if e.get("step") == "promote" and e["phase"] == "end")
    assert promote["outcome"] == "skipped"


def _ok_preflight(f: PreflightFacts):
    async def preflight() -> dict:
        d = build_report(f, max_lag_bytes=1 << 30).to_dict()
        d["ok"], d["blockers"] = True, []
        return d
    return preflight


async def test_a_warm_up_runs_after_the_preflight_and_before_the_pause() -> None:
    cutover, journal, events, _ = make()

    async def warm_up() -> dict:
        journal.append("warm-up")
        return {"server_connections": 20}

    cutover.warm_up = warm_up
    assert (await cutover.run()).result is Result.SUCCESS
    assert journal == HAPPY[:1] + ["warm-up"] + HAPPY[1:]
    end = next(e for e in events if e.get("step") == "warm-up" and e["phase"] == "end")
    assert end["detail"] == {"server_connections": 20}


async def test_a_failed_warm_up_refuses_before_anything_changed() -> None:
    cutover, journal, _, _ = make()

    async def warm_up() -> dict:
        raise ValueError("app@app cannot log in to pg4: password authentication failed")

    cutover.warm_up = warm_up
    result = await cutover.run()
    assert result.result is Result.REFUSED and "password authentication failed" in result.error
    assert journal == ["preflight", "close"]


async def test_a_dry_run_does_not_warm_up() -> None:
    cutover, journal, _, _ = make(settings=CutoverSettings(dry_run=True))

    async def warm_up() -> dict:
        journal.append("warm-up")
        return {}

    cutover.warm_up = warm_up
    assert (await cutover.run()).result is Result.DRY_RUN
    assert "warm-up" not in journal
