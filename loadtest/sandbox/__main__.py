"""``python -m loadtest.sandbox up``: a sandbox cluster that runs until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from loadtest.sandbox.cluster import Cluster


def _cli_up(args: argparse.Namespace) -> int:
    stop_event = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(args.replicas, name=args.name, base_dir=args.base_dir,
                      bindir=args.bindir, keep=args.keep)
    print(f"starting sandbox cluster {args.name!r} ({cluster.bindir}) ...", flush=True)
    try:
        cluster.start()
        if args.delay_ms and cluster.replicas:
            cluster.set_apply_delay(cluster.replicas[-1], args.delay_ms)
        print(f"ready in {cluster.startup_seconds:.2f}s; base dir {cluster.base_dir}")
        for n in cluster.nodes:
            extra = ""
            if n.role == "replica" and args.delay_ms and n is cluster.replicas[-1]:
                extra = f"  (recovery_min_apply_delay={args.delay_ms}ms)"
            print(f"  {n.name:<10} {n.role:<8} port {n.port}  log {n.logfile}{extra}")
            print(f"      superuser: {n.dsn('postgres')}")
            for user in cluster.users:
                print(f"      {user}: {n.dsn(user, dbname='app')}")
        print("Ctrl-C (or SIGTERM) stops everything.", flush=True)
        while not stop_event.wait(1.0):
            down = [n.name for n in cluster.nodes if not n.is_running()]
            if down and not args.quiet:
                print(f"warning: not running: {', '.join(down)}", file=sys.stderr, flush=True)
    finally:
        print("stopping ...", flush=True)
        cluster.stop()
        if cluster.keep:
            print(f"kept {cluster.base_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sandbox",
                                     description="Local PostgreSQL sandbox clusters.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a primary and streaming replicas, wait for Ctrl-C")
    up.add_argument("--replicas", type=int, default=2)
    up.add_argument("--delay-ms", type=int, default=0,
                    help="recovery_min_apply_delay for the last replica")
    up.add_argument("--base-dir", default=None, help="directory for the nodes (default: temp)")
    up.add_argument("--bindir", default=None, help="PostgreSQL bin directory")
    up.add_argument("--name", default="main")
    up.add_argument("--keep", action="store_true", help="keep the data directories")
    up.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "up":
        return _cli_up(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
