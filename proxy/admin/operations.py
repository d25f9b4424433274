"""What the admin API does: pause, resume, cutover, reload, and the online migration's
plan, start, status and verify, with the checks of their arguments.

Owns: the meaning of each operation's arguments (one check each, `BadArguments` for a
value that cannot be meant), one operation at a time (a cutover or a pause holds the
data plane; a second one is refused with CutoverBusy), running a cutover in a task of its
own, and the watches of started migrations (lag, copy states and drift into the metrics).
Separate from the process so that the proxy's shared state does not grow an admin method
per route, and from the HTTP layer so that tests and the CLI call the same typed methods.
Must not know: HTTP, JSON bodies, status codes (proxy.admin.http); how a cutover or a
migration works (ops.cutover, ops.migrate); the process's pools and monitor (it asks
the process to warm up, to drop a warm-up, to reconfigure).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from metrics import Metrics
from proxy.admin import reload
from proxy.config import Config
from proxy.dataplane import DataPlane
from proxy.process import wiring
from ops.cutover.logical import LogicalControl
from ops.cutover.machine import Cutover, CutoverBusy
from ops.migrate.control import MigrateError, databases_of
from ops.migrate.copy import start as start_migration
from ops.migrate.plan import plan as plan_migration
from ops.migrate.status import status as migration_status
from ops.migrate.verify import verify as verify_migration
from ops.migrate.watch import Watch
from ops.migrate.watch import drift as schema_drift
from router.topology import TopologyHolder

log = logging.getLogger("pgsplit")


class BadArguments(ValueError):
    """An argument that cannot be meant (the admin API answers 400 and changes nothing)."""


class Process(reload.Process, Protocol):
    """What the admin operations use of the proxy process (proxy.app.Proxy)."""

    metrics: Metrics
    topology: TopologyHolder
    dataplane: DataPlane

    def spawn(self, coro: Coroutine) -> asyncio.Task: ...
    def status(self) -> dict: ...
    def metrics_text(self) -> bytes: ...
    async def refresh(self) -> None: ...
    async def warm_up(self, target: str) -> dict: ...
    async def drop_warm_up(self) -> None: ...


class AdminOps:
    def __init__(self, process: Process):
        self.process = process
        self._busy: str | None = None  # "cutover" or "pause" while one is in progress: one at a time
        self._pause: object | None = None  # the pause in force or still draining (its own token)
        self._pausing = False  # the pause's drain has not returned yet: RESUME waits for it
        self.migration_watches: dict[str, Watch] = {}  # target cluster -> its watch
        self.migrations_finished: dict[str, dict] = {}  # target cluster -> how its cutover ended it
        self._migration_locks: dict[str, asyncio.Lock] = {}
        self._migration_sources: dict[str, str] = {}  # target cluster -> the source of its watched migration
        self.last_cutover: dict | None = None  # how the last cutover (not a dry run) ended, and when

    @property
    def config(self) -> Config:
        return self.process.config

    async def stop(self) -> None:
        for watch in list(self.migration_watches.values()):
            await watch.stop()

    # --- what the HTTP layer shows ---------------------------------------------------------------

    def admin_token(self) -> str | None:
        return self.config.admin.secret()

    def metrics_text(self) -> bytes:
        return self.process.metrics_text()

    async def refresh(self) -> None:
        """Fresh figures for a scrape or a status (from every worker, under a supervisor)."""
        await self.process.refresh()

    def health(self) -> dict:
        """The health check: "ok" with a writable primary, "degraded" with only replicas up,
        else "down"."""
        topo = self.process.topology.current
        writable = topo.primary_writable
        readable = writable or any(r.up for r in topo.replicas)
        return {"status": "ok" if writable else ("degraded" if readable else "down"),
                "primary_writable": writable, "generation": topo.generation}

    def status(self) -> dict:
        return self.process.status()

    def cutover_state(self) -> dict:
        """The operation holding the data plane now ("pause", "cutover" or None), how long
        traffic has been held, and the last cutover's outcome (the console's SHOW CUTOVER)."""
        dataplane = self.process.dataplane
        paused_at = dataplane.paused_at
        return {"active": self.config.active, "generation": self.process.topology.current.generation,
                "clusters": sorted(self.config.clusters), "in_progress": "pausing" if self._pausing else self._busy,
                "paused_seconds": None if paused_at is None else time.monotonic() - paused_at,
                "units_held": dataplane.held_units, "last": self.last_cutover}

    def migrations(self) -> list[dict]:
        """The migrations watched here and those a cutover ended, as their watch last saw
        them (no query sent; the console's SHOW MIGRATION)."""
        out = []
        for target, watch in self.migration_watches.items():
            st = watch.status
            out.append({"target": target, "source": self._migration_sources.get(target, ""), "name": watch.name,
                        "state": "watching" if watch.running else "stopped",
                        "ready": None if st is None else st.ready, "lag_bytes": None if st is None else st.lag_bytes,
                        "tables": {} if st is None else st.state_counts(), "drift": len(watch.drift),
                        "checked_at": watch.checked_at, "error": watch.error})
        for target, finished in self.migrations_finished.items():
            if target not in self.migration_watches:
                out.append({"target": target, "source": finished["source"], "name": finished["name"],
                            "state": "finished", "ready": None, "lag_bytes": None, "tables": {}, "drift": 0,
                            "checked_at": finished["finished"]["at"], "error": None})
        return out

    # --- pause and resume (POST /v1/pause, /v1/resume) --------------------------------------------

    async def pause(self, timeout_s: float | None = None) -> dict:
        """Hold new units and wait for those in flight (and open transactions) to finish;
        on timeout, undo the pause and fail (ValueError)."""
        timeout_s = _seconds("timeout_s", timeout_s)
        if self._busy is not None:
            raise CutoverBusy(f"a {self._busy} is in progress")
        dataplane = self.process.dataplane
        self._busy = "pause"
        self._pause = token = object()
        self._pausing = True
        try:
            dataplane.hold()  # (inside: whatever fails here releases the pause it began)
            drained = await dataplane.drain(timeout_s or self.config.cutover.pause_timeout_s)
        except BaseException as exc:
            # A failed drain releases its own pause only, never one taken after it.
            if self._pause is token:
                dataplane.release()
                self._busy = self._pause = None
                self._pausing = False
            if isinstance(exc, TimeoutError):
                raise ValueError(f"not paused: {exc}") from exc
            raise
        if self._pause is token:
            self._pausing = False
        log.info("traffic paused by the admin API (drained in %.1f ms)", drained.seconds * 1000)
        return {"paused": True, "drain_seconds": round(drained.seconds, 4),
                "waited_for_units": drained.waited_for_units}

    async def resume(self) -> dict:
        """Release the units held since POST /v1/pause."""
        if self._busy == "cutover":
            raise CutoverBusy("a cutover is in progress; it resumes traffic itself")
        if self._busy != "pause":
            raise ValueError("traffic is not paused")
        if self._pausing:
            raise CutoverBusy("a pause is still waiting for the units in flight to finish (at most "
                              "cutover.pause_timeout_s); resume once it has returned")
        dataplane = self.process.dataplane
        paused = dataplane.release()  # (no await before: a second RESUME meanwhile is refused)
        self._busy = self._pause = None
        await self.process.refresh()  # (workers: the units they held, counted until the release)
        log.info("traffic resumed by the admin API after %.3f s (%d units held)", paused, dataplane.held_units)
        return {"resumed": True, "pause_seconds": round(paused, 4), "units_held": dataplane.held_units}

    # --- reload (POST /v1/reload, SIGHUP) ----------------------------------------------------------

    async def reload(self) -> dict:
        """Read the config file again (see proxy.admin.reload); ReloadRefused changes nothing."""
        return await reload.reload_file(self.process)

    # --- cutover (POST /v1/cutover) ----------------------------------------------------------------

    def start_cutover(self, target: str, *, dry_run: bool = False, timeout_s: float | None = None,
                      reverse: bool = False, on_event: Callable[[dict], None] | None = None) -> asyncio.Task:
        """Check the request now (BadArguments; CutoverBusy: a cutover or a pause is in
        progress) and run ops.cutover in a task of its own, so an admin client that
        hangs up does not cancel a cutover halfway. The task's result is the summary event.
        `reverse`: a logical target (an online migration's) replicates back to the source
        afterwards, so a later cutover back loses nothing written in between."""
        timeout_s = _seconds("timeout_s", timeout_s)
        target = self._cluster(target)
        if target == self.config.active:
            raise BadArguments(f"cluster {target!r} is already the active one")
        dry_run, reverse = _flag("dry_run", dry_run), _flag("reverse", reverse)
        if self._busy == "cutover" or (self._busy is not None and not dry_run):
            raise CutoverBusy(f"a {self._busy} is in progress" + (
                "; POST /v1/resume first" if self._busy == "pause" else ""))
        config, source = self.config, self.config.active
        specs = wiring.backend_specs(config, target)
        control = LogicalControl(wiring.backend_specs(config, source)[0], specs[0], specs[1:],
                                 wiring.control_endpoint(config, source),
                                 wiring.logical_options(config, source, target, reverse=reverse))
        cutover = Cutover(source, target, self.process.dataplane, control,
                          wiring.cutover_settings(config, target, timeout_s=timeout_s, dry_run=dry_run), on_event,
                          warm_up=lambda: self.process.warm_up(target))
        if not dry_run:
            self._busy = "cutover"
        return self.process.spawn(self._run_cutover(cutover))

    async def _run_cutover(self, cutover: Cutover) -> dict:
        process = self.process
        try:
            result = await cutover.run()
        finally:
            if not cutover.settings.dry_run:
                self._busy = None
                if process.config.active != cutover.target:
                    await process.drop_warm_up()
        if not cutover.settings.dry_run:
            process.metrics.cutovers.labels(result=result.result.value).inc()
            summary = result.to_dict()
            self.last_cutover = {k: summary[k] for k in ("target", "result", "seconds", "pause_seconds", "error")}
            self.last_cutover["at"] = time.time()
        if result.pause_seconds is not None:
            process.metrics.cutover_pause_seconds.observe(result.pause_seconds)
        if process.config.active == cutover.target:
            await self._migration_cut_over(cutover.source, cutover.target, cutover.control,
                                           dropped=any(s.step == "finish" and s.outcome == "ok"
                                                       for s in result.steps))
        return result.to_dict()

    # --- online migration (pgsplit migrate; /v1/migrate/*) ------------------------------------------
    #
    # A migration goes from the active cluster's primary to the primary of cluster `target`
    # (ops.migrate, over the [monitor] account); its publication, subscription and slots
    # are named after the target (`wiring.migration_name`). A started one is watched: lag,
    # copy states and schema drift every `migration.watch_interval_s`, into the metrics.

    async def migrate_plan(self, target: str) -> dict:
        """What `start` would do and what blocks it (ops.migrate.plan)."""
        m = await self._migration(target)
        # the primaries by the names the cutover's preflight gives them
        servers = (wiring.backend_specs(self.config, m["source"])[0].name,
                   wiring.backend_specs(self.config, m["target"])[0].name)
        plan = await plan_migration(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                                    servers=servers)
        return {**_migration_head(m), "plan": plan.to_dict(), "text": plan.render()}

    async def migrate_start(self, target: str) -> dict:
        """Copy the schema, start the publication and subscription (ops.migrate.copy.start;
        refused with the plan's blockers), then watch it. Idempotent: a migration that
        runs already is kept, and watched from now on."""
        m = await self._migration(target)
        lock = self._migration_locks.setdefault(target, asyncio.Lock())
        async with lock:
            report = await start_migration(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                                           source_conninfo=wiring.publisher_conninfo_of(self.config, m["source"]))
            log.info("migration %s -> %s started (%s): %s", m["source"], target, m["name"],
                     "; ".join(report.created) or "everything existed already")
            watch = self._watch_migration(m)
        try:
            st, drift = await watch.check()
            first = {"status": st.to_dict(), "drift": drift}
        except MigrateError as exc:
            first = {"error": str(exc)}
        return {**_migration_head(m), "start": report.to_dict(), **first,
                "watch_interval_s": watch.interval}

    async def migrate_status(self, target: str) -> dict:
        """Per table the copy state, the lag, rates and ETA (from the round before, when
        watched), and the schema drift, asked now."""
        finished = self.migrations_finished.get(self._cluster(target))
        if finished is not None and target == self.config.active:
            # the cutover ended it: the status is that, not "a migration goes from it"
            return {**finished, "text": finished_text(finished)}
        m = await self._migration(target)
        watch = self.migration_watches.get(target)
        if watch is not None and watch.source == m["src"] and watch.name == m["name"]:
            st, drift = await watch.check()
        else:
            st, drift = await asyncio.gather(
                migration_status(m["src"], m["tgt"], name=m["name"], databases=m["databases"]),
                schema_drift(m["src"], m["tgt"], databases=m["databases"]))
            watch = None
        return {**_migration_head(m), "status": st.to_dict(), "text": st.render(), "drift": drift,
                "watching": watch is not None, "watch_interval_s": self.config.migration.watch_interval_s}

    async def migrate_verify(self, target: str, tables: list[str] | None = None,
                             chunk_rows: int | None = None) -> dict:
        """Row counts and chunked checksums of every table on both sides
        (ops.migrate.verify); the differing tables and key ranges by name."""
        if tables is not None and (not isinstance(tables, list) or not all(isinstance(t, str) for t in tables)):
            raise BadArguments("tables must be a list of \"schema.table\" names")
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise BadArguments("chunk_rows must be a whole number >= 1")
        m = await self._migration(target)
        report = await verify_migration(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                                      tables=tables, chunk_rows=chunk_rows or self.config.migration.verify_chunk_rows)
        log.info("migration %s -> %s: verify %s in %.1f s%s", m["source"], target,
                 "equal" if report.equal else "DIFFERENT", report.seconds,
                 "".join(f"; {line}" for line in report.differences[:20]))
        return {**_migration_head(m), "verify": report.to_dict(), "text": report.render()}

    def _cluster(self, target: Any) -> str:
        """`target` if it names a configured cluster."""
        if not isinstance(target, str) or target not in self.config.clusters:
            raise BadArguments(f"{target!r} is not a cluster (known: {', '.join(sorted(self.config.clusters))})")
        return target

    async def _migration(self, target: Any) -> dict:
        """The migration to `target` as the config says it."""
        config = self.config
        target = self._cluster(target)
        source = config.active
        if target == source:
            raise BadArguments(f"cluster {target!r} is the active one: a migration goes from it, not to it")
        src = wiring.control_endpoint(config, source)
        dbs = list(config.migration.databases) or await databases_of(src)
        if not dbs:
            raise MigrateError("source", f"cluster {source}",
                                       "has no database to migrate (set migration.databases)")
        return {"source": source, "target": target, "name": wiring.migration_name(target), "databases": dbs,
                "src": src, "tgt": wiring.control_endpoint(config, target)}

    def _watch_migration(self, m: dict) -> Watch:
        old = self.migration_watches.get(m["target"])
        if old is not None and old.source == m["src"] and old.name == m["name"] and old.running:
            return old
        if old is not None:
            self.process.spawn(old.stop())
        watch = Watch(m["src"], m["tgt"], name=m["name"], databases=m["databases"],
                      interval=self.config.migration.watch_interval_s,
                      label=f"{m['source']} -> {m['target']}", on_update=self._migration_metrics)
        self.migration_watches[m["target"]] = watch.start()
        self._migration_sources[m["target"]] = m["source"]
        return watch

    def _migration_metrics(self, _watch: Watch | None = None) -> None:
        """The metrics of every watched migration: the largest lag, tables per copy state,
        drift if any has some."""
        lag, states, drift = 0, {}, False
        for w in list(self.migration_watches.values()):
            if w.status is not None:
                lag = max(lag, w.status.lag_bytes)
                for state, n in w.status.state_counts().items():
                    states[state] = states.get(state, 0) + n
            drift = drift or bool(w.drift)
        self.process.metrics.set_migration(lag, states, drift)

    async def _migration_cut_over(self, source: str, target: str, control: LogicalControl, *,
                                  dropped: bool = True) -> None:
        """After a cutover to `target`: its migration is over (no longer watched); with a
        reverse replication, the migration back to `source` is watched instead."""
        # Noted before the first await: the client has the summary and may ask at once.
        if control.kind == "logical":
            self.migrations_finished[target] = {
                "source": source, "target": target, "name": wiring.migration_name(target),
                "databases": list(control.databases),
                "finished": {"at": time.time(), "reverse": control.logical.reverse, "dropped": dropped}}
        self.migrations_finished.pop(source, None)  # a migration back to it may start again
        watch = self.migration_watches.pop(target, None)
        if watch is not None:
            await watch.stop()
        if control.kind == "logical" and control.logical.reverse:
            try:
                m = await self._migration(source)
                self._watch_migration(m)
            except Exception as exc:  # noqa: BLE001  the cutover stands; status can still be asked
                log.warning("watching the reverse migration %s -> %s failed: %s", target, source, exc)
        self._migration_metrics()


def finished_text(finished: dict) -> str:
    """A finished migration's status line (pgsplit migrate status after the cutover)."""
    f = finished["finished"]
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f["at"]))
    text = (f"finished: the cutover to {finished['target']} ended it at {at} "
            + (f"(subscription {finished['name']} and its slots dropped)" if f["dropped"] else
               f"(but dropping subscription {finished['name']} failed: see the cutover's finish step)")
            + f"; {finished['target']} is the active cluster")
    if f["reverse"]:
        text += (f"; the reverse, {finished['target']} -> {finished['source']}: "
                 f"pgsplit migrate status {finished['source']}")
    return text


def _migration_head(m: dict) -> dict:
    return {k: m[k] for k in ("source", "target", "name", "databases")}


def _seconds(name: str, value: Any) -> float | None:
    # Python's JSON reads NaN, Infinity and 1e400 (inf) as floats: none is a timeout.
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise BadArguments(f"{name} must be a finite number of seconds > 0 (got {json.dumps(value, default=repr)})")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadArguments(f"{name} must be true or false")
    return value
