"""proxy.config: real TOML text in, values and error messages out. No server needed."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from router.tls import ServerTls

from proxy.config import (
    AdminConfig,
    Config,
    ConfigError,
    CutoverConfig,
    ListenConfig,
    MonitorConfig,
    PoolConfig,
    RoutingConfig,
    UserConfig,
    describe,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pgsplit.toml"
SECRET = "hunter2-very-secret"

MINIMAL = """
active = "main"

[[users]]
name = "app"
password = "hunter2-very-secret"

[backends.pg1]
host = "127.0.0.1"

[backends.pg2]
host = "127.0.0.1"
port = 5433

[clusters.main]
primary = "pg1"
replicas = ["pg2"]
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), source="test.toml", env=env or {})


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return str(info.value).splitlines()


def test_defaults() -> None:
    config = parse(MINIMAL)
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 6432)
    assert config.listen.tls_cert is None and config.listen.tls_key is None
    assert config.listen.max_client_connections == 10000
    assert config.listen.startup_timeout_s == 10.0
    assert (config.admin.host, config.admin.port, config.admin.token) == ("127.0.0.1", 9930, None)
    assert config.admin.is_loopback
    assert config.log_level == "info"
    assert config.log_format == "text"
    r = config.routing
    assert r.consistency == "session" and r.consistency_wait_ms == 50
    assert r.max_lag_bytes == 16777216 and r.max_lag_seconds == 5.0
    assert r.monitor_interval_ms == 100 and r.monitor_timeout_ms == 1000
    assert r.classify_cache_size == 10000 and r.catalog_refresh_s == 60.0
    assert r.retry_reads_on_replica_error is True
    p = config.pool
    assert (p.mode, p.size, p.connect_timeout_s, p.acquire_timeout_s) == ("transaction", 20, 5, 10)
    assert (p.idle_timeout_s, p.server_lifetime_s, p.max_prepared_statements) == (600, 3600, 100)
    assert (p.keepalive_idle_s, p.keepalive_interval_s, p.keepalive_count) == (15, 5, 3)
    assert (p.tcp_user_timeout_s, p.down_backend_wait_s) == (30.0, 1.0)
    assert (config.monitor.user, config.monitor.dbname, config.monitor.secret()) == (
        "postgres", "postgres", None)
    c = config.cutover
    assert (c.pause_timeout_s, c.catchup_timeout_s, c.fence, c.idle_in_transaction) == (
        10, 30, "read_only", "abort")
    pg1 = config.backends["pg1"]
    assert (pg1.port, pg1.weight, pg1.max_lag_bytes, pg1.max_lag_seconds) == (5432, 1.0, None, None)
    assert config.backends["pg2"].port == 5433
    assert config.active_cluster.primary == "pg1"
    assert config.active_cluster.replicas == ("pg2",)
    assert config.user("app") is not None and config.user("app").secret() == SECRET
    assert config.user("nobody") is None


def test_active_may_be_omitted_with_a_single_cluster() -> None:
    config = parse(MINIMAL.replace('active = "main"', ""))
    assert config.active == "main"


def test_active_required_with_several_clusters() -> None:
    text = MINIMAL.replace('active = "main"', "") + '[clusters.next]\nprimary = "pg2"\n'
    assert problems(text) == ["test.toml: active: required key is missing"]


def test_frozen() -> None:
    config = parse(MINIMAL)
    with pytest.raises(ValidationError):
        config.active = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.routing.max_lag_bytes = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.users[0].name = "root"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.clusters["main"].replicas[0] = "pg1"  # type: ignore[index]


def test_with_active_returns_a_new_config() -> None:
    config = parse(MINIMAL + '[clusters.next]\nprimary = "pg2"\n')
    swapped = config.with_active("next")
    assert swapped.active == "next" and swapped.active_cluster.primary == "pg2"
    assert config.active == "main"
    assert swapped.user("app") is not None
    with pytest.raises(ConfigError, match=r"active: 'nope' is not a cluster"):
        config.with_active("nope")


# ------------------------------------------------------------------ cross-field errors


def test_active_must_name_a_cluster() -> None:
    assert problems(MINIMAL.replace('active = "main"', 'active = "mian"')) == [
        "test.toml: active: 'mian' is not a cluster (known: main)"]


