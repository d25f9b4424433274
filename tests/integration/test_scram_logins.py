"""Logins without plaintext passwords in the config, against the sandbox cluster with real
drivers (asyncpg, psycopg, psql): a [[users]] entry holding only the SCRAM verifier
pg_authid holds, users looked up on the server with [auth_query], a password changed on
the server, and a lookup whose server does not answer in time.

pgsplit logs these users in to the backends with the ClientKey of their latest login:
reads on the replicas show that the replicas accept it too (pg_authid is replicated)."""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import subprocess
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from scramp import ScramClient

from loadtest.harness import ProxyThread, config_text
from proxy.admin.reload import compare
from proxy.auth import password_verifier
from proxy.config import parse_config
from helpers import run_leaving_loop_on_failure as _run

VERIFIED = ("scram_v", "v-secret-1")  # in [[users]] by its verifier
LOOKED_UP = ("scram_q", "q-secret-1")  # not in [[users]]: [auth_query]
TABLE = "scram_notes"


@pytest.fixture(scope="module")
def roles(cluster):
    """The two roles on the cluster (scram-sha-256 verifiers, replicated), and a table they
    may write; dropped at the end."""
    for name, password in (VERIFIED, LOOKED_UP):
        cluster.sql(cluster.primary, f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
    cluster.sql(cluster.primary, f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, who text)", dbname="app")
    cluster.sql(cluster.primary, f"GRANT ALL ON {TABLE}, {TABLE}_id_seq TO {VERIFIED[0]}, {LOOKED_UP[0]}",
                dbname="app")
    try:
        yield
    finally:
        cluster.sql(cluster.primary, f"DROP TABLE {TABLE}", dbname="app")
        for name, _ in (VERIFIED, LOOKED_UP):
            cluster.sql(cluster.primary, f"DROP ROLE {name}")


def verifier_of(cluster, user: str) -> str:
    return cluster.sql(cluster.primary, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", user)[0][0]


@pytest.fixture
def start(cluster, roles, tmp_path: Path):
    """start(**sections) -> a proxy whose config file names scram_v by its verifier; the
    file holds neither role's password."""
    started: list[ProxyThread] = []

    def make(**sections) -> ProxyThread:
        text = config_text({"main": cluster}, sections=sections)
        text += f'\n[[users]]\nname = "{VERIFIED[0]}"\nscram_verifier = "{verifier_of(cluster, VERIFIED[0])}"\n'
        path = tmp_path / "pgsplit.toml"
        path.write_text(text)
        written = path.read_text()
        assert VERIFIED[1] not in written and LOOKED_UP[1] not in written
        proxy = ProxyThread(written).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()



async def _connect(proxy: ProxyThread, user: str, password: str, database: str = "app"):
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=password,
                                 database=database, ssl=False)


async def _refused(proxy: ProxyThread, user: str, password: str, database: str = "app") -> Exception:
    """The error of a login expected to fail; one that gets in is closed and fails the test."""
    try:
        conn = await _connect(proxy, user, password, database)
    except (asyncpg.PostgresError, OSError) as exc:
        return exc
    await conn.close()
    raise AssertionError(f"{user} was let in")


async def _reads_and_writes(conn, user: str) -> None:
    """A write on the primary, and reads that reach a replica (logged in with the same key)."""
    await conn.execute(f"INSERT INTO {TABLE} (who) VALUES ($1)", user)
    assert await conn.fetchval(f"SELECT count(*) FROM {TABLE} WHERE who = $1", user) >= 1
    on_replica = False
    for _ in range(100):
        fresh = await conn.fetchval("SELECT pg_is_in_recovery()")
        if fresh:
            on_replica = True
            break
        await asyncio.sleep(0.05)
    assert on_replica, "no read went to a replica"


def test_a_user_known_by_its_verifier_logs_in_via_asyncpg_and_psql_with_reads_and_writes(start, cluster) -> None:
    user, password = VERIFIED
    proxy = start()

    async def run() -> None:
        conn = await _connect(proxy, user, password)
        try:
            assert await conn.fetchval("SELECT current_user") == user
            await _reads_and_writes(conn, user)
        finally:
            await conn.close()
        error = await _refused(proxy, user, "wrong")
        assert (error.sqlstate, str(error)) == ("28P01", f'password authentication failed for user "{user}"')

    _run(run())
    url = f"postgresql://{user}:{password}@127.0.0.1:{proxy.port}/app?sslmode=disable"
    sql = f"INSERT INTO {TABLE} (who) VALUES ('psql'); SELECT count(*) > 0 FROM {TABLE} WHERE who = 'psql'"
    out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, url],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "INSERT 0 1\nt\n", "")
    # Every server connection of the user was logged in with the ClientKey, none with a password.
    assert proxy.call(lambda: {type(proxy.proxy.pools.credential(user)).__name__}) == {"ScramKeys"}


