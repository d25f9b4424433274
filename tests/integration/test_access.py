"""[[access]] rules, max_client_connections per user and per database, and a user's
pool_size, against the sandbox cluster with real drivers (asyncpg, psycopg) and the raw
client: what a client sees, and that a refused one reaches no backend."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import psycopg
import pytest

from helpers import run_leaving_loop_on_failure as _run, wait_until
from loadtest.harness import ProxyThread, config_text
from proxy.admin.reload import compare
from proxy.config import parse_config
from rawclient import RawClient

APP_PASSWORD = "app-secret"
MD5_PASSWORD = "md5-secret"


@pytest.fixture
def start(cluster):
    """start(extra_toml="", users={"app": {"pool_size": 1}}, **sections) -> started ProxyThread."""
    started: list[ProxyThread] = []

    def make(extra: str = "", users: dict | None = None, **sections) -> ProxyThread:
        proxy = ProxyThread(_text(cluster, extra, users, sections)).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def _text(cluster, extra: str = "", users: dict | None = None, sections: dict | None = None) -> str:
    text = config_text({"main": cluster}, sections=sections or {})
    for name, keys in (users or {}).items():
        head = f'name = "{name}"\n'
        text = text.replace(head, head + "".join(f"{k} = {v}\n" for k, v in keys.items()), 1)
    return text + extra



def _backend_sessions(cluster, user: str) -> int:
    """Connections of `user` on every node of the cluster (the proxy's server connections)."""
    total = 0
    for node in cluster.nodes:
        with psycopg.connect(node.dsn(), autocommit=True) as conn:
            total += conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (user,)).fetchone()[0]
    return total


def _pool_users(proxy: ProxyThread) -> set[str]:
    return proxy.call(lambda: {pool.user for pool in proxy.proxy.pools})


async def _connect(proxy: ProxyThread, user: str = "app", database: str = "app", password: str | None = None):
    password = password if password is not None else {"app": APP_PASSWORD, "app_md5": MD5_PASSWORD}[user]
    return await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=password,
                                 database=database, ssl=False)


async def _refusal(exc_type, proxy: ProxyThread, user: str = "app", database: str = "app"):
    """The error a login expected to fail raises; a login that works instead is closed
    (a loop closed with a connection open hangs) and fails the test."""
    try:
        conn = await _connect(proxy, user, database)
    except exc_type as exc:
        return exc
    await conn.close()
    raise AssertionError(f"{user}@{database} was let in")


def _refused(proxy: ProxyThread, user: str, database: str, password: str) -> dict[str, str]:
    """The raw client's view of a refused login: the FATAL error, and that it was sent
    instead of any authentication request (no password was asked)."""
    with RawClient("127.0.0.1", proxy.port) as client:
        with pytest.raises(Exception) as info:
            client.login(user, password, database)
        assert client.auth_codes == [], "the proxy asked for a password before refusing"
        return info.value.fields


ACCESS = """
[[access]]
users = ["app_md5"]
databases = ["postgres"]
action = "reject"

[[access]]
users = ["app", "app_md5"]
addresses = ["127.0.0.0/8"]
action = "allow"

[[access]]
users = ["app"]
action = "reject"
"""


