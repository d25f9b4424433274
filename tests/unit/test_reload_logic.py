"""proxy.admin.reload's comparison of a reloaded config with the one in force, and
proxy.process.wiring's translation of a config: real TOML text in, the report and the
settings out. No server needed (tests/integration/test_reload.py runs a proxy)."""

from __future__ import annotations

import base64

import pytest

from proxy.admin.reload import ReloadRefused, compare
from proxy.config import Config, parse_config
from proxy.errors import QueryCanceled, RoutingError, ServerError
from proxy.process import wiring
from router.topology import Role

BASE = """
active = "main"

[[users]]
name = "app"
password = "app-secret"

[backends.pg1]
host = "127.0.0.1"

[backends.pg2]
host = "127.0.0.1"
port = 5433
max_lag_bytes = 4096

[backends.pg3]
host = "127.0.0.1"
port = 5434

[clusters.main]
primary = "pg1"
replicas = ["pg2"]

[clusters.next]
primary = "pg3"
"""


def config(extra: str = "", base: str = BASE) -> Config:
    return parse_config(base + extra, source="test.toml", env={})


def test_an_unchanged_file_applies_nothing() -> None:
    change = compare(config(), config())
    assert change.applied == () and change.needs_restart == ()


def test_what_is_applied_is_named_once_in_order() -> None:
    new = config('\n[routing]\nmax_lag_bytes = 12345\n[pool]\nsize = 3\n',
                 base=BASE.replace('password = "app-secret"', 'password = "new-secret"'))
    change = compare(config(), new)
    assert change.applied == ("users", "pool", "backends of the active cluster", "routing")
    assert change.config.pool.size == 3 and change.config.routing.max_lag_bytes == 12345


def test_a_monitor_account_change_is_the_monitor_and_another_clusters_backends_are_backends() -> None:
    new = config('\n[monitor]\nuser = "watcher"\n', base=BASE.replace("port = 5434", "port = 5435"))
    assert compare(config(), new).applied == ("monitor", "backends")


def test_access_rules_and_client_limits_are_applied() -> None:
    new = config('\n[[access]]\nusers = ["app"]\naction = "reject"\n[databases.app]\nmax_client_connections = 3\n',
                 base=BASE.replace('password = "app-secret"', 'password = "app-secret"\nmax_client_connections = 2\n'
                                                              'pool_size = 4'))
    change = compare(config(), new)
    assert change.applied == ("users", "access", "databases") and change.needs_restart == ()
    settings = wiring.runtime_settings(change.config)
    assert settings.limits.per_user == {"app": 2} and settings.limits.per_database == {"app": 3}
    assert settings.pool_sizes == {"app": 4} and not settings.access[0].allow


def test_what_only_a_restart_changes_is_kept_and_reported() -> None:
    new = config('\n[listen]\nmax_client_connections = 77\n[pool]\nmode = "session"\n'
                 '[routing]\nclassify_cache_size = 5\ncatalog_refresh_s = 9.0\nmonitor_interval_ms = 250\n')
    old = config()
    change = compare(old, new)
    assert change.needs_restart == ("listen", "pool.mode", "routing.classify_cache_size",
                                    "routing.monitor_interval_ms", "routing.catalog_refresh_s")
    assert change.applied == ()  # nothing else moved: the kept keys are not reported as applied
    assert change.config.listen == old.listen and change.config.pool.mode == "transaction"
    assert change.config.routing == old.routing


def test_a_new_log_format_needs_a_restart() -> None:
    change = compare(config(), config(base='log_format = "json"\n' + BASE))
    assert change.needs_restart == ("log_format",) and change.applied == ()
    assert change.config.log_format == "text"


def test_another_active_cluster_is_refused() -> None:
    with pytest.raises(ReloadRefused, match="run `pgsplit cutover next`"):
        compare(config(), config(base=BASE.replace('active = "main"', 'active = "next"')))


def test_backend_specs_take_the_routing_limits_unless_the_backend_has_its_own() -> None:
    c = config("\n[routing]\nmax_lag_bytes = 100\nmax_lag_seconds = 2.5\n")
    primary, replica = wiring.backend_specs(c, "main")
    assert (primary.name, primary.role, primary.max_lag_bytes, primary.max_lag_seconds) == (
        "pg1", Role.PRIMARY, 100, 2.5)
    assert (replica.name, replica.role, replica.port, replica.max_lag_bytes) == ("pg2", Role.REPLICA, 5433, 4096)
    settings = wiring.runtime_settings(c)
    assert settings.backends == tuple(wiring.backend_specs(c, "main")) and settings.passwords == {"app": "app-secret"}


