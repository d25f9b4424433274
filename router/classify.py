"""SQL text -> routing / session-state analysis.

Pure: no I/O, no asyncio, imports only the stdlib and pglast (never ``proxy``).

The proxy calls :meth:`Classifier.classify` once per unit of work (simple-protocol
Query text, or the text of an extended-protocol Parse).  The answer is an immutable
:class:`Analysis`: where the statement(s) may run (:class:`Route`), the transaction
control it contains (:class:`TxControl`), the session state it changes
(:class:`SessionEffect`), and the session state it creates or drops that cannot
follow the client to another server connection (:class:`Pin` / :class:`Unpin`).

Hot path, cheapest first (pglast 8.8: ``fingerprint`` is a parse, 6-16 us per pgbench
statement on a 2-core dev machine, in the range of ``parse_sql_json``; ``json.loads`` of
that JSON costs two to four times as much again; ``parse_sql``, some 20-30 times a
fingerprint, is never used):

1. exact-text LRU (extended protocol: the same text comes back every time);
2. a regex prefilter that proves trivially-safe SELECTs without calling pglast;
3. shape LRU (simple protocol inlines constants: :func:`literal_shape` blanks them with
   two byte translations, ~2 us, for texts whose constants a plain look can delimit);
4. the leading ``/* pgsplit:primary|replica */`` hint (a string check);
5. fingerprint LRU (the same, for every text pglast parses: comments, quoted names...);
6. full analysis: walk the JSON tree of ``parse_sql_json`` (dicts/lists).

The fingerprint ignores constant values, so an analysis that depends on a constant
(``BEGIN READ ONLY`` and ``BEGIN READ WRITE`` share a fingerprint, so do
``SET TRANSACTION READ ONLY/READ WRITE``, ``EXECUTE a``/``EXECUTE b``, ``SET x = 1``/
``SET x = 2``) or carries literal text (any :class:`SessionEffect`) is cached by exact
text only, never by fingerprint or shape (the shape LRU keeps only what the fingerprint
LRU would).

Known limits (same as every parser-based router; the hints are the escape hatch):
writes hidden behind a view, a rule, a trigger, a row-level-security policy, an
operator or a cast whose function is volatile, or inside a ``DO`` block or a function
body (temporary tables, advisory locks taken there) are not seen.
"""

from __future__ import annotations

import enum
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, NamedTuple

from pglast import parser as _pg

__all__ = [
    "Route",
    "TxControl",
    "Pin",
    "Unpin",
    "SessionEffect",
    "Analysis",
    "CacheInfo",
    "Classifier",
    "is_trivial_select",
    "literal_shape",
    "parse_hint",
    "volatile_function_names",
    "VOLATILE_FUNCTIONS_SQL",
    "BUILTIN_WRITER_FUNCTIONS",
]


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
    reason: str = ""  # short reason for WRITE, for logs and tests


class CacheInfo(NamedTuple):
    text_hits: int
    fingerprint_hits: int
    prefilter_hits: int
    misses: int
    text_size: int
    fingerprint_size: int
    shape_hits: int  # by literal_shape: the same statement with other constants
    shape_size: int

    @property
    def hits(self) -> int:
        return self.text_hits + self.fingerprint_hits + self.prefilter_hits + self.shape_hits


# --------------------------------------------------------------------------------------
# Functions that write, need the primary's session, or change server state.

BUILTIN_WRITER_FUNCTIONS: frozenset[str] = frozenset(
    {
        # sequences; currval/lastval read the state of the session that called nextval
        "nextval", "setval", "currval", "lastval",
        "set_config",
        # need a transaction id
        "txid_current", "txid_current_if_assigned",
        "pg_current_xact_id", "pg_current_xact_id_if_assigned",
        "pg_notify",
        # large objects that write (lo_export writes a file on the server)
        "lo_create", "lo_creat", "lo_import", "lo_unlink", "lo_open", "lowrite",
        "lo_put", "lo_truncate", "lo_truncate64", "lo_from_bytea", "lo_export",
        # server control
        "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_switch_wal",
        "pg_create_restore_point", "pg_promote", "pg_rotate_logfile",
        "pg_wal_replay_pause", "pg_wal_replay_resume",
        "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
        # replication slots
        "pg_drop_replication_slot", "pg_replication_slot_advance",
        "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
        "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes",
        "pg_logical_emit_message",
        "dblink_exec", "dblink_connect", "dblink_connect_u",
        "setseed",  # session state of random()
    }
)
_WRITER_PREFIXES: tuple[str, ...] = (
    "pg_advisory_",  # pg_advisory_lock*, pg_advisory_xact_lock*, pg_advisory_unlock*
    "pg_try_advisory",
    "pg_stat_reset",
    "pg_replication_origin_",
)
_SESSION_ADVISORY_LOCKS = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
)
# Builtin writers whose effect outlives the transaction in the server session.
_SESSION_STATE_FUNCTIONS = frozenset(
    {"setseed", "dblink_connect", "dblink_connect_u", "pg_replication_origin_session_setup"}
)


