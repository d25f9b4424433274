"""The online migration wired into the proxy, without a server: the preflight's verdict on
logical targets, the cutover's steps for them (finish after the resume, undo on a
rollback), the migration's JSON shapes and the CLI's tables, the metrics, the drift
watch's log lines, the admin API's routes and errors, names and connection strings.

What needs PostgreSQL is in tests/integration/test_migration_cutover.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from metrics import Metrics
from proxy import cli
from proxy.admin.http import Admin
from proxy.process.wiring import migration_name
from ops.cutover.machine import Cutover, CutoverSettings, Result
from ops.cutover.preflight import PreflightFacts, ReplicationFacts, ServerState, build_report, report_lines
from ops.migrate import watch as migrate_watch
from ops.migrate.control import MigrateError, publisher_conninfo
from ops.migrate.plan import Blocker, BlockedError, Plan
from ops.migrate.status import Status, SubscriptionStatus, TableCopy
from ops.migrate.verify import RangeDiff, TableCheck, VerifyReport
from ops.migrate.watch import Watch
from router.pg import Endpoint

# --- the preflight's verdict on a logical target -------------------------------------------------


def server(name: str, **kw: Any) -> ServerState:
    base = dict(address=f"10.0.0.{len(name)}:5432", reachable=True, version="15.4", version_num=150004,
                in_recovery=False, system_identifier="7000", timeline=1, wal_lsn=0x3000000, read_only=False,
                superuser=True)
    base.update(kw)
    return ServerState(name, **base)


def logical(**kw: Any) -> ReplicationFacts:
    base = dict(kind="logical", via="subscription pgsplit_next, slot pgsplit_next_app", status="streaming",
                lag_bytes=0, subscription="pgsplit_next", databases=["app"])
    base.update(kw)
    return ReplicationFacts(**base)


def facts(rep: ReplicationFacts | None = None, target: dict | None = None, **kw: Any) -> PreflightFacts:
    return PreflightFacts(server("pg1"),
                          server("pg4", **{"version": "18.1", "version_num": 180001, "system_identifier": "9",
                                           **(target or {})}),
                          replication=rep or logical(), schema_differences=kw.pop("schema_differences", []),
                          source_table_databases=kw.pop("source_table_databases", ["app"]), **kw)


def test_a_subscriber_of_the_source_on_another_major_version_is_accepted() -> None:
    report = build_report(facts(), max_lag_bytes=1024)
    assert report.ok, report.blockers
    assert report.versions.startswith("major versions differ: source pg1 runs 15 (15.4), target pg4 runs 18")
    assert "replication logical (subscription pgsplit_next, slot pgsplit_next_app, streaming), lag 0 bytes" \
        in "\n".join(report_lines(report.to_dict()))
    d = report.to_dict()["replication"]
    assert d["subscription"] == "pgsplit_next" and d["databases"] == ["app"] and d["tables_not_ready"] == []


@pytest.mark.parametrize(("change", "needle"), [
    ({"rep": logical(status="disabled")},
     "the subscription pgsplit_next on the target pg4 is disabled: nothing would be applied "
     "(ALTER SUBSCRIPTION pgsplit_next ENABLE)"),
    ({"rep": logical(tables_not_ready=["app.public.big"])},
     "tables still in their initial copy on the target pg4: app.public.big"),
    ({"source_table_databases": ["app", "billing"]},
     "database billing has tables on the source but the target pg4 has no subscription pgsplit_next there"),
    ({"schema_differences": ["database app: column public.t.note: only on the source (text)"]},
     "schemas differ: database app: column public.t.note: only on the source (text)"),
    ({"rep": logical(lag_bytes=4096)}, "4096 bytes behind"),
])
def test_logical_blockers(change: dict, needle: str) -> None:
    report = build_report(facts(**change), max_lag_bytes=1024)
    assert not report.ok
    assert any(needle in b for b in report.blockers), report.blockers


def test_a_worker_not_running_and_a_fenced_old_cluster_are_warnings_for_a_logical_target() -> None:
    report = build_report(facts(logical(status="enabled"), target={"read_only": True}), max_lag_bytes=1024)
    assert report.ok, report.blockers
    assert any("has no apply worker running" in w for w in report.warnings)
    assert any("default_transaction_read_only = on (the fence of an earlier cutover?): it is reset after the "
               "catch-up" in w for w in report.warnings)
    # the same for a physical standby is a blocker
    physical = facts(ReplicationFacts("physical", "direct", "streaming", lag_bytes=0),
                     target={"read_only": True, "version": "15.4", "version_num": 150004, "in_recovery": True,
                             "system_identifier": "7000"})
    assert any("default_transaction_read_only = on" in b for b in build_report(physical, max_lag_bytes=1024).blockers)


# --- the state machine with a logical target -----------------------------------------------------


class DataPlane:
    def __init__(self, journal: list[str]):
        self.journal = journal
        self.held_units = 0

    def census(self) -> tuple[int, int]:
        return 1, 0

    def hold(self) -> None:
        self.journal.append("hold")
        self.held_units = 3

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> Any:
        self.journal.append("drain")
        return SimpleNamespace(seconds=0.001, waited_for_units=1, cancelled_transactions=0)

    async def install(self, cluster_name: str) -> Any:
        self.journal.append(f"install {cluster_name}")
        return SimpleNamespace(generation=2)

    def release(self) -> float:
        self.journal.append("release")
        return 0.1


class LogicalControl:
    """LogicalControl's interface for a logical target, recording the calls."""

    def __init__(self, journal: list[str], fail: dict[str, BaseException] | None = None):
        self.journal = journal
        self.fail = fail or {}

    async def _call(self, name: str) -> None:
        self.journal.append(name)
        if name in self.fail:
            raise self.fail[name]

    async def preflight(self) -> PreflightFacts:
        await self._call("preflight")
        return facts()

    async def fence(self, timeout: float) -> dict:
        await self._call("fence")
        return {}

    async def unfence(self) -> dict:
        await self._call("unfence")
        return {}

    async def final_lsn(self, timeout: float) -> int:
        await self._call("final_lsn")
        return 0x3000100

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict:
        await self._call(f"catch_up {kind}")
        return {"bytes": 100}

    async def promote(self, timeout: float) -> dict:
        await self._call("promote")
        return {}

    async def target_in_recovery(self) -> bool | None:
        return False

    async def finish(self) -> dict:
        await self._call("finish_logical")
        return {"notes": ["target subscription pgsplit_next (database app): dropped"]}

    async def close(self) -> None:
        self.journal.append("close")


