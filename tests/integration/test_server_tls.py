"""TLS towards the backends: sandbox servers that run `ssl = on` and accept TCP connections
only inside TLS (pg_hba `hostssl`), as managed PostgreSQL services do.

What must hold: with `verify-full` and the right CA every connection pgsplit makes there
(the data plane's to the primary and the replica, the monitor's, a cancel) works and is
encrypted; a server whose certificate another CA signed is refused with an error that says
so, reaching the client as a connection failure and the operator in the status; with
`sslmode = disable` the server itself refuses, and the client reads why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from loadtest.sandbox import Cluster, SandboxCa, make_sandbox_ca
from proxy.errors import ConnectionFailure
from proxy.server.connection import open_connection
from router.tls import ServerTls

ENCRYPTED = "SELECT ssl, pg_is_in_recovery() FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SandboxCa:
    return make_sandbox_ca(tmp_path_factory.mktemp("tls") / "ca")


@pytest.fixture(scope="module")
def tls_cluster(ca: SandboxCa) -> Iterator[Cluster]:
    c = Cluster(1, name="tls", tls=ca)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def backends_up(proxy) -> dict[str, tuple[bool, str | None]]:
    status = proxy.call(lambda: proxy.proxy.status())
    return {b["name"]: (b["up"], b["error"]) for b in status["backends"]}


def wait_polled(proxy, timeout: float = 15.0) -> dict[str, tuple[bool, str | None]]:
    """The monitor's view once it has asked every backend (up, or with an error)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = backends_up(proxy)
        if all(up or error for up, error in seen.values()) and any(
                error or up for up, error in seen.values()) and proxy.call(
                lambda: all(b.in_recovery is not None or b.error for b in proxy.proxy.topology.current.backends)):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"the monitor did not poll every backend: {seen}")
        time.sleep(0.1)


def test_every_connection_to_a_tls_only_server_is_encrypted_and_verified(make_proxy, tls_cluster, ca):
    proxy = make_proxy(clusters={"main": tls_cluster},
                       server_tls={"sslmode": "verify-full", "sslrootcert": str(ca.ca_cert)})
    assert all(up for up, _ in wait_polled(proxy).values()), backends_up(proxy)  # the monitor's connections
    with psycopg.connect(proxy.dsn(), autocommit=True) as reader:  # (no writes: its reads go to the replica)
        assert reader.execute(ENCRYPTED).fetchone() == (True, True)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS tls_t (id int)")
        conn.execute("INSERT INTO tls_t VALUES (1)")
        with conn.transaction():  # on the primary
            assert conn.execute(ENCRYPTED).fetchone() == (True, False)
        # a cancel reaches the server too (its CancelRequest inside TLS as well). (The
        # non-blocking cancel: the blocking one holds the GIL, and this proxy runs in a
        # thread of this process.)
        timer = threading.Timer(0.5, conn.cancel_safe, kwargs={"timeout": 10})
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        timer.join()
        assert time.monotonic() - t0 < 10
        conn.execute("DROP TABLE tls_t")


def test_a_certificate_from_another_ca_is_refused_with_a_clear_error(make_proxy, tls_cluster, tmp_path: Path):
    stranger = make_sandbox_ca(tmp_path / "other", name="some other CA")
    proxy = make_proxy(clusters={"main": tls_cluster},
                       server_tls={"sslmode": "verify-ca", "sslrootcert": str(stranger.ca_cert)})
    seen = wait_polled(proxy)
    for up, error in seen.values():  # the operator's view: pgsplit status, /v1/status
        assert not up and "certificate verify failed" in error, seen
    with pytest.raises(psycopg.OperationalError) as failure:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=20) as conn:
            conn.execute("SELECT 1")
    text = str(failure.value)  # (the monitor found it first: its reason is the client's)
    assert "certificate verify failed: unable to get local issuer certificate" in text, text


def test_sslmode_disable_towards_a_tls_only_server_is_refused_by_the_server(make_proxy, tls_cluster):
    proxy = make_proxy(clusters={"main": tls_cluster}, server_tls={"sslmode": "disable"})
    with pytest.raises(psycopg.OperationalError) as failure:
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=20) as conn:
            conn.execute("SELECT 1")
    assert "no pg_hba.conf entry" in str(failure.value) and "no encryption" in str(failure.value), failure.value


def test_a_backend_of_its_own_overrides_the_default(make_proxy, tls_cluster, ca):
    """[server_tls] says disable, the primary's own keys say verify-full: the primary is
    reached, the replica (left at the default) is not."""
    primary = f"main_{tls_cluster.primary.name}"
    proxy = make_proxy(clusters={"main": tls_cluster}, server_tls={"sslmode": "disable"},
                       backends={primary: {"sslmode": "verify-full", "sslrootcert": str(ca.ca_cert)}})
    seen = wait_polled(proxy)
    assert seen[primary][0] is True, seen
    replica = f"main_{tls_cluster.replicas[0].name}"
    assert seen[replica][0] is False and "no encryption" in seen[replica][1], seen
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with conn.transaction():
            assert conn.execute(ENCRYPTED).fetchone() == (True, False)


async def test_the_data_planes_own_login_says_what_tls_refused(tls_cluster, ca, cluster, tmp_path: Path):
    """ServerConnection's SSLRequest handshake on its own (the monitor usually finds a bad
    certificate first): a certificate another CA signed, a server without TLS under
    `require`, and `require` / `prefer` where they must work."""
    stranger = make_sandbox_ca(tmp_path / "other", name="some other CA")
    node = tls_cluster.primary

    async def login(host: str, port: int, tls: ServerTls):
        return await open_connection("b", host, port, "app", "app", "app-secret", tls=tls, timeout=10)

    with pytest.raises(ConnectionFailure) as refused:
        await login(node.host, node.port, ServerTls("verify-full", str(stranger.ca_cert)))
    assert "the server's certificate was not accepted: certificate verify failed" in str(refused.value)
    assert "(sslmode=verify-full)" in str(refused.value)
    plain = cluster.primary  # ssl = off
    with pytest.raises(ConnectionFailure, match="the server does not accept TLS, and sslmode is require"):
        await login(plain.host, plain.port, ServerTls("require"))
    for host, port, tls, encrypted in ((node.host, node.port, ServerTls("require"), True),
                                       ("localhost", node.port, ServerTls("verify-full", str(ca.ca_cert)), True),
                                       (plain.host, plain.port, ServerTls("prefer"), False)):
        conn = await login(host, port, tls)
        try:
            assert (conn.transport.get_extra_info("ssl_object") is not None) is encrypted, (host, tls)
        finally:
            conn.close()