def test_a_user_not_in_users_logs_in_via_auth_query_and_unknown_or_wrong_look_alike(start) -> None:
    user, password = LOOKED_UP
    proxy = start(auth_query={})

    async def run() -> None:
        conn = await _connect(proxy, user, password)
        try:
            assert await conn.fetchval("SELECT current_user") == user
            await _reads_and_writes(conn, user)
        finally:
            await conn.close()
        wrong = await _refused(proxy, user, "wrong")
        unknown = await _refused(proxy, "nobody_at_all", password)
        assert (wrong.sqlstate, str(wrong)) == ("28P01", f'password authentication failed for user "{user}"')
        assert (unknown.sqlstate, str(unknown)) == ("28P01", 'password authentication failed for user "nobody_at_all"')
        # The exchange itself does not tell them apart either: the server-first-message of an
        # unknown name has the salt length and iteration count of the real verifiers.
        real = await _server_first(proxy, user)
        assert real == (16, 4096)  # (PostgreSQL's verifiers)
        assert await _server_first(proxy, VERIFIED[0]) == real
        assert await _server_first(proxy, "nobody_at_all") == real
        assert await _server_first(proxy, "app") == real  # ([[users]] with a password)

    _run(run())
    with psycopg.connect(f"postgresql://{user}:{password}@127.0.0.1:{proxy.port}/app?sslmode=disable") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


def test_a_password_changed_on_the_server_works_after_the_cache_ttl_and_the_old_one_is_refused(
        start, cluster) -> None:
    user, old = LOOKED_UP
    new = "q-secret-2"
    proxy = start(auth_query={"cache_ttl_s": 1.0})

    async def run() -> None:
        conn = await _connect(proxy, user, old)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        cluster.sql(cluster.primary, f"ALTER ROLE {user} PASSWORD '{new}'")
        try:
            await asyncio.sleep(1.2)  # the cached verifier expires
            error = await _refused(proxy, user, old)
            assert error.sqlstate == "28P01"
            # The new password logs in, also where pgsplit opens a new pool (another
            # database): the backends take the new ClientKey.
            for database in ("app", "postgres"):
                conn = await _connect(proxy, user, new, database)
                try:
                    assert await conn.fetchval("SELECT current_database()") == database
                finally:
                    await conn.close()
        finally:
            cluster.sql(cluster.primary, f"ALTER ROLE {user} PASSWORD '{old}'")

    _run(run())


def test_a_role_whose_password_expired_is_not_found_by_the_default_query(start, cluster) -> None:
    user, password = LOOKED_UP
    proxy = start(auth_query={"cache_ttl_s": 0.0})
    cluster.sql(cluster.primary, f"ALTER ROLE {user} VALID UNTIL '2000-01-01'")
    try:
        error = _run(_refused(proxy, user, password))
        assert (error.sqlstate, str(error)) == ("28P01", f'password authentication failed for user "{user}"')
    finally:
        cluster.sql(cluster.primary, f"ALTER ROLE {user} VALID UNTIL 'infinity'")

    async def run() -> None:
        conn = await _connect(proxy, user, password)
        await conn.close()

    _run(run())


