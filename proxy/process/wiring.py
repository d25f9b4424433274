"""Every translation of the config into the settings the running parts take.

Owns: the backend set of a cluster as the monitor and the cutover see it, the monitor's,
the pools' and a cutover's settings, the logins toward clients and backends, the TLS
context, and how the admin operations reach a cluster's primary (the control endpoint,
a migration's name and its publisher's connection string). Separate so that the config's
keys are read in one place: the process builds its parts from here and a reload compares
what it builds here, old config against new.
Must not know: how the parts use these settings, or what a reload may change.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field

from ops.cutover.logical import LogicalOptions
from ops.cutover.machine import CutoverSettings
from ops.migrate.control import publisher_conninfo
from proxy.access import Limits, Rule
from proxy.config import ALL, Config, PoolConfig
from proxy.process.lookup import LookupSettings
from proxy.scram import ScramKeys, Verifier
from router.monitor.probe import MonitorSettings
from router.pg import Endpoint
from router.topology import BackendSpec, Role


@dataclass(frozen=True)
class RuntimeSettings:
    """What the process's long-lived parts take from a config (the rest they read from the
    config in force when they need it)."""

    passwords: dict[str, str]  # user -> password: the SCRAM verifiers and the logins to backends
    pool: PoolConfig  # the pools take [pool] as it is
    monitor: MonitorSettings
    backends: tuple[BackendSpec, ...]  # the active cluster's
    access: tuple[Rule, ...] = ()  # [[access]], in file order
    limits: Limits = field(default_factory=Limits)  # max_client_connections per user, per database
    pool_sizes: dict[str, int] = field(default_factory=dict)  # user -> its pool_size, where set
    # user -> the verifier [[users]] gives instead of a password
    verifiers: dict[str, Verifier] = field(default_factory=dict)
    lookup: LookupSettings | None = None  # [auth_query], when set


def runtime_settings(config: Config) -> RuntimeSettings:
    return RuntimeSettings(passwords(config), config.pool, monitor_settings(config),
                           tuple(backend_specs(config, config.active)), access_rules(config),
                           limits(config), pool_sizes(config), verifiers(config), lookup_settings(config))


def keeps_client_key(settings: RuntimeSettings, user: str, keys: ScramKeys) -> bool:
    """Whether the ClientKey of a login of `user` may log it in to the backends under
    `settings`: the user has no password there, and either its [[users]] verifier is
    still the one the key was proved for, or it is not in [[users]] and [auth_query] is on."""
    if user in settings.passwords:
        return False
    if user in settings.verifiers:
        return settings.verifiers[user] == keys.verifier
    return settings.lookup is not None


def access_rules(config: Config) -> tuple[Rule, ...]:
    def names(value) -> frozenset[str] | None:
        return None if value == ALL else frozenset(value)

    return tuple(Rule(users=names(r.users), databases=names(r.databases),
                      networks=None if r.addresses == ALL else tuple(ipaddress.ip_network(a) for a in r.addresses),
                      allow=r.action == "allow")
                 for r in config.access)


def limits(config: Config) -> Limits:
    return Limits(
        per_user={u.name: u.max_client_connections for u in config.users if u.max_client_connections is not None},
        per_database={name: d.max_client_connections for name, d in config.databases.items()
                      if d.max_client_connections is not None})


def pool_sizes(config: Config) -> dict[str, int]:
    return {u.name: u.pool_size for u in config.users if u.pool_size is not None}


def backend_specs(config: Config, cluster_name: str) -> list[BackendSpec]:
    """A cluster's backends, its primary first; a backend's lag limits default to [routing]'s."""
    cluster = config.clusters[cluster_name]
    specs = []
    for name in cluster.members:
        b = config.backends[name]
        specs.append(BackendSpec(
            name=name, host=b.host, port=b.port,
            role=Role.PRIMARY if name == cluster.primary else Role.REPLICA,
            weight=b.weight,
            max_lag_bytes=b.max_lag_bytes if b.max_lag_bytes is not None else config.routing.max_lag_bytes,
            max_lag_seconds=b.max_lag_seconds if b.max_lag_seconds is not None else config.routing.max_lag_seconds,
            tls=config.tls_for(name),
        ))
    return specs


def monitor_settings(config: Config) -> MonitorSettings:
    r = config.routing
    return MonitorSettings(
        user=config.monitor.user, password=config.monitor.secret(), dbname=config.monitor.dbname,
        interval_s=r.monitor_interval_ms / 1000, timeout_s=r.monitor_timeout_ms / 1000,
        catalog_refresh_s=r.catalog_refresh_s,
    )


def passwords(config: Config) -> dict[str, str]:
    return {u.name: pw for u in config.users if (pw := u.secret()) is not None}


def verifiers(config: Config) -> dict[str, Verifier]:
    return {u.name: v for u in config.users if (v := u.verifier()) is not None}


def lookup_settings(config: Config) -> LookupSettings | None:
    """[auth_query]; its login defaults to [monitor]'s account."""
    q, m = config.auth_query, config.monitor
    if q is None:
        return None
    account = (q.user, q.secret(), q.dbname or m.dbname) if q.user is not None else (m.user, m.secret(),
                                                                                      q.dbname or m.dbname)
    return LookupSettings(q.query, *account, timeout_s=q.timeout_s, cache_ttl_s=q.cache_ttl_s,
                          cache_size=q.cache_size)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server side of TLS toward clients, or None when [listen] has no certificate."""
    if not config.listen.tls_enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.listen.tls_cert), str(config.listen.tls_key))
    return ctx


# --- cutover and online migration ------------------------------------------------------------


def cutover_settings(config: Config, target: str, *, timeout_s: float | None, dry_run: bool) -> CutoverSettings:
    c = config.cutover
    return CutoverSettings(
        pause_timeout_s=c.pause_timeout_s, catchup_timeout_s=c.catchup_timeout_s,
        cancel_idle_in_transaction=c.idle_in_transaction == "cancel",
        max_lag_bytes=backend_specs(config, target)[0].max_lag_bytes, timeout_s=timeout_s, dry_run=dry_run)


def logical_options(config: Config, source: str, target: str, *, reverse: bool) -> LogicalOptions:
    """What a cutover to a logical subscriber leaves behind: with `reverse`, the migration
    back to `source`, under the name a later cutover back looks for."""
    return LogicalOptions(reverse=reverse, reverse_name=migration_name(source),
                          reverse_conninfo=publisher_conninfo_of(config, target))


def control_endpoint(config: Config, cluster: str) -> Endpoint:
    """How the migration's connections reach `cluster`'s primary: the [monitor] account."""
    spec = backend_specs(config, cluster)[0]
    m = config.monitor
    return Endpoint(spec.host, spec.port, m.user, m.secret(), m.dbname, config.pool.connect_timeout_s, spec.tls)


def publisher_conninfo_of(config: Config, cluster: str) -> str | None:
    """How the other side's subscription reaches `cluster`'s primary, from
    [migration.conninfo] (None: as the proxy reaches it)."""
    fragment = config.migration.conninfo.get(cluster)
    if fragment is None:
        return None
    return publisher_conninfo(fragment, config.monitor.user, config.monitor.secret())


def migration_name(target: str) -> str:
    """The publication/subscription of a migration to cluster `target`: a migration to
    "next" is "pgsplit_next"; the reverse of a cutover main -> next is a migration to
    "main", "pgsplit_main", so a cutover back finds it by that name."""
    return "pgsplit_" + re.sub(r"[^a-z0-9_]", "_", target.lower())
