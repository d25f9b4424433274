"""The protocol-level statements prepared on one server connection, bounded.

Every client's named statement is prepared, under the proxy's name for it, on each server
connection where it runs, and stays there for the next client that uses it. Without a
bound a pooled connection collects every distinct statement its clients ever prepared
(25,000 from one asyncpg client through a pool of one: 25,002 in the server process, 183 MB
resident; with the bound at 100: 100, 21 MB). So a
connection keeps at most `limit`, least recently used first: to prepare one more, the
session closes the oldest (a Close just ahead of the Parse, in the same write; its
CloseComplete is dropped), and prepares it again, transparently, when it is next needed.

A statement in use by the unit being written is never lost to that unit: a Close goes out
after every message written before it, and a message after it finds the name gone and
prepares it first. Must not know: the protocol, sessions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

DEFAULT_LIMIT = 100


class StatementNames:
    """The proxy's server-side names for client statements, for the whole process.

    A name comes from the statement's text and parameter types, so every pooled
    connection that has it prepared serves every client that uses it. After DDL changes
    the columns a statement returns, PostgreSQL refuses to run a statement prepared
    before it (0A000 "cached plan must not change result type") until the client
    prepares it again; shared by text, the client's new Parse would find the old one
    and change nothing. So after a client's DDL every text gets a new name (`new_epoch`),
    and a name a server refused so is retired (DDL the proxy did not see): a client that
    prepares it again gets a fresh statement on every connection, as on its own server.
    (The old ones age out of each connection's LRU.)"""

    __slots__ = ("_generation", "_epoch")

    def __init__(self) -> None:
        self._generation: dict[bytes, int] = {}  # base name -> times retired
        self._epoch = 0  # DDL seen through the proxy: see `new_epoch`

    def new_epoch(self) -> None:
        """A client's DDL has ended: every text gets a new name, so statements prepared
        from now on are made afresh wherever they run (those prepared before are left to
        each connection's LRU, as their clients may still use them, as on PostgreSQL).
        DDL that does not pass through the proxy is met by `retire` instead, once."""
        self._epoch += 1

    def name(self, sql: bytes, param_section: bytes) -> bytes:
        epoch = b"%d\0" % self._epoch if self._epoch else b""
        return self._current(b"pgsplit_" + hashlib.blake2b(epoch + sql + b"\0" + param_section,
                                                           digest_size=10).hexdigest().encode())

    def retire(self, name: bytes) -> None:
        """`name` can no longer serve its text; only the current name moves on (the old
        ones left on other connections fail there, each once per client, as they would)."""
        base = name[:_BASE_LENGTH]
        if name == self._current(base):
            self._generation[base] = self._generation.get(base, 0) + 1

    def _current(self, base: bytes) -> bytes:
        generation = self._generation.get(base)
        return base if generation is None else b"%s_%d" % (base, generation)


_BASE_LENGTH = len(b"pgsplit_") + 20


class Evictions:
    """Statements closed to stay within the bound, over every pool of the process."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class PreparedStatements(OrderedDict):
    """Server-side statement names, least recently used first. `name in prepared` is the
    plain dict look-up (the hot path's check); a use moves the name to the end."""

    __slots__ = ("limit", "evictions", "names")

    def __init__(self, limit: int = DEFAULT_LIMIT, evictions: Evictions | None = None,
                 names: StatementNames | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.evictions = evictions if evictions is not None else Evictions()
        self.names = names if names is not None else StatementNames()

    def add(self, name: bytes) -> None:
        self[name] = None
        self.move_to_end(name)

    def discard(self, name: bytes) -> None:
        self.pop(name, None)

    def make_room(self) -> list[bytes]:
        """The least recently used names to close so that one more fits; forgotten here."""
        over = len(self) - self.limit + 1
        if over <= 0:
            return []
        names = [self.popitem(last=False)[0] for _ in range(over)]
        self.evictions.count += over
        return names

    def retire_all(self) -> list[bytes]:
        """A plan here no longer gives the result type it was prepared with, and the
        server does not say whose: every name here is forgotten (returned, to be closed)
        and retired (`StatementNames`)."""
        names = list(self)
        for name in names:
            self.names.retire(name)
        self.clear()
        return names
