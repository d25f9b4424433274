from proxy.server.replies cimport ForwardStep
from proxy.session.statements cimport Statements

cdef class Forwarding(Statements):
    cpdef ForwardStep _new_step(self)
