"""The admin console's rows (proxy.admin.show) from plain data, its command splitting and
wire encoding, and the [admin] console keys of the config and of a reload."""

from __future__ import annotations

import pytest

from proxy import wire
from proxy.admin import show
from proxy.admin.console import COMMANDS, statements, table
from proxy.admin.reload import compare, restart_only_keys
from proxy.config import ConfigError, parse_config

BASE = """
active = "main"

[[users]]
name = "app"
password = "app-secret"

[[users]]
name = "ops"
password_env = "OPS_PASSWORD"

[backends.pg1]
host = "127.0.0.1"

[clusters.main]
primary = "pg1"
"""
ENV = {"OPS_PASSWORD": "ops-secret"}
T0 = 1_796_000_000.0  # 2026-11-30 ...


def config(admin: str = "", base: str = BASE):
    return parse_config(base + ("\n[admin]\n" + admin if admin else ""), source="test.toml", env=ENV)


def client(**kw) -> show.ClientInfo:
    values = dict(user="app", database="app", state="idle", addr="127.0.0.1", port=50000, local_addr="127.0.0.1",
                  local_port=6432, connect_time=T0, tls=False, application_name="", prepared_statements=0, id=7,
                  backend=None, server_pid=None)
    return show.ClientInfo(**{**values, **kw})


def test_client_state_names_what_the_client_waits_for() -> None:
    assert show.client_state(login=True, console=False, waiting=False, has_server=False) == "login"
    assert show.client_state(login=False, console=True, waiting=False, has_server=False) == "active"
    assert show.client_state(login=False, console=False, waiting=True, has_server=False) == "waiting"
    assert show.client_state(login=False, console=False, waiting=False, has_server=True) == "active"
    assert show.client_state(login=False, console=False, waiting=False, has_server=False) == "idle"


def test_clients_are_listed_oldest_first_with_pgbouncers_column_names() -> None:
    columns, rows = show.clients([client(id=2, connect_time=T0 + 5, state="active", backend="pg1", server_pid=99),
                                  client(id=1)])
    assert columns[:9] == ["type", "user", "database", "state", "addr", "port", "local_addr", "local_port",
                           "connect_time"]
    assert [r[columns.index("id")] for r in rows] == [1, 2]
    second = dict(zip(columns, rows[1]))
    assert (second["type"], second["state"], second["backend"], second["server_pid"]) == ("C", "active", "pg1", 99)
    assert second["connect_time"] == show.timestamp(T0 + 5) and second["connect_time"].endswith(" UTC")


def test_pools_count_a_client_on_the_backend_whose_connection_it_holds() -> None:
    pools = [show.PoolInfo("app", "app", "pg2", "replica", 0, 2, 0, 0, 20),
             show.PoolInfo("app", "app", "pg1", "primary", 1, 0, 1, 3, 20)]
    columns, rows = show.pools(pools, {("app", "app", "pg1"): 1}, "transaction")
    assert columns[:9] == ["database", "user", "backend", "role", "cl_active", "cl_waiting", "sv_active",
                           "sv_idle", "sv_login"]
    assert rows == [["app", "app", "pg1", "primary", 1, 3, 1, 0, 1, 20, "transaction"],
                    ["app", "app", "pg2", "replica", 0, 0, 0, 2, 0, 20, "transaction"]]


def test_stats_are_the_counters_per_database() -> None:
    # the time is kept in float seconds (what a unit adds on the hot path), shown in µs
    columns, rows = show.stats({"b": [1, 2, 0.0003], "a": [4, 5, 0.000600]})
    assert columns == ["database", "total_xact_count", "total_query_count", "total_query_time"]
    assert rows == [["a", 4, 5, 600], ["b", 1, 2, 300]]


def test_databases_show_no_pool_for_the_console_and_paused_as_0_or_1() -> None:
    infos = [show.DatabaseInfo("pgsplit", None, 1, 0, True), show.DatabaseInfo("app", 5, 2, 3, False)]
    columns, rows = show.databases(infos, 20, "transaction", True)
    assert [dict(zip(columns, r)) for r in rows] == [
        {"name": "app", "pool_size": 20, "pool_mode": "transaction", "max_client_connections": 5,
         "current_client_connections": 2, "current_connections": 3, "paused": True},
        {"name": "pgsplit", "pool_size": None, "pool_mode": None, "max_client_connections": None,
         "current_client_connections": 1, "current_connections": 0, "paused": True}]
    assert [show.text(v) for v in rows[0]][-1] == "1"


