# C types for proxy/server/replies.py, compiled by Cython in pure-Python mode (setup.py).
# Steps and the reply half of a server connection become C structs: the reply loop reads
# their fields without a dictionary lookup, and frames with C integers.
import cython

# (module-level cdef names are C variables: compiled, Python does not see them)
cdef bytes SPECIAL, COMPLETES
cdef int _Z, _E, _S, _D, _G, _A
cdef object _FORWARD, _SWALLOW, _LOCAL

cdef class Step:
    cdef public object kind
    cdef public int status
    cdef public bint closed
    cdef public object error, callback
    cdef public double t0

cdef class ForwardStep(Step):
    cdef public Py_ssize_t done, sent, delivered, skip
    cdef public object edits, parses, closes, retry, retry_reason, backend, role, analyses
    cdef public bint extended, rows_seen, rows_out, retrying, cancelled, quiet_ready, left_open, writes

cdef class SwallowStep(Step):
    cdef public object rows, lsn, server

cdef class LocalStep(Step):
    cdef public object payload

cdef class ReplyStream:
    cdef dict __dict__  # the rest of a ServerConnection's fields
    cdef public object steps, params, owner, _write
    cdef public int status
    cdef public bint copy_in_absorb
    cdef public bytes _held
    cdef public Py_ssize_t _skip

    @cython.locals(n=Py_ssize_t, pos=Py_ssize_t, end=Py_ssize_t, emit=Py_ssize_t, t=int, step=Step, fwd=ForwardStep)
    cpdef data_received(self, bytes data)
    cdef _to_client(self, bytes data, ForwardStep step)
    cdef _emit_inserts(self, ForwardStep step)
    cdef Step _next_step(self, bytes data, Py_ssize_t pos, Py_ssize_t n)
