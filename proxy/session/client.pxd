from proxy.session.routing cimport Routing

cdef class ClientSession(Routing):
    pass