def _is_builtin_writer(name: str) -> bool:
    return (
        name in BUILTIN_WRITER_FUNCTIONS
        or name.startswith(_WRITER_PREFIXES)
        or (name.startswith("pg_create_") and name.endswith("_replication_slot"))
    )


# User functions the catalog marks VOLATILE.  The monitor runs this and passes
# volatile_function_names(rows) to Classifier.set_volatile_functions.
VOLATILE_FUNCTIONS_SQL = """\
SELECT n.nspname, p.proname
FROM pg_catalog.pg_proc AS p
JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
WHERE p.provolatile = 'v'
  AND p.prokind <> 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
ORDER BY 1, 2"""


def volatile_function_names(rows: Iterable[tuple[str, str] | Any]) -> frozenset[str]:
    """(nspname, proname) rows -> {"schema.func", "func", ...}, lowercased."""
    out: set[str] = set()
    for nsp, pro in rows:
        nsp, pro = str(nsp).lower(), str(pro).lower()
        out.add(pro)
        out.add(f"{nsp}.{pro}")
    return frozenset(out)


# --------------------------------------------------------------------------------------
# Cheap string checks (no pglast).

_HINT_RE = re.compile(r"[ \t\n\r\f\v]*/\*[ \t\n\r\f\v]*pgsplit:(primary|replica)[ \t\n\r\f\v]*\*/")


def parse_hint(sql: str) -> Route | None:
    """The routing hint of a leading ``/* pgsplit:primary */`` / ``/* pgsplit:replica */``."""
    if "pgsplit:" not in sql:
        return None
    m = _HINT_RE.match(sql)
    if m is None:
        return None
    return Route.WRITE if m.group(1) == "primary" else Route.READ


# PostgreSQL identifier characters: [A-Za-z0-9_$] and every byte >= 0x80.
_PF_START = re.compile(r"[ \t\n\r\f\v]*select(?![A-Za-z0-9_$\x80-\U0010ffff])", re.I | re.A)
# INTO / FOR as a word.  The left boundary lets a digit or "$" precede the keyword
# (older servers lex "1into" as "1 into"); only run when the substring is present.
_PF_WORDS = re.compile(
    r"(?<![A-Za-z_\x80-\U0010ffff])(?:into|for)(?![A-Za-z0-9_$\x80-\U0010ffff])", re.I | re.A
)
_PG_SPACE = " \t\n\r\f\v"


def _mentions_sync_commit(sql: str) -> bool:
    return "synchronous_commit" in sql.lower()


_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
# Identifier characters -> "a", digits -> "0": b"a0" then finds a digit inside a name (t1).
_NAME_OR_DIGIT = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_0123456789", b"a" * 53 + b"0" * 10
)


def literal_shape(sql: str) -> bytes | None:
    """``sql`` with the text of every string constant removed and every digit of a
    number made 0 (``aid = 74353`` -> ``aid = 00000``), or None when a plain look at
    the text cannot tell constants from the rest.

    Two texts with the same shape differ only in constant values, so an analysis that
    does not depend on constants (what the fingerprint cache keeps) serves both; the
    shape costs two byte translations instead of pglast's fingerprint (a parse). Declined:
    anything but ASCII, quoted identifiers, comments, dollar quotes and ``$n``,
    backslash escapes, Unicode escapes (``U&``), NUL, an odd number of ``'``, and a
    digit right after a name character (``t1``, ``int4``, ``1e5``), which would make
    names or exponents look like numbers.
    """
    if (not sql.isascii() or '"' in sql or "$" in sql or "\\" in sql or "--" in sql or "/*" in sql
            or "&" in sql or "\x00" in sql):
        return None
    text = sql.encode()
    if "'" in sql:
        parts = text.split(b"'")  # outside, string, outside... ('' inside a string too)
        if not len(parts) & 1:
            return None
        text = b"''".join(parts[0::2])
    if b"a0" in text.translate(_NAME_OR_DIGIT):
        return None
    return text.translate(_DIGITS_TO_ZERO)


def is_trivial_select(sql: str) -> bool:
    """True if ``sql`` can only be a plain read (or a syntax error), without parsing.

    It starts with the keyword SELECT and has no "(", no ";" except a trailing one, no
    comment, and no INTO/FOR word: so it is one SELECT with no function call (every
    call needs a parenthesis; the no-parenthesis SQL functions such as CURRENT_USER do
    not write), no locking clause, no INTO and no CTE.  The checks look at the raw
    text, quotes included, so a string or quoted identifier can only make it decline.
    A text that passes but does not parse goes to a replica, which answers the same
    syntax error the primary would (an odd number of quote characters, the commonest
    such mistake, is declined).
    """
    head = sql[:7]
    if head[:6].lower() == "select":  # fast path: no leading whitespace
        c = head[6:]
        if c and (c.isalnum() or c in "_$" or c >= "\x80"):
            return False
    elif _PF_START.match(sql) is None:
        return False
    if "(" in sql or "/*" in sql or "--" in sql or "\x00" in sql:
        return False
    semi = sql.find(";")
    if semi >= 0 and sql[semi + 1 :].strip(_PG_SPACE):
        return False
    if sql.count("'") & 1 or sql.count('"') & 1:
        return False
    low = sql.lower()
    if ("into" in low or "for" in low) and _PF_WORDS.search(sql) is not None:
        return False
    return True


