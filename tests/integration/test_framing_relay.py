"""loadtest.framing_relay as a child process in front of the sandbox primary: real clients
log in and run through it, and one side closing closes the other."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Iterator

import psycopg
import pytest

from helpers import wait_until
from loadtest.framing_relay import RelayProcess
from loadtest.harness import free_port

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def relay(cluster) -> Iterator[RelayProcess]:
    with RelayProcess("127.0.0.1", cluster.primary.port) as r:
        yield r


def _env(port: int, sslmode: str = "disable") -> dict[str, str]:
    return {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "app",
            "PGPASSWORD": "app-secret", "PGDATABASE": "app", "PGSSLMODE": sslmode}


def test_psql_logs_in_and_queries_through_the_relay(relay):
    # sslmode=prefer sends an SSLRequest first: the relay answers 'N', psql goes on in clear
    out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c",
                          "SELECT 6 * 7, current_user"], env=_env(relay.port, "prefer"),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42|app"
    req = subprocess.run(["psql", "-X", "-c", "SELECT 1"], env=_env(relay.port, "require"),
                         capture_output=True, text=True, timeout=30)
    assert req.returncode != 0
    assert "does not support SSL" in req.stderr, req.stderr


def test_pgbench_select_only_through_the_relay(relay):
    env = _env(relay.port)
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q"], env=env, capture_output=True,
                          text=True, timeout=120)  # COPY through the relay too
    assert init.returncode == 0, init.stderr
    clients, per_client = 4, 200
    for mode in ("simple", "extended", "prepared"):
        run = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "2",
                              "-t", str(per_client)], env=env, capture_output=True, text=True,
                             timeout=90)
        assert run.returncode == 0, (mode, run.stdout, run.stderr)
        total = clients * per_client
        assert f"number of transactions actually processed: {total}/{total}" in run.stdout, run.stdout
    assert relay.proc.poll() is None, relay.log()


def test_a_client_closing_closes_its_server_connection(relay, cluster):
    conn = psycopg.connect(host="127.0.0.1", port=relay.port, user="app", password="app-secret",
                           dbname="app", sslmode="disable", application_name="framing-relay-close",
                           connect_timeout=10)
    count = ("SELECT count(*) FROM pg_stat_activity "
             "WHERE application_name = 'framing-relay-close'")
    assert cluster.sql(cluster.primary, count) == [(1,)]
    conn.close()
    wait_until(lambda: cluster.sql(cluster.primary, count) == [(0,)], timeout=10)


def test_a_server_that_cannot_be_reached_closes_the_client():
    dead = free_port()  # nobody listens there
    with RelayProcess("127.0.0.1", dead) as r, socket.create_connection(("127.0.0.1", r.port),
                                                                         timeout=10) as s:
        s.sendall(struct.pack("!II", 8, 196608))
        assert s.recv(100) == b""  # closed, not left hanging
