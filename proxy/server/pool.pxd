# C types for the pool (Cython pure-Python mode, setup.py): every unit borrows and gives
# back a connection.
cdef class Pool:
    cdef dict __dict__
    cdef public object address, user, database, _credential, settings, own_size, generation
    cdef public object _lifetime, _on_connect, evictions, statement_names, timeouts, waiters
    cdef public list idle
    cdef public set busy
    cdef public Py_ssize_t opening
    cdef public bint closed
    cpdef try_acquire(self)
    cpdef release(self, conn)
