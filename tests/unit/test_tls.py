"""router.tls: libpq's sslmode, as the three kinds of connection pgsplit makes use it."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import psycopg
import pytest

from loadtest.sandbox import make_sandbox_ca
from proxy.errors import ConnectionFailure
from proxy.server.connection import open_connection
from router.pg import Endpoint
from router.tls import ServerTls, server_tls


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_sandbox_ca(tmp_path_factory.mktemp("ca")).ca_cert)


def test_what_each_mode_asks_and_verifies(ca_file: str) -> None:
    rows = {mode: (t.wanted, t.required, t.verifies) for mode, t in (
        ("disable", ServerTls("disable")), ("prefer", ServerTls("prefer")), ("require", ServerTls("require")),
        ("require+CA", ServerTls("require", ca_file)), ("verify-ca", ServerTls("verify-ca", ca_file)),
        ("verify-full", ServerTls("verify-full", ca_file)))}
    assert rows == {
        "disable": (False, False, False), "prefer": (True, False, False), "require": (True, True, False),
        "require+CA": (True, True, True),  # (as libpq: a root CA makes require verify the chain)
        "verify-ca": (True, True, True), "verify-full": (True, True, True)}


def test_the_context_checks_what_the_mode_says(ca_file: str) -> None:
    unverified = ServerTls("require").context()
    assert (unverified.verify_mode, unverified.check_hostname) == (ssl.CERT_NONE, False)
    chain = ServerTls("verify-ca", ca_file).context()
    assert (chain.verify_mode, chain.check_hostname) == (ssl.CERT_REQUIRED, False)
    full = ServerTls("verify-full", ca_file).context()
    assert (full.verify_mode, full.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert full is ServerTls("verify-full", ca_file).context()  # one context per setting
    assert ServerTls("verify-full", "system").context().cert_store_stats()["x509_ca"] > 0
    assert ServerTls("prefer").for_asyncpg() == "prefer" and ServerTls("disable").for_asyncpg() == "disable"
    assert ServerTls("verify-full", ca_file).for_asyncpg() is full


def test_a_subscription_gets_the_sslmode_and_local_programs_the_files(ca_file: str, tmp_path: Path) -> None:
    ep = Endpoint("10.0.0.5", 5432, "repl", "secret", "app", tls=ServerTls("verify-full", ca_file))
    remote = psycopg.conninfo.conninfo_to_dict(ep.conninfo())
    assert remote["sslmode"] == "require" and "sslrootcert" not in remote  # (the file is this machine's)
    local = psycopg.conninfo.conninfo_to_dict(ep.conninfo(password=False))
    assert (local["sslmode"], local["sslrootcert"]) == ("verify-full", ca_file) and "password" not in local
    plain = psycopg.conninfo.conninfo_to_dict(Endpoint("h").conninfo())
    assert "sslmode" not in plain  # (prefer: libpq's own default)
    assert ep.at("10.0.0.6", 5433).tls == ep.tls and ep.at("h", 1, ServerTls("disable")).tls.sslmode == "disable"


def test_a_client_certificate_reaches_asyncpg_under_prefer_too(ca_file: str, tmp_path: Path) -> None:
    ca = make_sandbox_ca(tmp_path / "client")
    with_cert = ServerTls("prefer", None, str(ca.server_cert), str(ca.server_key))
    assert isinstance(with_cert.for_asyncpg(), ssl.SSLContext)  # (asyncpg takes a certificate only so)


def test_system_roots_mean_verify_full_and_equal_settings_are_one_object() -> None:
    assert server_tls(sslrootcert="system") == ServerTls("verify-full", "system")
    assert server_tls() == ServerTls("prefer") and server_tls("require") is server_tls("require")


async def test_a_server_that_closes_before_answering_the_sslrequest_fails_at_once() -> None:
    """Not after the whole connect timeout: the login says what happened."""
    async def hang_up(reader, writer):
        await reader.readexactly(8)  # the SSLRequest
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionFailure, match="closed the connection before answering the SSLRequest"):
            await open_connection("b", "127.0.0.1", port, "app", "app", None, tls=ServerTls("require"), timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        server.close()
        await server.wait_closed()
