"""The `pgsplit` command: run, demo, status, cutover, check-config.

Owns: argument parsing, logging set-up, signals, and what a person reads on the terminal.
`status` talks to a running proxy's admin API (found from -c FILE or --admin URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config import Config, ConfigError, describe, load_config, parse_config

DEFAULT_ADMIN = "http://127.0.0.1:9930"
log = logging.getLogger("pgsplit")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def serve(config: Config, *, ready=None) -> None:
    """Run a proxy until SIGINT/SIGTERM."""
    from proxy.app import Proxy

    proxy = Proxy(config)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready(proxy)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await proxy.stop()


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import loop

    config = _load(args.config)
    if config is None:
        return 2
    setup_logging(args.log_level or config.log_level)
    loop.run(serve(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 2
    print(describe(config), end="")
    return 0


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def demo_config(cluster, port: int, admin_port: int) -> Config:
    """A config for the sandbox: its primary and replicas as cluster "sandbox"."""
    lines = [
        'active = "sandbox"',
        f'[listen]\nhost = "127.0.0.1"\nport = {port}',
        f'[admin]\nhost = "127.0.0.1"\nport = {admin_port}',
    ]
    for user, password in cluster.users.items():
        lines.append(f'[[users]]\nname = "{user}"\npassword = "{password}"')
    lines.append(f'[monitor]\nuser = "postgres"\npassword = "{cluster.superuser_password}"')
    for node in cluster.nodes:
        lines.append(f'[backends.{node.name}]\nhost = "{node.host}"\nport = {node.port}')
    replicas = ", ".join(f'"{r.name}"' for r in cluster.replicas)
    lines.append(f'[clusters.sandbox]\nprimary = "{cluster.primary.name}"\nreplicas = [{replicas}]')
    return parse_config("\n".join(lines) + "\n", source="<demo>")


def cmd_demo(args: argparse.Namespace) -> int:
    from loadtest.sandbox import Cluster
    from proxy import loop

    setup_logging(args.log_level)
    print(f"starting a sandbox: a primary and {args.replicas} streaming replicas ...", flush=True)
    with Cluster(args.replicas, name="demo") as cluster:
        if args.delay_ms and cluster.replicas:
            cluster.set_apply_delay(cluster.replicas[-1], args.delay_ms)
        config = demo_config(cluster, args.port, args.admin_port)
        user = next(iter(cluster.users))

        def ready(proxy) -> None:
            url = f"postgresql://{user}:{cluster.users[user]}@127.0.0.1:{proxy.port}/app"
            print()
            print("pgsplit is running in front of the sandbox:")
            for node in cluster.nodes:
                delay = f" (apply delay {args.delay_ms} ms)" if node is cluster.replicas[-1] and args.delay_ms else ""
                print(f"  {node.name:<10} 127.0.0.1:{node.port}{delay}")
            print(f"\n  connect:  psql '{url}'")
            print(f"  metrics:  http://127.0.0.1:{proxy.admin.port}/metrics")
            print(f"  status:   pgsplit status --admin http://127.0.0.1:{proxy.admin.port}")
            print("\nCtrl-C stops the proxy and the sandbox.", flush=True)

        loop.run(serve(config, ready=ready))
    return 0


def admin_url(args: argparse.Namespace) -> str:
    if getattr(args, "admin", None):
        return args.admin.rstrip("/")
    if getattr(args, "config", None):
        config = _load(args.config)
        if config is None:
            raise SystemExit(2)
        return f"http://{config.admin.host}:{config.admin.port}"
    return DEFAULT_ADMIN


def http_json(url: str, *, method: str = "GET", body: dict | None = None, token: str | None = None,
              timeout: float = 10.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise SystemExit(f"{url}: HTTP {exc.code} {detail}".rstrip())
    except urllib.error.URLError as exc:
        raise SystemExit(f"cannot reach the pgsplit admin API at {url}: {exc.reason}")


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}{unit}"
    return f"{value}{unit}"


def format_status(status: dict) -> str:
    lines = [
        f"cluster {status['cluster']}  generation {status['generation']}  pool {status['pool_mode']}"
        f"  primary {'writable' if status['primary_writable'] else 'NOT WRITABLE'}"
        + ("  SPLIT BRAIN" if status["split_brain"] else ""),
        "",
        f"{'backend':<12} {'role':<8} {'address':<22} {'up':<4} {'rotation':<9} {'lag bytes':>10} {'lag s':>7} {'load':>5} {'server conns':<20}",
    ]
    for b in status["backends"]:
        rotation = "-" if b["in_rotation"] is None else ("yes" if b["in_rotation"] else "NO")
        conns = " ".join(f"{k}={v}" for k, v in sorted(b["server_connections"].items())) or "-"
        lines.append(
            f"{b['name']:<12} {b['role']:<8} {b['host'] + ':' + str(b['port']):<22} {'yes' if b['up'] else 'NO':<4} "
            f"{rotation:<9} {_fmt(b['lag_bytes']):>10} {_fmt(b['lag_seconds']):>7} {b['load']:>5} {conns:<20}"
        )
        if b.get("error") and not b["up"]:
            lines.append(f"{'':<12} error: {b['error']}")
    clients = status["clients"]
    lines += ["", "clients: " + ", ".join(f"{k} {v}" for k, v in clients.items())]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = http_json(admin_url(args) + "/v1/status")
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def parse_duration(text: str) -> float:
    """"30s", "500ms", "2m" or a plain number of seconds -> seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    number, unit = text.strip(), "s"
    for suffix in ("ms", "s", "m"):
        if number.endswith(suffix):
            number, unit = number[: -len(suffix)], suffix
            break
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 30s, 500ms, 2m)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be > 0")
    return value


