"""Where did a statement run? Helpers for the routing and pooling integration tests.

Two ways to tell, as the style guide asks: ask the backend in the same statement
(``pg_is_in_recovery()``, ``inet_server_port()``, see ``WHERE_SQL``), or, for statements that
cannot return that (DDL, COPY, LOCK, ...), count the units the proxy served per role
around the statement (``UnitCounter``: deltas of ``proxy.proxy.metrics.units.units``, read
on the proxy's own loop so the counts are never read half-updated).
"""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

WHERE_SQL = "SELECT pg_is_in_recovery(), inet_server_port()"


def units_snapshot(proxy) -> dict[tuple[str, str, str], int]:
    """{(backend, role, kind): units served} as the proxy counts them now."""
    return proxy.call(lambda: dict(proxy.proxy.metrics.units.units))


def by_role(before: dict, after: dict) -> Counter:
    """Units served between two snapshots, by role ("primary"/"replica")."""
    out: Counter = Counter()
    for key, n in after.items():
        d = n - before.get(key, 0)
        if d:
            out[key[1]] += d
    return out


def by_backend(before: dict, after: dict) -> Counter:
    out: Counter = Counter()
    for key, n in after.items():
        d = n - before.get(key, 0)
        if d:
            out[key[0]] += d
    return out


class UnitCounter:
    """Units served by role since the last `mark()` (or creation)."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.base = units_snapshot(proxy)

    def mark(self) -> None:
        self.base = units_snapshot(self.proxy)

    def roles(self) -> Counter:
        return by_role(self.base, units_snapshot(self.proxy))

    def backends(self) -> Counter:
        return by_backend(self.base, units_snapshot(self.proxy))


def metrics_text(proxy) -> str:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample of the Prometheus text `text` (0.0 if it is absent)."""
    want = labels or {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in want.items()):
            return float(m.group(4))
    return 0.0


def retries(proxy, reason: str | None = None) -> float:
    """pgsplit_retries_total (for one reason, or summed over all), read from the registry."""
    text = proxy.call(lambda: proxy.proxy.metrics.exposition().decode())
    total = 0.0
    for line in text.splitlines():
        if line.startswith("pgsplit_retries_total"):
            m = re.search(r'reason="([^"]*)"\}\s+(\S+)$', line)
            if m and (reason is None or m.group(1) == reason):
                total += float(m.group(2))
    return total


@contextmanager
def routed(proxy, *, primary: int | None = None, replica: int | None = None,
           retried: int | None = 0) -> Iterator[UnitCounter]:
    """Assert the units served inside the block: `primary`/`replica` exact counts (None:
    not checked) and how many were retried (0 by default: a write that reached a replica
    and was silently retried on the primary would otherwise look routed right)."""
    r0 = retries(proxy)
    counter = UnitCounter(proxy)
    yield counter
    roles = counter.roles()
    got = {"primary": roles.get("primary", 0), "replica": roles.get("replica", 0)}
    want = dict(got)
    if primary is not None:
        want["primary"] = primary
    if replica is not None:
        want["replica"] = replica
    assert got == want, f"units served by role: {got}, expected {want}"
    if retried is not None:
        assert retries(proxy) - r0 == retried, f"retries: {retries(proxy) - r0}, expected {retried}"


def node_by_port(cluster, port: int) -> str:
    for node in cluster.nodes:
        if node.port == port:
            return node.name
    raise AssertionError(f"port {port} is not a node of cluster {cluster.name}: "
                         f"{[(n.name, n.port) for n in cluster.nodes]}")


def on(cluster, row: tuple[Any, ...]) -> str:
    """Node name of a (pg_is_in_recovery(), inet_server_port(), ...) row; checks that the
    two agree (a replica's port answers in recovery, the primary's does not)."""
    in_recovery, port = row[0], row[1]
    name = node_by_port(cluster, port)
    assert in_recovery == (name != cluster.primary.name), (row, name)
    return name

