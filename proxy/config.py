"""pgsplit configuration: one TOML file, validated into frozen pydantic models.

This module owns the shape of the config file (the key names are a contract, see
docs/config.md), its validation, and the error messages an operator sees. It must
not know how the values are used: no sockets, no routing, no pools.

Loading is parse -> validate -> frozen `Config`. A reload builds a new `Config` and
swaps it in; the old one is never mutated. Secrets (passwords, the admin token) are
`SecretStr`: `*_env` keys are resolved from the environment while loading, so the
resulting models hold the secret itself and `secret()` returns it. Secrets never
appear in `ConfigError` messages, in `describe()` or in `redacted_dict()`.

Problems are reported as "<file>: <dotted.key.path>: <message>", one per line.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from proxy.scram import BadVerifier, Verifier
from router.tls import SYSTEM_CA, ServerTls, server_tls

__all__ = [
    "AccessConfig",
    "AdminConfig",
    "AuthQueryConfig",
    "BackendConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "CutoverConfig",
    "DatabaseConfig",
    "ListenConfig",
    "MigrationConfig",
    "MonitorConfig",
    "PoolConfig",
    "Problem",
    "RoutingConfig",
    "UserConfig",
    "describe",
    "load_config",
    "parse_config",
]

REDACTED = "********"

# TOML gives values their types; a quoted number is a mistake worth reporting, so
# numbers and booleans are strict (an int is still accepted where a float is expected).
Port = Annotated[int, Strict(), Field(ge=0, le=65535)]
BackendPort = Annotated[int, Strict(), Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
StrictBool = Annotated[bool, Strict()]
Name = Annotated[str, Field(min_length=1)]
Secret = Annotated[SecretStr, Field(min_length=1)]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_PROBLEMS = "pgsplit_config"


def _fail(problems: Iterable[tuple[tuple[str | int, ...], str]]) -> NoReturn:
    """Raise a validation error that carries one or more (relative key path, message).

    A validator can only attach an error to its own model's location; this lets a
    cross-field check name the exact key (e.g. `clusters.main.primary`). `ConfigError`
    expands the list; a bare pydantic ValidationError still shows a readable summary.
    """
    items = tuple(problems)
    summary = "; ".join(
        f"{_dotted(loc)}: {msg}" if loc else msg for loc, msg in items
    )
    raise PydanticCustomError(_PROBLEMS, "{summary}", {"summary": summary, "problems": items})


def _environment(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context if isinstance(info.context, Mapping) else {}
    env = context.get("env")
    return os.environ if env is None else env


def _resolve_secret(
    data: Any, info: ValidationInfo, field: str, env_field: str, *, required: bool
) -> Any:
    """Check `field` / `env_field` (at most one, or exactly one if required) and
    replace an `env_field` reference with the variable's value. Never formats the secret."""
    if not isinstance(data, Mapping):
        return data  # a model instance, or a wrong type that field validation reports
    has_value = data.get(field) is not None
    env_name = data.get(env_field)
    if has_value and env_name is not None:
        _fail([((env_field,), f"set either {field} or {env_field}, not both")])
    if env_name is None:
        if required and not has_value:
            _fail([((field,), f"required: set {field} or {env_field}")])
        return data
    if not isinstance(env_name, str) or not env_name:
        return data  # field validation reports the bad type / empty name
    value = _environment(info).get(env_name)
    if value is None:
        _fail([((env_field,), f"environment variable {env_name} is not set")])
    if value == "":
        _fail([((env_field,), f"environment variable {env_name} is empty")])
    return {**data, field: value}


class ListenConfig(BaseModel):
    """Where clients connect ([listen])."""

    model_config = _FROZEN

    host: Name = "127.0.0.1"
    port: Port = 6432
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_client_connections: PositiveInt = 10000
    startup_timeout_s: PositiveFloat = 10.0

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _relative_to_config_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _config_relative(value, info)

    @model_validator(mode="after")
    def _check_tls(self) -> ListenConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "tls_key" if self.tls_key is None else "tls_cert"
            other = "tls_cert" if missing == "tls_key" else "tls_key"
            problems.append(((missing,), f"required when {other} is set (set both or neither)"))
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                problems.append(((key,), f"file not found: {path}"))
        if problems:
            _fail(problems)
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


