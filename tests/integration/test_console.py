"""The admin console over the PostgreSQL protocol (`psql -p PORT -U app pgsplit`), against
the sandbox cluster with real clients: psql, psycopg 3 (simple queries), asyncpg (which
uses the extended protocol and must get a clear error, not a hang) and the raw client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request

import asyncpg
import psycopg
import pytest

from helpers import run_leaving_loop_on_failure as _run, wait_until
from loadtest.harness import NodeSet, ProxyThread, config_text
from loadtest.sandbox import Cluster
from proxy.admin.show import CUTOVER_COLUMNS
from proxy.session.client import CONSOLE_INBOX_MAX
from rawclient import RawClient, ServerError, error_fields, message, query_message

APP_PASSWORD = "app-secret"
MD5_PASSWORD = "md5-secret"
CONSOLE = {"console_users": ["app"]}


@pytest.fixture
def proxy(make_proxy):
    return make_proxy(admin=CONSOLE)


def psql(proxy, sql: str, user: str = "app", password: str = APP_PASSWORD, database: str = "pgsplit"):
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(["psql", "-X", "-A", "-t", "-F", "|", "-h", "127.0.0.1", "-p", str(proxy.port),
                           "-U", user, "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
                          capture_output=True, text=True, env=env, timeout=60)


def console(proxy) -> psycopg.Connection:
    # prepare_threshold=None: psycopg would prepare a query run 5 times (the extended protocol)
    return psycopg.connect(proxy.dsn("app", dbname="pgsplit"), autocommit=True, prepare_threshold=None)


def rows(conn: psycopg.Connection, sql: str) -> list[dict]:
    cur = conn.execute(sql)
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]



def test_psql_gets_every_show_command_and_help_lists_them(proxy) -> None:
    out = psql(proxy, "SHOW HELP")
    assert out.returncode == 0, out.stderr
    listed = [line.split("|")[0] for line in out.stdout.splitlines() if line]
    for command in ("SHOW POOLS", "SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS", "SHOW DATABASES", "SHOW CONFIG",
                    "SHOW VERSION", "SHOW BACKENDS", "SHOW CONSISTENCY", "SHOW CUTOVER", "SHOW MIGRATION",
                    "PAUSE", "RESUME", "RELOAD"):
        assert command in listed
        if command.startswith("SHOW"):
            # case-insensitive, spaces and a trailing semicolon are fine
            shown = psql(proxy, "  " + command.lower().replace(" ", "   ") + " ; ")
            assert shown.returncode == 0, (command, shown.stderr)
    assert psql(proxy, "show version").stdout.startswith("pgsplit ")
    backends = [line.split("|") for line in psql(proxy, "SHOW BACKENDS").stdout.splitlines()]
    assert [(b[0], b[1], b[4]) for b in backends] == [
        ("main_primary", "primary", "1"), ("main_replica1", "replica", "1"), ("main_replica2", "replica", "1")]
    cutover = psql(proxy, "SHOW CUTOVER").stdout.strip().split("|")
    generation = proxy.call(lambda: proxy.proxy.topology.current.generation)
    # active "main" at the topology's generation, nothing in progress
    assert cutover[:4] == ["main", str(generation), "main", ""]

    # several commands in one Query: each answered, up to an error
    both = psql(proxy, "SHOW VERSION; SHOW CONSISTENCY").stdout.splitlines()
    assert both[0].startswith("pgsplit ") and both[1] == "session|50|0|0|0"
    bad = psql(proxy, "SHOW VERSION; SHOW NONSENSE; SHOW STATS")
    assert bad.returncode != 0
    assert 'unknown admin console command "SHOW NONSENSE"' in bad.stderr
    assert "HINT:  commands: SHOW HELP, SHOW CLIENTS" in bad.stderr


def test_unknown_command_is_42601_and_the_session_goes_on(proxy) -> None:
    with console(proxy) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as info:
            conn.execute("DROP TABLE users")
        assert "SHOW POOLS" in info.value.diag.message_hint
        assert rows(conn, "SHOW VERSION")[0]["version"].startswith("pgsplit ")


def _login_attempt(proxy, user: str, password: str, database: str = "pgsplit") -> tuple[list[int], dict]:
    """(the authentication requests the proxy made, the FATAL it then sent)."""
    with RawClient("127.0.0.1", proxy.port) as client:
        with pytest.raises(ServerError) as info:
            client.login(user, password, database)
        return client.auth_codes, info.value.fields


def test_a_non_admin_is_refused_only_after_the_password(proxy) -> None:
    codes, fields = _login_attempt(proxy, "app_md5", MD5_PASSWORD)
    assert codes == [10, 11, 12], "the refusal came before the password was checked"
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"] == ('user "app_md5" may not use the pgsplit admin console (database "pgsplit"): '
                           "it is not in [admin] console_users")
    out = psql(proxy, "SHOW POOLS", user="app_md5", password=MD5_PASSWORD)
    assert out.returncode != 0 and "not in [admin] console_users" in out.stderr
    # a wrong password of an admin is refused as any login is
    assert psql(proxy, "SHOW POOLS", password="wrong").returncode != 0


def test_who_is_an_admin_is_not_told_to_a_client_without_the_password(proxy) -> None:
    """An admin, a non-admin and an unknown name, each with a wrong password: the same
    exchange and the same error, but for the name."""
    seen = []
    for user in ("app", "app_md5", "nosuchuser"):
        codes, fields = _login_attempt(proxy, user, "not-the-password")
        seen.append((codes, fields["S"], fields["C"], fields["M"].replace(user, "USER")))
    assert seen[0] == seen[1] == seen[2], seen
    assert seen[0][:3] == ([10, 11], "FATAL", "28P01")


def test_access_rules_refuse_the_console_as_any_database_before_the_password(cluster) -> None:
    text = config_text({"main": cluster}, sections={"admin": CONSOLE}) + (
        '\n[[access]]\naddresses = ["127.0.0.1/32"]\naction = "reject"\n')
    proxy = ProxyThread(text).start()
    try:
        seen = []
        for user, password in (("app", APP_PASSWORD), ("app_md5", MD5_PASSWORD), ("nosuchuser", "x")):
            codes, fields = _login_attempt(proxy, user, password)
            seen.append((codes, fields["C"], fields["M"].replace(user, "USER")))
        assert seen[0] == seen[1] == seen[2] and seen[0][:2] == ([], "28000"), seen
    finally:
        proxy.stop()


def test_without_console_users_the_console_database_is_a_backend_database(make_proxy) -> None:
    proxy = make_proxy()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn("app", dbname="pgsplit"), connect_timeout=10).close()
    # the backend answered: no database of that name in the sandbox
    assert 'database "pgsplit" does not exist' in str(info.value)
    assert "console" not in str(info.value)


def test_an_admin_taken_out_of_console_users_by_a_reload_loses_the_console(proxy, tmp_path) -> None:
    path = tmp_path / "pgsplit.toml"
    path.write_text(proxy.text.replace('console_users = ["app"]', 'console_users = ["app_md5"]'))
    proxy.call(lambda: setattr(proxy.proxy, "config_path", str(path)))
    with RawClient("127.0.0.1", proxy.port) as client, RawClient("127.0.0.1", proxy.port) as other:
        client.login("app", APP_PASSWORD, "pgsplit")
        other.login("app", APP_PASSWORD, "pgsplit")
        reloaded = client.query("RELOAD")
        assert reloaded.tags == ["RELOAD"] and not reloaded.errors
        for c in (client, other):
            c.send(query_message("SHOW VERSION"))
            fields = c.read_fatal_or_eof()
            assert fields is not None and (fields["S"], fields["C"]) == ("FATAL", "28000"), fields
            assert "may no longer use the pgsplit admin console" in fields["M"]
    assert psql(proxy, "SHOW VERSION", user="app_md5", password=MD5_PASSWORD).returncode == 0


def test_show_clients_lists_a_second_client_and_pools_follow_its_transaction(proxy) -> None:
    with console(proxy) as admin, psycopg.connect(proxy.dsn("app", application_name="second")) as app:
        # opens a transaction (psycopg's implicit BEGIN), held on a server connection
        server_pid = app.execute("SELECT pg_backend_pid()").fetchone()[0]
        clients = rows(admin, "SHOW CLIENTS")
        mine = [c for c in clients if c["database"] == "app"]
        assert len(mine) == 1
        c = mine[0]
        assert (c["type"], c["user"], c["state"], c["application_name"], c["addr"]) == (
            "C", "app", "active", "second", "127.0.0.1")
        assert int(c["port"]) > 0 and c["local_port"] == str(proxy.port)
        assert c["id"] == str(app.info.backend_pid)  # the id the client was given (its cancel key's)
        assert c["backend"] is not None and c["server_pid"] == str(server_pid)
        assert c["connect_time"].endswith(" UTC")
        me = [c for c in clients if c["database"] == "pgsplit"]
        assert len(me) == 1 and me[0]["state"] == "active"

        pools = rows(admin, "SHOW POOLS")
        held = [p for p in pools if p["database"] == "app" and p["user"] == "app" and p["backend"] == c["backend"]]
        assert len(held) == 1
        assert (held[0]["cl_active"], held[0]["sv_active"], held[0]["pool_mode"]) == ("1", "1", "transaction")
        servers = [s for s in rows(admin, "SHOW SERVERS") if s["remote_pid"] == str(server_pid)]
        assert len(servers) == 1 and servers[0]["state"] == "active" and servers[0]["client_id"] == c["id"]

        app.commit()  # the transaction ends: the connection goes back to its pool
        after = [p for p in rows(admin, "SHOW POOLS") if p["database"] == "app" and p["backend"] == c["backend"]]
        assert (after[0]["cl_active"], after[0]["sv_active"]) == ("0", "0")
        assert int(after[0]["sv_idle"]) >= 1
        assert [c["state"] for c in rows(admin, "SHOW CLIENTS") if c["database"] == "app"] == ["idle"]
        stats = {s["database"]: s for s in rows(admin, "SHOW STATS")}
        assert int(stats["app"]["total_xact_count"]) >= 1 and int(stats["app"]["total_query_count"]) >= 2
        assert "pgsplit" not in stats  # the console's commands are no units of work
        dbs = {d["name"]: d for d in rows(admin, "SHOW DATABASES")}
        assert dbs["app"]["current_client_connections"] == "1" and dbs["pgsplit"]["pool_size"] is None
    # the console reached no backend: no pool of its database
    assert proxy.call(lambda: {pool.database for pool in proxy.proxy.pools}) == {"app"}


def test_show_config_masks_every_secret(proxy) -> None:
    out = psql(proxy, "SHOW CONFIG")
    assert out.returncode == 0, out.stderr
    assert APP_PASSWORD not in out.stdout and MD5_PASSWORD not in out.stdout
    assert proxy.config.monitor.secret() not in out.stdout
    config = dict(line.split("|", 1) for line in out.stdout.splitlines() if line)
    assert config["users.0.password"].startswith("********")
    assert config["monitor.password"].startswith("********")
    assert config["admin.console_users"] == '["app"]|1'  # (value, changeable by RELOAD)
    assert config["listen.port"].endswith("|0")


def test_pause_holds_a_real_query_until_resume(proxy) -> None:
    done: list[float] = []

    def client() -> None:
        with psycopg.connect(proxy.dsn("app"), autocommit=True) as conn:
            conn.execute("SELECT 1")
            done.append(time.monotonic())

    with console(proxy) as admin:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="traffic is not paused"):
            admin.execute("RESUME")
        admin.execute("PAUSE")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="a pause is in progress"):
            admin.execute("PAUSE")
        assert rows(admin, "SHOW CUTOVER")[0]["in_progress"] == "pause"
        assert {d["name"]: d["paused"] for d in rows(admin, "SHOW DATABASES")}["pgsplit"] == "1"
        thread = threading.Thread(target=client)
        thread.start()
        wait_until(lambda: any(c["state"] == "waiting" for c in rows(admin, "SHOW CLIENTS")), timeout=10)
        time.sleep(0.3)
        assert not done, "a query ran while traffic was paused"
        resumed_at = time.monotonic()
        admin.execute("RESUME")
        thread.join(10)
        assert done and done[0] >= resumed_at
        assert rows(admin, "SHOW CUTOVER")[0]["in_progress"] is None

        # one pause for both doors: the HTTP API's pause is the console's, and the other way round
        assert _post(proxy, "/v1/pause")["paused"] is True
        assert rows(admin, "SHOW CUTOVER")[0]["in_progress"] == "pause"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="a pause is in progress"):
            admin.execute("PAUSE")
        assert admin.execute("RESUME").statusmessage == "RESUME"
        admin.execute("PAUSE")
        assert _post(proxy, "/v1/resume")["resumed"] is True
        assert rows(admin, "SHOW CUTOVER")[0]["in_progress"] is None


def _post(proxy, path: str) -> dict:
    request = urllib.request.Request(proxy.admin_url + path, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_refused_reload_is_55000_and_a_good_one_says_reload(proxy, tmp_path) -> None:
    with console(proxy) as admin:
        # this proxy was started without a file: the operation's own refusal
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="without a config file"):
            admin.execute("RELOAD")
        path = tmp_path / "pgsplit.toml"
        path.write_text(proxy.text.replace('console_users = ["app"]', 'console_users = ["app", "app_md5"]'))
        proxy.call(lambda: setattr(proxy.proxy, "config_path", str(path)))
        cur = admin.execute("RELOAD")
        assert cur.statusmessage == "RELOAD"
    # the reloaded console_users are in force at the next login
    out = psql(proxy, "SHOW VERSION", user="app_md5", password=MD5_PASSWORD)
    assert out.returncode == 0, out.stderr


def test_asyncpg_gets_a_clear_error_for_the_extended_protocol_and_the_session_resyncs(proxy) -> None:
    async def go():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", password=APP_PASSWORD,
                                     database="pgsplit", ssl=False, timeout=10)
        try:
            with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError) as info:
                await asyncio.wait_for(conn.fetch("SHOW POOLS"), 10)
            assert "simple queries only" in str(info.value)
            # a plain execute() is a simple Query: it works on the same session
            assert await asyncio.wait_for(conn.execute("SHOW VERSION"), 10) == "SHOW"
        finally:
            await conn.close()

    _run(go())


def test_raw_protocol_resync_terminate_and_the_slot_is_released(proxy) -> None:
    before = proxy.call(lambda: len(proxy.proxy.sessions))
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        assert proxy.call(lambda: len(proxy.proxy.sessions)) == before + 1
        # Parse/Bind/Execute/Sync: one error, the rest dropped, ReadyForQuery at Sync
        client.send(message(b"P", b"\0SHOW POOLS\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
                    + message(b"E", b"\0\0\0\0\0") + message(b"S"))
        kinds = []
        while True:
            kind, body = client.read_message()
            kinds.append(kind)
            if kind == "Z":
                break
        assert kinds == ["E", "Z"]
        result = client.query("SHOW VERSION")
        assert result.rows[0][0].startswith("pgsplit ")
        # an empty query: EmptyQueryResponse and ReadyForQuery, no error
        assert [kind for kind, _ in _answer_messages(client, query_message("  ;  "))] == ["I", "Z"]
        client.send(message(b"X"))
        assert client.is_closed()
    wait_until(lambda: proxy.call(lambda: len(proxy.proxy.sessions)) == before, timeout=5)


def test_a_console_client_that_leaves_mid_session_frees_its_slot(make_proxy) -> None:
    proxy = make_proxy(admin=CONSOLE, **{"databases.pgsplit": {"max_client_connections": 1}})
    client = RawClient("127.0.0.1", proxy.port)
    client.login("app", APP_PASSWORD, "pgsplit")
    assert client.query("SHOW VERSION").rows
    out = psql(proxy, "SHOW VERSION")
    assert out.returncode != 0 and "too many" in out.stderr  # the one slot is taken
    client.close()  # gone without a Terminate: the slot is free again
    wait_until(lambda: psql(proxy, "SHOW VERSION").returncode == 0, timeout=10)


def test_a_message_out_of_place_ends_the_console_session_with_08p01(proxy) -> None:
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        client.send(message(b"d", b"stray copy data"))  # ignored outside COPY, as PostgreSQL does
        assert client.query("SHOW VERSION").rows
        client.send(message(b"p", b"a password, after login"))
        fields = client.read_fatal_or_eof()
        assert fields is not None and (fields["S"], fields["C"]) == ("FATAL", "08P01")
        assert client.is_closed()


def test_show_cutover_and_backends_after_a_real_cutover() -> None:
    """A cutover run over the HTTP API (to a physical standby of the primary) is what the
    console then shows: the new active cluster and primary, and the last cutover's outcome."""
    c = Cluster(0, name="console-co").start()
    proxy = None
    try:
        c.add_standby("hop1")
        c.wait_caught_up()
        proxy = ProxyThread(config_text({"main": NodeSet.of(c, "primary"), "hop1": NodeSet.of(c, "hop1")},
                                        sections={"admin": CONSOLE})).start()
        before = dict(zip(CUTOVER_COLUMNS, psql(proxy, "SHOW CUTOVER").stdout.strip().split("|")))
        assert (before["active_cluster"], before["last_result"]) == ("main", "")
        request = urllib.request.Request(proxy.admin_url + "/v1/cutover", data=json.dumps({"target": "hop1"}).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            summary = [json.loads(line) for line in response.read().splitlines() if line.strip()][-1]
        assert summary["result"] == "success", summary
        after = dict(zip(CUTOVER_COLUMNS, psql(proxy, "SHOW CUTOVER").stdout.strip().split("|")))
        assert (after["active_cluster"], after["last_target"], after["last_result"]) == ("hop1", "hop1", "success")
        assert after["last_at"].endswith(" UTC") and float(after["last_seconds"]) == pytest.approx(summary["seconds"], abs=0.001)
        backends = [line.split("|")[:2] for line in psql(proxy, "SHOW BACKENDS").stdout.splitlines() if line]
        assert backends == [["hop1_hop1", "primary"]]
    finally:
        if proxy is not None:
            proxy.stop()
        c.stop()


def _session_of(proxy, process_id: int):
    return proxy.call(lambda: next(s for s in proxy.proxy.sessions if s.process_id == process_id))


def test_a_client_that_does_not_read_its_answers_stops_the_console(proxy) -> None:
    """Pipelined commands from a client that reads nothing: the proxy keeps at most its
    write buffer's high-water mark (and one command's answer) and a bounded inbox, then
    stops reading; the client reading again gets every answer, and leaving ends it."""
    client = RawClient("127.0.0.1", proxy.port)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.login("app", APP_PASSWORD, "pgsplit")
        session = _session_of(proxy, client.backend_key[0])
        one = query_message("SHOW CONFIG;SHOW HELP;SHOW CONFIG;SHOW HELP")
        answer = len(b"".join(_raw_answer(client, one)))  # the bytes of one answer
        pipeline = one * 20000  # answered in full, some 100 MB
        client.sock.setblocking(False)
        sent, stalled_since = 0, None
        while sent < len(pipeline):
            try:
                sent += client.sock.send(pipeline[sent:sent + 65536])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 2.0:
                    break  # the proxy stopped reading
                time.sleep(0.01)
        time.sleep(0.5)
        buffered = proxy.call(lambda: session.transport.get_write_buffer_size())
        inbox = proxy.call(lambda: len(session.inbox.buf))
        # (before: the proxy had read all and written hundreds of MB into its buffer)
        assert buffered < 256 * 1024 + 4 * answer, (buffered, inbox, sent)
        assert inbox <= CONSOLE_INBOX_MAX + 256 * 1024, (buffered, inbox, sent)
        assert session.state.value == "console"
    finally:
        client.close()
    # the client left without reading: the session ends (its paused reading is checked)
    wait_until(lambda: proxy.call(lambda: session.state.value) == "closed", timeout=10)


def _raw_answer(client: RawClient, query: bytes) -> list[bytes]:
    """The messages answering one Query, up to ReadyForQuery, as bytes."""
    client.send(query)
    out = []
    while True:
        kind, body = client.read_message()
        out.append(kind.encode() + struct.pack("!i", len(body) + 4) + body)
        if kind == "Z":
            return out


def _answer_messages(client: RawClient, data: bytes) -> list[tuple[str, bytes]]:
    """Send `data`; the messages read up to the next ReadyForQuery."""
    client.send(data)
    out = []
    while True:
        kind, body = client.read_message()
        out.append((kind, body))
        if kind == "Z":
            return out


def test_the_extended_protocol_refusal_is_an_error_and_the_session_goes_on(proxy) -> None:
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        answer = _answer_messages(client, message(b"P", b"\0SHOW POOLS\0\0\0") + message(b"S"))
        assert [kind for kind, _ in answer] == ["E", "Z"]
        fields = error_fields(answer[0][1])
        assert (fields["S"], fields["V"], fields["C"]) == ("ERROR", "ERROR", "0A000")
        assert client.query("SHOW VERSION").rows[0][0].startswith("pgsplit ")


def test_a_lone_flush_is_answered_with_nothing_and_the_next_query_runs(proxy) -> None:
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        client.send(message(b"H"))
        result = client.query("SHOW VERSION")
        assert result.errors == [] and result.rows[0][0].startswith("pgsplit ")


def test_a_function_call_in_the_skip_mode_is_dropped_up_to_sync(proxy) -> None:
    call = message(b"F", b"\0\0\0\1\0\0\0\0\0\0\0\0")
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        # outside the skip mode: refused (an ERROR) with its ReadyForQuery
        answer = _answer_messages(client, call)
        assert [kind for kind, _ in answer] == ["E", "Z"] and error_fields(answer[0][1])["S"] == "ERROR"
        # after a refused Parse: dropped with the rest, one ReadyForQuery at Sync
        answer = _answer_messages(client, message(b"P", b"\0SHOW POOLS\0\0\0") + call + message(b"S"))
        assert [kind for kind, _ in answer] == ["E", "Z"]
        assert client.query("SHOW VERSION").rows[0][0].startswith("pgsplit ")


def test_a_terminate_in_a_pipeline_ends_the_session_and_what_follows_is_not_run(proxy) -> None:
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login("app", APP_PASSWORD, "pgsplit")
        client.send(query_message("SHOW VERSION") + message(b"X") + query_message("PAUSE"))
        assert client.read_result().rows[0][0].startswith("pgsplit ")
        assert client.is_closed()
    time.sleep(0.3)
    assert proxy.call(lambda: (proxy.proxy.admin_ops._busy, proxy.proxy.dataplane.holding)) == (None, False)


class _BusySession:
    """A session with a unit in flight until `until` (what a drain waits for)."""

    def __init__(self, seconds: float):
        self.until = time.monotonic() + seconds

    def activity(self) -> tuple[bool, bool]:
        return time.monotonic() < self.until, False


def test_resume_is_refused_while_a_pause_drains_and_a_failed_drain_releases_only_its_own_pause(make_proxy) -> None:
    proxy = make_proxy(admin=CONSOLE, cutover={"pause_timeout_s": 2.0})
    busy = _BusySession(2.5)  # longer than the pause's drain may take
    proxy.call(lambda: proxy.proxy.sessions.add(busy))
    try:
        with RawClient("127.0.0.1", proxy.port) as a, RawClient("127.0.0.1", proxy.port) as b:
            a.login("app", APP_PASSWORD, "pgsplit")
            b.login("app", APP_PASSWORD, "pgsplit")
            a.send(query_message("PAUSE"))
            wait_until(lambda: proxy.call(lambda: proxy.proxy.dataplane.holding), timeout=5)
            assert b.query("SHOW CUTOVER").rows[0][CUTOVER_COLUMNS.index("in_progress")] == "pausing"
            resumed = b.query("RESUME")
            assert [e["C"] for e in resumed.errors] == ["55000"]
            assert "still waiting for the units in flight" in resumed.errors[0]["M"]
            again = b.query("PAUSE")
            assert [e["C"] for e in again.errors] == ["55000"]
            assert proxy.call(lambda: proxy.proxy.dataplane.holding)  # the first pause still holds
            failed = a.read_result()
            assert [e["C"] for e in failed.errors] == ["55000"] and "not paused" in failed.errors[0]["M"]
            assert proxy.call(lambda: (proxy.proxy.dataplane.holding, proxy.proxy.admin_ops._busy)) == (False, None)
            # the next pause is a pause of its own, and RESUME ends it
            busy.until = 0.0
            assert b.query("PAUSE").tags == ["PAUSE"]
            assert b.query("RESUME").tags == ["RESUME"]
            assert proxy.call(lambda: proxy.proxy.dataplane.holding) is False
    finally:
        proxy.call(lambda: proxy.proxy.sessions.discard(busy))
