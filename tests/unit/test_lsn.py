"""router.lsn: the pg_lsn text format, and the coalescing of commit-LSN queries. No server."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.lsn import MAX_LSN, CommitLsnFetcher, CommitLsns, LsnFetchError, format_lsn, parse_lsn

# --- text format ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("0/0", 0),
    ("0/1", 1),
    ("16/B374D848", 0x16_B374D848),
    ("16/b374d848", 0x16_B374D848),
    ("0/16B3748", 0x16B3748),
    ("1/0", 1 << 32),
    ("00000001/00000000", 1 << 32),
    ("FFFFFFFF/FFFFFFFF", MAX_LSN),
])
def test_parse(text: str, value: int) -> None:
    assert parse_lsn(text) == value


@pytest.mark.parametrize(("value", "text"), [
    (0, "0/0"),
    (0x16_B374D848, "16/B374D848"),
    (0x16B3748, "0/16B3748"),
    (1 << 32, "1/0"),
    (MAX_LSN, "FFFFFFFF/FFFFFFFF"),
])
def test_format(value: int, text: str) -> None:
    assert format_lsn(value) == text


@pytest.mark.parametrize("text", [
    "", "/", "0/", "/0", "0", "16B374D848", "0/0/0", " 0/0", "0/0 ", "0 /0", "0x1/0", "+1/0",
    "-1/0", "1_0/0", "123456789/0", "0/123456789", "G/0", "0/g", "１/0", "0/0\n",
])
def test_parse_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        parse_lsn(text)


@pytest.mark.parametrize("value", [-1, MAX_LSN + 1, 1.0, "0/0", None, True])
def test_format_refuses_garbage(value: object) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        format_lsn(value)  # type: ignore[arg-type]


def test_parse_refuses_non_text() -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        parse_lsn(b"0/0")  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=MAX_LSN))
def test_round_trip_from_int(value: int) -> None:
    text = format_lsn(value)
    assert parse_lsn(text) == value
    assert text == text.upper()
    hi, lo = text.split("/")
    assert hi == f"{value >> 32:X}" and lo == f"{value & 0xFFFFFFFF:X}"


@given(st.from_regex(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", fullmatch=True))
def test_round_trip_from_text(text: str) -> None:
    hi, lo = text.split("/")
    assert format_lsn(parse_lsn(text)) == f"{int(hi, 16):X}/{int(lo, 16):X}"


@given(st.integers(min_value=0, max_value=MAX_LSN), st.integers(min_value=0, max_value=MAX_LSN))
def test_order_is_numeric_order(a: int, b: int) -> None:
    # Comparing parsed values must agree with pg_lsn's ordering, which is the 64-bit value.
    assert (parse_lsn(format_lsn(a)) < parse_lsn(format_lsn(b))) == (a < b)


@given(st.text(max_size=20))
def test_parse_never_crashes_otherwise(text: str) -> None:
    try:
        value = parse_lsn(text)
    except ValueError:
        return
    assert 0 <= value <= MAX_LSN


# --- CommitLsns -------------------------------------------------------------------------------


def test_a_synchronous_commit_is_covered_by_the_flush_position_an_asynchronous_one_by_the_insert() -> None:
    lsns = CommitLsns(flush=0x1000, insert=0x1400)
    assert lsns.covering(async_commit=False) == 0x1000
    assert lsns.covering(async_commit=True) == 0x1400


# --- CommitLsnFetcher -------------------------------------------------------------------------


class FakePrimary:
    """A query whose every call blocks until the test releases it; LSNs go up by 100."""

    def __init__(self) -> None:
        self.lsn = 1000
        self.calls = 0
        self.gates: list[asyncio.Event] = []
        self.fail_next: BaseException | None = None

    async def query(self) -> int:
        self.calls += 1
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        self.lsn += 100
        return self.lsn

    async def release(self, n: int) -> None:
        """Let query number n (1-based) return, once it has been sent."""
        for _ in range(100):
            if len(self.gates) >= n:
                break
            await asyncio.sleep(0)
        self.gates[n - 1].set()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_hundred_waiters_with_earlier_tickets_share_one_query() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    tickets = [fetcher.ticket() for _ in range(100)]  # commits that finished before any query
    tasks = [asyncio.create_task(fetcher.fetch_after(t)) for t in tickets]
    await settle()
    await primary.release(1)
    results = await asyncio.gather(*tasks)
    assert results == [1100] * 100
    assert fetcher.queries_sent == 1 == primary.calls


async def test_ticket_issued_while_query_in_flight_waits_for_the_next_query() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    early = asyncio.create_task(fetcher.fetch_after(fetcher.ticket()))
    await settle()
    assert fetcher.queries_sent == 1
    # A commit finishes now: the query in flight was sent before it and may not cover it.
    late_ticket = fetcher.ticket()
    late = [asyncio.create_task(fetcher.fetch_after(late_ticket)) for _ in range(10)]
    also_early = asyncio.create_task(fetcher.fetch_after(0))
    await settle()
    assert fetcher.queries_sent == 1  # one at a time: the next round waits
    await primary.release(1)
    assert await early == 1100 and await also_early == 1100
    await settle()
    assert fetcher.queries_sent == 2  # started as soon as the first returned
    assert not any(t.done() for t in late)
    await primary.release(2)
    assert await asyncio.gather(*late) == [1200] * 10
    assert primary.calls == 2


async def test_a_finished_query_sent_after_the_ticket_is_reused() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    ticket = fetcher.ticket()
    task = asyncio.create_task(fetcher.fetch_current())
    await settle()
    await primary.release(1)
    assert await task == 1100
    assert await fetcher.fetch_after(ticket) == 1100  # that query was sent after the ticket
    assert fetcher.queries_sent == 1
    # A ticket taken after the query was sent needs a new one.
    later = asyncio.create_task(fetcher.fetch_after(fetcher.ticket()))
    await settle()
    assert fetcher.queries_sent == 2
    await primary.release(2)
    assert await later == 1200


async def test_fetch_current_never_uses_a_query_sent_before_the_call() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    first = asyncio.create_task(fetcher.fetch_current())
    await settle()
    current = [asyncio.create_task(fetcher.fetch_current()) for _ in range(5)]
    await settle()
    await primary.release(1)
    assert await first == 1100
    await settle()
    await primary.release(2)
    assert await asyncio.gather(*current) == [1200] * 5
    assert fetcher.queries_sent == 2


async def test_errors_reach_every_waiter_of_the_round_and_the_next_round_works() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    primary.fail_next = ConnectionResetError("primary went away")
    ticket = fetcher.ticket()
    tasks = [asyncio.create_task(fetcher.fetch_after(ticket)) for _ in range(5)]
    await settle()
    await primary.release(1)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)
    # The failed round produced nothing to reuse: the same ticket starts a new query.
    again = asyncio.create_task(fetcher.fetch_after(ticket))
    await settle()
    await primary.release(2)
    assert await again == 1100
    assert fetcher.queries_sent == 2


async def test_an_error_fails_only_its_own_round() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    early = asyncio.create_task(fetcher.fetch_current())
    await settle()
    late = asyncio.create_task(fetcher.fetch_current())
    await settle()
    primary.fail_next = TimeoutError("no answer")
    await primary.release(1)
    with pytest.raises(TimeoutError):
        await early
    await settle()
    await primary.release(2)
    assert await late == 1100


async def test_cancelled_waiters_do_not_cancel_the_round_of_others() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    ticket = fetcher.ticket()
    a = asyncio.create_task(fetcher.fetch_after(ticket))  # starts the query
    b = asyncio.create_task(fetcher.fetch_after(ticket))  # joins it
    await settle()
    a.cancel()
    await settle()
    await primary.release(1)
    assert await b == 1100
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_next_round_is_dropped_when_all_its_waiters_give_up() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    first = asyncio.create_task(fetcher.fetch_current())
    await settle()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await fetcher.fetch_current()  # would need round 2
    await primary.release(1)
    assert await first == 1100
    await settle()
    assert fetcher.queries_sent == 1  # nobody waits any more: no second query


async def test_aclose_fails_waiters_with_lsn_fetch_error() -> None:
    primary = FakePrimary()
    fetcher = CommitLsnFetcher(primary.query)
    first = asyncio.create_task(fetcher.fetch_current())
    await settle()
    second = asyncio.create_task(fetcher.fetch_current())
    await settle()
    await fetcher.aclose()
    for task in (first, second):
        with pytest.raises(LsnFetchError):
            await task
    assert fetcher.queries_sent == 1
    # Still usable afterwards.
    third = asyncio.create_task(fetcher.fetch_current())
    await settle()
    await primary.release(2)
    assert await third == 1100