def test_cluster_primary_must_name_a_backend() -> None:
    assert problems(MINIMAL.replace('primary = "pg1"', 'primary = "pg9"')) == [
        "test.toml: clusters.main.primary: 'pg9' is not a backend (known: pg1, pg2)"]


def test_cluster_replicas_must_name_backends() -> None:
    assert problems(MINIMAL.replace('["pg2"]', '["pg2", "pg7"]')) == [
        "test.toml: clusters.main.replicas.1: 'pg7' is not a backend (known: pg1, pg2)"]


def test_backend_cannot_be_primary_and_replica_of_one_cluster() -> None:
    (line,) = problems(MINIMAL.replace('["pg2"]', '["pg2", "pg1"]'))
    assert line.startswith("test.toml: clusters.main.replicas.1: 'pg1' is this cluster's primary")


def test_replica_listed_twice() -> None:
    assert problems(MINIMAL.replace('["pg2"]', '["pg2", "pg2"]')) == [
        "test.toml: clusters.main.replicas.1: 'pg2' is listed twice"]


def test_several_cross_field_problems_are_all_reported() -> None:
    text = MINIMAL.replace('active = "main"', 'active = "x"').replace(
        'primary = "pg1"', 'primary = "pg9"')
    lines = problems(text)
    assert "test.toml: active: 'x' is not a cluster (known: main)" in lines
    assert any(line.startswith("test.toml: clusters.main.primary: 'pg9'") for line in lines)


def test_user_names_are_unique() -> None:
    text = MINIMAL + '[[users]]\nname = "app"\npassword = "x"\n'
    assert problems(text) == ["test.toml: users.1.name: duplicate user 'app' (also users.0)"]


def test_at_least_one_user_backend_cluster() -> None:
    text = 'active = "main"\nusers = []\nbackends = {}\nclusters = {}\n'
    assert sorted(problems(text)) == [
        "test.toml: backends: must not be empty",
        "test.toml: clusters: must not be empty",
        "test.toml: users: must not be empty",
    ]