def test_access_rules_refuse_with_28000_before_the_password_and_reach_no_backend(start, cluster) -> None:
    assert _backend_sessions(cluster, "app_md5") == 0
    proxy = start(ACCESS)
    # First match wins: rule 1 rejects app_md5 on postgres, even with the right password...
    fields = _refused(proxy, "app_md5", "postgres", MD5_PASSWORD)
    assert (fields["S"], fields["C"]) == ("FATAL", "28000")
    assert fields["M"] == 'pgsplit access rule #1 rejects connection for host "127.0.0.1", user "app_md5", database "postgres"'
    # ...and the same with a wrong one: the refusal says nothing about the password.
    assert _refused(proxy, "app_md5", "postgres", "wrong")["M"] == fields["M"]
    # Nothing reached a backend: no pool for the user, no connection of it on any node.
    assert "app_md5" not in _pool_users(proxy)
    assert _backend_sessions(cluster, "app_md5") == 0

    # Rule 2 lets both users in from 127.0.0.0/8 to the other databases: the drivers work.
    async def allowed() -> list:
        out = []
        for user in ("app", "app_md5"):
            conn = await _connect(proxy, user)
            out.append(await conn.fetchval("SELECT current_user"))
            await conn.close()
        return out

    assert _run(allowed()) == ["app", "app_md5"]
    with psycopg.connect(proxy.dsn("app")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_matching_rule_refuses_and_asyncpg_sees_28000(start, cluster) -> None:
    # Only 10.0.0.0/8 may connect: the test's 127.0.0.1 matches no rule.
    proxy = start('\n[[access]]\naddresses = ["10.0.0.0/8"]\naction = "allow"\n')

    error = _run(_refusal(asyncpg.InvalidAuthorizationSpecificationError, proxy))
    assert error.sqlstate == "28000"
    assert str(error) == 'no pgsplit access rule allows connection for host "127.0.0.1", user "app", database "app"'
    assert _pool_users(proxy) == set()
    fields = _refused(proxy, "app", "app", APP_PASSWORD)
    assert fields["C"] == "28000" and fields["M"].startswith("no pgsplit access rule allows")


def test_max_client_connections_per_user_refuses_the_next_and_accepts_after_one_leaves(start) -> None:
    proxy = start(users={"app": {"max_client_connections": 2}})

    async def run() -> None:
        first, second = await _connect(proxy), await _connect(proxy)
        error = await _refusal(asyncpg.TooManyConnectionsError, proxy)
        assert error.sqlstate == "53300" and str(error) == 'too many connections for role "app"'
        other = await _connect(proxy, "app_md5")  # another user is not counted against app
        assert proxy.call(lambda: proxy.proxy.client_limits.user("app")) == 2
        await first.close()
        wait_until(lambda: proxy.call(lambda: proxy.proxy.client_limits.user("app")) == 1, timeout=10,
                   message="the closed session to be released")
        third = await _connect(proxy)
        assert await third.fetchval("SELECT 1") == 1
        for conn in (second, third, other):
            await conn.close()

    _run(run())
    wait_until(lambda: proxy.call(lambda: proxy.proxy.client_limits.user("app")) == 0, timeout=10,
               message="every session released")


def test_max_client_connections_per_database(start) -> None:
    proxy = start("\n[databases.app]\nmax_client_connections = 1\n")

    async def run() -> None:
        first = await _connect(proxy, "app", "app")
        error = await _refusal(asyncpg.TooManyConnectionsError, proxy, "app_md5", "app")
        assert str(error) == 'too many connections for database "app"'
        elsewhere = await _connect(proxy, "app_md5", "postgres")  # another database has no limit
        await elsewhere.close()
        await first.close()
        wait_until(lambda: proxy.call(lambda: proxy.proxy.client_limits.database("app")) == 0, timeout=10,
                   message="the closed session to be released")
        again = await _connect(proxy, "app_md5", "app")
        await again.close()

    _run(run())


def test_a_users_pool_size_bounds_its_server_connections(start) -> None:
    proxy = start(users={"app": {"pool_size": 1}}, pool={"size": 5})
    peaks: dict[str, int] = {}

    def sample() -> None:
        for pool in proxy.proxy.pools:
            peaks[pool.user] = max(peaks.get(pool.user, 0), pool.total)

    async def sleepers(user: str) -> float:
        conns = [await _connect(proxy, user) for _ in range(3)]
        for conn in conns:
            await conn.execute("SET pgsplit.route = 'primary'")
        t0 = time.monotonic()
        work = asyncio.gather(*(conn.execute("SELECT pg_sleep(0.4)") for conn in conns))
        while not work.done():
            proxy.call(sample)
            await asyncio.sleep(0.05)
        await work
        elapsed = time.monotonic() - t0
        for conn in conns:
            await conn.close()
        return elapsed

    assert _run(sleepers("app")) >= 1.1  # one at a time on its one connection
    assert _run(sleepers("app_md5")) < 1.1  # [pool] size 5: side by side
    assert peaks["app"] == 1 and peaks["app_md5"] >= 2
    assert proxy.call(lambda: max(p.total for p in proxy.proxy.pools if p.user == "app")) == 1


def test_a_reload_applies_rules_and_limits_to_new_clients_and_keeps_open_sessions(start, cluster) -> None:
    proxy = start()
    rules = '\n[[access]]\nusers = ["app_md5"]\naction = "reject"\n\n[[access]]\naction = "allow"\n'
    new = parse_config(_text(cluster, rules, users={"app": {"max_client_connections": 1}}), source="<test>")

    async def run() -> None:
        kept = [await _connect(proxy, "app"), await _connect(proxy, "app")]
        try:
            change = compare(proxy.proxy.config, new)
            assert change.applied == ("users", "access")
            proxy.call(proxy.proxy.reconfigure, change.config)
            error = await _refusal(asyncpg.InvalidAuthorizationSpecificationError, proxy, "app_md5")
            assert "access rule #1 rejects" in str(error)
            await _refusal(asyncpg.TooManyConnectionsError, proxy, "app")  # two are open, the new limit is one
            for conn in kept:  # the sessions opened before the reload go on
                assert await conn.fetchval("SELECT 1") == 1
        finally:
            for conn in kept:
                await conn.close()
        wait_until(lambda: proxy.call(lambda: proxy.proxy.client_limits.user("app")) == 0, timeout=10,
                   message="the sessions to be released")
        conn = await _connect(proxy, "app")
        await conn.close()

    _run(run())