def logical_cutover(fail: dict[str, BaseException] | None = None) -> tuple[Cutover, list[str], list[dict]]:
    journal: list[str] = []
    events: list[dict] = []
    cutover = Cutover("main", "next", DataPlane(journal), LogicalControl(journal, fail),
                      CutoverSettings(max_lag_bytes=1024), events.append)
    return cutover, journal, events


async def test_a_logical_cutover_catches_up_skips_the_promotion_and_finishes_after_the_resume() -> None:
    cutover, journal, events = logical_cutover()
    result = await cutover.run()
    assert result.result is Result.SUCCESS, result.error
    assert journal == ["preflight", "hold", "drain", "fence", "final_lsn", "catch_up logical", "install next",
                       "release", "finish_logical", "close"]
    ends = [(e["step"], e["outcome"]) for e in events if e["event"] == "step" and e["phase"] == "end"]
    assert ends == [("preflight", "ok"), ("pause", "ok"), ("fence", "ok"), ("catch-up", "ok"),
                    ("promote", "skipped"), ("swap", "ok"), ("resume", "ok"), ("finish", "ok")]
    assert events[-1]["steps"][-1]["detail"] == {"notes": ["target subscription pgsplit_next (database app): dropped"]}


async def test_a_failed_finish_is_named_but_the_cutover_stands() -> None:
    cutover, journal, events = logical_cutover({"finish_logical": MigrateError("source", "replication slot s",
                                                                              "is active")})
    result = await cutover.run()
    assert result.result is Result.SUCCESS and "unfence" not in journal
    finish = next(e for e in events if e.get("step") == "finish" and e["phase"] == "end")
    assert finish["outcome"] == "failed" and "replication slot s: is active" in finish["detail"]["error"]


async def test_a_failed_logical_catch_up_rolls_back_before_the_swap() -> None:
    cutover, journal, _ = logical_cutover({"catch_up logical": MigrateError("source", "replication slot s",
                                                                            "behind")})
    result = await cutover.run()
    assert result.result is Result.ROLLED_BACK
    assert journal[-3:] == ["unfence", "release", "close"] and "finish_logical" not in journal
    assert "install next" not in journal


# --- names, connection strings, metrics ------------------------------------------------------------


@pytest.mark.parametrize(("target", "name"), [("next", "pgsplit_next"), ("Region-2.b", "pgsplit_region_2_b"),
                                              ("main", "pgsplit_main")])
def test_migration_names(target: str, name: str) -> None:
    assert migration_name(target) == name


