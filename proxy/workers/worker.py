"""One worker process of `pgsplit run --workers N`: a proxy that serves clients on the
shared port, led by the supervisor over its control channel.

Owns: the worker's side of the channel: the supervisor's config and topology at start,
and the operations the supervisor sends (snapshots, hold, drain, swap, release, reload,
warm-up, a cancel for a session of this worker, its counters and figures). A worker
whose channel ends (the supervisor is gone) stops: no worker outlives its supervisor.
Started as `python -m proxy.workers.worker` by proxy.workers.supervisor, never by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

from proxy import loop
from proxy.app import Proxy
from proxy.dataplane import DrainTimeout
from proxy.logs import WorkerField, formatter
from proxy.workers.channel import Channel
from proxy.workers.follower import FollowerMonitor
from proxy.workers.link import WorkerLink

log = logging.getLogger("pgsplit")

HELLO_TIMEOUT_S = 10.0
CANCEL_WAIT_S = 5.0  # a cancel passed on is answered once its server has taken it
STOP_TIMEOUT_S = 15.0  # then the worker exits anyway


class Worker:
    def __init__(self, index: int, port: int, sock: socket.socket):
        self.index, self.port = index, port
        self.proxy: Proxy | None = None
        self.stopped = asyncio.Event()
        self.channel = Channel(sock, self._handlers(), name="supervisor")

    def _handlers(self) -> dict:
        return {
            "topology": self._topology, "hold": self._hold, "drain": self._drain, "release": self._release,
            "install": self._install, "reconfigure": self._reconfigure, "warm_up": self._warm_up,
            "drop_warm_up": self._drop_warm_up, "cancel": self._cancel, "report": self._report,
            "stop": self._stop,
        }

    async def run(self) -> None:
        await self.channel.start()
        hello = await self.channel.request("hello", self.index, os.getpid(), timeout=HELLO_TIMEOUT_S)
        link = WorkerLink(self.index, self.port, self.channel)
        proxy = self.proxy = Proxy(hello["config"], config_path=hello["config_path"], worker=link)
        assert isinstance(proxy.monitor, FollowerMonitor)
        proxy.monitor.install_pushed(hello["topology"])
        if hello["holding"]:  # started during a pause or a cutover: held like the others
            proxy.dataplane.hold()
        await proxy.start()
        log.info("worker %d (pid %d) serving on port %d", self.index, os.getpid(), self.port)
        closed = asyncio.ensure_future(self.channel.closed.wait())
        stopped = asyncio.ensure_future(self.stopped.wait())
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (closed, stopped):
            task.cancel()
        if self.channel.closed.is_set() and not self.stopped.is_set():
            log.warning("worker %d: the supervisor is gone; stopping", self.index)
        # The stop is bounded even where the loop is not: sessions told, then the process exits.
        deadline = threading.Timer(STOP_TIMEOUT_S, _exit_now, (self.index,))
        deadline.daemon = True
        deadline.start()
        await proxy.stop()
        await self.channel.aclose()

    # --- what the supervisor sends -----------------------------------------------------------

    def _topology(self, topo) -> None:
        if self.proxy is not None:
            self.proxy.monitor.install_pushed(topo)

    def _hold(self) -> None:
        self.proxy.dataplane.hold()

    async def _drain(self, timeout: float, cancel_idle_in_transaction: bool) -> tuple:
        try:
            report = await self.proxy.dataplane.drain(timeout, cancel_idle_in_transaction=cancel_idle_in_transaction)
        except DrainTimeout as exc:
            return ("timeout", str(exc), exc.in_flight, exc.idle_in_transaction)
        return ("ok", report.seconds, report.waited_for_units, report.cancelled_transactions)

    def _release(self) -> int:
        dataplane = self.proxy.dataplane
        held = dataplane.held_units
        dataplane.release()
        return held

    async def _install(self, cluster: str, topo) -> int:
        self.proxy.monitor.expect(topo)
        await self.proxy.dataplane.install(cluster)
        return self.proxy.dataplane.held_units

    async def _reconfigure(self, config) -> int:
        if config.log_level != self.proxy.config.log_level:  # (as the supervisor's reload does)
            logging.getLogger().setLevel(config.log_level.upper())
        return await self.proxy.reconfigure(config)

    async def _warm_up(self, target: str) -> dict:
        return await self.proxy.warm_up(target)

    async def _drop_warm_up(self) -> None:
        await self.proxy.drop_warm_up()

    async def _cancel(self, process_id: int, secret_key: bytes) -> bool:
        """A cancel another worker received. Answered once the server has taken it, as the
        listener answers its own: the client's cancel connection closes only then."""
        task = self.proxy.cancel(process_id, secret_key)
        if task is None:
            return False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), CANCEL_WAIT_S)
        return True

    def _report(self, admin_state: dict) -> dict:
        if self.proxy is None:
            return {}
        self.proxy.worker.admin_state = admin_state
        return self.proxy.worker_report()

    def _stop(self) -> None:
        self.stopped.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgsplit-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(args.log_format, args.index))
    handler.addFilter(WorkerField(args.index))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    sock = socket.socket(fileno=args.fd)
    _die_with_parent(args.parent_pid)

    async def serve() -> None:
        worker = Worker(args.index, args.port, sock)
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, worker.stopped.set)
        running.add_signal_handler(signal.SIGHUP, lambda: None)  # (the supervisor reloads every worker)
        await worker.run()

    loop.run(serve())
    return 0


def _die_with_parent(parent_pid: int) -> None:
    """Stop when the supervisor dies, also where this worker's loop is stuck: SIGTERM from
    the kernel (Linux), and a thread that exits the process if the parent is gone for
    longer than a stop may take. (The end of the control channel stops a working loop
    first.) The parent is known by its pid: it may itself be pid 1, in a container."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        time.sleep(STOP_TIMEOUT_S)
        _exit_now(-1)

    threading.Thread(target=watch, name="pgsplit-orphan-watch", daemon=True).start()


def _exit_now(index: int) -> None:
    log.error("worker %s did not stop within %g s; exiting", index, STOP_TIMEOUT_S)
    logging.shutdown()
    os._exit(1)


PR_SET_PDEATHSIG = 1


if __name__ == "__main__":
    sys.exit(main())