def test_config_rows_mask_every_secret_and_say_what_a_reload_changes() -> None:
    c = config('console_users = ["ops"]\ntoken = "tok-secret-123"\n')
    columns, rows = show.config(c.redacted_dict(), restart_only_keys())
    values = {r[0]: r[1] for r in rows}
    changeable = {r[0]: r[2] for r in rows}
    text = repr(rows)
    for secret in ("app-secret", "ops-secret", "tok-secret-123"):
        assert secret not in text
    assert values["users.0.password"] == values["users.1.password"] == values["admin.token"] == "********"
    assert values["users.1.password_env"] == "OPS_PASSWORD"  # the variable's name is no secret
    assert values["admin.console_users"] == '["ops"]' and changeable["admin.console_users"] is True
    assert changeable["admin.port"] is False and changeable["listen.port"] is False
    assert changeable["pool.mode"] is False and changeable["pool.size"] is True
    assert changeable["active"] is False and changeable["routing.classify_cache_size"] is False
    assert values["routing.retry_reads_on_replica_error"] == "true"


def test_flatten_indexes_arrays_of_tables_and_keeps_other_lists_as_values() -> None:
    assert show.flatten({"a": {"b": 1, "c": [1, 2]}, "u": [{"n": "x"}, {"n": "y"}], "e": []}) == [
        ("a.b", 1), ("a.c", [1, 2]), ("u.0.n", "x"), ("u.1.n", "y"), ("e", [])]
    # an empty table is shown as an empty list is
    assert show.flatten({"databases": {}, "access": [], "t": {"inner": {}}}) == [
        ("databases", {}), ("access", []), ("t.inner", {})]


def test_config_rows_show_floats_as_configured_and_empty_tables_like_empty_lists() -> None:
    c = parse_config(BASE + "\n[cutover]\npause_timeout_s = 0.0125\n", source="test.toml", env=ENV)
    columns, rows = show.config(c.redacted_dict(), restart_only_keys())
    shown = {r[0]: show.text(r[1]) for r in rows}
    assert shown["cutover.pause_timeout_s"] == "0.0125"
    assert c.databases == {} and shown["databases"] == "{}"
    assert c.access == () and shown["access"] == "[]"


def test_backends_rows_come_from_the_status_dict() -> None:
    status = {"backends": [{"name": "pg1", "role": "primary", "host": "h", "port": 5432, "up": True,
                            "in_recovery": False, "in_rotation": None, "lag_bytes": None, "lag_seconds": None,
                            "weight": 1.0, "load": 2, "error": None,
                            "server_connections": {"active": 2, "idle": 1}}]}
    columns, rows = show.backends(status)
    row = dict(zip(columns, rows[0]))
    assert (row["sv_active"], row["sv_idle"], row["sv_login"], row["in_rotation"]) == (2, 1, 0, None)
    assert [show.text(v) for v in (row["up"], row["weight"], row["lag_bytes"])] == ["1", "1", None]


def test_consistency_cutover_and_migration_rows() -> None:
    _, rows = show.consistency("session", 50, {"immediate": 3, "waited": 2, "fallback": 1})
    assert rows == [["session", 50, 3, 2, 1]]
    columns, rows = show.cutover({"active": "main", "generation": 4, "clusters": ["main", "next"],
                                  "in_progress": None, "paused_seconds": None, "units_held": 0,
                                  "last": {"target": "main", "result": "ok", "at": T0, "seconds": 1.5,
                                           "pause_seconds": 0.2, "error": None}})
    row = dict(zip(columns, rows[0]))
    assert (row["clusters"], row["in_progress"], row["last_result"], row["last_at"]) == (
        "main,next", None, "ok", show.timestamp(T0))
    _, never = show.cutover({"active": "main", "generation": 1, "clusters": ["main"], "in_progress": "pause",
                             "paused_seconds": 1.23456, "units_held": 2, "last": None})
    assert never[0][3:6] == ["pause", 1.235, 2] and never[0][6:] == [None] * 6
    info = show.MigrationInfo("next", "main", "pgsplit_next", "watching", False, 4096,
                              {"ready": 2, "data copy": 1, "init": 0}, 0, T0, None)
    _, rows = show.migrations([info])
    assert rows[0][:7] == ["next", "main", "pgsplit_next", "watching", False, 4096, "ready=2 data_copy=1"]


