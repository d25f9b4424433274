"""The cutover: move the proxy's traffic from the active backend set to another one, with no
client error and no lost acknowledged write (design.md, "Cutover").

Owns: the state machine (`Cutover`), its steps' order, timing, events and rollback
decisions, and the two protocols it drives: `DataPlane` (the proxy hands in its own) and
`Control`, the database side (physical.py's `PhysicalControl`, logical.py's
`LogicalControl`: the control connections that fence the source, read its final LSN,
wait for the target and promote it). The preflight report is preflight.py's.
Must not know: sessions, pools, the config file, SQL. Settings arrive as
`CutoverSettings`; ops/ never imports proxy/.

Order of operations (each step is logged and timed; an event goes out at its start and end):

1. preflight: both primaries reachable, versions compared, schema fingerprints compared
   (ops.schema), the target's replication from the source found and its lag measured.
   Anything that would make the cutover fail or lose data is a blocker: nothing changes.
   A dry run stops here.
   warm-up (if the data plane offers one): server connections to the target are opened
   now, while clients still run, so the held units do not all log in at once after the
   swap (a hot standby's sessions survive its promotion and then take writes). A target
   that refuses the application's logins is refused here, before anything changed.
2. pause: the data plane holds new units; units in flight finish; sessions idle in a
   transaction get `pause_timeout_s` (then the cutover rolls back, or they are cancelled).
3. fence: the source refuses writes from everyone (default_transaction_read_only on,
   reloaded) and every other client backend that could write is terminated and gone, so
   no other proxy or direct client writes to it any more.
4. catch-up: the source's WAL position after the fence is final; the target (and its own
   standbys) must have replayed it (physical) within `catchup_timeout_s`. A logical
   subscriber (ops.migrate) must have applied it; then its sequences are moved past
   the source's, its subscription disabled, the reverse replication created if asked,
   and a target fenced by an earlier cutover unfenced (`LogicalControl.catch_up_logical`).
5. promote: a physical standby is promoted and confirmed out of recovery (a logical
   target is a primary already: skipped).
6. swap: the data plane installs the target's backend set (one assignment, generation + 1):
   connections to the old set retired, LSN tokens reset, session state replayed later.
7. resume: held units run on the new primary.
8. finish (logical targets), clients running meanwhile: the disabled forward
   subscription, its slot and publication dropped, the reverse subscription created on
   the old primary (on the slot the catch-up made); a failure is reported, not rolled back.

Any failure before the swap rolls back: undo what a logical catch-up changed (enable the
subscription, drop the reverse, fence the target again), unfence the source (if the fence
had begun) and release the held units, which run on the source again. The fence comes before the
promotion and the swap after it, so at no moment are there two writable primaries behind
the proxy: while the target is promoted and the source fenced, every unit is held.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from ops.cutover.preflight import PreflightFacts, build_report
from router.pg import error_text

__all__ = [
    "Control",
    "Cutover",
    "CutoverBusy",
    "CutoverError",
    "CutoverResult",
    "CutoverSettings",
    "CutoverStep",
    "DataPlane",
    "Result",
    "StepRecord",
]

log = logging.getLogger("pgsplit.cutover")


class CutoverStep(enum.Enum):
    PREFLIGHT = "preflight"
    WARM_UP = "warm-up"
    PAUSE = "pause"
    FENCE = "fence"
    CATCH_UP = "catch-up"
    PROMOTE = "promote"
    SWAP = "swap"
    RESUME = "resume"
    FINISH = "finish"  # logical targets: drop the old subscription, after the resume
    ROLLBACK = "rollback"


class Result(enum.Enum):
    SUCCESS = "success"  # traffic runs on the target
    DRY_RUN = "dry_run"  # preflight only, no blockers; nothing changed
    REFUSED = "refused"  # preflight found blockers (a dry run too); nothing changed
    ROLLED_BACK = "rolled_back"  # a step before the swap failed; traffic runs on the source again
    FAILED = "failed"  # the swap or the rollback itself failed: an operator must look


class CutoverError(Exception):
    """A step could not be done; the message is for the operator."""


class CutoverBusy(ValueError):
    """Another cutover (or a manual pause) is in progress."""


class DataPlane(Protocol):
    """What the cutover needs from the proxy's data plane (proxy.dataplane.DataPlane)."""

    held_units: int

    def hold(self) -> None: ...

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> Any: ...

    async def install(self, cluster_name: str) -> Any: ...

    def release(self) -> float: ...

    def census(self) -> tuple[int, int]: ...

