# C types for the client session (Cython pure-Python mode, setup.py). The session is one
# chain of classes, ByteStream <- Attachment <- Recovery <- Statements <- Forwarding <-
# Routing <- ClientSession (a C type has one base); its fields are declared here, at the
# root, so every part reads them as C fields. `__dict__` keeps any other attribute working.

from metrics.units cimport UnitStats
from proxy.session.transaction cimport Transaction

cdef class ByteStream:
    cdef dict __dict__
    cdef public object host, transport, state, peer, user, database, process_id, secret_key
    cdef public bint tls, route_primary
    cdef public Transaction tx
    cdef public object carried, token, server, backend, inbox
    cdef public dict owned
    cdef public Py_ssize_t units
    cdef public bytes _stash
    cdef public list _parts
    cdef public Py_ssize_t _missing, _skip, _retry_skip, _memo_version
    cdef public object _skip_to, _open, _routing, _unnamed, _retry_data, _group_error
    cdef public bint _fresh, _bound_copy, _copy_done, _force_primary_next, _cancel_pending, _lsn_after
    cdef public bint _skip_to_sync, _write_paused
    cdef public set _pause_reasons
    cdef public object _memo_sql, _memo_analysis, _close_reason, _unit_key, _handshake_task
    cdef public dict _pools
    cdef public UnitStats _unit_stats
    cdef public list _db_counters
    cdef public object connected_at, application_name, _write_waiter
