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

from collections import OrderedDict

DEFAULT_LIMIT = 100


class Evictions:
    """Statements closed to stay within the bound, over every pool of the process."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class PreparedStatements(OrderedDict):
    """Server-side statement names, least recently used first. `name in prepared` is the
    plain dict look-up (the hot path's check); a use moves the name to the end."""

    __slots__ = ("limit", "evictions")

    def __init__(self, limit: int = DEFAULT_LIMIT, evictions: Evictions | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.evictions = evictions if evictions is not None else Evictions()

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
