"""`pgsplit demo`: a sandbox cluster with pgsplit in front of it, for a person to try.

Lives with the sandbox tooling rather than in proxy/cli.py: it builds clusters and their
config, which the proxy itself never needs; the CLI only dispatches here.
"""

from __future__ import annotations

import argparse
import contextlib

from loadtest.sandbox import Cluster, find_bindir
from proxy import loop
from proxy.cli import serve, setup_logging
from proxy.config import Config, parse_config


def demo_config(cluster, port: int, admin_port: int, next_cluster=None) -> Config:
    """A config for the sandbox: its primary and replicas as cluster "sandbox" (its first
    user an admin of the console); with `next_cluster` (`pgsplit demo --migrate`), its
    primary as cluster "next" (backend "next"), the target of `pgsplit migrate ... next`
    and `pgsplit cutover next`."""
    lines = [
        'active = "sandbox"',
        f'[listen]\nhost = "127.0.0.1"\nport = {port}',
        f'[admin]\nhost = "127.0.0.1"\nport = {admin_port}\nconsole_users = ["{next(iter(cluster.users))}"]',
    ]
    for user, password in cluster.users.items():
        lines.append(f'[[users]]\nname = "{user}"\npassword = "{password}"')
    lines.append(f'[monitor]\nuser = "postgres"\npassword = "{cluster.superuser_password}"')
    for node in cluster.nodes:
        lines.append(f'[backends.{node.name}]\nhost = "{node.host}"\nport = {node.port}')
    replicas = ", ".join(f'"{r.name}"' for r in cluster.replicas)
    lines.append(f'[clusters.sandbox]\nprimary = "{cluster.primary.name}"\nreplicas = [{replicas}]')
    if next_cluster is not None:
        node = next_cluster.primary
        lines.append(f'[backends.next]\nhost = "{node.host}"\nport = {node.port}')
        lines.append('[clusters.next]\nprimary = "next"')
        lines.append('[migration]\ndatabases = ["app"]\nwatch_interval_s = 2.0')
    return parse_config("\n".join(lines) + "\n", source="<demo>")


DEMO_TABLE = """
CREATE TABLE IF NOT EXISTS demo_items (id bigserial PRIMARY KEY, name text NOT NULL,
                                       created timestamptz NOT NULL DEFAULT now());
INSERT INTO demo_items (name) SELECT 'item ' || g FROM generate_series(1, 10000) g
"""


def run_demo(args: argparse.Namespace) -> int:
    """`pgsplit demo`: a sandbox cluster (and with --migrate a PostgreSQL 18 primary), pgsplit
    in front of it, and what to type next; Ctrl-C stops it all."""
    setup_logging(args.log_level)
    print(f"starting a sandbox: a primary and {args.replicas} streaming replicas ...", flush=True)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster(args.replicas, name="demo"))
        if args.delay_ms and cluster.replicas:
            cluster.set_apply_delay(cluster.replicas[-1], args.delay_ms)
        target = None
        if args.migrate:
            bindir = find_bindir(18)
            print(f"starting a PostgreSQL 18 primary as cluster \"next\" ({bindir}) ...", flush=True)
            target = stack.enter_context(Cluster(0, name="demo-next", bindir=bindir))
            for statement in DEMO_TABLE.split(";"):
                if statement.strip():
                    cluster.sql(cluster.primary, statement, user=next(iter(cluster.users)), dbname="app")
        config = demo_config(cluster, args.port, args.admin_port, target)
        user = next(iter(cluster.users))

        def ready(proxy) -> None:
            url = f"postgresql://{user}:{cluster.users[user]}@127.0.0.1:{proxy.port}/app"
            admin = f"--admin http://127.0.0.1:{proxy.admin.port}"
            print()
            print("pgsplit is running in front of the sandbox:")
            for node in cluster.nodes:
                delay = f" (apply delay {args.delay_ms} ms)" if node is cluster.replicas[-1] and args.delay_ms else ""
                print(f"  {node.name:<10} 127.0.0.1:{node.port}{delay}")
            if target is not None:
                print(f"  {'next':<10} 127.0.0.1:{target.primary.port} (PostgreSQL {target.major_version}, "
                      "cluster \"next\": the migration's target)")
            print(f"\n  connect:  psql '{url}'")
            print(f"  console:  psql '{url.rsplit('/', 1)[0]}/pgsplit' -c 'SHOW HELP'")
            print(f"  metrics:  http://127.0.0.1:{proxy.admin.port}/metrics")
            print(f"  status:   pgsplit status {admin}")
            if target is not None:
                print("\n  migrate to PostgreSQL 18 (table demo_items has 10,000 rows), one step at a time:")
                for step in ("migrate plan next", "migrate start next", "migrate status next",
                             "migrate verify next", "cutover next --dry-run", "cutover next"):
                    print(f"            pgsplit {step} {admin}")
            print("\nCtrl-C stops the proxy and the sandbox.", flush=True)

        loop.run(serve(config, ready=ready))
    return 0