@dataclass(frozen=True, slots=True)
class CutoverSettings:
    pause_timeout_s: float = 10.0
    catchup_timeout_s: float = 30.0
    cancel_idle_in_transaction: bool = False  # cutover.idle_in_transaction = "cancel"
    promote_timeout_s: float = 60.0
    fence_timeout_s: float = 10.0  # for terminated backends to exit
    max_lag_bytes: int = 16 * 1024 * 1024  # preflight: a target further behind is a blocker
    timeout_s: float | None = None  # cap on pause .. promote together (the units' wait)
    dry_run: bool = False


class Control(Protocol):
    """The database operations the state machine runs (PhysicalControl, LogicalControl;
    fakes in unit tests). A physical target has nothing to finish: its `finish` is not
    called."""

    async def preflight(self) -> PreflightFacts: ...

    async def fence(self, timeout: float) -> dict[str, Any]: ...

    async def unfence(self) -> dict[str, Any]: ...

    async def final_lsn(self, timeout: float) -> int: ...

    async def catch_up(self, kind: str, lsn: int, timeout: float) -> dict[str, Any]: ...

    async def promote(self, timeout: float) -> dict[str, Any]: ...

    async def target_in_recovery(self) -> bool | None: ...

    async def finish(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass
class StepRecord:
    step: str
    outcome: str  # "ok" | "failed" | "skipped"
    seconds: float
    detail: dict[str, Any]


@dataclass
class CutoverResult:
    result: Result
    source: str
    target: str
    steps: list[StepRecord] = field(default_factory=list)
    report: dict[str, Any] | None = None
    error: str | None = None
    pause_seconds: float | None = None  # None: no unit was ever held
    units_held: int = 0
    bytes_caught_up: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"event": "summary", "result": self.result.value, "source": self.source, "target": self.target,
                "seconds": round(self.seconds, 4),
                "pause_seconds": None if self.pause_seconds is None else round(self.pause_seconds, 4),
                "units_held": self.units_held, "bytes_caught_up": self.bytes_caught_up, "error": self.error,
                "steps": [{**asdict(s), "detail": _short(s)} for s in self.steps], "report": self.report}


def _short(record: StepRecord) -> dict[str, Any]:
    """A step's detail for logs and the summary: the preflight's is the whole report (sent
    once, in its own event and as the summary's `report`), so only its verdict here."""
    d = record.detail
    if record.step == CutoverStep.PREFLIGHT.value and "blockers" in d:
        return {"ok": d["ok"], "blockers": len(d["blockers"]), "warnings": len(d["warnings"])}
    return d


class _StepFailed(Exception):
    def __init__(self, step: CutoverStep, cause: BaseException):
        super().__init__(f"{step.value}: {error_text(cause)}")
        self.step = step
        self.cause = cause