def test_publisher_conninfo_adds_the_account_and_the_database_placeholder() -> None:
    text = publisher_conninfo(" host=10.1.0.5 port=7001 sslmode=require ", "postgres", "it's secret")
    assert text == r"host=10.1.0.5 port=7001 sslmode=require user=postgres password='it\'s secret' dbname={database}"
    assert text.replace("{database}", "app").endswith("dbname=app")
    assert publisher_conninfo("host=h", "u", None) == "host=h user=u dbname={database}"


def test_migration_metrics() -> None:
    m = Metrics()
    m.set_migration(4096, {"ready": 3, "data copy": 1, "initialize": 0}, True)
    text = m.exposition().decode()
    assert "pgsplit_migration_lag_bytes 4096.0" in text
    assert 'pgsplit_migration_tables{state="ready"} 3.0' in text
    assert 'pgsplit_migration_tables{state="data_copy"} 1.0' in text
    assert "pgsplit_schema_drift 1.0" in text
    m.set_migration(0, {}, False)
    text = m.exposition().decode()
    assert "pgsplit_schema_drift 0.0" in text and 'state="ready"' not in text


# --- JSON shapes and the CLI's tables ----------------------------------------------------------------


def status(states: dict[str, str], lag: int = 2048) -> Status:
    tables = tuple(TableCopy(t, st, 1000, 1000 if st == "r" else 250) for t, st in states.items())
    sub = SubscriptionStatus("app", "pgsplit_next", "pgsplit_next_app", True, True, tables, 0x3000000,
                             0x3000000 - lag, 0x3000000, lag, 0, 0.01, True)
    return Status("pgsplit_next", 1.0, 1.0, (sub,), copy_bytes_per_s=2e6, apply_bytes_per_s=1e5,
                  source_wal_bytes_per_s=5e4, eta_seconds=12.0)


def test_status_to_dict_and_its_table() -> None:
    st = status({"public.a": "r", "public.b": "d"})
    d = json.loads(json.dumps(st.to_dict()))
    assert d["ready"] is False and d["lag_bytes"] == 2048 and d["copy_done_bytes"] == 1250
    assert d["tables_by_state"] == {"initialize": 0, "data copy": 1, "finished copy": 0, "synchronized": 0,
                                    "ready": 1}
    assert d["databases"][0]["confirmed_lsn"] == "0/2FFF800"
    result = {"source": "main", "target": "next", "name": "pgsplit_next", "databases": ["app"], "status": d,
              "drift": ["database app: column public.a.x: only on the source (text)"], "watching": True}
    lines = cli.format_migrate_status(result).splitlines()
    assert lines[0] == "migration main -> next (pgsplit_next), database app"
    assert lines[1] == "  copying, lag 2.0 kB / 0.01 s, ETA 12 s"
    assert lines[2] == "  rates: copy 1.9 MB/s, apply 97.7 kB/s, source WAL 48.8 kB/s"
    assert lines[3] == "  SCHEMA DRIFT (1): a cutover is refused until both sides match"
    assert lines[4] == "    - database app: column public.a.x: only on the source (text)"
    header = lines.index("database  table     copy state  copied    size  done")
    assert lines[header + 1].split() == ["app", "public.a", "ready", "1000", "B", "1000", "B", "100%"]
    assert lines[header + 2].split() == ["app", "public.b", "data", "copy", "250", "B", "1000", "B", "25%"]
    assert lines[-1].startswith("app: subscription pgsplit_next enabled, apply worker running, slot "
                                "pgsplit_next_app active, lag 2048 bytes / 0.01 s")


def test_verify_to_dict_keys_json_has_no_type_for_and_its_table() -> None:
    diff = RangeDiff((Decimal("1.5"), "k"), None, 10, 9)
    report = VerifyReport((TableCheck("app", "public.p", ("a", "b"), 100, 99, 2, (diff,)),
                           TableCheck("app", "public.n", (), 5, 5, 1)), 0.5)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["equal"] is False
    assert d["tables"][0]["differences"][0]["key_from"] == ["1.5", "k"]
    assert d["tables"][0]["differences"][0]["key_to"] is None
    assert d["differences"] == ["database app: table public.p: keys ((1.5, k), +inf]: source 10 rows, "
                                "target 9 rows, row counts differ"]
    text = cli.format_migrate_verify({"source": "main", "target": "next", "name": "pgsplit_next",
                                      "databases": ["app"], "verify": d})
    lines = text.splitlines()
    assert lines[1] == "verify: 2 tables, 105 source rows, 0.5 s: DIFFERENT"
    assert lines[4].split() == ["app", "public.p", "a,", "b", "100", "99", "2", "1", "range(s)", "differ"]
    assert lines[5].split() == ["app", "public.n", "(whole)", "5", "5", "1", "equal"]
    assert lines[-1] == "  - database app: table public.p: keys ((1.5, k), +inf]: source 10 rows, target 9 rows, " \
                        "row counts differ"


