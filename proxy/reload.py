"""Reloading the config file while the proxy runs (SIGHUP, POST /v1/reload).

Owns: parse, validate, compare with the config in force, apply what can change live, and
say what was applied and what needs a restart or a cutover. An invalid file changes
nothing: the old config stays in force (the error names the file and key). Connections
and sessions are never dropped by a reload: pools take new settings for connections they
open from now on; the monitor switches to a changed backend set with a new generation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.auth import Verifiers
from proxy.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # pragma: no cover
    from proxy.app import Proxy

log = logging.getLogger("pgsplit.reload")

# Sections that only take effect when the proxy starts (sockets are bound then).
RESTART_ONLY = ("listen", "admin")


class ReloadRefused(ValueError):
    """The new file is invalid, or asks for something a reload cannot do."""


async def reload_file(proxy: "Proxy") -> dict:
    if proxy.config_path is None:
        raise ReloadRefused("this proxy was started without a config file: nothing to reload")
    try:
        new = load_config(proxy.config_path)
    except ConfigError as exc:
        raise ReloadRefused(f"the config was not reloaded:\n{exc}") from None
    except OSError as exc:
        raise ReloadRefused(f"the config was not reloaded: {proxy.config_path}: {exc.strerror or exc}") from None
    return await apply(proxy, new)


async def apply(proxy: "Proxy", new: Config) -> dict:
    from proxy.app import backend_specs, monitor_settings

    old = proxy.config
    if new.active != old.active:
        raise ReloadRefused(
            f"active = {new.active!r} differs from the cluster in use ({old.active!r}): a reload does not "
            f"move traffic; run `pgsplit cutover {new.active}`"
        )
    # What only a restart changes stays as it is in the config in force.
    needs_restart = [s for s in RESTART_ONLY if getattr(new, s) != getattr(old, s)]
    if new.pool.mode != old.pool.mode:
        needs_restart.append("pool.mode")
    new = new.model_copy(update={"listen": old.listen, "admin": old.admin,
                                 "pool": new.pool.model_copy(update={"mode": old.pool.mode})})
    applied: list[str] = []
    if new.users != old.users:
        proxy.verifiers = Verifiers({u.name: u.secret() for u in new.users})
        proxy.pools.update_passwords({u.name: u.secret() for u in new.users})
        applied.append("users")
    if new.pool != old.pool:
        proxy.pools.update_settings(new.pool)
        applied.append("pool")
    proxy.config = new
    specs_changed = backend_specs(new, new.active) != backend_specs(old, old.active)
    monitor_changed = monitor_settings(new) != monitor_settings(old)
    if specs_changed or monitor_changed:
        proxy.monitor.settings = monitor_settings(new)
        await proxy.monitor.retarget(new.active, backend_specs(new, new.active))
        applied.append("backends of the active cluster" if specs_changed else "monitor")
    for section in ("routing", "cutover", "migration", "backends", "clusters", "log_level"):
        if getattr(new, section, None) != getattr(old, section, None) and section not in applied:
            applied.append(section)
    if new.log_level != old.log_level:
        logging.getLogger().setLevel(new.log_level.upper())
    log.info("config reloaded: %s%s", ", ".join(applied) or "no change",
             f" (needs a restart: {', '.join(needs_restart)})" if needs_restart else "")
    return {"applied": applied, "needs_restart": needs_restart, "generation": proxy.topology.current.generation}