class Cutover:
    """One run of the state machine (see the module docstring for the order). `run()`
    never raises for a failed step: the outcome is in the result, and every step's
    start and end went to `on_event` as a dict."""

    def __init__(self, source_cluster: str, target_cluster: str, dataplane: DataPlane, control: Control,
                 settings: CutoverSettings, on_event: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 warm_up: Callable[[], Awaitable[dict[str, Any]]] | None = None):
        self.source = source_cluster
        self.target = target_cluster
        self.dataplane = dataplane
        self.control = control
        self.settings = settings
        self.on_event = on_event
        self.clock = clock
        self.warm_up = warm_up
        self.result = CutoverResult(Result.FAILED, source_cluster, target_cluster)
        self.holding = False  # units are held: release them whatever happens
        self.fence_begun = False  # the source may be read-only: unfence on rollback
        self.swapped = False
        self._deadline: float | None = None

    def _emit(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001  a broken listener must not break a cutover
                log.exception("cutover event listener failed")

    def _budget(self, step: CutoverStep, timeout: float) -> float:
        if self._deadline is None:
            return timeout
        left = self._deadline - self.clock()
        if left <= 0:
            raise CutoverError(f"the cutover's timeout ({self.settings.timeout_s:g}s) ran out before {step.value}")
        return min(timeout, left)

    async def _step(self, step: CutoverStep, action: Callable[[], Any]) -> dict[str, Any]:
        self._emit({"event": "step", "step": step.value, "phase": "start"})
        t0 = self.clock()
        try:
            detail = await action()
        except (Exception, asyncio.CancelledError) as exc:
            seconds = self.clock() - t0
            detail = {"error": error_text(exc)}
            self._record(step, "failed", seconds, detail)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _StepFailed(step, exc) from exc
        detail = detail or {}
        outcome = detail.pop("outcome", "ok")
        self._record(step, outcome, self.clock() - t0, detail)
        return detail

    def _record(self, step: CutoverStep, outcome: str, seconds: float, detail: dict[str, Any]) -> None:
        record = StepRecord(step.value, outcome, round(seconds, 4), detail)
        self.result.steps.append(record)
        self._emit({"event": "step", "step": step.value, "phase": "end", "outcome": outcome,
                    "seconds": round(seconds, 4), "detail": detail})
        level = logging.INFO if outcome != "failed" else logging.WARNING
        log.log(level, "cutover %s -> %s: %s %s in %.1f ms: %s", self.source, self.target, step.value, outcome,
                seconds * 1000, ", ".join(f"{k}={v}" for k, v in _short(record).items()))
        if step is CutoverStep.PREFLIGHT and "blockers" in detail:
            for line in detail["blockers"]:
                log.warning("cutover %s -> %s: preflight blocker: %s", self.source, self.target, line)
            for line in detail["warnings"]:
                log.info("cutover %s -> %s: preflight warning: %s", self.source, self.target, line)

    async def run(self) -> CutoverResult:
        t0 = self.clock()
        self._emit({"event": "begin", "source": self.source, "target": self.target,
                    "dry_run": self.settings.dry_run})
        try:
            await self._run()
        except _StepFailed as exc:
            self.result.error = str(exc)
            if self.swapped:
                self.result.result = Result.FAILED
            elif self.holding or self.fence_begun:
                await self._rollback()
            else:
                self.result.result = Result.REFUSED
        except asyncio.CancelledError:
            if not self.swapped and (self.holding or self.fence_begun):
                self.result.error = "the cutover was cancelled"
                await asyncio.shield(self._rollback())
            raise
        finally:
            if self.holding:  # never leave clients waiting, whatever went wrong
                self._release()
            self.result.seconds = self.clock() - t0
            r = self.result
            log.log(logging.INFO if r.result in (Result.SUCCESS, Result.DRY_RUN) else logging.WARNING,
                    "cutover %s -> %s: %s in %.3f s%s%s", self.source, self.target, r.result.value, r.seconds,
                    "" if r.pause_seconds is None else f", units held {r.pause_seconds * 1000:.0f} ms "
                                                       f"({r.units_held} units)",
                    f": {r.error}" if r.error else "")
            try:
                await self.control.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the cutover's control connections failed")
            self._emit(self.result.to_dict())
        return self.result

    async def _run(self) -> None:
        s = self.settings
        report = await self._step(CutoverStep.PREFLIGHT, self._preflight)
        self.result.report = report
        # A dry run that finds blockers is refused too: that is its answer.
        if not report["ok"]:
            self.result.result = Result.REFUSED
            self.result.error = "preflight: " + "; ".join(report["blockers"])
            return
        if s.dry_run:
            self.result.result = Result.DRY_RUN
            return
        kind = report["replication"]["kind"]
        if self.warm_up is not None:
            await self._step(CutoverStep.WARM_UP, self.warm_up)
        if s.timeout_s is not None:
            self._deadline = self.clock() + s.timeout_s
        await self._step(CutoverStep.PAUSE, self._pause)
        await self._step(CutoverStep.FENCE, self._fence)
        caught = await self._step(CutoverStep.CATCH_UP, lambda: self._catch_up(kind))
        self.result.bytes_caught_up = caught.get("bytes")
        try:
            await self._step(CutoverStep.PROMOTE, lambda: self._promote(kind))
        except _StepFailed:
            # A promotion that finished late is still a promotion: the target has every
            # write (the catch-up said so), so going on is right; rolling back would leave
            # it a diverged primary for nothing. Otherwise roll back.
            if await self.control.target_in_recovery() is not False:
                raise
            log.warning("cutover %s -> %s: the target left recovery after all; going on", self.source, self.target)
        # Point of no return: the target is a primary. From here a failure is not rolled
        # back (unfencing the source would make two writable primaries).
        self.swapped = True
        await self._step(CutoverStep.SWAP, self._swap)
        await self._step(CutoverStep.RESUME, self._resume)
        self.result.result = Result.SUCCESS
        if kind == "logical":
            # Clients run on the target: a failure here is named, the cutover stands.
            try:
                await self._step(CutoverStep.FINISH, self.control.finish)
            except _StepFailed as exc:
                log.warning("cutover %s -> %s: the old subscription was not dropped (%s); drop it on the "
                            "target, and its slot on the source, by hand", self.source, self.target, exc)

    async def _preflight(self) -> dict[str, Any]:
        facts = await self.control.preflight()
        report = build_report(facts, max_lag_bytes=self.settings.max_lag_bytes)
        d = report.to_dict()
        if not report.ok:
            d["outcome"] = "failed"  # (taken out by _step: the report itself has no outcome)
        return d

    async def _pause(self) -> dict[str, Any]:
        in_flight, idle_tx = self.dataplane.census()
        timeout = self._budget(CutoverStep.PAUSE, self.settings.pause_timeout_s)
        self.holding = True
        self.dataplane.hold()
        try:
            drained = await self.dataplane.drain(timeout, cancel_idle_in_transaction=self.settings.cancel_idle_in_transaction)
        except TimeoutError as exc:
            hint = "" if self.settings.cancel_idle_in_transaction else (
                " (cutover.idle_in_transaction = \"cancel\" rolls such transactions back instead)")
            raise CutoverError(f"{exc}{hint}") from exc
        return {"in_flight": in_flight, "idle_in_transaction": idle_tx,
                "drain_seconds": round(drained.seconds, 4), "waited_for_units": drained.waited_for_units,
                "cancelled_transactions": drained.cancelled_transactions}

    async def _fence(self) -> dict[str, Any]:
        timeout = self._budget(CutoverStep.FENCE, self.settings.fence_timeout_s)
        self.fence_begun = True
        return await self.control.fence(timeout)

    async def _catch_up(self, kind: str) -> dict[str, Any]:
        end = self.clock() + self._budget(CutoverStep.CATCH_UP, self.settings.catchup_timeout_s)
        final = await self.control.final_lsn(max(0.0, end - self.clock()))
        return await self.control.catch_up(kind, final, max(0.0, end - self.clock()))

    async def _promote(self, kind: str) -> dict[str, Any]:
        if kind != "physical":
            return {"outcome": "skipped", "reason": f"a {kind} target is a primary already"}
        return await self.control.promote(self._budget(CutoverStep.PROMOTE, self.settings.promote_timeout_s))

    async def _swap(self) -> dict[str, Any]:
        topology = await self.dataplane.install(self.target)
        return {"cluster": self.target, "generation": getattr(topology, "generation", None)}

    def _release(self) -> float:
        paused = self.dataplane.release()
        self.holding = False
        self.result.pause_seconds = paused
        self.result.units_held = self.dataplane.held_units
        return paused

    async def _resume(self) -> dict[str, Any]:
        paused = self._release()
        return {"pause_seconds": round(paused, 4), "units_held": self.result.units_held}

    async def _rollback(self) -> None:
        async def undo() -> dict[str, Any]:
            detail: dict[str, Any] = {"unfenced": False}
            try:
                if self.fence_begun:
                    await self.control.unfence()
                    detail["unfenced"] = True
            finally:
                if self.holding:  # released even if unfencing failed: clients must not hang
                    detail["pause_seconds"] = round(self._release(), 4)
                    detail["units_held"] = self.result.units_held
            return detail

        try:
            await self._step(CutoverStep.ROLLBACK, undo)
            self.result.result = Result.ROLLED_BACK
        except _StepFailed as exc:
            self.result.result = Result.FAILED
            self.result.error = f"{self.result.error}; then the rollback failed: {exc} (the source may still be " \
                                "read-only: ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf())"
