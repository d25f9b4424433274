"""Replies the proxy composes itself, in the shape a server would give them.

Owns: encoding an answer (a result set or a command tag, or an error) for a simple Query
or for an extended-protocol group (Parse/Bind/Describe/Execute/Close/Sync), so that
`SHOW pgsplit.last_lsn`, `SET pgsplit.*`, a deferred `BEGIN` and the like look to a driver
exactly like a server's reply. Must not know: sessions, routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy import wire
from proxy.errors import ProxyError


@dataclass(frozen=True, slots=True)
class Answer:
    tag: str = ""
    columns: tuple[str, ...] = ()  # empty: no result set (SET, BEGIN, ...)
    rows: tuple[tuple[str | None, ...], ...] = ()
    error: ProxyError | None = None
    notices: tuple[bytes, ...] = field(default=())


def _result(answer: Answer) -> bytes:
    out = b"".join(answer.notices)
    if answer.error is not None:
        return out + answer.error.to_wire()
    if answer.columns:
        out += wire.row_description(list(answer.columns))
        out += b"".join(wire.data_row(list(r)) for r in answer.rows)
    return out + wire.command_complete(answer.tag)


def simple(answer: Answer, status: int) -> bytes:
    """Reply to a Query message (an error inside a transaction block fails the block)."""
    if answer.error is not None and status == wire.TX_IN_BLOCK:
        status = wire.TX_FAILED
    return _result(answer) + wire.ready_for_query(status)


def extended(answer: Answer, message_types: list[tuple[int, int]], status: int) -> bytes:
    """Reply to an extended-protocol group, message by message.

    message_types: [(type byte, describe/close kind byte or 0), ...] in the client's order.
    After an error, everything up to Sync is skipped, as a server does.
    """
    out = []
    failed = False
    for t, kind in message_types:
        if t == wire.F_SYNC:
            out.append(wire.ready_for_query(wire.TX_FAILED if failed and status != wire.TX_IDLE else status))
            failed = False
            continue
        if failed:
            continue
        if t == wire.F_PARSE:
            out.append(wire.PARSE_COMPLETE)
        elif t == wire.F_BIND:
            out.append(wire.BIND_COMPLETE)
        elif t == wire.F_CLOSE:
            out.append(wire.CLOSE_COMPLETE)
        elif t == wire.F_DESCRIBE:
            if kind == 0x53:  # statement: parameters first (none), then the row shape
                out.append(wire.message(wire.B_PARAM_DESCRIPTION, b"\0\0"))
            out.append(wire.row_description(list(answer.columns)) if answer.columns and answer.error is None
                       else wire.NO_DATA)
        elif t == wire.F_EXECUTE:
            if answer.error is not None:
                out.append(b"".join(answer.notices) + answer.error.to_wire())
                failed = True
            else:
                out.append(b"".join(answer.notices))
                out.extend(wire.data_row(list(r)) for r in answer.rows)
                out.append(wire.command_complete(answer.tag))
    return b"".join(out)
