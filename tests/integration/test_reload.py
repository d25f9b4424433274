"""Reloading the config of a running proxy: what changes live, what is refused, and that
nothing in flight is dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psycopg
import pytest

from helpers import wait_until
from loadtest.harness import ProxyProcess, config_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def _dsn(proc: ProxyProcess, user: str, password: str) -> str:
    return f"postgresql://{user}:{password}@127.0.0.1:{proc.port}/app?sslmode=disable"


@pytest.fixture
def running(cluster):
    proc = ProxyProcess(config_text({"main": cluster})).start()
    yield proc
    proc.stop()


def _rewrite(proc: ProxyProcess, old: str, new: str) -> None:
    text = proc.config_path.read_text()
    assert old in text, old
    proc.config_path.write_text(text.replace(old, new, 1))


def test_password_change_applies_to_new_logins_and_keeps_open_sessions(running, cluster) -> None:
    keep = psycopg.connect(_dsn(running, "app", "app-secret"), autocommit=True)
    try:
        cluster.sql(cluster.primary, "ALTER ROLE app PASSWORD 'app-secret-2'")
        _rewrite(running, 'password = "app-secret"', 'password = "app-secret-2"')
        out = _cli("reload", "--admin", f"http://127.0.0.1:{running.admin_port}")
        assert out.returncode == 0, out.stderr
        assert "users" in out.stdout
        # The open session goes on; a new login needs the new password.
        assert keep.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(_dsn(running, "app", "app-secret-2")) as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "app"'):
            psycopg.connect(_dsn(running, "app", "app-secret"))
    finally:
        keep.close()
        cluster.sql(cluster.primary, "ALTER ROLE app PASSWORD 'app-secret'")


def test_sighup_reloads_and_an_invalid_file_changes_nothing(running, cluster) -> None:
    # An invalid file: refused with the key named, the old config stays in force.
    running.config_path.write_text(running.config_path.read_text() + "\n[routing]\nmax_lag_bytes = -1\n")
    out = _cli("reload", "--admin", f"http://127.0.0.1:{running.admin_port}")
    assert out.returncode != 0
    assert "routing.max_lag_bytes" in out.stderr + out.stdout
    with psycopg.connect(_dsn(running, "app", "app-secret")) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    # A valid change by SIGHUP: the lag limit moves, with a new topology generation.
    text = running.config_path.read_text().replace("max_lag_bytes = -1", "max_lag_bytes = 12345")
    running.config_path.write_text(text)
    before = json.loads(_cli("status", "--json", "--admin", f"http://127.0.0.1:{running.admin_port}").stdout)
    os.kill(running.proc.pid, signal.SIGHUP)
    wait_until(lambda: "config reloaded" in running.log(), timeout=10, message="the reload log line")
    after = json.loads(_cli("status", "--json", "--admin", f"http://127.0.0.1:{running.admin_port}").stdout)
    assert after["generation"] == before["generation"] + 1
    with psycopg.connect(_dsn(running, "app", "app-secret")) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_reload_refuses_another_active_cluster_and_reports_restart_only_keys(running) -> None:
    text = running.config_path.read_text()
    running.config_path.write_text(text.replace('active = "main"', 'active = "other"', 1)
                                   + '\n[clusters.other]\nprimary = "main_primary"\n')
    out = _cli("reload", "--admin", f"http://127.0.0.1:{running.admin_port}")
    assert out.returncode != 0
    assert "pgsplit cutover other" in out.stderr + out.stdout
    running.config_path.write_text(text.replace("[listen]", "[listen]\nmax_client_connections = 77", 1))
    out = _cli("reload", "--admin", f"http://127.0.0.1:{running.admin_port}")
    assert out.returncode == 0, out.stderr
    assert "needs a restart to take effect: listen" in out.stdout