def format_event(event: dict) -> str:
    """One line (or a few) for an event of POST /v1/cutover."""
    from router.cutover import report_lines

    kind = event.get("event")
    if kind == "begin":
        return f"cutover {event['source']} -> {event['target']}" + (" (dry run)" if event["dry_run"] else "")
    if kind == "step" and event["phase"] == "start":
        return f"  {event['step']:<10} ..."
    if kind == "step":
        detail = event.get("detail") or {}
        line = f"  {event['step']:<10} {event['outcome']:<7} {event['seconds'] * 1000:9.1f} ms"
        if event["step"] == "preflight" and "source" in detail:
            return line + "\n" + "\n".join(f"      {text}" for text in report_lines(detail))
        return line + ("  " + ", ".join(f"{k}={v}" for k, v in detail.items()) if detail else "")
    if kind == "summary":
        pause = event.get("pause_seconds")
        caught = event.get("bytes_caught_up")
        lines = ["", f"result       {event['result']}"]
        if pause is not None:
            lines.append(f"pause        {pause * 1000:.1f} ms ({event.get('units_held', 0)} units held)")
        if caught is not None:
            lines.append(f"caught up    {caught} bytes")
        if event.get("seconds") is not None:
            lines.append(f"total        {event['seconds']:.3f} s")
        if event.get("error"):
            lines.append(f"error        {event['error']}")
        return "\n".join(lines)
    return json.dumps(event)


def cmd_cutover(args: argparse.Namespace) -> int:
    url = admin_url(args) + "/v1/cutover"
    token = os.environ.get("PGSPLIT_ADMIN_TOKEN")
    if getattr(args, "config", None) and not args.admin:
        config = _load(args.config)
        token = (config.admin.secret() if config is not None else None) or token
    body = {"target": args.name, "dry_run": args.dry_run}
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    summary = None
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            for line in resp:  # one event per line, printed as it arrives
                if not line.strip():
                    continue
                event = json.loads(line)
                if args.json:
                    print(json.dumps(event), flush=True)
                else:
                    print(format_event(event), flush=True)
                if event.get("event") == "summary":
                    summary = event
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except ValueError:
            detail = ""
        raise SystemExit(f"{url}: HTTP {exc.code} {detail}".rstrip())
    except urllib.error.URLError as exc:
        raise SystemExit(f"cannot reach the pgsplit admin API at {url}: {exc.reason}")
    if summary is None:
        print("the proxy ended the stream without a summary", file=sys.stderr)
        return 1
    ok = summary["result"] == "success" or (summary["result"] == "dry_run" and (summary.get("report") or {}).get("ok"))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgsplit",
        description="PostgreSQL proxy: writes to the primary, reads to replicas that have your writes, "
                    "lagging replicas out of rotation, atomic cutover to another cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the proxy", description="Run the proxy with a config file.")
    p.add_argument("-c", "--config", required=True, help="the TOML config file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="start a local sandbox cluster and the proxy in front of it",
                       description="Start a primary and streaming replicas on this machine (one with an "
                                   "artificial apply delay) and pgsplit in front of them; Ctrl-C stops all.")
    p.add_argument("--replicas", type=int, default=2, help="number of streaming replicas (default 2)")
    p.add_argument("--delay-ms", type=int, default=500, help="apply delay of the last replica (default 500)")
    p.add_argument("--port", type=int, default=6432, help="client port of the proxy (default 6432)")
    p.add_argument("--admin-port", type=int, default=9930, help="admin/metrics port (default 9930)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="show backends, roles, lag, rotation and connections",
                       description="Ask a running proxy's admin API for its status.")
    p.add_argument("-c", "--config", help="find the admin API from this config file")
    p.add_argument("--admin", help=f"admin API URL (default {DEFAULT_ADMIN})")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cutover", help="move traffic to another configured cluster, showing each step",
                       description="Run a cutover to cluster NAME on a running proxy (preflight, pause, fence, "
                                   "catch-up, promote, swap, resume; rollback on failure before the swap). The "
                                   "admin token comes from -c FILE or PGSPLIT_ADMIN_TOKEN. Exit status 0 on "
                                   "success (or a dry run without blockers), 1 otherwise.")
    p.add_argument("name", metavar="NAME", help="the target cluster ([clusters.NAME])")
    p.add_argument("--dry-run", action="store_true", help="run the preflight, print its report, change nothing")
    p.add_argument("--timeout", type=parse_duration, help="cap on how long clients may be held (e.g. 30s, 500ms)")
    p.add_argument("-c", "--config", help="find the admin API (and its token) from this config file")
    p.add_argument("--admin", help=f"admin API URL (default {DEFAULT_ADMIN})")
    p.add_argument("--json", action="store_true", help="print the raw events")
    p.set_defaults(func=cmd_cutover)

    p = sub.add_parser("check-config", help="validate a config file and print the effective config",
                       description="Validate a config file; print the effective config (secrets hidden).")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