# --------------------------------------------------------------------------------------
# JSON tree helpers.

_DML = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE", "MergeStmt": "MERGE"}
_LOCK_REASON = {
    "LCS_FORUPDATE": "SELECT FOR UPDATE",
    "LCS_FORNOKEYUPDATE": "SELECT FOR NO KEY UPDATE",
    "LCS_FORSHARE": "SELECT FOR SHARE",
    "LCS_FORKEYSHARE": "SELECT FOR KEY SHARE",
}
_TX_KIND = {
    "TRANS_STMT_BEGIN": TxControl.BEGIN,
    "TRANS_STMT_START": TxControl.BEGIN,
    "TRANS_STMT_COMMIT": TxControl.COMMIT,
    "TRANS_STMT_ROLLBACK": TxControl.ROLLBACK,
    "TRANS_STMT_SAVEPOINT": TxControl.SAVEPOINT,
    "TRANS_STMT_RELEASE": TxControl.SAVEPOINT,
    "TRANS_STMT_ROLLBACK_TO": TxControl.SAVEPOINT,
    "TRANS_STMT_PREPARE": TxControl.PREPARE_TRANSACTION,
    "TRANS_STMT_COMMIT_PREPARED": TxControl.PREPARE_TRANSACTION,
    "TRANS_STMT_ROLLBACK_PREPARED": TxControl.PREPARE_TRANSACTION,
}
_TX_WRITE_REASON = {
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
_REASONS = {
    "CallStmt": "CALL",
    "DoStmt": "DO",
    "LockStmt": "LOCK",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "NotifyStmt": "NOTIFY",
    "VacuumStmt": "VACUUM/ANALYZE",
    "ClusterStmt": "CLUSTER",
    "ReindexStmt": "REINDEX",
    "CheckPointStmt": "CHECKPOINT",
    "GrantStmt": "GRANT/REVOKE",
    "GrantRoleStmt": "GRANT/REVOKE role",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "TruncateStmt": "TRUNCATE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "FetchStmt": "FETCH/MOVE",
    "ClosePortalStmt": "CLOSE",
    "ExecuteStmt": "EXECUTE",
    "LoadStmt": "LOAD",
    "AlterSystemStmt": "ALTER SYSTEM",
}
_SESSION_CHARACTERISTICS = {
    "transaction_read_only": "default_transaction_read_only",
    "transaction_isolation": "default_transaction_isolation",
    "transaction_deferrable": "default_transaction_deferrable",
}
_WALK_MARKERS = ('"FuncCall"', '"lockingClause"', '"intoClause"', '"ExecuteStmt"')
_CURSOR_OPT_HOLD = 0x20
# Statement types whose analysis may be cached by fingerprint.  The fingerprint ignores
# constants and several names (BEGIN READ ONLY = BEGIN READ WRITE, UNLISTEN a =
# UNLISTEN *, CLOSE a = CLOSE ALL, EXECUTE a = EXECUTE b, SET x = 1 = SET x = 2...),
# so only the query statements are cached that way: their answer depends on node
# types, function names, locking strength and relpersistence, which it keeps.  Those
# are also the statements that simple-protocol clients send with inlined literals.
_FP_SAFE = frozenset(
    {"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "CallStmt", "DeclareCursorStmt"}
)
_FALSE_WORDS = frozenset({"false", "off", "0", "no", "n", "f"})
# A SelectStmt with only these keys evaluates its target list exactly once.
_SELECT_ONCE = frozenset({"targetList", "limitOption", "op"})


def _const_value(node: Any) -> str | None:
    """A_Const / Integer / Float / String / Boolean node -> str (None if not a constant)."""
    if type(node) is not dict:
        return None
    c = node.get("A_Const")
    if c is not None:
        if "sval" in c:
            return str(c["sval"].get("sval", ""))
        if "ival" in c:
            return str(c["ival"].get("ival", 0))  # 0 is encoded as {"ival": {}}
        if "fval" in c:
            return str(c["fval"].get("fval", "0"))
        if "boolval" in c:
            return "true" if c["boolval"].get("boolval") else "false"
        return None  # NULL
    if "String" in node:
        return str(node["String"].get("sval", ""))
    if "Integer" in node:
        return str(node["Integer"].get("ival", 0))
    if "Float" in node:
        return str(node["Float"].get("fval", "0"))
    if "Boolean" in node:
        return "true" if node["Boolean"].get("boolval") else "false"
    return None


def _render_args(args: Any) -> str | None:
    if not args:
        return None
    parts = []
    for a in args:
        v = _const_value(a)
        if v is None:
            return None
        parts.append(v)
    return ", ".join(parts)


def _truthy(node: Any) -> bool:
    """A DefElem argument as PostgreSQL's defGetBoolean reads it; no argument = true.

    Anything unrecognised counts as true (the conservative answer for ANALYZE and
    READ ONLY alike is decided by the caller)."""
    if node is None:
        return True
    v = _const_value(node)
    if v is None:
        return True
    return v.strip().lower() not in _FALSE_WORDS


def _tx_read_only(options: Any) -> bool:
    """Last transaction_read_only option wins (START TRANSACTION READ ONLY, READ WRITE)."""
    ro = False
    for opt in options or ():
        d = opt.get("DefElem") if type(opt) is dict else None
        if d is not None and d.get("defname") == "transaction_read_only":
            v = _const_value(d.get("arg"))
            ro = v is not None and v not in ("0", "false", "off")
    return ro


def _is_temp_rangevar(rv: Any) -> bool:
    if type(rv) is not dict:
        return False
    if rv.get("relpersistence") == "t":
        return True
    sn = rv.get("schemaname")
    return bool(sn) and str(sn).lower().startswith("pg_temp")


def _mentions_temp(node: Any) -> bool:
    """Any TEMP relation or pg_temp-qualified object in a (DDL) tree."""
    stack = [node]
    while stack:
        x = stack.pop()
        if type(x) is dict:
            if x.get("relpersistence") == "t":
                return True
            sn = x.get("schemaname")
            if type(sn) is str and sn.lower().startswith("pg_temp"):
                return True
            s = x.get("String")
            if type(s) is dict:
                sv = s.get("sval")
                if type(sv) is str and (sv == "pg_temp" or sv.startswith("pg_temp_")):
                    return True
            stack.extend(v for v in x.values() if type(v) is dict or type(v) is list)
        elif type(x) is list:
            stack.extend(x)
    return False


def _set_config(fc: dict[str, Any], acc: "_Acc") -> None:
    """set_config(name, value, is_local): with is_local false the setting outlives the
    transaction. Carried like a SET (replayed as this call) when its arguments are
    constants and it runs exactly once; otherwise the session is pinned. With is_local
    true it ends with the transaction, like SET LOCAL."""
    acc.const_dep = True  # is_local true / false share a fingerprint
    args = fc.get("args") or ()
    if len(args) != 3:
        return  # no such function in pg_catalog: PostgreSQL refuses the call
    name, value, local = (_const_value(a) for a in args)
    if local is not None and local.strip().lower() in ("true", "t", "on", "1", "yes", "y"):
        return
    at = next((i for i, f in enumerate(acc.once) if f is fc), None)
    if local is None or name is None or value is None or at is None:
        acc.pins.add(Pin.SESSION_STATE)
        return
    text = f"SELECT pg_catalog.set_config({_quote(name)}, {_quote(value)}, false)"
    acc.once_effects.append((at, SessionEffect("set", name.strip().lower(), value, text)))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_statement(text: str) -> str:
    """Strip whitespace and leading/trailing comments from one statement's text."""
    s = text.strip()
    if "--" not in s and "/*" not in s:
        return s
    try:
        toks = _pg.scan(s)
    except Exception:
        return s
    toks = [t for t in toks if t.name not in ("SQL_COMMENT", "C_COMMENT")]
    if not toks:
        return s
    # scan() reports character offsets, end inclusive.
    return s[toks[0].start : toks[-1].end + 1]


class _Acc:
    """Accumulates findings over the statements of one text."""

    __slots__ = (
        "reason", "tx", "effects", "pins", "unpins", "executes", "copy_in", "const_dep",
        "need_walk", "need_walk_select", "once", "once_effects",
    )

    def __init__(self) -> None:
        self.reason: str | None = None
        self.tx: TxControl | None = None
        self.effects: list[SessionEffect] = []
        self.pins: set[Pin] = set()
        self.unpins: set[Unpin] = set()
        self.executes: list[str] = []
        self.copy_in = False
        self.const_dep = False  # the answer depends on a constant the fingerprint ignores
        self.need_walk = True  # some FuncCall / lockingClause / intoClause / ExecuteStmt exists
        self.need_walk_select = True  # ... or a DML node (writable CTE)
        self.once: tuple[Any, ...] = ()  # FuncCall nodes that run exactly once (a FROM-less SELECT's targets)
        self.once_effects: list[tuple[int, SessionEffect]] = []  # their effects, by position

    def write(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def set_tx(self, tx: TxControl) -> None:
        if self.tx is None:
            self.tx = tx


# Function lookup result: (write reason or None, pin or None, unpin or None)
_FuncInfo = tuple[str | None, Pin | None, Unpin | None]
_NO_FUNC: _FuncInfo = (None, None, None)

_PLAIN_READ = Analysis(route=Route.READ)
_EMPTY = Analysis(route=Route.READ, statements=0)
_MAX_TEXT_KEY = 16384  # longer texts are cached by fingerprint only


class Classifier:
    """Classifies SQL text; caches by exact text and by fingerprint (bounded LRUs).

    Not thread-safe (one per event loop is the intended use)."""

    def __init__(self, cache_size: int = 10000, volatile_functions: frozenset[str] = frozenset()) -> None:
        self.version = 0  # bumped whenever the analyses it gives may change
        self._cache_size = max(0, int(cache_size))
        self._text: OrderedDict[str, Analysis] = OrderedDict()
        self._fp: OrderedDict[str, Analysis] = OrderedDict()
        self._shape: OrderedDict[bytes, Analysis] = OrderedDict()  # by literal_shape
        self._volatile: frozenset[str] = frozenset(n.lower() for n in volatile_functions)
        self._funcs: dict[tuple[str, ...], _FuncInfo] = {}
        self._text_hits = self._fp_hits = self._pf_hits = self._shape_hits = self._misses = 0

    # -- configuration -----------------------------------------------------------------

    @property
    def volatile_functions(self) -> frozenset[str]:
        return self._volatile

    def set_volatile_functions(self, names: frozenset[str] | Iterable[str]) -> None:
        """Replace the user-volatile function set ("schema.func" and bare "func").

        Clears the caches when the set actually changes (a periodic refresh that finds
        the same functions keeps them)."""
        new = frozenset(n.lower() for n in names)
        if new == self._volatile:
            return
        self._volatile = new
        self.version += 1  # callers that memoise analyses compare it
        self.clear_cache()

    def clear_cache(self) -> None:
        self._text.clear()
        self._fp.clear()
        self._shape.clear()
        self._funcs.clear()

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._text_hits, self._fp_hits, self._pf_hits, self._misses, len(self._text), len(self._fp),
                         self._shape_hits, len(self._shape))

    # -- the hot path --------------------------------------------------------------------

    def classify(self, sql: str) -> Analysis:
        text_cache = self._text
        a = text_cache.get(sql)
        if a is not None:
            text_cache.move_to_end(sql)
            self._text_hits += 1
            return a
        if is_trivial_select(sql):  # no comment, so no hint either
            self._pf_hits += 1
            return _PLAIN_READ
        # Simple protocol inlines constants: the same statement comes back with new ones.
        shape = literal_shape(sql) if len(sql) <= _MAX_TEXT_KEY else None  # keys stay small
        if shape is not None:
            base = self._shape.get(shape)
            if base is not None:
                self._shape.move_to_end(shape)
                self._shape_hits += 1
                return self._reuse(base, sql, None)  # no comment, so no hint either
        # The text cache key is the whole text, so it already accounts for the hint;
        # the fingerprint ignores comments, so the hint is applied on top of it.
        hint = parse_hint(sql)
        try:
            # pglast stops at a NUL byte, so "SELECT 1\0; DROP TABLE t" would look
            # like "SELECT 1": never fingerprint such a text (_analyze rejects it).
            fp: str | None = None if "\x00" in sql else _pg.fingerprint(sql)
        except Exception:
            fp = None  # the full analysis below reports the parse error
        if fp is not None:
            base = self._fp.get(fp)
            if base is not None:
                self._fp.move_to_end(fp)
                self._fp_hits += 1
                self._remember_shape(shape, base)
                return self._reuse(base, sql, hint)
        self._misses += 1
        base, fp_ok = self._analyze(sql)
        size = self._cache_size
        if size:
            if fp is not None and fp_ok:
                self._fp[fp] = base
                if len(self._fp) > size:
                    self._fp.popitem(last=False)
                self._remember_shape(shape, base)
        final = base if hint is None else replace(base, hint=hint)
        if size and len(sql) <= _MAX_TEXT_KEY:
            text_cache[sql] = final
            if len(text_cache) > size:
                text_cache.popitem(last=False)
        return final

    @staticmethod
    def _reuse(base: Analysis, sql: str, hint: Route | None) -> Analysis:
        """A cached analysis of another text with the same fingerprint (or shape), for
        `sql`. Constants are in neither: set_config('synchronous_commit', ...) and
        set_config('work_mem', ...) share both. Look at this text."""
        sync = _mentions_sync_commit(sql)
        if hint is None and sync == base.mentions_sync_commit:
            return base
        return replace(base, hint=hint, mentions_sync_commit=sync)

    def _remember_shape(self, shape: bytes | None, base: Analysis) -> None:
        """Keep an analysis the fingerprint cache holds (so it does not depend on
        constants) under the text's `literal_shape` too."""
        if shape is not None and self._cache_size:
            self._shape[shape] = base
            if len(self._shape) > self._cache_size:
                self._shape.popitem(last=False)

    def analyze_uncached(self, sql: str) -> Analysis:
        """Full analysis: no cache, no prefilter (for tests and debugging)."""
        base, _ = self._analyze(sql)
        hint = parse_hint(sql)
        return base if hint is None else replace(base, hint=hint)

    # -- full analysis -------------------------------------------------------------------

    def _analyze(self, sql: str) -> tuple[Analysis, bool]:
        """-> (analysis without hint, may be cached by fingerprint)."""
        base, fp_ok = self._analyze_text(sql)
        if _mentions_sync_commit(sql):
            base = replace(base, mentions_sync_commit=True)
        return base, fp_ok

    def _analyze_text(self, sql: str) -> tuple[Analysis, bool]:
        if "\x00" in sql:  # PostgreSQL rejects it too; pglast would silently truncate
            return Analysis(route=Route.WRITE, parse_error=True, reason="parse error (NUL in text)"), False
        try:
            js = _pg.parse_sql_json(sql)
            tree = json.loads(js)
        except _pg.ParseError:
            return Analysis(route=Route.WRITE, parse_error=True, reason="parse error"), False
        except Exception as exc:  # e.g. UnicodeEncodeError on lone surrogates, RecursionError
            return Analysis(route=Route.WRITE, parse_error=True, reason=f"parse error ({type(exc).__name__})"), False
        try:
            return self._analyze_tree(sql, tree, js)
        except Exception as exc:  # never raise on the hot path; unknown shapes go to the primary
            return Analysis(route=Route.WRITE, parse_error=True, reason=f"analysis error ({type(exc).__name__})"), False

    def _analyze_tree(self, sql: str, tree: dict[str, Any], js: str) -> tuple[Analysis, bool]:
        stmts = tree.get("stmts") or []
        if not stmts:
            return _EMPTY, True
        acc = _Acc()
        # The tree walk is the costly part of a miss; JSON keys appear verbatim in the
        # text, so when none of the nodes it looks for occurs anywhere, it is skipped.
        acc.need_walk = any(m in js for m in _WALK_MARKERS)
        acc.need_walk_select = acc.need_walk or any(m in js for m in _DML)
        encoded: list[bytes] = []
        fp_ok = True

        for raw in stmts:
            (ntype, body), = raw["stmt"].items()
            if ntype not in _FP_SAFE:
                fp_ok = False

            def text_of(raw: dict[str, Any] = raw) -> str:
                loc = raw.get("stmt_location", 0)
                ln = raw.get("stmt_len", 0)
                if sql.isascii():
                    s = sql[loc : loc + ln] if ln else sql[loc:]
                else:  # libpg_query offsets are byte offsets into the UTF-8 text
                    if not encoded:
                        encoded.append(sql.encode("utf-8"))
                    b = encoded[0]
                    s = (b[loc : loc + ln] if ln else b[loc:]).decode("utf-8", "replace")
                return _clean_statement(s)

            self._stmt(ntype, body, acc, text_of)

        route = Route.WRITE if acc.reason is not None else Route.READ
        a = Analysis(
            route=route,
            tx=acc.tx,
            effects=tuple(acc.effects),
            pins=frozenset(acc.pins),
            unpins=frozenset(acc.unpins),
            statements=len(stmts),
            executes=tuple(acc.executes),
            is_copy_in=acc.copy_in,
            reason=acc.reason or "",
        )
        fp_ok = fp_ok and not (acc.const_dep or acc.effects or acc.executes)
        return a, fp_ok

    def _stmt(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: Callable[[], str] | None) -> None:
        """One statement node (``ntype`` is the JSON key, e.g. "SelectStmt")."""
        if ntype == "SelectStmt":
            if acc.need_walk_select:
                if text_of is not None and _SELECT_ONCE.issuperset(body) and body.get("op") == "SETOP_NONE":
                    acc.once = tuple(t["ResTarget"].get("val", {}).get("FuncCall")
                                     for t in body.get("targetList") or () if "ResTarget" in t)
                self._walk(body, acc)
                if acc.once_effects:  # in the order PostgreSQL evaluates them (the walk is not)
                    acc.effects.extend(e for _, e in sorted(acc.once_effects, key=lambda x: x[0]))
                    acc.once_effects = []
                acc.once = ()
        elif ntype in _DML:
            acc.write(_DML[ntype])
            if acc.need_walk:
                self._walk(body, acc)
        elif ntype == "TransactionStmt":
            self._transaction(body, acc)
        elif ntype == "VariableSetStmt":
            self._variable_set(body, acc, text_of)
        elif ntype == "VariableShowStmt":
            name = str(body.get("name", "")).lower()
            if name.startswith("pgsplit.") and text_of is not None:
                acc.effects.append(SessionEffect("pgsplit_show", name[8:], None, text_of()))
        elif ntype == "ExplainStmt":
            self._explain(body, acc)
        elif ntype == "CopyStmt":
            self._copy(body, acc)
        elif ntype == "PrepareStmt":
            (qtype, qbody), = body["query"].items()
            self._stmt(qtype, qbody, acc, None)  # route (and pins) of the prepared query
            if text_of is not None:
                acc.effects.append(SessionEffect("prepare", body.get("name"), None, text_of()))
        elif ntype == "ExecuteStmt":
            acc.write("EXECUTE")
            acc.executes.append(str(body.get("name", "")))
            self._walk(body, acc)  # parameters may call functions
        elif ntype == "DeallocateStmt":
            if text_of is not None:
                name = body.get("name")
                if body.get("isall") or name is None:
                    acc.effects.append(SessionEffect("deallocate_all", None, None, text_of()))
                else:
                    acc.effects.append(SessionEffect("deallocate", name, None, text_of()))
        elif ntype == "DiscardStmt":
            target = body.get("target")
            if target == "DISCARD_ALL":
                acc.unpins.add(Unpin.DISCARD_ALL)
                if text_of is not None:
                    acc.effects.append(SessionEffect("discard_all", None, None, text_of()))
            elif target == "DISCARD_TEMP":
                acc.unpins.add(Unpin.DISCARD_TEMP)
        elif ntype == "DeclareCursorStmt":
            if int(body.get("options", 0)) & _CURSOR_OPT_HOLD:
                acc.write("DECLARE WITH HOLD")
                acc.pins.add(Pin.HOLD_CURSOR)
            q = body.get("query")
            if q:
                (qtype, qbody), = q.items()
                self._stmt(qtype, qbody, acc, None)
        elif ntype == "ListenStmt":
            acc.write("LISTEN")
            acc.pins.add(Pin.LISTEN)
        elif ntype == "UnlistenStmt":
            acc.write("UNLISTEN")
            if not body.get("conditionname"):
                acc.unpins.add(Unpin.UNLISTEN_ALL)
        elif ntype == "ClosePortalStmt":
            acc.write("CLOSE")
            if not body.get("portalname"):
                acc.unpins.add(Unpin.CLOSE_ALL)
        elif ntype == "CreateTableAsStmt":  # CREATE TABLE AS / MATERIALIZED VIEW: runs its query
            acc.write("CREATE TABLE AS")
            if _is_temp_rangevar((body.get("into") or {}).get("rel")):
                acc.pins.add(Pin.TEMP_TABLE)
            self._walk(body.get("query"), acc)
        elif ntype == "CallStmt":
            acc.write("CALL")
            self._walk(body, acc)  # arguments may call functions
        elif ntype == "LoadStmt":
            acc.write("LOAD")
            acc.pins.add(Pin.SESSION_STATE)  # a loaded library stays with the server session
        else:  # DDL and every other utility statement
            acc.write(_REASONS.get(ntype, ntype))
            if _mentions_temp(body):
                acc.pins.add(Pin.TEMP_TABLE)

    def _transaction(self, body: dict[str, Any], acc: _Acc) -> None:
        kind = body.get("kind")
        tx = _TX_KIND.get(kind, TxControl.OTHER)  # type: ignore[arg-type]
        if tx is TxControl.BEGIN:
            options = body.get("options")
            if options:
                acc.const_dep = True  # BEGIN READ ONLY / READ WRITE share a fingerprint
                if _tx_read_only(options):
                    tx = TxControl.BEGIN_READ_ONLY
        elif tx is TxControl.PREPARE_TRANSACTION:
            acc.write(_TX_WRITE_REASON.get(kind, "PREPARE TRANSACTION"))  # type: ignore[arg-type]
        acc.set_tx(tx)

    def _variable_set(self, body: dict[str, Any], acc: _Acc, text_of: Callable[[], str] | None) -> None:
        kind = body.get("kind")
        name = str(body.get("name") or "").lower()
        local = bool(body.get("is_local"))
        acc.const_dep = True  # SET x = 1 / SET x = 2 share a fingerprint
        if kind == "VAR_SET_MULTI":
            args = body.get("args")
            if name == "transaction":
                acc.set_tx(TxControl.SET_TX_READ_ONLY if _tx_read_only(args) else TxControl.OTHER)
            elif name == "transaction snapshot":
                acc.set_tx(TxControl.OTHER)
            elif name == "session characteristics" and not local and text_of is not None:
                text = text_of()
                for opt in args or ():
                    d = opt.get("DefElem") if type(opt) is dict else None
                    if d is None:
                        continue
                    guc = _SESSION_CHARACTERISTICS.get(str(d.get("defname")))
                    if guc is None:
                        continue
                    v = _const_value(d.get("arg"))
                    if guc != "default_transaction_isolation" and v is not None:
                        v = "off" if v in ("0", "false", "off") else "on"
                    acc.effects.append(SessionEffect("set", guc, v, text))
            return
        if text_of is None:
            return
        if kind == "VAR_RESET_ALL":
            acc.effects.append(SessionEffect("reset_all", None, None, text_of()))
            return
        if local:
            return  # SET LOCAL ends with the transaction (SET LOCAL pgsplit.* goes to the server as is)
        if name.startswith("pgsplit."):
            short = name[8:]
            if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
                acc.effects.append(SessionEffect("pgsplit_reset", short, None, text_of()))
            else:
                acc.effects.append(SessionEffect("pgsplit_set", short, _render_args(body.get("args")), text_of()))
            return
        if kind == "VAR_RESET":
            acc.effects.append(SessionEffect("reset", name, None, text_of()))
        else:  # VAR_SET_VALUE, VAR_SET_DEFAULT, VAR_SET_CURRENT
            value = _render_args(body.get("args")) if kind == "VAR_SET_VALUE" else None
            acc.effects.append(SessionEffect("set", name, value, text_of()))

    def _explain(self, body: dict[str, Any], acc: _Acc) -> None:
        analyze = False
        for opt in body.get("options") or ():
            d = opt.get("DefElem") if type(opt) is dict else None
            if d is not None and str(d.get("defname")).lower() == "analyze":
                if d.get("arg") is not None:
                    acc.const_dep = True
                analyze = _truthy(d.get("arg"))  # the last one wins, as in PostgreSQL
        q = body.get("query")
        if not q:
            return
        (qtype, qbody), = q.items()
        if analyze:  # the statement runs
            self._stmt(qtype, qbody, acc, None)
            return
        # Only planned: READ, but an EXECUTE still needs its prepared statement.
        if qtype == "ExecuteStmt":
            acc.executes.append(str(qbody.get("name", "")))
        elif qtype == "CreateTableAsStmt":
            inner = (qbody.get("query") or {}).get("ExecuteStmt")
            if inner is not None:
                acc.executes.append(str(inner.get("name", "")))

    def _copy(self, body: dict[str, Any], acc: _Acc) -> None:
        to_file = bool(body.get("filename")) or bool(body.get("is_program"))
        if body.get("is_from"):
            acc.write("COPY FROM")
            if not to_file:
                acc.copy_in = True
            return
        if to_file:
            acc.write("COPY TO file/program")  # writes a file on the server it runs on
        q = body.get("query")
        if q:
            (qtype, qbody), = q.items()
            self._stmt(qtype, qbody, acc, None)

    def _walk(self, node: Any, acc: _Acc) -> None:
        """Scan an executed query tree for writing functions, locking clauses, SELECT
        INTO, data-modifying CTEs and EXECUTE (iterative: no recursion limit)."""
        if node is None:
            return
        stack = [node]
        pop, push = stack.pop, stack.append
        while stack:
            x = pop()
            if type(x) is list:
                stack.extend(x)
                continue
            if type(x) is not dict:
                continue
            for k, v in x.items():
                tv = type(v)
                if tv is dict:
                    if k == "FuncCall":
                        self._func(v, acc)
                    elif k in _DML:
                        acc.write(f"writable CTE ({_DML[k]})")
                    elif k == "intoClause":
                        acc.write("SELECT INTO")
                        if _is_temp_rangevar(v.get("rel")):
                            acc.pins.add(Pin.TEMP_TABLE)
                    elif k == "ExecuteStmt":
                        acc.executes.append(str(v.get("name", "")))
                    push(v)
                elif tv is list:
                    if k == "lockingClause" and v:
                        lc = v[0].get("LockingClause", {}) if type(v[0]) is dict else {}
                        acc.write(_LOCK_REASON.get(lc.get("strength", ""), "SELECT FOR UPDATE"))
                    push(v)

    def _func(self, fc: dict[str, Any], acc: _Acc) -> None:
        names = tuple(
            str(n["String"].get("sval", "")).lower() if type(n) is dict and "String" in n else ""
            for n in fc.get("funcname") or ()
        )
        if names and names[-1] == "set_config":
            _set_config(fc, acc)
        info = self._funcs.get(names)
        if info is None:
            info = self._func_info(names)
            if len(self._funcs) < 65536:
                self._funcs[names] = info
        reason, pin, unpin = info
        if reason is not None:
            acc.write(reason)
        if pin is not None:
            acc.pins.add(pin)
        if unpin is not None:
            acc.unpins.add(unpin)

    def _func_info(self, names: tuple[str, ...]) -> _FuncInfo:
        if not names:
            return _NO_FUNC
        bare = names[-1]
        schema = names[-2] if len(names) >= 2 else None
        # Builtin writers match whatever the schema (pg_catalog.nextval, but also a
        # same-named function elsewhere: the conservative answer).
        if _is_builtin_writer(bare):
            pin = Pin.ADVISORY_LOCK if bare in _SESSION_ADVISORY_LOCKS else None
            if bare in _SESSION_STATE_FUNCTIONS or (bare.startswith("pg_create_") and bare.endswith("_slot")):
                # (a replication slot may be temporary: it lives as long as the server session)
                pin = Pin.SESSION_STATE
            unpin = Unpin.ADVISORY_UNLOCK_ALL if bare == "pg_advisory_unlock_all" else None
            return (f"function {bare}", pin, unpin)
        vol = self._volatile
        if vol and schema != "pg_catalog":
            if schema is not None and f"{schema}.{bare}" in vol:
                return (f"volatile function {schema}.{bare}", None, None)
            if bare in vol:  # unqualified call, or a same-named volatile function elsewhere
                return (f"volatile function {bare}", None, None)
        return _NO_FUNC
