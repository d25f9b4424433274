"""Who may reach which database from where ([[access]]), and the client limits per user and
per database: pure decisions, no sockets.

Owns: the rules as the listener applies them (first match wins, as in pg_hba.conf; with
rules and no match, refused; with no rules, everything allowed), the messages a refused
client gets (PostgreSQL's wording), and counting authenticated sessions per user and per
database against their limits. Must not know: the handshake, the config file's shape
(proxy.process.wiring builds `Rule`s from it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.errors import InvalidAuthorization, TooManyConnections

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """One [[access]] entry; None stands for "all"."""

    users: frozenset[str] | None
    databases: frozenset[str] | None
    networks: tuple[Network, ...] | None
    allow: bool

    def matches(self, user: str, database: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if self.users is not None and user not in self.users:
            return False
        if self.databases is not None and database not in self.databases:
            return False
        if self.networks is None:
            return True
        # (a client address that is not IP, e.g. a Unix socket, matches only "all")
        return address is not None and any(address in net for net in self.networks)


def client_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's address as rules compare it: an IPv4 client on a dual-stack socket
    (::ffff:10.0.0.5) is the IPv4 address, so IPv4 rules match it."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refusal(rules: Sequence[Rule], user: str, database: str, host: str) -> InvalidAuthorization | None:
    """None when `user` may reach `database` from `host`, else the 28000 error to send.
    No rules: allowed. Otherwise the first rule that matches decides; none: refused."""
    if not rules:
        return None
    address = client_address(host)
    who = f'host "{host}", user "{user}", database "{database}"'
    for number, rule in enumerate(rules, 1):
        if rule.matches(user, database, address):
            if rule.allow:
                return None
            return InvalidAuthorization(f"pgsplit access rule #{number} rejects connection for {who}")
    return InvalidAuthorization(f"no pgsplit access rule allows connection for {who}")


@dataclass(frozen=True)
class Limits:
    """max_client_connections of [[users]] and [databases.NAME] (absent: no limit)."""

    per_user: dict[str, int] = field(default_factory=dict)
    per_database: dict[str, int] = field(default_factory=dict)


class ClientCounts:
    """Authenticated sessions by user and by database. `admit` checks and counts in one
    step (nothing awaited in between), `leave` is safe to call more than once."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[object]] = {}
        self._by_database: dict[str, set[object]] = {}

    def admit(self, session: object, user: str, database: str, limits: Limits) -> None:
        """Count `session`, or raise 53300 (PostgreSQL's words) when a limit is reached."""
        limit = limits.per_user.get(user)
        if limit is not None and self.user(user) >= limit:
            raise TooManyConnections(f'too many connections for role "{user}"')
        limit = limits.per_database.get(database)
        if limit is not None and self.database(database) >= limit:
            raise TooManyConnections(f'too many connections for database "{database}"')
        self._by_user.setdefault(user, set()).add(session)
        self._by_database.setdefault(database, set()).add(session)

    def leave(self, session: object, user: str, database: str) -> None:
        # (an emptied entry goes: database names come from clients, the maps stay bounded
        # by the sessions open now)
        for counts, key in ((self._by_user, user), (self._by_database, database)):
            sessions = counts.get(key)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del counts[key]

    def user(self, name: str) -> int:
        return len(self._by_user.get(name, ()))

    def database(self, name: str) -> int:
        return len(self._by_database.get(name, ()))
