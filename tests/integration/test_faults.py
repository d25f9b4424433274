"""Bad input and faults through pgsplit, against the real sandbox cluster.

Every test asserts exactly what a client sees (SQLSTATE, severity, message, as PostgreSQL
itself answers the same bytes: the expected values were taken from a PostgreSQL 15 server)
and that a second session, opened before the fault, still answers afterwards. Raw bytes are
sent with the small client in rawclient.py (startup + SCRAM via scramp); real clients (psql,
psycopg) are used where the point is what a driver does.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from scramp import ScramClient

from helpers import wait_until
from rawclient import (
    PROTOCOL_3_1, SCRAM, TLS_CLIENT_HELLO, RawClient, ServerError, error_fields, gssenc_request, message,
    query_message, ssl_request, startup_packet, terminate_message,
)

APP_PASSWORD = "app-secret"


# --- helpers ------------------------------------------------------------------------------


def raw(proxy) -> RawClient:
    return RawClient("127.0.0.1", proxy.port, timeout=10)


def logged_in(proxy, user: str = "app", password: str = APP_PASSWORD, database: str = "app") -> RawClient:
    client = raw(proxy)
    try:
        client.login(user, password, database)
    except BaseException:
        client.close()
        raise
    assert client.status == "I"
    return client


@pytest.fixture
def bystander(proxy) -> Iterator[psycopg.Connection]:
    """A second session, opened (and used) before the fault; the test checks it after."""
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'before'").fetchone() == ("before",)
        yield conn


def assert_still_serving(proxy, bystander: psycopg.Connection) -> None:
    """The session opened before the fault answers, and so does a brand-new one."""
    assert bystander.execute("SELECT 'after', 6 * 7").fetchone() == ("after", 42)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 'new'").fetchone() == ("new",)


def assert_closed_with_optional_error(client: RawClient, sqlstate: str, message_prefix: str) -> None:
    """PostgreSQL closes without a word for these (it logs a COMMERROR); a proxy may also
    send a FATAL ErrorResponse first: if it does, it must carry these values."""
    error = client.read_fatal_or_eof(timeout=5)
    if error is not None:
        assert error.get("C") == sqlstate, error
        assert error.get("V", error.get("S")) == "FATAL", error
        assert error.get("M", "").startswith(message_prefix), error


def sessions_running(cluster, marker: str) -> list[tuple]:
    """pg_stat_activity rows, on every node, of queries whose text contains marker."""
    rows = []
    for node in cluster.nodes:
        rows += [(node.name, *r) for r in cluster.sql(
            node, "SELECT pid, state, query FROM pg_stat_activity "
                  "WHERE query LIKE %s AND pid <> pg_backend_pid()", f"%{marker}%")]
    return rows


# --- the startup packet -----------------------------------------------------------------------


def test_garbage_instead_of_startup_packet(proxy, bystander):
    with raw(proxy) as client:
        client.send(b"GARBAGE!GARBAGE!GARBAGE!")  # length 0x47415242: far over 10000
        assert_closed_with_optional_error(client, "08P01", "invalid length of startup packet")
    assert_still_serving(proxy, bystander)


def test_tls_client_hello_instead_of_startup_packet(proxy, bystander):
    with raw(proxy) as client:
        client.send(TLS_CLIENT_HELLO)  # 0x16030102...: no startup packet is that long
        assert_closed_with_optional_error(client, "08P01", "invalid length of startup packet")
    assert_still_serving(proxy, bystander)


def test_startup_packet_shorter_than_8_bytes(proxy, bystander):
    with raw(proxy) as client:
        client.send(struct.pack("!i", 4) + b"\0\0\0\0")
        assert_closed_with_optional_error(client, "08P01", "invalid length of startup packet")
    assert_still_serving(proxy, bystander)


def test_unknown_protocol_version_code(proxy, bystander):
    """A well-framed packet whose code is no protocol: PostgreSQL 15 answers
    FATAL 0A000 "unsupported frontend protocol 4660.22136: server supports 3.0 to 3.0"."""
    with raw(proxy) as client:
        client.send(struct.pack("!ii", 16, 0x12345678) + b"abcdefgh")
        error = client.read_fatal_or_eof(timeout=5)
    assert error is not None, "no ErrorResponse"
    assert (error.get("V"), error.get("C"), error.get("M")) == (
        "FATAL", "0A000", "unsupported frontend protocol 4660.22136: server supports 3.0 to 3.0")
    with raw(proxy) as client:
        client.send(startup_packet({"user": "app", "database": "app"}, protocol=4 << 16))
        error = client.read_fatal_or_eof(timeout=5)
    assert error is not None, "no ErrorResponse"
    assert (error.get("V"), error.get("C"), error.get("M")) == (
        "FATAL", "0A000", "unsupported frontend protocol 4.0: server supports 3.0 to 3.0")
    assert_still_serving(proxy, bystander)


def test_startup_packet_over_10000_bytes(proxy, bystander):
    packet = startup_packet({"user": "app", "database": "app", "application_name": "x" * 10100})
    assert len(packet) > 10000
    with raw(proxy) as client:
        client.send(packet)
        assert_closed_with_optional_error(client, "08P01", "invalid length of startup packet")
    assert_still_serving(proxy, bystander)


def test_startup_packet_of_exactly_10000_bytes_is_accepted(proxy, bystander):
    base = startup_packet({"user": "app", "database": "app", "application_name": ""})
    packet_params = {"user": "app", "database": "app", "application_name": "y" * (10000 - len(base))}
    assert len(startup_packet(packet_params)) == 10000
    with raw(proxy) as client:
        client.send(startup_packet(packet_params))
        client.finish_login("app", APP_PASSWORD)
        # PostgreSQL truncates application_name to NAMEDATALEN - 1 = 63 bytes
        assert client.scalar("SELECT current_setting('application_name')") == "y" * 63
    assert_still_serving(proxy, bystander)


def test_no_user_in_startup_packet(proxy, bystander):
    with raw(proxy) as client:
        client.send(startup_packet({"database": "app"}))
        error = client.read_fatal_or_eof(timeout=5)
    assert error is not None
    assert (error.get("V"), error.get("C"), error.get("M")) == (
        "FATAL", "28000", "no PostgreSQL user name specified in startup packet")
    assert_still_serving(proxy, bystander)


# --- after login: framing --------------------------------------------------------------------


def test_message_length_over_the_bound_after_login(proxy, bystander):
    """A Query announcing ~2 GB: PostgreSQL drops the connection at once (COMMERROR
    "invalid message length"); the proxy must not wait for the body nor forward it."""
    with logged_in(proxy) as client:
        client.send(b"Q" + struct.pack("!i", 0x7FFFFFF0) + b"SELECT 1")
        assert_closed_with_optional_error(client, "08P01", "invalid message length")
    assert_still_serving(proxy, bystander)


@pytest.mark.parametrize("length", [0, 3, -1])
def test_message_length_below_4_after_login(proxy, bystander, length):
    with logged_in(proxy) as client:
        client.send(b"Q" + struct.pack("!i", length) + b"SELECT 1;\0")
        assert_closed_with_optional_error(client, "08P01", "invalid message length")
    assert_still_serving(proxy, bystander)


def test_unknown_message_type_after_login(proxy, bystander):
    with logged_in(proxy) as client:
        client.send(message(b"z", b"abc"))
        error = client.read_fatal_or_eof(timeout=5)
    assert error is not None, "the connection was closed without an ErrorResponse"
    assert (error.get("V"), error.get("C"), error.get("M")) == (
        "FATAL", "08P01", "invalid frontend message type 122")
    assert_still_serving(proxy, bystander)


SYNC = message(b"S")
MALFORMED = {
    "query without its terminator": message(b"Q", b"SELECT 1"),
    "parse cut short": message(b"P", b"s1\0SELECT 1") + SYNC,
    "parse without parameter count": message(b"P", b"s1\0SELECT 1\0") + SYNC,
    "bind cut short": message(b"B", b"\0") + SYNC,
    "bind of an unnamed statement cut short": message(b"P", b"\0SELECT $1::int\0\0\0")
    + message(b"B", b"\0\0\0\0\0\1\0\0\0\x08") + SYNC,
    "describe of an unknown kind": message(b"D", b"X\0") + SYNC,
    "describe without terminator": message(b"D", b"Sname") + SYNC,
    "close of an unknown kind": message(b"C", b"Q\0") + SYNC,
    "parse, then bind cut short, pipelined": message(b"P", b"\0SELECT 1\0\0\0") + message(b"B", b"\0")
    + message(b"E", b"\0\0\0\0\0") + SYNC,
}


def replies(client: RawClient) -> list[tuple[str, str | None, str | None]]:
    """(type, SQLSTATE, message) of each reply up to ReadyForQuery."""
    out = []
    while True:
        t, body = client.read_message()
        fields = error_fields(body) if t == "E" else {}
        out.append((t, fields.get("C"), fields.get("M")))
        if t == "Z":
            return out


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_after_login_is_answered_as_postgresql_does(proxy, cluster, bystander, case):
    """A message whose body is malformed gets PostgreSQL's own answer (an ERROR 08P01, the
    session goes on), not a closed connection."""
    seen = {}
    for where, port in (("postgresql", cluster.primary.port), ("pgsplit", proxy.port)):
        with RawClient("127.0.0.1", port, timeout=10) as client:
            client.login("app", APP_PASSWORD, "app")
            client.send(MALFORMED[case])
            got = replies(client)
            assert client.scalar("SELECT 6 * 7") == "42", where
            seen[where] = got
    assert seen["pgsplit"] == seen["postgresql"]
    assert any(t == "E" and code == "08P01" for t, code, _ in seen["postgresql"])
    assert_still_serving(proxy, bystander)


# --- authentication ----------------------------------------------------------------------------


@pytest.mark.parametrize("user, password", [
    ("app", "wrong-password"),
    ("app_md5", "wrong-password"),
    ("nosuchuser", "whatever"),
])
def test_authentication_failures(proxy, bystander, user, password):
    with raw(proxy) as client:
        with pytest.raises(ServerError) as info:
            client.login(user, password, "app")
        assert client.is_closed(timeout=5)
    assert (info.value.severity, info.value.sqlstate, info.value.message) == (
        "FATAL", "28P01", f'password authentication failed for user "{user}"')
    # a client cannot tell unknown users from wrong passwords: both get a SCRAM exchange
    assert client.auth_codes == [10, 11], client.auth_codes
    assert_still_serving(proxy, bystander)


def server_first(proxy, user: str) -> dict[str, str]:
    """The attributes of the SCRAM server-first-message the proxy sends `user` (r, s, i)."""
    with raw(proxy) as client:
        client.send(startup_packet({"user": user, "database": "app"}))
        t, body = client.read_message()
        assert (t, struct.unpack_from("!i", body)[0]) == ("R", 10), (t, body)
        first = ScramClient([SCRAM], user, "whatever").get_client_first().encode()
        client.send(message(b"p", SCRAM.encode() + b"\0" + struct.pack("!i", len(first)) + first))
        t, body = client.read_message()
        assert (t, struct.unpack_from("!i", body)[0]) == ("R", 11), (t, body)
    return dict(attr.split("=", 1) for attr in body[4:].decode().split(","))


def test_unknown_users_get_salts_of_their_own(proxy):
    """A client that compares salts cannot tell which user names exist: each unknown name
    has a salt of its own, the same at every attempt, shaped as a real user's (PostgreSQL's
    mock authentication does the same)."""
    app, ghost, phantom = server_first(proxy, "app"), server_first(proxy, "ghost"), server_first(proxy, "phantom")
    assert ghost["s"] != phantom["s"]
    assert server_first(proxy, "ghost")["s"] == ghost["s"]
    assert app["s"] != ghost["s"] and app["s"] != phantom["s"]
    assert ghost["i"] == phantom["i"] == app["i"] == "4096"
    assert len(base64.b64decode(ghost["s"])) == len(base64.b64decode(app["s"]))
    assert sorted(ghost) == sorted(app) == ["i", "r", "s"]


def test_wrong_password_with_psql(proxy, bystander):
    out = subprocess.run(
        ["psql", "-X", "-w", "-c", "SELECT 1",
         f"postgresql://app:nope@127.0.0.1:{proxy.port}/app?sslmode=disable"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out
    assert 'FATAL:  password authentication failed for user "app"' in out.stderr, out.stderr
    assert_still_serving(proxy, bystander)


def test_unknown_database(proxy, bystander):
    with raw(proxy) as client:
        with pytest.raises(ServerError) as info:
            client.login("app", APP_PASSWORD, "nosuchdb")
        assert client.is_closed(timeout=5)
    assert (info.value.severity, info.value.sqlstate, info.value.message) == (
        "FATAL", "3D000", 'database "nosuchdb" does not exist')
    assert_still_serving(proxy, bystander)


@pytest.mark.parametrize("value", ["database", "true"])
def test_replication_connection_is_refused(proxy, bystander, value):
    with raw(proxy) as client:
        with pytest.raises(ServerError) as info:
            client.login("app", APP_PASSWORD, "app", params={"replication": value})
        assert client.is_closed(timeout=5)
    assert (info.value.severity, info.value.sqlstate) == ("FATAL", "0A000")
    assert "replication" in info.value.message, info.value.message
    assert_still_serving(proxy, bystander)


# --- SSLRequest, GSSENCRequest, TLS, NegotiateProtocolVersion ---------------------------------


def test_ssl_request_answered_n_without_tls(proxy, bystander):
    with raw(proxy) as client:
        client.send(ssl_request())
        assert client.read_exact(1) == b"N"
        client.login("app", APP_PASSWORD, "app")  # the startup follows on the same socket
        assert client.scalar("SELECT 'plain'") == "plain"
    url = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{proxy.port}/app"
    ok = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT 'prefer ok'", url + "?sslmode=prefer"],
                        capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout) == (0, "prefer ok\n"), ok
    refused = subprocess.run(["psql", "-X", "-c", "SELECT 1", url + "?sslmode=require"],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2, refused
    assert "server does not support SSL, but SSL was required" in refused.stderr, refused.stderr
    assert_still_serving(proxy, bystander)


def test_gssenc_request_answered_n(proxy, bystander):
    with raw(proxy) as client:
        client.send(gssenc_request())
        assert client.read_exact(1) == b"N"
        client.send(ssl_request())  # libpq may try SSL next, on the same socket
        assert client.read_exact(1) == b"N"
        client.login("app", APP_PASSWORD, "app")
        assert client.scalar("SELECT 'after gss'") == "after gss"
    url = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{proxy.port}/app?gssencmode=prefer&sslmode=prefer"
    ok = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT 'gss prefer ok'", url],
                        capture_output=True, text=True, timeout=30)
    assert (ok.returncode, ok.stdout) == (0, "gss prefer ok\n"), ok
    assert_still_serving(proxy, bystander)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    assert shutil.which("openssl"), "openssl is missing: scripts/install.sh (make test) installs it"
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_when_configured(make_proxy, tls_files):
    cert, key = tls_files
    proxy = make_proxy(listen={"tls_cert": str(cert), "tls_key": str(key)})
    with psycopg.connect(proxy.dsn(), autocommit=True) as bystander:  # sslmode=disable
        assert bystander.pgconn.ssl_in_use is False
        with raw(proxy) as client:
            client.send(ssl_request())
            assert client.read_exact(1) == b"S"
        url = f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{proxy.port}/app"
        ok = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT 'tls ok'", url + "?sslmode=require"],
                            capture_output=True, text=True, timeout=30)
        assert (ok.returncode, ok.stdout) == (0, "tls ok\n"), ok
        with psycopg.connect(url + "?sslmode=require", autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use is True
            assert conn.execute("SELECT 'over tls', 1 + 1").fetchone() == ("over tls", 2)
            # a result bigger than one TLS record
            assert conn.execute("SELECT sum(length(repeat('z', g))) FROM generate_series(1, 2000) g"
                                ).fetchone() == (2001000,)
        with psycopg.connect(url + "?sslmode=verify-ca&sslrootcert=" + str(cert), autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use is True
        assert_still_serving(proxy, bystander)


def test_negotiate_protocol_version(proxy, bystander):
    """Protocol 3.1 with a _pq_ option: PostgreSQL 15 answers NegotiateProtocolVersion with
    its newest version, 3.0 (the int32 196608 = 3 << 16, not a bare minor number: libpq 18
    reads it as a full version and refuses anything below 3.0), and the unrecognised option,
    then continues with authentication."""
    with raw(proxy) as client:
        client.login("app", APP_PASSWORD, "app", params={"_pq_.foo": "bar"}, protocol=PROTOCOL_3_1)
        assert client.negotiated == (196608, ["_pq_.foo"])
        assert client.scalar("SELECT 'negotiated'") == "negotiated"
    with raw(proxy) as client:  # 3.0 with an unknown option: negotiation too
        client.login("app", APP_PASSWORD, "app", params={"_pq_.foo": "1", "_pq_.bar": "2"})
        assert client.negotiated == (196608, ["_pq_.foo", "_pq_.bar"])
        assert client.scalar("SELECT 'negotiated'") == "negotiated"
    with raw(proxy) as client:  # plain 3.0: no negotiation
        client.login("app", APP_PASSWORD, "app")
        assert client.negotiated is None
    assert_still_serving(proxy, bystander)


# --- faults in the middle of work --------------------------------------------------------------


def test_client_disconnects_mid_query(proxy, cluster, bystander):
    marker = f"gone_{uuid.uuid4().hex[:8]}"
    client = logged_in(proxy)
    try:
        client.send(query_message(f"SELECT pg_sleep(60) /* {marker} */"))
        wait_until(lambda: [r for r in sessions_running(cluster, marker) if r[2] == "active"],
                   timeout=10, message="the pg_sleep to start on a backend")
    finally:
        client.close()
    wait_until(lambda: not [r for r in sessions_running(cluster, marker) if r[2] == "active"],
               timeout=5, message="the abandoned pg_sleep to be cancelled")
    assert_still_serving(proxy, bystander)


def test_backend_dies_mid_query(proxy, cluster, bystander):
    marker = f"killed_{uuid.uuid4().hex[:8]}"
    with logged_in(proxy) as client:
        assert client.query("SET pgsplit.route = 'primary'").errors == []
        client.send(query_message(f"SELECT pg_sleep(5) /* {marker} */"))
        pids = wait_until(lambda: [r[1] for r in sessions_running(cluster, marker)
                                   if r[0] == cluster.primary.name and r[2] == "active"],
                          timeout=10, message="the pg_sleep to start on the primary")
        t0 = time.monotonic()
        assert cluster.sql(cluster.primary, "SELECT pg_terminate_backend(%s)", pids[0]) == [(True,)]
        client.sock.settimeout(3)
        error = None
        status = None
        seen = []
        try:
            while True:
                t, body = client.read_message()
                seen.append(t)
                if t == "E":
                    error = error_fields(body)
                elif t == "Z":
                    status = chr(body[0])
                    break
        except (EOFError, ConnectionResetError):
            hung = False
        except TimeoutError:
            hung = True
        else:
            hung = False
        if hung:
            pytest.fail(f"the client hangs: it got {seen} ({error}) and then, for 3 s, neither "
                        "ReadyForQuery nor the end of the connection")
        elapsed = time.monotonic() - t0
        assert error is not None, "the client got no ErrorResponse"
        assert elapsed < 2.5, elapsed
        # PostgreSQL itself sends FATAL 57P01 "terminating connection due to administrator
        # command" and closes; a proxy may relay that, or report the lost server (08006).
        assert (error.get("C"), error.get("M")) == (
            "57P01", "terminating connection due to administrator command") or error.get("C") == "08006", error
        if error.get("V") == "FATAL":
            assert status is None and client.is_closed(timeout=3), "FATAL but the connection stays open"
        else:
            assert status == "I", status
            assert client.scalar("SELECT 'same session'") == "same session"
    assert_still_serving(proxy, bystander)


def test_terminate_mid_transaction_leaves_no_dirty_server_connection(make_proxy, cluster):
    """A client sends Terminate inside a transaction. With one server connection per pool,
    the next client must get a clean one (or a new one): no open transaction, no sign of the
    uncommitted insert, and no 'idle in transaction' session left on the primary."""
    proxy = make_proxy(pool={"size": 1})
    table = f"faults_term_{uuid.uuid4().hex[:8]}"
    cluster.sql(cluster.primary, f"CREATE TABLE {table} (tag text)", dbname="app")
    cluster.sql(cluster.primary, f"GRANT ALL ON {table} TO app", dbname="app")
    with psycopg.connect(proxy.dsn(), autocommit=True) as bystander:
        bystander.execute("SELECT 1")
        with logged_in(proxy) as client:
            assert client.query("BEGIN").status == "T"
            result = client.query(f"INSERT INTO {table} VALUES ('dirty')")
            assert (result.errors, result.tags, result.status) == ([], ["INSERT 0 1"], "T")
            dirty_pid = client.scalar("SELECT pg_backend_pid()")
            client.send(terminate_message())
            assert client.is_closed(timeout=5)
        with logged_in(proxy) as client:
            assert client.query("SET pgsplit.route = 'primary'").errors == []
            result = client.query(
                "SELECT txid_current_if_assigned() IS NULL, now() = statement_timestamp(), "
                f"(SELECT count(*) FROM {table}), pg_backend_pid()")
            assert result.errors == [], result.errors
            fresh_xact, fresh_now, rows, pid = result.rows[0]
            assert (fresh_xact, fresh_now, rows) == ("t", "t", "0"), (result.rows, dirty_pid)
            assert result.status == "I"
            # a write in a new transaction must not be lumped with the dead one
            assert client.query(f"INSERT INTO {table} VALUES ('clean')").errors == []
        wait_until(lambda: not cluster.sql(
            cluster.primary, "SELECT pid FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
                             "AND datname = 'app'"),
            timeout=5, message="no idle-in-transaction session left")
        assert cluster.sql(cluster.primary, f"SELECT tag FROM {table}", dbname="app") == [("clean",)]
        assert bystander.execute("SELECT 'after'").fetchone() == ("after",)
    cluster.sql(cluster.primary, f"DROP TABLE {table}", dbname="app")
