"""What a function call in a statement means for routing: writes, pins, unpins.

Owns: the builtin functions that write, need the primary's session or change server
state (`BUILTIN_WRITER_FUNCTIONS` and the prefixes beside it), the catalog query for the
user functions marked VOLATILE (`VOLATILE_FUNCTIONS_SQL`, run by router.monitor.catalog)
and `function_info`, the verdict on one called name.
Must not know: the JSON tree, caches (the tree walk caches verdicts per name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from router.classify.analysis import Pin, Unpin

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


# A function call's verdict: (write reason or None, pin or None, unpin or None)
FuncInfo = tuple[str | None, Pin | None, Unpin | None]
NO_FUNC: FuncInfo = (None, None, None)


def function_info(names: tuple[str, ...], volatile: frozenset[str]) -> FuncInfo:
    """The verdict on a call of `names` (the qualified name, lowercased), given the
    user functions the catalog marks volatile ("schema.func" and bare "func")."""
    if not names:
        return NO_FUNC
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
    if volatile and schema != "pg_catalog":
        if schema is not None and f"{schema}.{bare}" in volatile:
            return (f"volatile function {schema}.{bare}", None, None)
        if bare in volatile:  # unqualified call, or a same-named volatile function elsewhere
            return (f"volatile function {bare}", None, None)
    return NO_FUNC