def _config_relative(value: Path | None, info: ValidationInfo) -> Path | None:
    """Relative paths are relative to the config file, not to the working directory."""
    if value is None or value.is_absolute() or str(value) == SYSTEM_CA:
        return value
    context = info.context if isinstance(info.context, Mapping) else {}
    base = context.get("base_dir")
    return (Path(base) / value) if base is not None else value.absolute()


SslMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]
_TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


class ServerTlsConfig(BaseModel):
    """TLS towards the backends ([server_tls]; the same keys in [backends.NAME] override it
    for that backend), with libpq's meanings: see router.tls."""

    model_config = _FROZEN

    sslmode: SslMode | None = None
    sslrootcert: Path | None = None  # a PEM file, or "system"
    sslcert: Path | None = None
    sslkey: Path | None = None

    _relative = field_validator("sslrootcert", "sslcert", "sslkey")(classmethod(
        lambda cls, value, info: _config_relative(value, info)))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class AdminConfig(BaseModel):
    """The admin HTTP endpoint: /metrics, /healthz, /v1/* ([admin]), and who may use the
    admin console over the PostgreSQL protocol (proxy.admin.console)."""

    model_config = _FROZEN

    host: Name = "127.0.0.1"
    port: Port = 9930
    token: Secret | None = None
    token_env: Name | None = None
    # [[users]] names that may log in to the console database (none: no console).
    console_users: tuple[Name, ...] = ()
    # The database name a client asks for to get the console instead of a backend.
    console_database: Name = "pgsplit"

    @model_validator(mode="before")
    @classmethod
    def _resolve_token(cls, data: Any, info: ValidationInfo) -> Any:
        return _resolve_secret(data, info, "token", "token_env", required=False)

    @model_validator(mode="after")
    def _check_token(self) -> AdminConfig:
        if self.token is None and not self.is_loopback:
            _fail([(("token",), f"required because host {self.host!r} is not a loopback "
                                "address: set token or token_env")])
        return self

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    def secret(self) -> str | None:
        """The bearer token in plain text, or None when no token is configured."""
        return None if self.token is None else self.token.get_secret_value()


_CREDENTIALS = ("password", "password_env", "scram_verifier", "scram_verifier_env")


