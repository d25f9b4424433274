"""`log_format = "json"`: `pgsplit run` as a process writes every log line as one JSON object,
and no secret of its config appears in them.

The proxy runs at log_level debug (the most lines) through its start, client sessions (one
that logs in, one with a wrong password), a reload (SIGHUP) and its stop (SIGTERM).
ProxyProcess writes the child's stdout and stderr to one file; `pgsplit run` prints nothing
on stdout, so every line there is a log line from stderr.
"""

from __future__ import annotations

import json
import signal
import time

import psycopg
import pytest

from loadtest.harness import ProxyProcess, config_text

ADMIN_TOKEN = "admin-token-never-logged"


def test_every_log_line_is_a_json_object_without_secrets(cluster) -> None:
    text = 'log_format = "json"\nlog_level = "debug"\n' + config_text(
        {"main": cluster}, sections={"admin": {"token": ADMIN_TOKEN}})
    proc = ProxyProcess(text).start()
    try:
        dsn = f"postgresql://app:{cluster.users['app']}@127.0.0.1:{proc.port}/app?sslmode=disable"
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT 1").fetchone()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn.replace(cluster.users["app"], "wrong-password"), connect_timeout=10)
        proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        assert proc.stop() == 0
    log = proc.log()

    lines = [json.loads(line) for line in log.splitlines()]  # any other line fails here
    assert all(isinstance(line, dict) for line in lines)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    messages = [line["message"] for line in lines]
    assert any(m.startswith("pgsplit listening on") for m in messages)
    assert any(m.startswith("config reloaded") for m in messages)
    assert "shutting down" in messages
    assert any(line["level"] == "DEBUG" for line in lines)

    for secret in (*cluster.users.values(), cluster.superuser_password, ADMIN_TOKEN):
        assert secret not in log
