"""WAL positions (LSNs) and the coalesced fetcher of the primary's commit LSNs.

Owns: the LSN text format (PostgreSQL's ``pg_lsn``: ``%X/%X``, two hexadecimal halves of a
64-bit position), the query that reads the primary's commit positions (`COMMIT_LSN_SQL`,
`CommitLsns`) and `CommitLsnFetcher`, which turns "this session's commit has returned"
into LSNs at or past that commit (design.md, "Read-your-writes").
Must not know: sockets, sessions, asyncpg. The fetcher is handed a coroutine function that
runs `COMMIT_LSN_SQL` on the primary and returns its `CommitLsns`; the monitor provides one.
The session runs the same query itself when it reads the positions on its own connection.

Why positions read *after* the commit returned are enough: a commit inserts its WAL
record before it is acknowledged, and the positions only move forward, so any later
reading is at or past the commit record's end (`CommitLsns.covering` says which position
covers which kind of commit).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Generic, NamedTuple, TypeVar

__all__ = ["COMMIT_LSN_SQL", "CommitLsnFetcher", "CommitLsns", "LsnFetchError", "format_lsn", "parse_lsn",
           "REPLAY_WAIT_SQL"]

MAX_LSN = (1 << 64) - 1

# pg_lsn_in (src/backend/utils/adt/pg_lsn.c): 1-8 hex digits, '/', 1-8 hex digits, nothing
# else (no whitespace, no sign, no 0x prefix).
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> ``0x16_B374D848``; ValueError on anything pg_lsn would refuse."""
    if not isinstance(text, str):
        raise ValueError(f"invalid LSN {text!r}: expected text like '16/B374D848'")
    m = _LSN_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"invalid LSN {text!r}: expected two hexadecimal numbers "
                         "of 1-8 digits separated by '/', like '16/B374D848'")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    """``0x16_B374D848`` -> ``"16/B374D848"`` (upper-case hex, as PostgreSQL prints it)."""
    if isinstance(lsn, bool) or not isinstance(lsn, int):
        raise ValueError(f"invalid LSN {lsn!r}: expected an int")
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"invalid LSN {lsn}: outside 0..2**64-1")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


# A query a hot standby runs to wait, on its own side, until it has replayed $1 (pg_lsn
# text), for at most $2 milliseconds. Its one row is the replay position as soon as that
# reaches $1, or once the time is up; NULL on a server not in recovery. So the answer comes
# one round trip after the replay, not a poll interval later. Plain SQL (no PL/pgSQL), with
# parameters so that one prepared statement serves every wait: the CASE looks before it
# naps (pg_sleep rounds a nap up to 1 ms), LIMIT 1 stops at the first row that passes, and
# generate_series, which only bounds the naps, sits in a select list so that its rows come
# one at a time (in FROM they would all be built first).
REPLAY_WAIT_SQL = (
    "SELECT pg_catalog.pg_last_wal_replay_lsn()::text"
    " FROM (SELECT pg_catalog.generate_series(1, 4 * $2::int + 1)) AS naps"
    " WHERE CASE WHEN pg_catalog.pg_last_wal_replay_lsn() >= $1::text::pg_lsn"
    " OR pg_catalog.clock_timestamp() >= pg_catalog.statement_timestamp() + $2::int * interval '1 ms'"
    " OR pg_catalog.pg_last_wal_replay_lsn() IS NULL"
    " THEN true ELSE pg_catalog.pg_sleep(0.0005) IS NULL END LIMIT 1"
)


# A commit that returned with synchronous_commit on (or local, remote_*) is flushed, so the
# flush position covers it, and it is as far as replicas can get (WAL is streamed up to
# it). A commit with synchronous_commit = off may not be flushed yet: only the insert
# position covers it (replicas reach it once the WAL writer flushes).
COMMIT_LSN_SQL = "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text"