class UserConfig(BaseModel):
    """A client account ([[users]]): its password (the proxy uses it towards backends too),
    or its SCRAM-SHA-256 verifier (backends are then logged in to with the ClientKey of the
    user's latest login, see proxy.scram)."""

    model_config = _FROZEN

    name: Name
    password: Secret | None = None
    password_env: Name | None = None
    # pg_authid.rolpassword's text: SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    scram_verifier: Secret | None = None
    scram_verifier_env: Name | None = None
    # Authenticated sessions of this user at once (PostgreSQL's CONNECTION LIMIT); unset: no limit.
    max_client_connections: PositiveInt | None = None
    # Server connections per pool of this user; unset: [pool] size.
    pool_size: PositiveInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_password(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, Mapping):
            return data
        given = [key for key in _CREDENTIALS if data.get(key) is not None]
        if not given:
            _fail([(("password",), "required: set password, password_env, scram_verifier or scram_verifier_env")])
        if any(k.startswith("password") for k in given) and any(k.startswith("scram") for k in given):
            _fail([((given[-1],), "set either a password (password, password_env) or a verifier "
                                  "(scram_verifier, scram_verifier_env), not both")])
        if given[0].startswith("scram"):
            return _resolve_secret(data, info, "scram_verifier", "scram_verifier_env", required=True)
        return _resolve_secret(data, info, "password", "password_env", required=True)

    @field_validator("scram_verifier")
    @classmethod
    def _parse_verifier(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            if value.get_secret_value() == REDACTED:
                _fail([((), f'"{REDACTED}" is how check-config masks a verifier, not a verifier: put the '
                            "user's verifier (or its scram_verifier_env) back")])
            try:
                Verifier.parse(value.get_secret_value())
            except BadVerifier as exc:
                _fail([((), str(exc))])
        return value

    @model_validator(mode="after")
    def _check_password(self) -> UserConfig:
        if self.password is None and self.scram_verifier is None:  # constructed from a model instance
            _fail([(("password",), "required: set password, password_env, scram_verifier or scram_verifier_env")])
        return self

    def secret(self) -> str | None:
        """The password in plain text (resolved from password_env if that was used); None
        for a user configured by its verifier."""
        return None if self.password is None else self.password.get_secret_value()

    def verifier(self) -> Verifier | None:
        """The SCRAM-SHA-256 verifier of a user configured by one, else None."""
        return None if self.scram_verifier is None else Verifier.parse(self.scram_verifier.get_secret_value())


# (a role whose password expired has no verifier to log in with, as PostgreSQL refuses it)
DEFAULT_AUTH_QUERY = ("SELECT usename, passwd FROM pg_shadow WHERE usename = $1 "
                      "AND (valuntil IS NULL OR valuntil > now())")


class AuthQueryConfig(BaseModel):
    """Users not in [[users]]: their SCRAM verifier is read from the active cluster's
    primary ([auth_query]; the table's presence turns the lookup on)."""

    model_config = _FROZEN

    # Takes the user name as $1; the last column of its first row is the verifier.
    query: Name = DEFAULT_AUTH_QUERY
    # The lookup's login; unset: [monitor]'s account (its user, password and dbname).
    user: Name | None = None
    password: Secret | None = None
    password_env: Name | None = None
    dbname: Name | None = None
    timeout_s: PositiveFloat = 2.0  # the whole lookup: connecting, logging in, the query
    cache_ttl_s: NonNegativeFloat = 5.0  # how long an answer (also "no such user") is used
    cache_size: PositiveInt = 1000  # answers kept at most

    @model_validator(mode="before")
    @classmethod
    def _resolve_password(cls, data: Any, info: ValidationInfo) -> Any:
        return _resolve_secret(data, info, "password", "password_env", required=False)

    @model_validator(mode="after")
    def _password_needs_user(self) -> AuthQueryConfig:
        if self.password is not None and self.user is None:
            _fail([(("user",), "required when a password is set (without user, [monitor]'s account "
                               "and password are used)")])
        return self

    def secret(self) -> str | None:
        return None if self.password is None else self.password.get_secret_value()


class DatabaseConfig(BaseModel):
    """Settings of one database as clients name it ([databases.NAME])."""

    model_config = _FROZEN

    # Authenticated sessions to this database at once; unset: no limit.
    max_client_connections: PositiveInt | None = None


ALL = "all"


def _all_or_list(value: Any, what: str) -> Any:
    """"all", or a list of names in which "all" would be ambiguous (a name or everyone?)."""
    if not isinstance(value, (str, list, tuple)) or isinstance(value, str) and value != ALL:
        _fail([((), f'must be "{ALL}" or a list of {what} (e.g. ["{value}"])' if isinstance(value, str)
                   else f'must be "{ALL}" or a list of {what}')])
    if isinstance(value, (list, tuple)) and not value:
        _fail([((), f'must not be empty: list {what}, or write "{ALL}"')])
    if isinstance(value, (list, tuple)) and ALL in value:
        _fail([((), f'"{ALL}" cannot be in a list: write "{ALL}" alone')])
    return value


class AccessConfig(BaseModel):
    """One rule of [[access]]: first match wins, as in pg_hba.conf."""

    model_config = _FROZEN

    # "all", or a non-empty list (the before-validator says so in words)
    users: Literal["all"] | tuple[Name, ...] = ALL
    databases: Literal["all"] | tuple[Name, ...] = ALL
    addresses: Literal["all"] | tuple[Name, ...] = ALL
    action: Literal["allow", "reject"]

    @field_validator("users", "databases", "addresses", mode="before")
    @classmethod
    def _all_or_names(cls, value: Any, info: ValidationInfo) -> Any:
        return _all_or_list(value, "addresses (CIDR)" if info.field_name == "addresses" else info.field_name)

    @field_validator("addresses")
    @classmethod
    def _cidr(cls, value: Any) -> Any:
        if value == ALL:
            return value
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for index, text in enumerate(value):
            try:
                ipaddress.ip_network(text)
            except ValueError as exc:
                problems.append(((index,), f"not an address or CIDR network: {exc}"))
        if problems:
            _fail(problems)
        return value


class BackendConfig(BaseModel):
    """One PostgreSQL server ([backends.NAME]); limits override [routing] when set."""

    model_config = _FROZEN

    host: Name
    port: BackendPort = 5432
    weight: PositiveFloat = 1.0
    max_lag_bytes: NonNegativeInt | None = None
    max_lag_seconds: NonNegativeFloat | None = None
    # TLS towards this backend; unset keys come from [server_tls]
    sslmode: SslMode | None = None
    sslrootcert: Path | None = None
    sslcert: Path | None = None
    sslkey: Path | None = None

    _relative = field_validator("sslrootcert", "sslcert", "sslkey")(classmethod(
        lambda cls, value, info: _config_relative(value, info)))


class ClusterConfig(BaseModel):
    """A named backend set ([clusters.NAME]): one primary and its replicas."""

    model_config = _FROZEN

    primary: Name
    replicas: tuple[Name, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return (self.primary, *self.replicas)


class RoutingConfig(BaseModel):
    """Read/write splitting, lag limits and read-your-writes ([routing])."""

    model_config = _FROZEN

    consistency: Literal["session", "global", "token", "eventual"] = "session"
    consistency_wait_ms: NonNegativeInt = 50
    max_lag_bytes: NonNegativeInt = 16 * 1024 * 1024
    max_lag_seconds: NonNegativeFloat = 5.0
    monitor_interval_ms: PositiveInt = 100
    monitor_timeout_ms: PositiveInt = 1000
    classify_cache_size: NonNegativeInt = 10000
    catalog_refresh_s: PositiveFloat = 60.0
    retry_reads_on_replica_error: StrictBool = True


class PoolConfig(BaseModel):
    """Server connection pools, one per (backend, user, database) ([pool])."""

    model_config = _FROZEN

    mode: Literal["transaction", "session"] = "transaction"
    size: PositiveInt = 20
    connect_timeout_s: PositiveFloat = 5.0
    acquire_timeout_s: PositiveFloat = 10.0
    idle_timeout_s: PositiveFloat = 600.0
    server_lifetime_s: PositiveFloat = 3600.0
    # A backend that stops answering (a partition, a stopped host): TCP notices a silent
    # peer (keepalive probes on an idle connection; unacknowledged data after
    # tcp_user_timeout_s, 0 = the system's default), and a unit in flight on a backend the
    # monitor declared down waits at most down_backend_wait_s before its connection is cut.
    keepalive_idle_s: PositiveInt = 15
    keepalive_interval_s: PositiveInt = 5
    keepalive_count: PositiveInt = 3
    tcp_user_timeout_s: NonNegativeFloat = 30.0
    down_backend_wait_s: NonNegativeFloat = 1.0
    max_prepared_statements: PositiveInt = 100


class MonitorConfig(BaseModel):
    """The account of the monitor and cutover control connections ([monitor])."""

    model_config = _FROZEN

    user: Name = "postgres"
    password: Secret | None = None
    password_env: Name | None = None
    dbname: Name = "postgres"

    @model_validator(mode="before")
    @classmethod
    def _resolve_password(cls, data: Any, info: ValidationInfo) -> Any:
        return _resolve_secret(data, info, "password", "password_env", required=False)

    def secret(self) -> str | None:
        """The password in plain text, or None (the server must then not ask for one)."""
        return None if self.password is None else self.password.get_secret_value()


class CutoverConfig(BaseModel):
    """Timeouts and policies of the cutover state machine ([cutover])."""

    model_config = _FROZEN

    pause_timeout_s: PositiveFloat = 10.0
    catchup_timeout_s: PositiveFloat = 30.0
    fence: Literal["read_only"] = "read_only"
    idle_in_transaction: Literal["abort", "cancel"] = "abort"


_CONNINFO_OWN_KEYS = re.compile(r"(?:^|\s)(password|user|dbname)\s*=")


class MigrationConfig(BaseModel):
    """Online migration to another configured cluster ([migration]; `pgsplit migrate`)."""

    model_config = _FROZEN

    # The databases a migration carries; empty: every database of the source that takes
    # connections, except templates and `postgres`.
    databases: tuple[Name, ...] = ()
    # How often a started migration's lag, copy states and schema drift are checked.
    watch_interval_s: PositiveFloat = 5.0
    # Rows per checksum chunk of `pgsplit migrate verify`.
    verify_chunk_rows: PositiveInt = 10000
    # Cluster name -> how the other side's subscription reaches that cluster's primary
    # (libpq key/value pairs, e.g. "host=10.1.0.5 port=5432 sslmode=require"); the
    # [monitor] user and password and the database are added. Default: the primary's
    # host and port as the proxy reaches it.
    conninfo: dict[Name, Name] = {}

    @field_validator("conninfo")
    @classmethod
    def _no_own_keys(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [((name, ), f"must not set {m.group(1)} (the [monitor] account and each "
                               "database are added)")
                    for name, text in value.items() if (m := _CONNINFO_OWN_KEYS.search(text))]
        if problems:
            _fail(problems)
        return value


class Config(BaseModel):
    """The whole file. Immutable: a reload or a cutover makes a new one."""

    model_config = _FROZEN

    active: Name
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per log line (time, level, logger, message), for log shippers.
    log_format: Literal["text", "json"] = "text"
    listen: ListenConfig = ListenConfig()
    admin: AdminConfig = AdminConfig()
    # Looking up users not in [[users]] on the server; unset: only [[users]] log in.
    auth_query: AuthQueryConfig | None = None
    users: tuple[UserConfig, ...]
    backends: Annotated[dict[Name, BackendConfig], Field(min_length=1)]
    clusters: Annotated[dict[Name, ClusterConfig], Field(min_length=1)]
    routing: RoutingConfig = RoutingConfig()
    pool: PoolConfig = PoolConfig()
    monitor: MonitorConfig = MonitorConfig()
    cutover: CutoverConfig = CutoverConfig()
    migration: MigrationConfig = MigrationConfig()
    server_tls: ServerTlsConfig = ServerTlsConfig()
    # Who may reach which database from where; no rules: everyone (pgsplit's passwords still apply).
    access: tuple[AccessConfig, ...] = ()
    databases: dict[Name, DatabaseConfig] = {}

    _users_by_name: dict[str, UserConfig] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _default_active(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "users" not in data and data.get("auth_query") is not None:
            data = {**data, "users": ()}
        # With a single cluster, `active` may be left out.
        if isinstance(data, Mapping) and "active" not in data:
            clusters = data.get("clusters")
            if isinstance(clusters, Mapping) and len(clusters) == 1:
                return {**data, "active": next(iter(clusters))}
        return data

    @field_validator("users")
    @classmethod
    def _some_users(cls, value: tuple[UserConfig, ...], info: ValidationInfo) -> tuple[UserConfig, ...]:
        # With [auth_query], the server's roles log in: [[users]] may be left out.
        if not value and info.data.get("auth_query") is None:
            _fail([((), "must not be empty")])
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        known = ", ".join(sorted(self.backends))

        seen: dict[str, int] = {}
        for index, user in enumerate(self.users):
            if user.name in seen:
                problems.append((("users", index, "name"),
                                 f"duplicate user {user.name!r} (also users.{seen[user.name]})"))
            else:
                seen[user.name] = index

        # A misspelt name in a reject rule would let the user in: names must be [[users]]
        # (with [auth_query], any role of the server may log in: no list to check against).
        for index, rule in enumerate(self.access):
            if rule.users != ALL and self.auth_query is None:
                for position, name in enumerate(rule.users):
                    if name not in seen:
                        problems.append((("access", index, "users", position),
                                         f"{name!r} is not a [[users]] name (known: {', '.join(sorted(seen))})"))

        # The console's admins authenticate as [[users]]: a misspelt name would be nobody.
        for position, name in enumerate(self.admin.console_users):
            if name not in seen:
                problems.append((("admin", "console_users", position),
                                 f"{name!r} is not a [[users]] name (known: {', '.join(sorted(seen))})"))

        if self.active not in self.clusters:
            problems.append((("active",), f"{self.active!r} is not a cluster "
                             f"(known: {', '.join(sorted(self.clusters))})"))

        for cname, cluster in self.clusters.items():
            if cluster.primary not in self.backends:
                problems.append((("clusters", cname, "primary"),
                                 f"{cluster.primary!r} is not a backend (known: {known})"))
            listed: set[str] = set()
            for index, replica in enumerate(cluster.replicas):
                loc = ("clusters", cname, "replicas", index)
                if replica not in self.backends:
                    problems.append((loc, f"{replica!r} is not a backend (known: {known})"))
                elif replica == cluster.primary:
                    problems.append((loc, f"{replica!r} is this cluster's primary; "
                                          "a backend cannot be both primary and replica"))
                elif replica in listed:
                    problems.append((loc, f"{replica!r} is listed twice"))
                listed.add(replica)

        for name in self.backends:
            problems += self._tls_problems(name)

        for cname in self.migration.conninfo:
            if cname not in self.clusters:
                problems.append((("migration", "conninfo", cname),
                                 f"{cname!r} is not a cluster (known: {', '.join(sorted(self.clusters))})"))

        if problems:
            _fail(problems)
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._users_by_name = {user.name: user for user in self.users}

    def tls_for(self, backend: str) -> ServerTls:
        """TLS towards `backend`: its own keys, else [server_tls]'s, else libpq's default
        (prefer)."""
        own, default = self.backends[backend], self.server_tls
        values = {}
        for key in _TLS_KEYS:
            value = getattr(own, key)
            if value is None:
                value = getattr(default, key)
            if value is not None:
                values[key] = str(value)
        return server_tls(**values)

    def _tls_problems(self, backend: str) -> list[tuple[tuple[str | int, ...], str]]:
        """What would make TLS towards `backend` fail at its first connection, named by
        the key that says it (the backend's own, or [server_tls]'s)."""
        own = self.backends[backend]

        def where(key: str) -> tuple[str, ...]:
            return ("backends", backend, key) if getattr(own, key) is not None else ("server_tls", key)

        tls = self.tls_for(backend)
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if tls.sslrootcert == SYSTEM_CA and tls.sslmode != "verify-full":
            # (any publicly trusted certificate would pass a weaker check: libpq refuses too)
            problems.append((where("sslmode"), f"sslrootcert = \"{SYSTEM_CA}\" needs sslmode = \"verify-full\" "
                                               f"(the system's roots vouch for any public name)"))
        if tls.sslmode in ("verify-ca", "verify-full") and tls.sslrootcert is None:
            problems.append((where("sslmode"), f"{tls.sslmode} needs sslrootcert (a PEM file of the CA that "
                                               f"signed the server's certificate, or \"{SYSTEM_CA}\")"))
        if (tls.sslcert is None) != (tls.sslkey is None):
            missing = "sslkey" if tls.sslkey is None else "sslcert"
            other = "sslcert" if missing == "sslkey" else "sslkey"
            problems.append((where(other), f"{missing} is required when {other} is set (set both or neither)"))
        for key in ("sslrootcert", "sslcert", "sslkey"):
            value = getattr(tls, key)
            if value is not None and value != SYSTEM_CA and not Path(value).is_file():
                problems.append((where(key), f"file not found: {value}"))
        return problems

    def user(self, name: str) -> UserConfig | None:
        """The [[users]] entry called `name`, or None."""
        return self._users_by_name.get(name)

    @property
    def active_cluster(self) -> ClusterConfig:
        return self.clusters[self.active]

    def with_active(self, name: str) -> Config:
        """A copy whose active cluster is `name` (the cutover's swap)."""
        if name not in self.clusters:
            raise ConfigError([Problem("<config>", "active",
                                       f"{name!r} is not a cluster "
                                       f"(known: {', '.join(sorted(self.clusters))})")])
        return self.model_copy(update={"active": name})

    def redacted_dict(self) -> dict[str, Any]:
        """The effective config as plain data (lists, str paths), every secret "********"."""
        return _redact(self.model_dump(mode="python"))

    def describe(self) -> str:
        return describe(self)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One config problem: where (file, dotted key path) and what."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}" if self.path else \
            f"{self.source}: {self.message}"


class ConfigError(Exception):
    """An invalid config file. str() lists every problem found, one per line."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(loc: Iterable[str | int]) -> str:
    parts = []
    for part in loc:
        text = str(part)
        parts.append(text if _BARE_KEY.fullmatch(text) else json.dumps(text))
    return ".".join(parts)


# Top-level keys that TOML silently moves into the preceding [table] when written after it.
_TOP_LEVEL_SCALARS = {"active", "log_level", "log_format"}


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    msg: str = error["msg"]
    ctx = error.get("ctx") or {}
    loc = error["loc"]
    if kind == "extra_forbidden":
        if loc and loc[-1] in _TOP_LEVEL_SCALARS and len(loc) > 1:
            return (f"unknown key (`{loc[-1]}` is a top-level key: put it before "
                    "the first [table] of the file)")
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        return "must not be empty"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _problems_from(exc: ValidationError, source: str) -> list[Problem]:
    problems: list[Problem] = []
    # include_input=False: pydantic would otherwise echo the offending value, which
    # may be a password.
    errors = exc.errors(include_url=False, include_input=False, include_context=True)
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and any(
            len(other["loc"]) > len(loc) and tuple(other["loc"][: len(loc)]) == loc
            for other in errors
        ):
            continue  # pydantic counts only valid items: the real problem is an item's
        if error["type"] == _PROBLEMS:
            for rel, message in error["ctx"]["problems"]:
                problems.append(Problem(source, _dotted(loc + tuple(rel)), message))
        else:
            problems.append(Problem(source, _dotted(loc), _message(error)))
    return problems


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _toml_problem(exc: tomllib.TOMLDecodeError, source: str) -> Problem:
    text = str(exc)
    match = _TOML_POSITION.search(text)
    if match:
        where = f"line {match.group(1)}, column {match.group(2)}"
        text = text[: match.start()]
    else:
        where = "end of file" if "end of document" in text else ""
        text = re.sub(r"\s*\(at end of document\)\s*$", "", text)
    return Problem(source, where, f"invalid TOML: {text}")


# --------------------------------------------------------------------------- loading


def _validate(data: Mapping[str, Any], source: str, env: Mapping[str, str] | None,
              base_dir: Path) -> Config:
    context = {"env": os.environ if env is None else env, "base_dir": base_dir}
    try:
        return Config.model_validate(data, context=context)
    except ValidationError as exc:
        # `from None`: the chained ValidationError's text would include input values.
        raise ConfigError(_problems_from(exc, source)) from None


def parse_config(text: str, source: str = "<string>",
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate TOML text. Relative TLS paths are relative to the working directory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(exc, source)]) from None
    return _validate(data, source, env, Path.cwd())


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file. Relative TLS paths are relative to the file."""
    path = Path(path)
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(source, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(source, "", f"not UTF-8 text (byte {exc.start})")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_problem(exc, source)]) from None
    return _validate(data, source, env, path.absolute().parent)


# --------------------------------------------------------------------------- rendering


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, Mapping):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _toml_table(header: str, table: Mapping[str, Any]) -> list[str]:
    lines = [header]
    for key, value in table.items():
        if value is None:
            continue  # TOML has no null: an unset optional key is simply absent
        if key.endswith("password") or key in ("token", "scram_verifier"):
            if table.get(f"{key}_env") is not None:
                continue  # shown as its *_env reference instead
        masked = "  # masked: a secret; put the real value back to load this text" if value == REDACTED else ""
        lines.append(f"{_dotted([key])} = {_toml_value(value)}{masked}")
    return lines


def describe(config: Config) -> str:
    """The effective config as TOML text (for `pgsplit check-config`), secrets masked."""
    data = config.redacted_dict()
    out = [f"active = {_toml_value(data['active'])}",
           f"log_level = {_toml_value(data['log_level'])}",
           f"log_format = {_toml_value(data['log_format'])}", ""]
    out += _toml_table("[listen]", data["listen"]) + [""]
    out += _toml_table("[admin]", data["admin"]) + [""]
    if data["auth_query"] is not None:
        out += _toml_table("[auth_query]", data["auth_query"]) + [""]
    for user in data["users"]:
        out += _toml_table("[[users]]", user) + [""]
    for rule in data["access"]:
        out += _toml_table("[[access]]", rule) + [""]
    for name, database in data["databases"].items():
        out += _toml_table(f"[databases.{_dotted([name])}]", database) + [""]
    for name, backend in data["backends"].items():
        out += _toml_table(f"[backends.{_dotted([name])}]", backend) + [""]
    for name, cluster in data["clusters"].items():
        out += _toml_table(f"[clusters.{_dotted([name])}]", cluster) + [""]
    for section in ("routing", "pool", "monitor", "cutover"):
        out += _toml_table(f"[{section}]", data[section]) + [""]
    migration = dict(data["migration"])
    conninfo = migration.pop("conninfo")
    out += _toml_table("[migration]", migration) + [""]
    if conninfo:
        out += _toml_table("[migration.conninfo]", conninfo) + [""]
    return "\n".join(out).rstrip("\n") + "\n"
