# C types for the per-unit counters (Cython pure-Python mode, setup.py): every unit is
# recorded here.
import cython

cdef class FastHistogram:
    cdef public tuple bounds
    cdef public list counts
    cdef public double total
    cdef public Py_ssize_t count
    cpdef observe(self, double value)

cdef class UnitStats:
    cdef public dict units, durations, consistency, databases
    @cython.locals(hist=FastHistogram, units=dict)
    cpdef record(self, backend, role, kind, double seconds)
