"""What the classifier answers: the immutable `Analysis` of one SQL text.

Owns: the vocabulary a classification is written in (`Route`, `TxControl`, `Pin`,
`Unpin`, `SessionEffect`) and `Analysis`, the one value the proxy reads per unit.
Must not know: SQL parsing, caches. It is apart from the classifier so that the data
plane can read an analysis without importing pglast's tree walk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Route(enum.Enum):
    READ = "read"  # may go to a replica
    WRITE = "write"  # needs the primary


class TxControl(enum.Enum):
    BEGIN = "begin"
    BEGIN_READ_ONLY = "begin_read_only"
    COMMIT = "commit"  # COMMIT, END (also COMMIT AND CHAIN)
    ROLLBACK = "rollback"  # ROLLBACK, ABORT
    SET_TX_READ_ONLY = "set_tx_read_only"  # SET [LOCAL] TRANSACTION READ ONLY
    SAVEPOINT = "savepoint"  # SAVEPOINT, RELEASE, ROLLBACK TO
    PREPARE_TRANSACTION = "prepare_transaction"  # PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED
    OTHER = "other"  # SET TRANSACTION without READ ONLY (isolation, READ WRITE, SNAPSHOT)


class Pin(enum.Enum):
    """Session state that cannot follow the client across server connections."""

    TEMP_TABLE = "temp_table"  # CREATE TEMP TABLE/VIEW/SEQUENCE, SELECT INTO TEMP, pg_temp.* objects
    LISTEN = "listen"
    ADVISORY_LOCK = "advisory_lock"  # session-level advisory locks (not the _xact_ ones)
    HOLD_CURSOR = "hold_cursor"  # DECLARE ... WITH HOLD
    # Other session state the proxy cannot replay: set_config whose arguments are not
    # constants (or that may run other than once), setseed, LOAD, dblink connections,
    # temporary replication slots, a replication origin session. Only DISCARD ALL ends it.
    SESSION_STATE = "session_state"


class Unpin(enum.Enum):
    UNLISTEN_ALL = "unlisten_all"  # UNLISTEN *
    ADVISORY_UNLOCK_ALL = "advisory_unlock_all"  # pg_advisory_unlock_all()
    DISCARD_TEMP = "discard_temp"  # DISCARD TEMP
    DISCARD_ALL = "discard_all"  # DISCARD ALL: implies every other Unpin
    CLOSE_ALL = "close_all"  # CLOSE ALL: closes WITH HOLD cursors too


@dataclass(frozen=True, slots=True)
class SessionEffect:
    """A statement that changes session state the proxy must track.

    kind: "set", "reset", "reset_all", "discard_all", "prepare", "deallocate",
    "deallocate_all", "pgsplit_set", "pgsplit_show", "pgsplit_reset".

    name: GUC name lowercased (set/reset; pgsplit_* without the "pgsplit." prefix), or
    the prepared statement name as the parser normalised it (prepare/deallocate:
    unquoted names are lowercased by PostgreSQL, quoted ones keep their case).

    value: pgsplit_set: the value as a plain string (quotes removed, several values
    joined with ", "). For "set" also filled when every value is a plain constant
    (so the proxy can see e.g. default_transaction_read_only = "on"); None for
    SET ... TO DEFAULT and for values that are not plain constants.

    text: this one statement, sliced from the input (leading/trailing whitespace and
    comments removed, no trailing semicolon), to be replayed verbatim.  Send each
    text as its own statement or join them with ";\\n".

    ``SET SESSION CHARACTERISTICS AS TRANSACTION ...`` yields one "set" effect per
    option, named default_transaction_read_only / default_transaction_isolation /
    default_transaction_deferrable, each carrying the whole statement as text.
    """

    kind: str
    name: str | None
    value: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Analysis:
    route: Route
    tx: TxControl | None = None  # first transaction-control statement
    effects: tuple[SessionEffect, ...] = ()
    pins: frozenset[Pin] = frozenset()
    unpins: frozenset[Unpin] = frozenset()
    hint: Route | None = None  # leading /* pgsplit:primary */ or /* pgsplit:replica */
    parse_error: bool = False  # unparsable -> route WRITE
    statements: int = 1
    # Names used by SQL EXECUTE (also inside EXPLAIN / CREATE TABLE AS).  A top-level
    # EXECUTE is routed WRITE here: the proxy should use the analysis it kept for the
    # matching PREPARE (whose route is the prepared query's route) instead.
    executes: tuple[str, ...] = ()
    is_copy_in: bool = False  # COPY ... FROM STDIN
    # The text names synchronous_commit (SET LOCAL, set_config): a commit of its transaction
    # may return before its WAL is flushed, which read-your-writes must know.
    mentions_sync_commit: bool = False
    # DDL (CREATE, ALTER, DROP, RENAME...): a statement prepared before it may no longer
    # return what it was prepared for; the proxy's shared server statements start afresh.
    changes_schema: bool = False
    reason: str = ""  # short reason for WRITE, for logs and tests
    # One statement whose only effect is on data: no session state, pins, EXECUTE, COPY
    # FROM STDIN, synchronous_commit or DDL for the proxy to follow (computed once, read
    # per unit).
    plain: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain", not (
            self.effects or self.pins or self.unpins or self.executes or self.is_copy_in or self.statements != 1
            or self.mentions_sync_commit or self.changes_schema))