def test_a_migration_is_named_after_its_target_and_its_settings_come_from_the_config() -> None:
    c = config('\n[migration]\nconninfo = { next = "host=10.0.0.1" }\n[cutover]\nidle_in_transaction = "cancel"\n')
    options = wiring.logical_options(c, "main", "next", reverse=True)
    assert options.reverse_name == "pgsplit_main" and options.reverse_conninfo.startswith("host=10.0.0.1 user=postgres")
    assert wiring.publisher_conninfo_of(c, "main") is None  # the reverse's publisher is the target
    settings = wiring.cutover_settings(c, "next", timeout_s=None, dry_run=True)
    assert settings.cancel_idle_in_transaction and settings.dry_run
    assert wiring.control_endpoint(c, "next").port == 5434


def test_as_fatal_leaves_the_error_as_it_is() -> None:
    shared = RoutingError("25006", "no replica")
    fatal = shared.as_fatal()
    assert fatal.fatal and not shared.fatal and type(fatal) is RoutingError and fatal.sqlstate == "25006"
    assert b"SFATAL" in fatal.to_wire() and b"SERROR" in shared.to_wire()
    server = ServerError({"C": "28P01", "M": "password authentication failed", "S": "ERROR"})
    assert b"VFATAL" in server.as_fatal().to_wire() and not server.fatal
    canceled = QueryCanceled("canceling authentication due to timeout")
    assert canceled.as_fatal().sqlstate == "57014" and canceled.as_fatal().as_fatal().fatal


def test_adding_changing_or_removing_auth_query_is_applied() -> None:
    plain, looked_up = config(), config('\n[auth_query]\ncache_ttl_s = 1.0\n')
    assert compare(plain, looked_up).applied == ("auth_query",)
    assert compare(looked_up, plain).applied == ("auth_query",)
    assert compare(looked_up, config('\n[auth_query]\ncache_ttl_s = 2.0\n')).applied == ("auth_query",)
    assert compare(looked_up, config('\n[auth_query]\ncache_ttl_s = 1.0\n')).applied == ()


def test_a_reload_drops_the_client_keys_of_users_it_changes_and_pushes_credentials_to_the_pools() -> None:
    """Pools keep a ClientKey per user known by its verifier; a reload keeps only those
    its settings still allow (proxy.process.wiring.keeps_client_key)."""
    import asyncio

    from proxy.auth import password_verifier
    from proxy.scram import ScramKeys
    from proxy.server.pool import Pools

    def text_of(v) -> str:
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        return f"SCRAM-SHA-256${v.iterations}:{b64(v.salt)}${b64(v.stored_key)}:{b64(v.server_key)}"

    v1, v2, vq = password_verifier("one"), password_verifier("two"), password_verifier("q")
    users = {name: f'\n[[users]]\nname = "{name}"\nscram_verifier = "{text_of(v)}"\n'
             for name, v in (("kept", v1), ("changed", v1), ("removed", v1))}
    before = wiring.runtime_settings(config("".join(users.values()) + "\n[auth_query]\n"))
    after = wiring.runtime_settings(config(users["kept"] + users["changed"].replace(text_of(v1), text_of(v2))
                                           + '\n[[users]]\nname = "removed_now_password"\npassword = "pw"\n'))

    async def run() -> None:
        pools = Pools(before.pool, before.passwords)
        keys = {name: ScramKeys(v1, b"k" * 32) for name in ("kept", "changed", "removed")}
        keys["looked_up"] = ScramKeys(vq, b"q" * 32)
        for name, k in keys.items():
            assert wiring.keeps_client_key(before, name, k)
            pools.remember_keys(name, k)
        opened = {name: pools.get("pg1", "127.0.0.1", 5432, name, "app") for name in keys}
        pools.update_credentials(after.passwords, lambda user, k: wiring.keeps_client_key(after, user, k))
        # kept: same verifier; changed: another verifier; removed: gone (and [auth_query] off);
        # looked_up: [auth_query] removed.
        assert {name: pools.credential(name) for name in keys} == {
            "kept": keys["kept"], "changed": None, "removed": None, "looked_up": None}
        assert {name: pool._credential for name, pool in opened.items()} == {
            "kept": keys["kept"], "changed": None, "removed": None, "looked_up": None}
        # A login proved for a verifier a reload replaced is not stored afterwards.
        assert not wiring.keeps_client_key(after, "changed", keys["changed"])
        assert wiring.keeps_client_key(after, "changed", ScramKeys(v2, b"k" * 32))
        assert not wiring.keeps_client_key(after, "app", ScramKeys(v1, b"k" * 32))  # a password user
        pools.close()

    asyncio.run(run())