def test_plan_to_dict_is_json() -> None:
    plan = Plan("pgsplit_next", "15.4", "18.1", 15, 18, "logical", 18, "/x", (),
                (Blocker("source", "table public.t (database app)", "has no primary key"),), ("a note",))
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["ok"] is False
    assert d["blockers"] == [{"side": "source", "object": "table public.t (database app)",
                              "reason": "has no primary key",
                              "text": "source table public.t (database app): has no primary key"}]


def test_the_cli_parses_migrate_and_cutover_reverse() -> None:
    args = cli.build_parser().parse_args(["migrate", "verify", "next", "--admin", "http://x:1", "--table", "public.a",
                                          "--table", "public.b", "--chunk-rows", "500"])
    assert (args.action, args.name, args.table, args.chunk_rows, args.timeout) == (
        "verify", "next", ["public.a", "public.b"], 500, 3600.0)
    assert args.func is cli.cmd_migrate
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["migrate", "copy", "next"])
    assert cli.build_parser().parse_args(["cutover", "main", "--reverse"]).reverse is True
    assert cli.build_parser().parse_args(["demo", "--migrate"]).migrate is True


# --- the drift watch -------------------------------------------------------------------------------


async def test_the_watch_logs_drift_when_it_appears_and_when_it_goes(monkeypatch, caplog) -> None:
    answers: list[Any] = [[], ["database app: column public.t.x: only on the source (text)"],
                          MigrateError("target", "database h:1/app", "cannot connect: refused"), []]

    async def fake_status(*a: Any, **kw: Any) -> Status:
        return status({"public.t": "r"}, lag=0)

    async def fake_drift(*a: Any, **kw: Any) -> list[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(migrate_watch, "status", fake_status)
    monkeypatch.setattr(migrate_watch, "drift", fake_drift)
    updates: list[tuple[list[str], str | None]] = []
    ep = Endpoint("h", 1)
    watch = Watch(ep, ep, name="pgsplit_next", databases=["app"], interval=0.01, label="main -> next",
                          on_update=lambda w: updates.append((list(w.drift), w.error)))
    caplog.set_level(logging.INFO, logger="pgsplit.migrate")
    await watch.check()
    await watch.check()
    with pytest.raises(MigrateError):
        await watch.check()
    await watch.check()
    assert updates == [([], None), (["database app: column public.t.x: only on the source (text)"], None),
                       (["database app: column public.t.x: only on the source (text)"],
                        "target database h:1/app: cannot connect: refused"), ([], None)]
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "migration main -> next: schema drift: database app: column public.t.x: only on the source (text)",
        "migration main -> next: watch round failed: target database h:1/app: cannot connect: refused",
        "migration main -> next: watch rounds work again",
        "migration main -> next: schema drift resolved: database app: column public.t.x: only on the source (text)",
    ]
    assert watch.rounds == 3 and watch.status is not None


async def test_the_watch_runs_until_stopped(monkeypatch) -> None:
    calls = []

    async def fake_status(*a: Any, **kw: Any) -> Status:
        calls.append(kw.get("previous"))
        return status({"public.t": "r"})

    async def fake_drift(*a: Any, **kw: Any) -> list[str]:
        return []

    monkeypatch.setattr(migrate_watch, "status", fake_status)
    monkeypatch.setattr(migrate_watch, "drift", fake_drift)
    ep = Endpoint("h", 1)
    watch = Watch(ep, ep, name="n", databases=["app"], interval=0.005).start()
    for _ in range(200):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.005)
    assert watch.running and len(calls) >= 3
    assert calls[0] is None and calls[1] is not None  # rates from the round before
    await watch.stop()
    assert not watch.running


# --- the admin API's migrate routes ----------------------------------------------------------------


