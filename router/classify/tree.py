"""The full analysis of one SQL text: pglast's JSON parse tree, walked.

Owns: parsing (`parse_sql_json`), the per-statement rules (one handler per statement node
type, looked up in a table), the scan of executed query trees for writing functions,
locking clauses, SELECT INTO, data-modifying CTEs and EXECUTE, and the decision whether
an answer may be cached by fingerprint.
Must not know: caches of analyses, hints, the prefilters (router.classify.classifier
consults those before it gets here). It is the costly tier: a parse and a walk per text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pglast import parser as _pg

from router.classify.analysis import Analysis, Pin, Route, SessionEffect, TxControl, Unpin
from router.classify.functions import FuncInfo, function_info
from router.classify.prefilter import mentions_sync_commit

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
# Utility statements that change the schema (pglast node names): CreateStmt, AlterTableStmt,
# DropStmt, RenameStmt, ViewStmt, CompositeTypeStmt, DefineStmt, CreateEnumStmt...
_DDL_PREFIXES = ("Create", "Alter", "Drop", "Rename", "View", "CompositeType", "Define")
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
        "need_walk", "need_walk_select", "once", "once_effects", "schema",
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
        self.schema = False  # DDL among the statements

    def write(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def set_tx(self, tx: TxControl) -> None:
        if self.tx is None:
            self.tx = tx



TextOf = Callable[[], str]  # the statement's own text, sliced on demand
_EMPTY = Analysis(route=Route.READ, statements=0)


class TreeAnalyzer:
    """Parses a text and walks its statements. Caches the verdict on each function name
    it meets (they depend only on the name and the volatile set it was built with)."""

    def __init__(self, volatile: frozenset[str] = frozenset()) -> None:
        self.volatile = volatile
        self._funcs: dict[tuple[str, ...], FuncInfo] = {}

    def clear_cache(self) -> None:
        self._funcs.clear()

    def analyze(self, sql: str) -> tuple[Analysis, bool]:
        """-> (analysis without hint, may be cached by fingerprint)."""
        base, fp_ok = self._analyze_text(sql)
        if mentions_sync_commit(sql):
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
            changes_schema=acc.schema,
        )
        fp_ok = fp_ok and not (acc.const_dep or acc.effects or acc.executes)
        return a, fp_ok

    def _stmt(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        """One statement node (``ntype`` is the JSON key, e.g. "SelectStmt"); `text_of`
        is None for a statement nested in another (EXPLAIN, PREPARE, COPY, DECLARE)."""
        self._STATEMENTS.get(ntype, TreeAnalyzer._utility)(self, ntype, body, acc, text_of)

    # -- one handler per statement node type (the table below the handlers) -------------

    def _select(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        if acc.need_walk_select:
            if text_of is not None and _SELECT_ONCE.issuperset(body) and body.get("op") == "SETOP_NONE":
                acc.once = tuple(t["ResTarget"].get("val", {}).get("FuncCall")
                                 for t in body.get("targetList") or () if "ResTarget" in t)
            self._walk(body, acc)
            if acc.once_effects:  # in the order PostgreSQL evaluates them (the walk is not)
                acc.effects.extend(e for _, e in sorted(acc.once_effects, key=lambda x: x[0]))
                acc.once_effects = []
            acc.once = ()

    def _dml(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write(_DML[ntype])
        if acc.need_walk:
            self._walk(body, acc)

    def _transaction(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
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

    def _variable_set(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
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


    def _variable_show(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        name = str(body.get("name", "")).lower()
        if name.startswith("pgsplit.") and text_of is not None:
            acc.effects.append(SessionEffect("pgsplit_show", name[8:], None, text_of()))

    def _explain(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
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

    def _copy(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
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


    def _prepare(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        (qtype, qbody), = body["query"].items()
        self._stmt(qtype, qbody, acc, None)  # route (and pins) of the prepared query
        if text_of is not None:
            acc.effects.append(SessionEffect("prepare", body.get("name"), None, text_of()))

    def _execute(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("EXECUTE")
        acc.executes.append(str(body.get("name", "")))
        self._walk(body, acc)  # parameters may call functions

    def _deallocate(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        if text_of is not None:
            name = body.get("name")
            if body.get("isall") or name is None:
                acc.effects.append(SessionEffect("deallocate_all", None, None, text_of()))
            else:
                acc.effects.append(SessionEffect("deallocate", name, None, text_of()))

    def _discard(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        target = body.get("target")
        if target == "DISCARD_ALL":
            acc.unpins.add(Unpin.DISCARD_ALL)
            if text_of is not None:
                acc.effects.append(SessionEffect("discard_all", None, None, text_of()))
        elif target == "DISCARD_TEMP":
            acc.unpins.add(Unpin.DISCARD_TEMP)

    def _declare_cursor(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        if int(body.get("options", 0)) & _CURSOR_OPT_HOLD:
            acc.write("DECLARE WITH HOLD")
            acc.pins.add(Pin.HOLD_CURSOR)
        q = body.get("query")
        if q:
            (qtype, qbody), = q.items()
            self._stmt(qtype, qbody, acc, None)

    def _listen(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("LISTEN")
        acc.pins.add(Pin.LISTEN)

    def _unlisten(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("UNLISTEN")
        if not body.get("conditionname"):
            acc.unpins.add(Unpin.UNLISTEN_ALL)

    def _close_portal(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("CLOSE")
        if not body.get("portalname"):
            acc.unpins.add(Unpin.CLOSE_ALL)

    def _create_table_as(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        # CREATE TABLE AS / MATERIALIZED VIEW: runs its query
        acc.write("CREATE TABLE AS")
        if _is_temp_rangevar((body.get("into") or {}).get("rel")):
            acc.pins.add(Pin.TEMP_TABLE)
        self._walk(body.get("query"), acc)

    def _call(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("CALL")
        self._walk(body, acc)  # arguments may call functions

    def _load(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        acc.write("LOAD")
        acc.pins.add(Pin.SESSION_STATE)  # a loaded library stays with the server session

    def _utility(self, ntype: str, body: dict[str, Any], acc: _Acc, text_of: TextOf | None) -> None:
        """DDL and every other utility statement."""
        acc.write(_REASONS.get(ntype, ntype))
        if ntype.startswith(_DDL_PREFIXES) and ntype != "AlterSystemStmt":
            acc.schema = True
        if _mentions_temp(body):
            acc.pins.add(Pin.TEMP_TABLE)

    _STATEMENTS: dict[str, Callable[[TreeAnalyzer, str, dict[str, Any], _Acc, TextOf | None], None]] = {
        "SelectStmt": _select,
        **dict.fromkeys(_DML, _dml),
        "TransactionStmt": _transaction,
        "VariableSetStmt": _variable_set,
        "VariableShowStmt": _variable_show,
        "ExplainStmt": _explain,
        "CopyStmt": _copy,
        "PrepareStmt": _prepare,
        "ExecuteStmt": _execute,
        "DeallocateStmt": _deallocate,
        "DiscardStmt": _discard,
        "DeclareCursorStmt": _declare_cursor,
        "ListenStmt": _listen,
        "UnlistenStmt": _unlisten,
        "ClosePortalStmt": _close_portal,
        "CreateTableAsStmt": _create_table_as,
        "CallStmt": _call,
        "LoadStmt": _load,
    }  # every other type: _utility

    # -- the scan of an executed query tree ------------------------------------------------

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
            info = function_info(names, self.volatile)
            if len(self._funcs) < 65536:
                self._funcs[names] = info
        reason, pin, unpin = info
        if reason is not None:
            acc.write(reason)
        if pin is not None:
            acc.pins.add(pin)
        if unpin is not None:
            acc.unpins.add(unpin)