class CommitLsns(NamedTuple):
    """What a read after a commit waits for (see COMMIT_LSN_SQL)."""

    flush: int
    insert: int

    def covering(self, async_commit: bool) -> int:
        """The LSN that covers a commit made before the query: a synchronous one is flushed,
        an asynchronous one (synchronous_commit = off) only inserted."""
        return self.insert if async_commit else self.flush


class LsnFetchError(ConnectionError):
    """The primary's LSN could not be read for this round (the query was cancelled)."""


Positions = TypeVar("Positions")  # what the query returns: CommitLsns in the proxy


class CommitLsnFetcher(Generic[Positions]):
    """LSNs at or past a session's last commit, one query per round for everyone waiting.

    Order is kept with a sequence number instead of a clock. `ticket()` returns the number
    of queries started so far; a session records it when the ReadyForQuery of its commit
    arrives. Query number ``n`` (1-based) was sent after every ticket below ``n``, so its
    result serves them all. `fetch_after(t)` therefore

    - returns the last result at once if that query was started after ``t``;
    - joins the query in flight if it was started after ``t``;
    - otherwise joins the *next* round, which starts as soon as the one in flight returns
      (or at once when nothing is in flight). One query is in flight at a time.

    A failed query fails every waiter of its round; the next call starts a new round.
    ``queries_sent`` counts the queries started (tests use it to show coalescing).
    The fetcher only orders and shares results; it never looks inside them (the proxy's
    query returns `CommitLsns`, and each waiter picks the position covering its commit).
    """

    def __init__(self, query: Callable[[], Awaitable[Positions]]):
        self._query = query
        self._started = 0  # queries started; the one in flight, if any, has this number
        self._current: asyncio.Future[Positions] | None = None  # result of the query in flight
        self._next: asyncio.Future[Positions] | None = None  # the round after it, if anyone waits
        self._next_waiters = 0
        self._task: asyncio.Task[None] | None = None
        self._last: tuple[int, Positions] | None = None  # (query number, result) of the last success
        self._closed = False
        self.queries_sent = 0

    def ticket(self) -> int:
        """The sequence value to record when a commit's ReadyForQuery arrives."""
        return self._started

    async def fetch_after(self, ticket: int) -> Positions:
        """Positions read by a query sent after ``ticket`` was issued."""
        last = self._last
        if last is not None and last[0] > ticket:
            return last[1]
        if self._current is None:
            return await asyncio.shield(self._launch(None))
        if self._started > ticket:
            return await asyncio.shield(self._current)
        # The query in flight was sent before this ticket: it may predate the commit.
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        self._next_waiters += 1
        try:
            return await asyncio.shield(fut)
        finally:
            if self._next is fut:  # not started yet: forget it if nobody waits any more
                self._next_waiters -= 1
                if self._next_waiters == 0:
                    self._next = None

    async def fetch_current(self) -> Positions:
        """Positions read after this call began (``global`` consistency)."""
        return await self.fetch_after(self.ticket())

    async def aclose(self) -> None:
        """Cancel the query in flight (its waiters, and those of the next round, get
        LsnFetchError). Later calls still work: they start new rounds."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._closed = False

    def _launch(self, fut: asyncio.Future[Positions] | None) -> asyncio.Future[Positions]:
        loop = asyncio.get_running_loop()
        if fut is None:
            fut = loop.create_future()
        self._started += 1
        self.queries_sent += 1
        self._current = fut
        self._task = loop.create_task(self._run(self._started, fut))
        return fut

    async def _run(self, number: int, fut: asyncio.Future[Positions]) -> None:
        try:
            value = await self._query()
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_exception(LsnFetchError("the query for the primary's WAL position was cancelled"))
            raise
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if self._last is None or number > self._last[0]:
                self._last = (number, value)
            if not fut.done():
                fut.set_result(value)
        finally:
            self._current = None
            nxt, self._next, self._next_waiters = self._next, None, 0
            if nxt is not None and not nxt.done():
                if self._closed:
                    nxt.set_exception(LsnFetchError("the LSN fetcher was closed"))
                else:
                    self._launch(nxt)