def test_tls_cert_and_key_both_or_neither(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("x")
    text = MINIMAL.replace('active = "main"', f'active = "main"\n[listen]\ntls_cert = "{cert}"\n')
    # The [listen] table must close before [[users]]; MINIMAL's tables follow it.
    assert problems(text) == [
        "test.toml: listen.tls_key: required when tls_cert is set (set both or neither)"]


def test_tls_files_must_exist_and_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("cert")
    (tmp_path / "server.key").write_text("key")
    listen = '[listen]\ntls_cert = "server.crt"\ntls_key = "server.key"\n'
    path = tmp_path / "pgsplit.toml"
    path.write_text(MINIMAL.replace('active = "main"', 'active = "main"\n' + listen))
    config = load_config(path, env={})
    assert config.listen.tls_cert == tmp_path / "server.crt"
    assert config.listen.tls_enabled

    (tmp_path / "server.key").unlink()
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: listen.tls_key: file not found: {tmp_path / 'server.key'}")


# ------------------------------------------------------------------ field errors


def test_unknown_key_is_rejected_with_its_path() -> None:
    text = MINIMAL.replace('port = 5433', 'port = 5433\nmax_lag = 5')
    assert problems(text) == ["test.toml: backends.pg2.max_lag: unknown key"]
    assert problems('colour = "blue"\n' + MINIMAL) == ["test.toml: colour: unknown key"]


def test_top_level_key_after_a_table_gets_a_hint() -> None:
    text = MINIMAL.replace('active = "main"', "") + 'active = "main"\n'
    (line,) = problems(text)
    assert line.startswith("test.toml: clusters.main.active: unknown key")
    assert "before the first [table]" in line


def test_log_format() -> None:
    assert parse('log_format = "json"\n' + MINIMAL).log_format == "json"
    assert problems('log_format = "yaml"\n' + MINIMAL) == [
        "test.toml: log_format: Input should be 'text' or 'json'"]
    (line,) = problems(MINIMAL + 'log_format = "json"\n')
    assert line.startswith("test.toml: clusters.main.log_format: unknown key")
    assert "before the first [table]" in line
    assert 'log_format = "json"' in describe(parse('log_format = "json"\n' + MINIMAL))


def test_wrong_types_and_ranges_name_the_key() -> None:
    assert problems(MINIMAL.replace("port = 5433", 'port = "5433"')) == [
        "test.toml: backends.pg2.port: Input should be a valid integer"]
    assert problems(MINIMAL.replace("port = 5433", "port = 70000")) == [
        "test.toml: backends.pg2.port: Input should be less than or equal to 65535"]
    lines = problems(MINIMAL + '[routing]\nconsistency = "strong"\nmax_lag_seconds = -1\n')
    assert lines == [
        "test.toml: routing.consistency: Input should be 'session', 'global', 'token' or "
        "'eventual'",
        "test.toml: routing.max_lag_seconds: Input should be greater than or equal to 0",
    ]
    assert problems(MINIMAL.replace('host = "127.0.0.1"\n\n[backends.pg2]',
                                    'weight = 0\n\n[backends.pg2]')) == [
        "test.toml: backends.pg1.host: required key is missing",
        "test.toml: backends.pg1.weight: Input should be greater than 0",
    ]
    assert problems(MINIMAL + "[pool]\nmax_prepared_statements = 0\n") == [
        "test.toml: pool.max_prepared_statements: Input should be greater than 0"]


def test_backend_fault_bounds_name_the_key() -> None:
    lines = problems(MINIMAL + "[pool]\nkeepalive_idle_s = 0\nkeepalive_count = 1.5\n"
                               "tcp_user_timeout_s = -1\ndown_backend_wait_s = -0.5\n")
    assert lines == [
        "test.toml: pool.keepalive_idle_s: Input should be greater than 0",
        "test.toml: pool.keepalive_count: Input should be a valid integer",
        "test.toml: pool.tcp_user_timeout_s: Input should be greater than or equal to 0",
        "test.toml: pool.down_backend_wait_s: Input should be greater than or equal to 0",
    ]
    p = parse(MINIMAL + "[pool]\ntcp_user_timeout_s = 0.0\ndown_backend_wait_s = 0.0\n").pool
    assert (p.tcp_user_timeout_s, p.down_backend_wait_s) == (0, 0)


def test_missing_required_sections() -> None:
    assert sorted(problems('active = "main"\n')) == [
        "test.toml: backends: required key is missing",
        "test.toml: clusters: required key is missing",
        "test.toml: users: required key is missing",
    ]


def test_toml_syntax_error_has_file_line_and_column() -> None:
    (line,) = problems('active = "main"\n[listen]\nport 6432\n')
    assert line.startswith("test.toml: line 3, column 6: invalid TOML: ")


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_config(tmp_path / "nope.toml")


# ------------------------------------------------------------------ secrets


def test_password_env_is_resolved() -> None:
    text = MINIMAL.replace(f'password = "{SECRET}"', 'password_env = "APP_PW"')
    config = parse(text, env={"APP_PW": "from-env"})
    user = config.user("app")
    assert user is not None
    assert user.secret() == "from-env" and user.password_env == "APP_PW"


def test_password_env_missing_variable_is_named() -> None:
    text = MINIMAL.replace(f'password = "{SECRET}"', 'password_env = "APP_PW"')
    assert problems(text, env={}) == [
        "test.toml: users.0.password_env: environment variable APP_PW is not set"]
    assert problems(text, env={"APP_PW": ""}) == [
        "test.toml: users.0.password_env: environment variable APP_PW is empty"]


def test_password_xor_password_env() -> None:
    both = MINIMAL.replace(f'password = "{SECRET}"',
                           f'password = "{SECRET}"\npassword_env = "APP_PW"')
    assert problems(both, env={"APP_PW": "x"}) == [
        "test.toml: users.0.password_env: set either password or password_env, not both"]
    neither = MINIMAL.replace(f'password = "{SECRET}"', "")
    assert problems(neither) == [
        "test.toml: users.0.password: required: set password, password_env, scram_verifier or scram_verifier_env"]


def test_monitor_password_env() -> None:
    text = MINIMAL + '[monitor]\nuser = "pgsplit_monitor"\npassword_env = "MON_PW"\n'
    config = parse(text, env={"MON_PW": "mon-secret"})
    assert config.monitor.user == "pgsplit_monitor" and config.monitor.secret() == "mon-secret"
    assert problems(text) == [
        "test.toml: monitor.password_env: environment variable MON_PW is not set"]


def test_non_loopback_admin_requires_a_token() -> None:
    text = MINIMAL + '[admin]\nhost = "0.0.0.0"\n'
    (line,) = problems(text)
    assert line.startswith("test.toml: admin.token: required because host '0.0.0.0' is not "
                           "a loopback address")
    config = parse(text + 'token_env = "ADMIN_TOKEN"\n', env={"ADMIN_TOKEN": "tok"})
    assert config.admin.secret() == "tok" and config.admin.token is not None
    assert not config.admin.is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("10.0.0.1", False), ("::", False),
    ("db.example.com", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    admin = AdminConfig(host=host, token="t")  # type: ignore[arg-type]
    assert admin.is_loopback is loopback


def test_secrets_never_in_config_error() -> None:
    # Errors on a secret field itself, next to it, and elsewhere in the file.
    texts = [
        MINIMAL.replace(f'password = "{SECRET}"', f'password = "{SECRET}"\npasword = "{SECRET}"'),
        MINIMAL.replace(f'password = "{SECRET}"', f'password = ["{SECRET}"]'),
        MINIMAL.replace(f'password = "{SECRET}"',
                        f'password = "{SECRET}"\npassword_env = "{SECRET}"'),
        MINIMAL + f'[admin]\nhost = "10.1.1.1"\ntoken = {{ value = "{SECRET}" }}\n',
        MINIMAL + f'[monitor]\npassword = "{SECRET}"\ndbname = 3\n',
    ]
    for text in texts:
        with pytest.raises(ConfigError) as info:
            parse(text, env={SECRET: SECRET})
        rendered = str(info.value) + repr(info.value) + repr(info.value.problems)
        assert SECRET not in rendered, rendered
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_secrets_never_in_describe_or_redacted_dict() -> None:
    text = (MINIMAL.replace('active = "main"', 'active = "main"\n[admin]\ntoken = "admintok"\n')
            + '[monitor]\npassword = "monpass"\n')
    config = parse(text)
    out = describe(config)
    for secret in (SECRET, "admintok", "monpass"):
        assert secret not in out
        assert secret not in repr(config.redacted_dict())
        assert secret not in repr(config)
    assert out.count('"********"') == 3
    assert config.redacted_dict()["users"][0]["password"] == "********"


def test_describe_is_valid_toml_that_reparses_to_the_same_config() -> None:
    config = parse(MINIMAL + '[routing]\nconsistency = "global"\n')
    text = describe(config)
    assert tomllib.loads(text)["routing"]["consistency"] == "global"
    again = parse(text.replace('"********"', f'"{SECRET}"'))
    assert again == config


def test_example_file_round_trip() -> None:
    config = load_config(EXAMPLE, env={})
    assert config.active == "main"
    assert config.backends["pg1"].host == "127.0.0.1" and config.backends["pg1"].port == 5432
    assert [config.backends[n].port for n in ("pg2", "pg3", "pg4", "pg5")] == [
        5433, 5434, 5435, 5436]
    assert config.active_cluster.replicas == ("pg2", "pg3")
    assert config.clusters["next"].primary == "pg4"
    assert config.user("app") is not None
    # The example spells out the defaults: it must not drift from them.
    assert config.routing == RoutingConfig() and config.pool == PoolConfig()
    assert config.cutover == CutoverConfig() and config.listen == ListenConfig()
    assert config.admin == AdminConfig() and config.monitor == MonitorConfig()
    # describe() -> TOML -> the same config.
    rendered = describe(config).replace('"********"', '"app"')
    assert parse_config(rendered, env={}) == config


def test_models_are_usable_directly() -> None:
    assert ListenConfig().port == 6432
    user = UserConfig.model_validate({"name": "u", "password_env": "PW"},
                                     context={"env": {"PW": "pw"}})
    assert user.secret() == "pw"
    with pytest.raises(ValidationError, match="password, password_env, scram_verifier or scram_verifier_env"):
        UserConfig(name="u")  # type: ignore[call-arg]


def test_migration_defaults_and_keys() -> None:
    config = parse(MINIMAL)
    m = config.migration
    assert (m.databases, m.watch_interval_s, m.verify_chunk_rows, m.conninfo) == ((), 5.0, 10000, {})
    config = parse(MINIMAL + '[clusters.next]\nprimary = "pg2"\n'
                   '[migration]\ndatabases = ["app", "billing"]\nwatch_interval_s = 0.5\nverify_chunk_rows = 500\n'
                   '[migration.conninfo]\nmain = "host=10.1.0.5 port=7001 sslmode=require"\n')
    m = config.migration
    assert m.databases == ("app", "billing") and m.watch_interval_s == 0.5 and m.verify_chunk_rows == 500
    assert m.conninfo == {"main": "host=10.1.0.5 port=7001 sslmode=require"}


def test_migration_problems_name_the_key() -> None:
    base = MINIMAL + '[clusters.next]\nprimary = "pg2"\n'
    assert problems(base + '[migration.conninfo]\nnext = "host=h password=x"\n') == [
        "test.toml: migration.conninfo.next: must not set password (the [monitor] account and each database "
        "are added)"]
    assert problems(base + '[migration.conninfo]\nother = "host=h"\n') == [
        "test.toml: migration.conninfo.other: 'other' is not a cluster (known: main, next)"]
    assert problems(base + "[migration]\nwatch_interval_s = 0\n") == [
        "test.toml: migration.watch_interval_s: Input should be greater than 0"]
    assert problems(base + '[migration]\ndatabases = [""]\n') == [
        "test.toml: migration.databases.0: must not be empty"]
    assert problems(base + "[migration]\nbogus = 1\n") == ["test.toml: migration.bogus: unknown key"]


def test_describe_renders_the_migration_section_and_reparses() -> None:
    config = parse(MINIMAL + '[clusters.next]\nprimary = "pg2"\n[migration]\ndatabases = ["app"]\n'
                   '[migration.conninfo]\nnext = "host=far port=6000"\n')
    text = describe(config)
    assert '[migration]\ndatabases = ["app"]\nwatch_interval_s = 5.0\nverify_chunk_rows = 10000\n' in text
    assert '[migration.conninfo]\nnext = "host=far port=6000"\n' in text
    assert parse(text.replace('"********"', f'"{SECRET}"')) == config


def test_server_tls_defaults_to_prefer_and_a_backend_overrides_it(tmp_path: Path) -> None:
    (tmp_path / "root.crt").write_text("pem")
    config = parse(MINIMAL)
    assert config.tls_for("pg1") == ServerTls("prefer")
    server_tls = f'[server_tls]\nsslmode = "verify-full"\nsslrootcert = "{tmp_path / "root.crt"}"\n'
    text = MINIMAL.replace('active = "main"', 'active = "main"\n' + server_tls).replace(
        'port = 5433', 'port = 5433\nsslmode = "require"')
    config = parse(text)
    assert config.tls_for("pg1") == ServerTls("verify-full", str(tmp_path / "root.crt"))
    assert config.tls_for("pg2") == ServerTls("require", str(tmp_path / "root.crt"))  # (the CA: from [server_tls])


def test_server_tls_problems_name_the_key_that_says_it(tmp_path: Path) -> None:
    (tmp_path / "client.crt").write_text("pem")
    text = MINIMAL.replace('active = "main"', 'active = "main"\n[server_tls]\nsslmode = "verify-ca"\n').replace(
        'port = 5433', f'port = 5433\nsslcert = "{tmp_path / "client.crt"}"\nsslrootcert = "system"')
    assert problems(text) == [
        "test.toml: server_tls.sslmode: verify-ca needs sslrootcert (a PEM file of the CA that signed the "
        "server's certificate, or \"system\")",
        # (as libpq: the system's roots vouch for any public name, so only verify-full will do)
        "test.toml: server_tls.sslmode: sslrootcert = \"system\" needs sslmode = \"verify-full\" (the system's "
        "roots vouch for any public name)",
        "test.toml: backends.pg2.sslcert: sslkey is required when sslcert is set (set both or neither)",
    ]
    system = MINIMAL.replace('port = 5433', 'port = 5433\nsslrootcert = "system"')
    assert parse(system).tls_for("pg2") == ServerTls("verify-full", "system")  # (libpq 16's default for it)
    assert parse(system).tls_for("pg2") is parse(system).tls_for("pg2")  # one object per setting
    missing = MINIMAL.replace('port = 5433', 'port = 5433\nsslmode = "verify-full"\nsslrootcert = "nowhere.crt"')
    path = tmp_path / "pgsplit.toml"
    path.write_text(missing)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: backends.pg2.sslrootcert: file not found: {tmp_path / 'nowhere.crt'}"
    bad = MINIMAL.replace('port = 5433', 'port = 5433\nsslmode = "verify"')
    assert problems(bad)[0].startswith("test.toml: backends.pg2.sslmode: Input should be 'disable', 'prefer'")


# ------------------------------------------------------------------ SCRAM verifiers, auth_query

VERIFIER = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=:" + "B" * 43 + "=")


def test_a_user_may_be_configured_by_its_verifier_which_stays_secret() -> None:
    text = MINIMAL.replace(f'password = "{SECRET}"', f'scram_verifier = "{VERIFIER}"')
    config = parse(text)
    user = config.user("app")
    assert user is not None and user.secret() is None
    assert user.verifier() is not None and user.verifier().iterations == 4096
    assert VERIFIER not in describe(config) and VERIFIER not in repr(config.redacted_dict())
    assert VERIFIER not in repr(config) and VERIFIER[20:40] not in repr(user.verifier())
    env = parse(MINIMAL.replace(f'password = "{SECRET}"', 'scram_verifier_env = "APP_V"'), env={"APP_V": VERIFIER})
    assert env.user("app").verifier() == user.verifier()


@pytest.mark.parametrize("bad", ["md5" + "0" * 32, "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA", "plain"])
def test_a_bad_verifier_is_named_by_its_key_and_not_quoted(bad: str) -> None:
    lines = problems(MINIMAL.replace(f'password = "{SECRET}"', f'scram_verifier = "{bad}"'))
    assert len(lines) == 1 and lines[0].startswith("test.toml: users.0.scram_verifier: ")
    assert bad not in lines[0]
    lines = problems(MINIMAL.replace(f'password = "{SECRET}"', 'scram_verifier_env = "V"'), env={"V": bad})
    assert lines[0].startswith("test.toml: users.0.scram_verifier: ") and bad not in lines[0]


def test_a_password_and_a_verifier_are_not_both_set() -> None:
    text = MINIMAL.replace(f'password = "{SECRET}"', f'password = "{SECRET}"\nscram_verifier = "{VERIFIER}"')
    assert problems(text) == ["test.toml: users.0.scram_verifier: set either a password (password, password_env) "
                              "or a verifier (scram_verifier, scram_verifier_env), not both"]


def test_auth_query_defaults_and_users_become_optional() -> None:
    without_users = MINIMAL.replace(f'[[users]]\nname = "app"\npassword = "{SECRET}"\n', "")
    assert problems(without_users) == ["test.toml: users: required key is missing"]
    config = parse(without_users + "[auth_query]\n")
    q = config.auth_query
    assert config.users == () and q is not None
    assert q.query == ("SELECT usename, passwd FROM pg_shadow WHERE usename = $1 "
                       "AND (valuntil IS NULL OR valuntil > now())")
    assert (q.user, q.secret(), q.dbname, q.timeout_s, q.cache_ttl_s, q.cache_size) == (None, None, None, 2.0, 5.0, 1000)
    # any role of the server may log in: an access rule may name one
    parse(without_users + '[auth_query]\n[[access]]\nusers = ["someone"]\naction = "reject"\n')
    assert parse(describe(config)) == config


def test_auth_query_password_needs_its_user_and_is_secret() -> None:
    assert problems(MINIMAL + '[auth_query]\npassword = "lookup-secret"\n') == [
        "test.toml: auth_query.user: required when a password is set (without user, [monitor]'s account "
        "and password are used)"]
    config = parse(MINIMAL + '[auth_query]\nuser = "pgsplit_auth"\npassword = "lookup-secret"\n')
    assert config.auth_query.secret() == "lookup-secret"
    assert "lookup-secret" not in describe(config)


def test_check_config_output_says_a_verifier_is_masked_and_reloads_with_it_put_back() -> None:
    config = parse(MINIMAL.replace(f'password = "{SECRET}"', f'scram_verifier = "{VERIFIER}"'))
    text = describe(config)
    assert 'scram_verifier = "********"  # masked: a secret; put the real value back to load this text' in text
    assert VERIFIER not in text
    assert problems(text) == ['test.toml: users.0.scram_verifier: "********" is how check-config masks a verifier, '
                              "not a verifier: put the user's verifier (or its scram_verifier_env) back"]
    assert parse(text.replace('"********"', f'"{VERIFIER}"')) == config