def test_text_is_what_the_wire_carries() -> None:
    assert [show.text(v) for v in (None, True, False, 3, 1.5, 2.0, 0.12345, "x")] == [
        None, "1", "0", "3", "1.5", "2", "0.123", "x"]


def test_statements_split_trim_and_normalize() -> None:
    assert statements("  show   pools ;;\n SHOW\tSTATS;  ") == ["show pools", "SHOW STATS"]
    assert statements(" ; ;") == []


def test_a_table_is_row_description_data_rows_and_show() -> None:
    data = table(["a", "b"], [[1, None]])
    frames, end = wire.split_messages(data)
    assert end == len(data)
    assert [chr(t) for t, _, _ in frames] == ["T", "D", "C"]
    t, s, e = frames[1]
    assert wire.parse_data_row(data[s + 5:e]) == [b"1", None]
    t, s, e = frames[2]
    assert wire.parse_command_tag(data[s + 5:e]) == "SHOW"


def test_help_lists_every_command() -> None:
    _, rows = show.help_table(COMMANDS)
    assert [r[0] for r in rows][:2] == ["SHOW HELP", "SHOW CLIENTS"]
    assert {"PAUSE", "RESUME", "RELOAD", "SHOW BACKENDS", "SHOW MIGRATION"} <= {r[0] for r in rows}


def test_console_users_must_be_users() -> None:
    assert config('console_users = ["ops"]').admin.console_users == ("ops",)
    assert config().admin.console_users == () and config().admin.console_database == "pgsplit"
    with pytest.raises(ConfigError) as info:
        config('console_users = ["ops", "opps"]')
    assert str(info.value) == "test.toml: admin.console_users.1: 'opps' is not a [[users]] name (known: app, ops)"


def test_a_reload_applies_the_console_keys_and_keeps_the_rest_of_admin() -> None:
    old = config('port = 9930\nconsole_users = ["app"]\n')
    change = compare(old, config('port = 9931\nconsole_users = ["ops"]\nconsole_database = "admin"\n'))
    assert change.applied == ("admin.console_users", "admin.console_database")
    assert change.needs_restart == ("admin",)
    assert change.config.admin.console_users == ("ops",) and change.config.admin.console_database == "admin"
    assert change.config.admin.port == 9930
    only = compare(old, config('port = 9930\nconsole_users = ["app", "ops"]\n'))
    assert only.applied == ("admin.console_users",) and only.needs_restart == ()


def test_bounded_tells_an_operations_own_timeout_from_the_wait_running_out() -> None:
    import asyncio
    from types import SimpleNamespace

    from proxy.admin.console import Console
    from proxy.errors import ObjectNotInPrerequisiteState

    async def own_timeout() -> dict:
        raise TimeoutError("the monitor did not answer")

    async def slow() -> dict:
        await asyncio.sleep(5)
        return {}

    async def refused() -> dict:
        raise ValueError("traffic is not paused")

    async def go() -> list[str]:
        tasks: list[asyncio.Task] = []

        def spawn(coro):
            tasks.append(asyncio.ensure_future(coro))
            return tasks[-1]

        console = Console(SimpleNamespace(spawn=spawn), session=None)
        messages = []
        for operation, seconds in ((own_timeout(), 5.0), (slow(), 0.05), (refused(), 5.0)):
            with pytest.raises(ObjectNotInPrerequisiteState) as info:
                await console.bounded(operation, seconds, "RELOAD")
            messages.append(info.value.message)
        for task in tasks:
            task.cancel()
        return messages

    own, waited, no = asyncio.run(go())
    assert own == "RELOAD failed: a step of it timed out (the monitor did not answer)"
    assert waited.startswith("RELOAD did not finish within 0.05 s; it goes on in the proxy")
    assert no == "traffic is not paused"
