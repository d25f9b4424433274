"""proxy.access: [[access]]'s decision (first match wins, as pg_hba.conf) and the client
limits per user and per database, without sockets; and their config keys and wiring."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest
from hypothesis import given, strategies as st

from proxy.access import ClientCounts, Limits, Rule, client_address, refusal
from proxy.config import ConfigError, parse_config
from proxy.errors import InvalidAuthorization, TooManyConnections
from proxy.process.wiring import access_rules, limits, pool_sizes, runtime_settings

BASE = """
[[users]]
name = "app"
password = "app-secret"

[[users]]
name = "report"
password = "report-secret"

[backends.pg1]
host = "127.0.0.1"

[clusters.main]
primary = "pg1"
"""


def config(extra: str):
    return parse_config(BASE + textwrap.dedent(extra), source="test.toml", env={})


def problems(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(extra)
    return str(info.value).splitlines()


def rule(users=None, databases=None, networks=None, allow=True) -> Rule:
    return Rule(users=None if users is None else frozenset(users),
                databases=None if databases is None else frozenset(databases),
                networks=None if networks is None else tuple(ipaddress.ip_network(n) for n in networks),
                allow=allow)


# --- the decision --------------------------------------------------------------------------


def test_no_rules_allows_everyone() -> None:
    assert refusal((), "anyone", "anything", "203.0.113.9") is None


def test_no_match_is_refused_with_postgresqls_words() -> None:
    error = refusal((rule(users=["app"]),), "report", "app", "127.0.0.1")
    assert isinstance(error, InvalidAuthorization) and error.sqlstate == "28000" and error.fatal
    assert error.message == 'no pgsplit access rule allows connection for host "127.0.0.1", user "report", database "app"'


def test_a_reject_rule_names_its_number() -> None:
    rules = (rule(databases=["app"]), rule(allow=False), rule())
    assert refusal(rules, "app", "app", "10.0.0.1") is None
    error = refusal(rules, "app", "other", "10.0.0.1")
    assert error.message == 'pgsplit access rule #2 rejects connection for host "10.0.0.1", user "app", database "other"'


def test_addresses_match_by_network_and_an_ipv4_client_on_a_dual_stack_socket_is_ipv4() -> None:
    rules = (rule(networks=["10.0.0.0/8", "::1/128"]),)
    assert refusal(rules, "u", "d", "10.1.2.3") is None
    assert refusal(rules, "u", "d", "::ffff:10.1.2.3") is None
    assert refusal(rules, "u", "d", "::1") is None
    assert refusal(rules, "u", "d", "11.0.0.1") is not None
    assert refusal(rules, "u", "d", "not-an-address") is not None  # only "all" matches it
    assert refusal((rule(),), "u", "d", "not-an-address") is None
    assert client_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")


NAMES = st.sampled_from(["a", "b", "c"])
HOSTS = st.sampled_from(["127.0.0.1", "10.0.0.7", "192.168.1.1", "::1"])
RULES = st.builds(
    rule,
    users=st.none() | st.frozensets(NAMES, min_size=1),
    databases=st.none() | st.frozensets(NAMES, min_size=1),
    networks=st.none() | st.lists(st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "::1/128"]), min_size=1),
    allow=st.booleans(),
)


@given(rules=st.lists(RULES, max_size=6), user=NAMES, database=NAMES, host=HOSTS)
def test_the_first_matching_rule_decides(rules, user, database, host) -> None:
    address = ipaddress.ip_address(host)
    first = next((i for i, r in enumerate(rules) if r.matches(user, database, address)), None)
    error = refusal(rules, user, database, host)
    if not rules:
        assert error is None
    elif first is None:
        assert error is not None and error.message.startswith("no pgsplit access rule allows")
    elif rules[first].allow:
        assert error is None
    else:
        assert error is not None and error.message.startswith(f"pgsplit access rule #{first + 1} rejects")
    # Whatever follows the deciding rule changes nothing.
    if first is not None:
        tail = [rule(allow=not rules[first].allow)]
        assert (refusal(rules + tail, user, database, host) is None) == (error is None)


# --- the limits ----------------------------------------------------------------------------


def test_limits_per_user_and_per_database_refuse_the_next_and_release_on_leave() -> None:
    counts = ClientCounts()
    lim = Limits(per_user={"app": 2}, per_database={"db": 2})
    a, b, c, d = object(), object(), object(), object()
    counts.admit(a, "app", "db", lim)
    counts.admit(b, "app", "other", lim)
    with pytest.raises(TooManyConnections, match='too many connections for role "app"') as info:
        counts.admit(c, "app", "db", lim)
    assert info.value.sqlstate == "53300" and info.value.fatal
    counts.admit(c, "report", "db", lim)
    with pytest.raises(TooManyConnections, match='too many connections for database "db"'):
        counts.admit(d, "report", "db", lim)
    assert (counts.user("app"), counts.database("db")) == (2, 2)
    counts.leave(a, "app", "db")
    counts.leave(a, "app", "db")  # a session's cleanup may run twice
    assert (counts.user("app"), counts.database("db")) == (1, 1)
    counts.admit(d, "app", "db", lim)
    assert (counts.user("app"), counts.database("db")) == (2, 2)


def test_a_refused_session_is_not_counted() -> None:
    counts = ClientCounts()
    lim = Limits(per_user={"app": 5}, per_database={"db": 1})
    counts.admit(object(), "x", "db", lim)
    with pytest.raises(TooManyConnections):
        counts.admit(object(), "app", "db", lim)
    assert counts.user("app") == 0


# --- config keys and wiring ------------------------------------------------------------------


def test_keys_are_read_and_wired() -> None:
    c = config("""
        [[access]]
        users = ["report"]
        addresses = ["10.0.0.0/8", "::1"]
        action = "allow"

        [[access]]
        users = ["report"]
        action = "reject"

        [databases.app]
        max_client_connections = 7
    """)
    c = c.model_copy(update={"users": (c.users[0].model_copy(update={"max_client_connections": 3, "pool_size": 4}),
                                       c.users[1])})
    rules = access_rules(c)
    assert rules == (rule(users=["report"], networks=["10.0.0.0/8", "::1/128"]), rule(users=["report"], allow=False))
    assert limits(c) == Limits(per_user={"app": 3}, per_database={"app": 7})
    assert pool_sizes(c) == {"app": 4}
    assert runtime_settings(c).access == rules
    assert runtime_settings(config("")).access == () and runtime_settings(config("")).limits == Limits()


def test_user_keys_parse() -> None:
    c = parse_config(BASE.replace('password = "app-secret"',
                                  'password = "app-secret"\nmax_client_connections = 2\npool_size = 3'), env={})
    assert (c.users[0].max_client_connections, c.users[0].pool_size) == (2, 3)
    assert (c.users[1].max_client_connections, c.users[1].pool_size) == (None, None)


def test_rule_defaults_are_all_and_action_is_required() -> None:
    c = config('[[access]]\naction = "reject"\n')
    assert (c.access[0].users, c.access[0].databases, c.access[0].addresses) == ("all", "all", "all")
    assert problems("[[access]]\nusers = \"all\"\n") == ["test.toml: access.0.action: required key is missing"]


@pytest.mark.parametrize("extra, expected", [
    ('[[access]]\nusers = "app"\naction = "allow"\n',
     'test.toml: access.0.users: must be "all" or a list of users (e.g. ["app"])'),
    ('[[access]]\ndatabases = ["all"]\naction = "allow"\n',
     'test.toml: access.0.databases: "all" cannot be in a list: write "all" alone'),
    ('[[access]]\naddresses = []\naction = "allow"\n',
     'test.toml: access.0.addresses: must not be empty: list addresses (CIDR), or write "all"'),
    ('[[access]]\naddresses = ["10.0.0.0/8", "10.0.0.1/8"]\naction = "allow"\n',
     "test.toml: access.0.addresses.1: not an address or CIDR network: 10.0.0.1/8 has host bits set"),
    ('[[access]]\nusers = ["app", "repotr"]\naction = "reject"\n',
     "test.toml: access.0.users.1: 'repotr' is not a [[users]] name (known: app, report)"),
    ('[[access]]\naction = "trust"\n',
     "test.toml: access.0.action: Input should be 'allow' or 'reject'"),
    ('[databases.app]\nmax_client_connections = 0\n',
     "test.toml: databases.app.max_client_connections: Input should be greater than 0"),
    ('[databases.app]\npool_size = 3\n', "test.toml: databases.app.pool_size: unknown key"),
])
def test_mistakes_name_the_key(extra: str, expected: str) -> None:
    assert problems(extra) == [expected]


def test_user_limit_and_pool_size_must_be_positive() -> None:
    text = BASE.replace('password = "app-secret"', 'password = "app-secret"\nmax_client_connections = 0\npool_size = 0')
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="test.toml", env={})
    assert str(info.value).splitlines() == [
        "test.toml: users.0.max_client_connections: Input should be greater than 0",
        "test.toml: users.0.pool_size: Input should be greater than 0",
    ]