def test_a_lookup_that_gets_no_answer_fails_within_its_deadline_and_others_go_on(start, caplog) -> None:
    """The lookup of one name hangs on the server: that login fails within timeout_s with
    a generic 08006 (the log names the server), while sessions, [[users]] logins and the
    lookup of another name (an [auth_query] user) go on."""
    # (the sleep on the outer side of the join: it runs whether the role exists or not)
    slow = ("SELECT u.usename, u.passwd FROM pg_sleep(CASE WHEN $1::text = 'slow_name' THEN 5 ELSE 0 END) AS s "
            "LEFT JOIN pg_shadow AS u ON u.usename = $1")
    proxy = start(auth_query={"query": slow, "timeout_s": 1.0})

    async def run() -> None:
        other = await _connect(proxy, "app", "app-secret")
        try:
            t0 = time.monotonic()
            lookup = asyncio.ensure_future(_refused(proxy, "slow_name", "whatever"))
            await asyncio.sleep(0.2)
            # While the lookup waits, sessions go on, [[users]] and auth_query users log in.
            assert await other.fetchval("SELECT 42") == 42
            again = await _connect(proxy, "app", "app-secret")
            await again.close()
            looked_up = await _connect(proxy, *LOOKED_UP)
            try:
                assert await looked_up.fetchval("SELECT current_user") == LOOKED_UP[0]
            finally:
                await looked_up.close()
            assert not lookup.done()
            error = await lookup
            elapsed = time.monotonic() - t0
        finally:
            await other.close()
        assert elapsed < 3.0, elapsed
        assert (error.sqlstate, str(error)) == ("08006", "authentication lookup failed; see the pgsplit log")

    with caplog.at_level(logging.WARNING, logger="pgsplit.auth_query"):
        _run(run())
        time.sleep(1.2)  # (the lookup itself ends at its own deadline, and logs why)
    port = proxy.config.backends["main_primary"].port
    assert (f'could not look up user "slow_name": the auth_query server main_primary (127.0.0.1:{port}) did not '
            "answer within 1s (auth_query.timeout_s)") in caplog.text


async def _server_first(proxy: ProxyThread, user: str) -> tuple[int, int]:
    """(salt length, iteration count) of the server-first-message pgsplit sends for `user`:
    a raw startup and SASLInitialResponse, then the connection is dropped."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        body = struct.pack("!i", 196608) + f"user\0{user}\0database\0app\0\0".encode()
        writer.write(struct.pack("!i", len(body) + 4) + body)
        client_first = ScramClient(["SCRAM-SHA-256"], user, "whatever").get_client_first().encode()

        async def auth_request() -> tuple[int, bytes]:
            kind, length = struct.unpack("!ci", await reader.readexactly(5))
            payload = await reader.readexactly(length - 4)
            assert kind == b"R", (kind, payload)
            return struct.unpack("!i", payload[:4])[0], payload[4:]

        assert (await asyncio.wait_for(auth_request(), 5))[0] == 10  # AuthenticationSASL
        body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(client_first)) + client_first
        writer.write(b"p" + struct.pack("!i", len(body) + 4) + body)
        code, server_first = await asyncio.wait_for(auth_request(), 5)
        assert code == 11  # AuthenticationSASLContinue
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        return len(base64.b64decode(attrs["s"])), int(attrs["i"])
    finally:
        writer.close()


def test_a_reload_puts_a_new_verifier_in_force(start, cluster) -> None:
    user, old = VERIFIED
    new = "v-secret-2"
    proxy = start()

    async def run() -> None:
        conn = await _connect(proxy, user, old)
        await conn.close()
        cluster.sql(cluster.primary, f"ALTER ROLE {user} PASSWORD '{new}'")
        try:
            text = proxy.text.replace(proxy.config.user(user).scram_verifier.get_secret_value(),
                                      verifier_of(cluster, user))
            change = compare(proxy.proxy.config, parse_config(text, source="<test>"))
            assert change.applied == ("users",)
            proxy.call(proxy.proxy.reconfigure, change.config)
            error = await _refused(proxy, user, old)
            assert error.sqlstate == "28P01"
            for database in ("app", "postgres"):  # a pool opened after the reload logs in too
                conn = await _connect(proxy, user, new, database)
                try:
                    assert await conn.fetchval("SELECT current_user") == user
                finally:
                    await conn.close()
        finally:
            cluster.sql(cluster.primary, f"ALTER ROLE {user} PASSWORD '{old}'")

    _run(run())


def test_backends_that_cannot_take_the_client_key_fail_the_login_clearly(start, cluster) -> None:
    """A verifier of the same password with another salt than the backends' (as setting
    the password again would make), and a backend that asks md5 (pg_hba.conf): 28P01
    naming the reason, no secret."""
    user, password = VERIFIED
    own = password_verifier(password)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    other_salt = f"SCRAM-SHA-256${own.iterations}:{b64(own.salt)}${b64(own.stored_key)}:{b64(own.server_key)}"
    md5_user, md5_password = "app_md5", "md5-secret"  # pg_hba.conf asks md5 for it
    md5_verifier = password_verifier(md5_password)
    proxy = start()
    text = proxy.text.replace(verifier_of(cluster, user), other_salt).replace(
        f'password = "{md5_password}"',
        f'scram_verifier = "SCRAM-SHA-256${md5_verifier.iterations}:{b64(md5_verifier.salt)}$'
        f'{b64(md5_verifier.stored_key)}:{b64(md5_verifier.server_key)}"')
    assert md5_password not in text and password not in text
    proxy.call(proxy.proxy.reconfigure, parse_config(text, source="<test>"))

    async def run() -> None:
        error = await _refused(proxy, user, password)
        assert error.sqlstate == "28P01"
        assert str(error).startswith(f'pgsplit could not log in to backend main_primary: cannot log in to the '
                                     f'backend as user "{user}" without the password: the server\'s SCRAM '
                                     "verifier has another salt or iteration count")
        error = await _refused(proxy, md5_user, md5_password)
        assert error.sqlstate == "28P01"
        assert str(error) == (f'pgsplit could not log in to backend main_primary: the backend asks md5 '
                              f'authentication for user "{md5_user}", and pgsplit holds only a SCRAM-SHA-256 '
                              "verifier for this user: make the backend ask scram-sha-256 (pg_hba.conf), or "
                              "configure the user's password")

    _run(run())


LOOKUP_FUNCTION = """
CREATE SCHEMA pgsplit_it;
CREATE FUNCTION pgsplit_it.user_lookup(i_username text, OUT uname text, OUT phash text)
RETURNS record AS $$
    SELECT usename, passwd FROM pg_catalog.pg_shadow
    WHERE usename = i_username AND (valuntil IS NULL OR valuntil > now());
