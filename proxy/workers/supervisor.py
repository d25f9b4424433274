"""`pgsplit run --workers N`: one supervisor process and N workers on one client port.

Owns: starting the workers (each binds the client port with SO_REUSEPORT; the kernel
spreads new connections over them), restarting one that dies (the others' clients are
not touched), and being the one proxy an operator sees: the monitor (one per host, its
snapshots pushed to every worker), the admin API and /metrics (every worker's counters
added up, a dead worker's kept), reload, and the data plane as the cutover and PAUSE
drive it (`WorkersDataPlane`: hold, drain, swap and release reach every worker, and a
worker that cannot take the swap is killed rather than left on the old primary).
The supervisor serves no client itself: its `Proxy` runs without a listener.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from metrics import counters_only, merge_snapshots
from proxy.app import Proxy
from proxy.config import Config
from proxy.dataplane import DrainReport, DrainTimeout
from proxy.workers.channel import Channel, ChannelClosed, RemoteError
from router.topology import Topology

log = logging.getLogger("pgsplit")

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (holds proxy/)

START_TIMEOUT_S = 30.0  # a worker's start: its process, its hello, its listener
REPORT_INTERVAL_S = 1.0  # how often the workers' counters and figures are collected
REPORT_TIMEOUT_S = 2.0
STUCK_S = 12.0  # a worker that has answered no report for this long is stuck: killed, restarted
SWAP_TIMEOUT_S = 10.0  # a worker that has not taken the swap by then is killed
STOP_TIMEOUT_S = 10.0
RESTART_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # a worker that keeps dying is restarted more slowly


@dataclass
class WorkerHandle:
    index: int
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    pid: int | None = None
    ready: bool = False  # said hello: gets every broadcast from then on
    restarts: int = 0
    started_at: float = 0.0
    report: dict = field(default_factory=dict)  # its last worker_report()
    answered_at: float = 0.0  # (monotonic) its last report: a worker silent for STUCK_S is killed
    retired: bool = False  # its counters moved to the retired sum (once per process)

    @property
    def live(self) -> bool:
        return self.ready and self.channel is not None and self.channel.is_open


def cpu_count() -> int:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Supervisor:
    def __init__(self, config: Config, count: int, *, config_path: str | None, log_level: str):
        self.count = count
        self.log_level = log_level
        self.proxy = Proxy(config, config_path=config_path)
        self.proxy.workers = self
        self.proxy.dataplane = WorkersDataPlane(self)
        self.workers = [WorkerHandle(i) for i in range(count)]
        self.retired: list = []  # counters of workers that died or were replaced, added to /metrics
        self._reservation: list[socket.socket] = []
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self.port = config.listen.port

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.proxy.config
        self._reservation = _reserve_port(config.listen.host, config.listen.port)
        self.port = self._reservation[0].getsockname()[1]
        self.proxy.client_port = self.port
        await self.proxy.start(clients=False, admin=False)  # (the monitor's first round: workers start with it)
        self.proxy.topology.listeners.append(self._push_topology)
        started = await asyncio.gather(*(self._start_worker(w) for w in self.workers), return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise RuntimeError(f"a worker did not start: {failed[0]}")
        for w in self.workers:
            self._spawn(self._supervise(w))
        self._spawn(self._collect_reports())
        await self.proxy.start_admin()  # (once every worker listens: ready means ready)
        log.info("pgsplit supervisor (pid %d): %d workers on port %d, admin on %s:%d", os.getpid(), self.count,
                 self.port, self.proxy.config.admin.host, self.proxy.admin.port)

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._stop_worker(w) for w in self.workers), return_exceptions=True)
        await self.proxy.stop()
        for sock in self._reservation:
            sock.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_worker(self, w: WorkerHandle) -> None:
        """Start worker `w` and wait until it listens (its first report says so)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w.ready, w.report, w.answered_at = False, {}, time.monotonic()
        w.channel = Channel(parent, self._handlers(w), name=f"worker {w.index}")
        try:
            await w.channel.start()
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()  # (a reload's)
            # -P and the path of this installation: the worker runs the code the supervisor
            # runs, never a `proxy` package in the current directory
            env = dict(os.environ)
            if _PACKAGE_ROOT not in {os.path.abspath(p) for p in sys.path if p}:  # (a checkout run from its directory)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), _PACKAGE_ROOT]))
            w.process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "proxy.workers.worker", "--index", str(w.index), "--port", str(self.port),
                "--fd", str(child.fileno()), "--log-level", level, "--log-format", self.proxy.config.log_format,
                "--parent-pid", str(os.getpid()),
                pass_fds=(child.fileno(),), env=env)
        finally:
            child.close()
        w.pid, w.started_at, w.retired = w.process.pid, time.time(), False
        deadline = time.monotonic() + START_TIMEOUT_S
        while not w.report.get("listening"):
            if w.process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {w.index} (pid {w.pid}) did not start within {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.05)
            if w.live:
                await self._ask_report(w)

    async def _supervise(self, w: WorkerHandle) -> None:
        """Keep worker `w` running: when its process ends (or could not be started), start
        it again, sooner if it had run a while, more slowly if it keeps dying."""
        while not self._stopping:
            process = w.process
            code = await process.wait() if process is not None else None
            self._retire(w)
            if self._stopping:
                return
            log.error("worker %d (pid %s) exited with %s; starting it again", w.index, w.pid, code)
            ran_a_while = time.time() - w.started_at > 60
            delay = RESTART_DELAYS_S[0 if ran_a_while else min(w.restarts, len(RESTART_DELAYS_S) - 1)]
            w.restarts += 1
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._start_worker(w)
            except Exception as exc:  # noqa: BLE001  (tried again, more slowly)
                log.error("worker %d did not start again: %s", w.index, exc)
                if w.process is not None and w.process.returncode is None:
                    w.process.kill()

    def _retire(self, w: WorkerHandle) -> None:
        """A worker ended or is being killed: its counters stay in /metrics (as last
        collected), its gauges go. Once per process: a late report of it is dropped."""
        w.ready = False
        if w.retired:
            return
        w.retired = True
        if w.channel is not None:
            self._spawn(w.channel.aclose())
        if w.report.get("metrics"):
            self.retired = merge_snapshots(self.retired, [counters_only(w.report["metrics"])])
        w.report = {}

    async def _stop_worker(self, w: WorkerHandle) -> None:
        process = w.process
        if process is None or process.returncode is not None:
            return
        if w.live:
            await self._ask_report(w)  # (its last counters)
            w.channel.notify("stop")
        else:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    def kill(self, w: WorkerHandle, why: str) -> None:
        """SIGKILL: a worker that did not take a swap or stopped answering. Its counters
        move to the retired sum now (a scrape before it is reaped must not miss them)."""
        if w.process is not None and w.process.returncode is None:
            log.error("killing worker %d (pid %s): %s", w.index, w.pid, why)
            w.process.kill()
        self._retire(w)

    # --- what workers ask ----------------------------------------------------------------------

    def _handlers(self, w: WorkerHandle) -> dict:
        return {
            "hello": lambda index, pid: self._hello(w, pid),
            "mark_down": self.proxy.monitor.mark_down,
            "check": self.proxy.monitor.check,
            "cancel": self._cancel,
            "admin": self._admin,
        }

    def _hello(self, w: WorkerHandle, pid: int) -> dict:
        w.ready = True  # (from this answer on, every broadcast reaches it, in order)
        return {"config": self.proxy.config, "config_path": self.proxy.config_path,
                "topology": self.proxy.topology.current, "holding": self.proxy.dataplane.holding}

    async def _cancel(self, process_id: int, secret_key: bytes) -> bool:
        """Pass a CancelRequest on to the worker whose number the key carries."""
        index = process_id & 0xFF
        if index >= len(self.workers) or not self.workers[index].live:
            log.info("cancel request for a worker that is not running ignored")
            return False
        log.info("cancel request for a session of worker %d passed on", index)
        return await self.workers[index].channel.request("cancel", process_id, secret_key, timeout=7)

    async def _admin(self, op: str, args: tuple):
        """The admin console's PAUSE, RESUME and RELOAD, asked by the worker the console
        client is on. In a task of the process: the asking worker dying (its channel's
        handlers are cancelled) must not cut a reload or a pause in half."""
        ops = self.proxy.admin_ops
        operation = {"pause": ops.pause, "resume": ops.resume, "reload": ops.reload}[op]

        async def outcome():
            try:
                return await operation(*args), None
            except (ValueError, TimeoutError) as exc:  # a refusal: the asker's error, not a failure here
                return None, exc

        result, refused = await asyncio.shield(self.proxy.spawn(outcome()))
        if refused is not None:
            raise refused
        return result

    # --- what the supervisor sends -------------------------------------------------------------

    def live(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.live]

    def _push_topology(self, topo: Topology) -> None:
        for w in self.live():
            w.channel.notify("topology", topo)

    async def broadcast(self, op: str, *args, timeout: float) -> list:
        """Ask every live worker; a worker that went away meanwhile answers None."""
        asked = [(w, w.channel) for w in self.live()]
        results = await asyncio.gather(*(channel.request(op, *args, timeout=timeout) for _, channel in asked),
                                       return_exceptions=True)
        out = []
        for (w, channel), r in zip(asked, results):
            if isinstance(r, ChannelClosed) or w.channel is not channel:
                r = None  # (gone, or replaced by a new process meanwhile: not the one asked)
            out.append((w, r))
        return out

    async def reconfigure(self, config: Config) -> None:
        for w, r in await self.broadcast("reconfigure", config, timeout=SWAP_TIMEOUT_S):
            if isinstance(r, BaseException):
                self.kill(w, f"it did not take the reloaded config: {r}")  # (restarted with it)

    async def warm_up(self, target: str) -> dict:
        total = {"server_connections": 0, "pools": 0}
        for _, r in await self.broadcast("warm_up", target, timeout=60):
            if isinstance(r, BaseException):
                raise r if not isinstance(r, RemoteError) else ValueError(str(r))
            if r:
                total["server_connections"] += r["server_connections"]
                total["pools"] += r["pools"]
        return total

    async def drop_warm_up(self) -> None:
        await self.broadcast("drop_warm_up", timeout=30)

    # --- figures ---------------------------------------------------------------------------------

    def _admin_state(self) -> dict:
        """What a worker's admin console shows of the supervisor (sent with each report request)."""
        ops = self.proxy.admin_ops
        return {"cutover_state": ops.cutover_state(), "migrations": ops.migrations(), "status": self.proxy.status()}

    async def _ask_report(self, w: WorkerHandle, state: dict | None = None) -> None:
        channel = w.channel
        state = state if state is not None else self._admin_state()
        try:
            report = await channel.request("report", state, timeout=REPORT_TIMEOUT_S)
        except (ChannelClosed, TimeoutError, RemoteError) as exc:
            silent = time.monotonic() - w.answered_at
            if w.channel is channel and w.live and isinstance(exc, TimeoutError):
                log.warning("worker %d (pid %s) has not reported for %.0f s", w.index, w.pid, silent)
                if silent >= STUCK_S:  # (by time: however many scrapes asked meanwhile)
                    self.kill(w, f"it did not answer for {silent:.0f} s")
            return
        if w.channel is channel and w.live:  # (not a report of a worker retired meanwhile)
            w.report, w.answered_at = report, time.monotonic()

    async def refresh(self) -> None:
        """Fresh figures from every worker (a scrape, a status)."""
        state = self._admin_state()
        await asyncio.gather(*(self._ask_report(w, state) for w in self.live()))

    async def _collect_reports(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            await self.refresh()

    def metrics_snapshots(self) -> list:
        """Every worker's last counters, also of one that just died and is not retired yet
        (a scrape then must not miss them), and the retired sum."""
        return [w.report["metrics"] for w in self.workers if not w.retired and w.report.get("metrics")] + [self.retired]

    def status(self) -> dict:
        """The workers' part of `pgsplit status`."""
        return {"count": self.count, "port": self.port, "workers": [
            {"index": w.index, "pid": w.pid, "up": w.live, "restarts": w.restarts,
             "clients": sum(w.report.get("clients", {}).values())} for w in self.workers]}

    def reports(self) -> list[dict]:
        return [w.report for w in self.live() if w.report]


class WorkersDataPlane:
    """proxy.dataplane.DataPlane's interface, carried out by every worker: what the
    cutover (ops.cutover) and PAUSE drive. hold and release are sent in order with
    everything else on each channel; drain waits for every worker; the swap installs
    the supervisor's new snapshot in each (a worker that cannot is killed: it must not
    route a unit to the old set, and its restart starts on the new one)."""

    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self.holding = False
        self.held: set = set()  # (sessions live in the workers)
        self.paused_at: float | None = None
        self._held_at_swap = 0  # the units the workers held, as their swaps answered

    @property
    def held_units(self) -> int:
        """Units held by the current or last pause: what the workers said at the swap or
        last reported, whichever is more (RESUME asks them again after the release)."""
        reported = sum(report.get("held_units", 0) for report in self.supervisor.reports())
        return max(reported, self._held_at_swap)

    def hold(self) -> None:
        self.holding = True
        self.paused_at = time.monotonic()
        self._held_at_swap = 0
        for w in self.supervisor.live():
            w.channel.notify("hold")

    def census(self) -> tuple[int, int]:
        in_flight = idle_tx = 0
        for report in self.supervisor.reports():
            a, b = report.get("census", (0, 0))
            in_flight += a
            idle_tx += b
        return in_flight, idle_tx

    async def drain(self, timeout: float, *, cancel_idle_in_transaction: bool = False) -> DrainReport:
        t0 = time.monotonic()
        results = await self.supervisor.broadcast("drain", timeout, cancel_idle_in_transaction, timeout=timeout + 5)
        waited = cancelled = in_flight = idle_tx = 0
        failures = []
        for w, r in results:
            if r is None:
                continue  # died meanwhile: its restart starts held
            if isinstance(r, BaseException):
                failures.append(f"worker {w.index}: {r}")
            elif r[0] == "timeout":
                failures.append(f"worker {w.index}: {r[1]}")
                in_flight += r[2]
                idle_tx += r[3]
            else:
                waited += r[2]
                cancelled += r[3]
        if failures:
            raise DrainTimeout("; ".join(failures), in_flight, idle_tx)
        return DrainReport(time.monotonic() - t0, waited, cancelled)

    async def install(self, cluster: str) -> Topology:
        topology = await self.supervisor.proxy.switch_cluster(cluster)
        for w, r in await self.supervisor.broadcast("install", cluster, topology, timeout=SWAP_TIMEOUT_S):
            if isinstance(r, BaseException):
                self.supervisor.kill(w, f"it did not take the swap to cluster {cluster!r}: {r}")
            elif isinstance(r, int):
                self._held_at_swap += r
        return topology

    def release(self) -> float:
        self.holding = False
        for w in self.supervisor.live():
            w.channel.notify("release")
        paused = time.monotonic() - self.paused_at if self.paused_at is not None else 0.0
        self.paused_at = None
        return paused


def _reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (not listen) the port the workers then listen on with SO_REUSEPORT, on every
    address `host` names (as the listener binds them): the kernel gives connections only
    to listening sockets, and the port stays ours while workers restart (port 0: the one
    the kernel picks for the first address). First a bind without SO_REUSEPORT: a port in
    use (another pgsplit of the same user would otherwise share it silently, and a cutover
    of one would not hold the other) fails as it does for one process."""
    addresses = list(dict.fromkeys(
        (family, sockaddr[:2]) for family, _, _, _, sockaddr in
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    if port != 0:
        for family, address in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is not in use)
                probe.bind(address)  # OSError EADDRINUSE: taken
    reserved: list[socket.socket] = []
    try:
        for family, (addr, _) in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            reserved.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # (as asyncio's listener)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((addr, port))
            port = sock.getsockname()[1]
    except OSError:
        for sock in reserved:
            sock.close()
        raise
    return reserved


async def serve(config: Config, count: int, *, config_path: str | None, log_level: str) -> None:
    """Run a supervisor and its workers until SIGINT/SIGTERM; SIGHUP reloads all of them."""
    supervisor = Supervisor(config, count, config_path=config_path, log_level=log_level)
    await supervisor.start()
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        running.add_signal_handler(sig, stop.set)
    running.add_signal_handler(signal.SIGHUP, lambda: supervisor.proxy.spawn(supervisor.proxy.admin_ops.reload()))
    try:
        await stop.wait()
    finally:
        log.info("shutting down %d workers", count)
        await supervisor.stop()
