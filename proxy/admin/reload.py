"""Reloading the config file while the proxy runs (SIGHUP, POST /v1/reload).

Owns: parse and validate the file, compare it with the config in force, keep what only a
restart changes as it is, and say honestly what was applied and what needs a restart or a
cutover. The process then puts the new config and the settings built from it in force in
one swap (`Process.reconfigure`). An invalid file changes nothing: the old config stays in
force (the error names the file and key). Connections and sessions are never dropped by a
reload: pools take new settings for connections they open from now on; the monitor
switches to a changed backend set with a new generation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from proxy.config import AdminConfig, Config, ConfigError, load_config
from proxy.process.wiring import runtime_settings

log = logging.getLogger("pgsplit.reload")

# What only takes effect when the proxy starts: sockets are bound then, and the log's
# format is set once (a log shipper reads one format per stream).
RESTART_ONLY = ("listen", "admin", "log_format")
# [routing] keys read once at start: the classifier's cache is sized, the monitor's poll
# and catalog loops take their period.
RESTART_ONLY_ROUTING = ("classify_cache_size", "monitor_interval_ms", "catalog_refresh_s")
# [admin] keys a reload does apply: the console reads them at each login.
RELOADABLE_ADMIN = ("console_users", "console_database")


def restart_only_keys() -> list[str]:
    """The dotted keys (or tables) a reload leaves as they are, for the console's SHOW
    CONFIG: what only a restart changes, and `active`, which only a cutover does."""
    keys = ["active", "log_format", "listen", "pool.mode"]
    keys += [f"admin.{k}" for k in AdminConfig.model_fields if k not in RELOADABLE_ADMIN]
    return keys + [f"routing.{k}" for k in RESTART_ONLY_ROUTING]


class ReloadRefused(ValueError):
    """The new file is invalid, or asks for something a reload cannot do."""


class Process(Protocol):
    """What a reload needs of the proxy process (proxy.app.Proxy)."""

    config: Config
    config_path: str | None

    async def reconfigure(self, config: Config) -> int: ...


@dataclass(frozen=True)
class Reload:
    config: Config  # what goes in force: the new file with the restart-only parts as they are
    applied: tuple[str, ...]
    needs_restart: tuple[str, ...]


async def reload_file(process: Process) -> dict:
    """Read the config file again and put it in force; the answer of POST /v1/reload."""
    old = process.config
    change = compare(old, read(process.config_path))
    generation = await process.reconfigure(change.config)
    if change.config.log_level != old.log_level:
        logging.getLogger().setLevel(change.config.log_level.upper())
    log.info("config reloaded: %s%s", ", ".join(change.applied) or "no change",
             f" (needs a restart: {', '.join(change.needs_restart)})" if change.needs_restart else "")
    return {"applied": list(change.applied), "needs_restart": list(change.needs_restart), "generation": generation}


def read(path: str | None) -> Config:
    if path is None:
        raise ReloadRefused("this proxy was started without a config file: nothing to reload")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise ReloadRefused(f"the config was not reloaded:\n{exc}") from None
    except OSError as exc:
        raise ReloadRefused(f"the config was not reloaded: {path}: {exc.strerror or exc}") from None


def compare(old: Config, new: Config) -> Reload:
    """What reloading `new` over `old` changes (pure; ReloadRefused for another active cluster)."""
    if new.active != old.active:
        raise ReloadRefused(
            f"active = {new.active!r} differs from the cluster in use ({old.active!r}): a reload does not "
            f"move traffic; run `pgsplit cutover {new.active}`"
        )
    # What only a restart changes stays as it is in the config in force.
    console = {k: getattr(new.admin, k) for k in RELOADABLE_ADMIN}
    admin = old.admin.model_copy(update=console)
    needs_restart = [s for s in RESTART_ONLY if getattr(new, s) != (admin if s == "admin" else getattr(old, s))]
    if new.pool.mode != old.pool.mode:
        needs_restart.append("pool.mode")
    kept_routing = {k: getattr(old.routing, k) for k in RESTART_ONLY_ROUTING}
    needs_restart += [f"routing.{k}" for k, v in kept_routing.items() if getattr(new.routing, k) != v]
    new = new.model_copy(update={"listen": old.listen, "admin": admin, "log_format": old.log_format,
                                 "pool": new.pool.model_copy(update={"mode": old.pool.mode}),
                                 "routing": new.routing.model_copy(update=kept_routing)})
    before, after = runtime_settings(old), runtime_settings(new)
    applied: list[str] = []
    if new.users != old.users:
        applied.append("users")
    if new.pool != old.pool:
        applied.append("pool")
    if after.backends != before.backends:
        applied.append("backends of the active cluster")
    elif after.monitor != before.monitor:
        applied.append("monitor")
    applied += [f"admin.{k}" for k in RELOADABLE_ADMIN if getattr(new.admin, k) != getattr(old.admin, k)]
    for section in ("auth_query", "routing", "cutover", "migration", "backends", "clusters", "access", "databases",
                    "log_level"):
        if getattr(new, section) != getattr(old, section) and section not in applied:
            applied.append(section)
    return Reload(new, tuple(applied), tuple(needs_restart))
