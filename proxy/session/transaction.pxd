# C types for the session's transaction (Cython pure-Python mode, setup.py): the session
# reads `status` and `deferred_begin` at every unit.
cdef class Transaction:
    cdef dict __dict__
    cdef public object phase, deferred_begin, aborted
    cdef public int status
    cdef public bint wrote, names_sync_commit, failed, changed_schema
    cdef public list effects
    cpdef ready(self, int status)