class FakeOps:
    """The migrate operations of proxy.admin.operations.AdminOps, answering from a script."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []

    def admin_token(self) -> str | None:
        return self.token

    async def migrate_plan(self, target: str) -> dict:
        self.calls.append(("plan", {"target": target}))
        if target == "blocked":
            plan = Plan("pgsplit_x", "15", "18", 15, 18, "replica", 18, None, (),
                        (Blocker("source", "wal_level", "is 'replica'"),), ())
            raise BlockedError(plan)
        if target == "down":
            raise MigrateError("target", "database h:1/app", "cannot connect")
        if target == "nope":
            raise ValueError("'nope' is not a cluster")
        return {"plan": {"ok": True}}

    async def migrate_start(self, target: str) -> dict:
        self.calls.append(("start", {"target": target}))
        return {"start": {}}

    async def migrate_status(self, target: str) -> dict:
        self.calls.append(("status", {"target": target}))
        return {"status": {}}

    async def migrate_verify(self, target: str, tables: list[str] | None = None,
                                   chunk_rows: int | None = None) -> dict:
        self.calls.append(("verify", {"target": target, "tables": tables, "chunk_rows": chunk_rows}))
        return {"verify": {}}


async def _client(proxy: FakeOps) -> TestClient:
    client = TestClient(TestServer(Admin(proxy).app))
    await client.start_server()
    return client


async def test_the_migrate_routes_answer_and_name_what_failed() -> None:
    proxy = FakeOps()
    client = await _client(proxy)
    try:
        resp = await client.post("/v1/migrate/plan", json={"target": "next"})
        assert resp.status == 200 and await resp.json() == {"plan": {"ok": True}}
        resp = await client.get("/v1/migrate/status", params={"target": "next"})
        assert resp.status == 200 and proxy.calls[-1] == ("status", {"target": "next"})
        resp = await client.post("/v1/migrate/verify", json={"target": "next", "tables": ["public.a"],
                                                             "chunk_rows": 5})
        assert resp.status == 200
        assert proxy.calls[-1] == ("verify", {"target": "next", "tables": ["public.a"], "chunk_rows": 5})
        resp = await client.post("/v1/migrate/plan", json={"target": "down"})
        assert resp.status == 409
        assert await resp.json() == {"error": "target database h:1/app: cannot connect", "side": "target",
                                     "object": "database h:1/app"}
        resp = await client.post("/v1/migrate/plan", json={"target": "blocked"})
        body = await resp.json()
        assert resp.status == 409 and body["error"] == "refused: source wal_level: is 'replica'"
        assert body["plan"]["blockers"][0]["object"] == "wal_level" and "blockers:" in body["text"]
        for bad in ({"target": "nope"}, {}, {"target": "next", "bogus": 1}):
            resp = await client.post("/v1/migrate/plan", json=bad)
            assert resp.status == 400, bad
        resp = await client.get("/v1/migrate/status")
        assert resp.status == 400
        resp = await client.post("/v1/migrate/start", json={"target": "next"})
        assert resp.status == 200 and proxy.calls[-1] == ("start", {"target": "next"})
    finally:
        await client.close()


async def test_migrate_posts_need_the_token_and_the_status_get_does_not() -> None:
    proxy = FakeOps(token="s3cret")
    client = await _client(proxy)
    try:
        assert (await client.post("/v1/migrate/plan", json={"target": "next"})).status == 401
        resp = await client.post("/v1/migrate/plan", json={"target": "next"},
                                 headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 200
        assert (await client.get("/v1/migrate/status", params={"target": "next"})).status == 200
    finally:
        await client.close()


async def test_stopping_a_watch_is_bounded_when_a_round_swallows_its_cancellation(monkeypatch, caplog) -> None:
    """A round below which a cancellation is lost (a library catching it) must not hold
    the cutover or the shutdown that stops the watch: stop() returns within its bound,
    says so, and the loop ends at its next turn."""
    rounds = []

    async def stubborn_status(*a: Any, **kw: Any) -> Status:
        rounds.append(1)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # swallowed: the round goes on, then ends normally
        return status({"public.t": "r"})

    async def fake_drift(*a: Any, **kw: Any) -> list[str]:
        return []

    monkeypatch.setattr(migrate_watch, "status", stubborn_status)
    monkeypatch.setattr(migrate_watch, "drift", fake_drift)
    ep = Endpoint("h", 1)
    watch = Watch(ep, ep, name="n", databases=["app"], interval=0.01, label="main -> next").start()
    while not rounds:
        await asyncio.sleep(0.005)
    caplog.set_level(logging.WARNING, logger="pgsplit.migrate")
    await asyncio.wait_for(watch.stop(timeout=0.1), 1)
    assert any("did not stop within 0.1 s" in r.getMessage() for r in caplog.records), caplog.text
    await asyncio.sleep(0.5)
    assert len(rounds) == 1  # no round after the stop
