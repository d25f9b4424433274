"""A cutover's warm-up: server connections to the target cluster opened before the pause.

Owns: how many connections per (user, database) the target gets (as many as the active
cluster has now), opening them a few at a time while live traffic goes on, staging the
monitor's logins there, and closing all of it when the cutover does not switch.
Must not know: the cutover's steps (ops.cutover calls it through the admin operations).
"""

from __future__ import annotations

import asyncio

from proxy.config import Config
from proxy.process.wiring import backend_specs
from proxy.server.connection import ServerConnection
from proxy.server.pool import Pool, Pools
from router.monitor.monitor import Monitor
from router.topology import Role

WARM_UP_LOGINS = 4  # opened at a time (live traffic goes on)


async def warm_up(pools: Pools, monitor: Monitor, config: Config, target: str) -> dict:
    """Before the pause, open as many server connections to the target cluster per
    (user, database) as the active one has now: sessions of a hot standby survive its
    promotion and take writes after it, so held units find connections ready instead of
    all logging in at once after the swap. A login failure refuses the cutover."""
    active = {s.name: s for s in backend_specs(config, config.active)}
    specs = backend_specs(config, target)
    by_name = {s.name: s for s in specs}
    want: dict[tuple[str, str, str], int] = {}
    for pool in pools:
        spec = active.get(pool.address.backend)
        if spec is None or not pool.total:
            continue
        dests = specs[:1] if spec.role is Role.PRIMARY or len(specs) == 1 else specs[1:]
        for d in dests:
            key = (d.name, pool.user, pool.database)
            want[key] = min(config.pool.size, want.get(key, 0) + -(-pool.total // len(dests)))

    gate = asyncio.Semaphore(WARM_UP_LOGINS)

    async def login(pool: Pool) -> ServerConnection:
        async with gate:
            return await pool.acquire()

    async def fill(key: tuple[str, str, str], n: int) -> int:
        spec = by_name[key[0]]
        pool = pools.get(spec.name, spec.host, spec.port, key[1], key[2], spec.tls)
        # all held until every one is open (a released one would be lent again)
        conns = await asyncio.gather(*(login(pool) for _ in range(max(0, n - pool.total))),
                                     return_exceptions=True)
        for conn in conns:
            if isinstance(conn, ServerConnection):
                pool.release(conn)
        for conn in conns:
            if isinstance(conn, BaseException):
                raise conn
        return len(conns)

    # The monitor logs in too, so the swap costs it one poll rather than logins.
    staged, *opened = await asyncio.gather(monitor.stage(target, specs),
                                           *(fill(k, n) for k, n in want.items()), return_exceptions=True)
    for n, key in zip(opened, want):
        if isinstance(n, BaseException):
            raise ValueError(f"{key[1]}@{key[2]} cannot log in to {key[0]} of cluster {target!r}: {n}") from n
    return {"server_connections": sum(opened), "pools": len(want),
            "monitor_logins": staged if isinstance(staged, int) else 0}


async def drop_warm_up(pools: Pools, monitor: Monitor, config: Config) -> None:
    """A cutover that did not switch: close what its warm-up opened (the target's pools,
    the monitor's staged logins)."""
    pools.retire_backends({s.name for s in backend_specs(config, config.active)})
    await monitor.unstage()
