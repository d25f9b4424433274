from proxy.session.recovery cimport Recovery

cdef class Statements(Recovery):
    pass
