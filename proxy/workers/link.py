"""What a worker's proxy knows of its place among the workers, and the admin operations
it asks the supervisor to run (the admin console's PAUSE, RESUME and RELOAD hold or
reload every worker, so the supervisor runs them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from proxy.workers.channel import Channel, RemoteError

log = logging.getLogger("pgsplit")

CANCEL_TIMEOUT_S = 8.0  # (the other worker waits up to 5 s for its server to take it)
ADMIN_TIMEOUT_S = 600.0  # (the console bounds each operation itself)


@dataclass
class WorkerLink:
    index: int  # 0..N-1: also the low byte of every cancel key this worker hands out
    port: int  # the shared client port (SO_REUSEPORT)
    channel: Channel
    admin_state: dict = field(default_factory=dict)  # the supervisor's, sent with each report request

    async def forward_cancel(self, process_id: int, secret_key: bytes) -> None:
        """A CancelRequest for a session of another worker: the supervisor passes it on
        (and answers once that worker's server has taken it)."""
        try:
            await self.channel.request("cancel", process_id, secret_key, timeout=CANCEL_TIMEOUT_S)
        except (ConnectionError, TimeoutError, RemoteError) as exc:
            log.info("cancel request for worker %d not passed on: %s", process_id & 0xFF, exc)

    async def admin(self, op: str, *args: Any) -> Any:
        try:
            return await self.channel.request("admin", op, args, timeout=ADMIN_TIMEOUT_S)
        except RemoteError as exc:  # refused there (not paused, busy, an invalid file): refused here
            raise ValueError(str(exc)) from None


class RemoteAdminOps:
    """proxy.admin.operations.AdminOps as the admin console of a worker uses it."""

    def __init__(self, process: Any, link: WorkerLink):
        self.process = process
        self.link = link

    async def pause(self, timeout_s: float | None = None) -> dict:
        return await self.link.admin("pause", timeout_s)

    async def resume(self) -> dict:
        return await self.link.admin("resume")

    async def reload(self) -> dict:
        return await self.link.admin("reload")

    def status(self) -> dict:
        """The supervisor's status (every worker's connections), as of its last report
        request (at most a second old); this worker's own until the first one."""
        return self.link.admin_state.get("status") or self.process.status()

    def cutover_state(self) -> dict:
        return self.link.admin_state.get("cutover_state") or {
            "active": self.process.config.active, "generation": self.process.topology.current.generation,
            "clusters": sorted(self.process.config.clusters), "in_progress": None, "paused_seconds": None,
            "units_held": 0, "last": None}

    def migrations(self) -> list[dict]:
        return self.link.admin_state.get("migrations", [])

    async def stop(self) -> None:
        pass  # (nothing of its own to stop)