$$ LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog;
REVOKE ALL ON FUNCTION pgsplit_it.user_lookup(text) FROM public;
GRANT USAGE ON SCHEMA pgsplit_it TO pgsplit_it_auth;
GRANT EXECUTE ON FUNCTION pgsplit_it.user_lookup(text) TO pgsplit_it_auth;
"""


def test_the_lookup_through_a_security_definer_function_as_operations_md_sets_it_up(
        start, cluster, monkeypatch) -> None:
    """A login of its own that may call the function and read nothing else."""
    cluster.sql(cluster.primary, "CREATE ROLE pgsplit_it_auth LOGIN PASSWORD 'auth-secret'")
    try:
        cluster.sql(cluster.primary, LOOKUP_FUNCTION)  # (no parameters: one simple query)
        monkeypatch.setenv("PGSPLIT_IT_AUTH_PASSWORD", "auth-secret")
        proxy = start(auth_query={"user": "pgsplit_it_auth", "password_env": "PGSPLIT_IT_AUTH_PASSWORD",
                                  "query": "SELECT * FROM pgsplit_it.user_lookup($1)"})
        assert "auth-secret" not in proxy.text

        async def run() -> None:
            conn = await _connect(proxy, *LOOKED_UP)
            try:
                assert await conn.fetchval("SELECT current_user") == LOOKED_UP[0]
            finally:
                await conn.close()

        _run(run())
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the login alone reads no pg_shadow
            with psycopg.connect(cluster.primary.dsn("pgsplit_it_auth", "auth-secret")) as conn:
                conn.execute("SELECT passwd FROM pg_shadow")
    finally:
        cluster.sql(cluster.primary, "DROP SCHEMA IF EXISTS pgsplit_it CASCADE")
        cluster.sql(cluster.primary, "DROP ROLE pgsplit_it_auth")
